"""Replay tree-budget controllers offline on recorded draft trees (no model: seconds a run).

    python -m benchmarks.replay_controller record --datasets humaneval,gsm8k,mbpp --limit 6 --out traces.json
    python -m benchmarks.replay_controller replay traces.json --costs h200-fp32 \\
        --variants '{"adaptive": {}, "one-pool": {"request_prior": 0}}'
    python -m benchmarks.replay_controller replay n16.json n64.json n128.json ...  # own states

``record`` runs ``specdec.generate`` at one big fixed budget (``--nodes`` / ``--depth``,
default 128 / 8) and keeps, per step, where it started, the drafted tree (parents, depths)
and the accepted path. ``replay`` walks every prompt again under fixed budgets and
controllers: a step at position p takes the recorded tree whose start is nearest p, cut to
the step's budget (its first n nodes, none deeper than the cap: what a best-first drafter
gives a smaller budget) with the accepted path inside it, and costs what a cost model says
(verify curve + per-node host time + the rest of a step, with lognormal jitter), overlapped
with the verify on a GPU as ``generate`` does. An approximation -- the drafter's state
follows the recorded run, not the replayed one -- for comparing controller variants on real
acceptance streams (results relative to the best fixed budget), not for absolute tokens/s.

The drafter's state depends on the budgets played: token recycling refreshes one adjacency
row per verified node, so a 128-node run's trees cut to 16 nodes accept more than a 16-node
run's own trees (CPU, 36 code + math prompts: tau 2.41 vs 2.11; 64 nodes: 2.85 vs 2.74).
Given several recordings of the same prompts at different budgets, a step takes its tree
from the recording of the smallest budget that covers the arm played (its own state, when
that budget was recorded), so a controller sees the same biased view of smaller arms that
it sees in ``generate``, and a fixed budget that was recorded replays its own run.

A guide, not a verdict: it put per-context choices (``context_levels`` 3) 2-3% ahead of the
shipped controller on both cost models, and real runs did not confirm it (H200: 0.99x /
0.95x / 0.97x against 0.97x / 0.96x / 0.97x; CPU: behind). The replay keeps the recorded
runs' step-to-step correlation of accepted counts (lag-1 0.60 vs 0.59 recorded on code +
math at 64 nodes), so that is not where it parts from the real runs.

Controllers are attached to a stand-in runner on the cost model's device (``overlap``: a GPU),
so the device-dependent defaults are those ``generate`` would use (one pool and far probes on a
GPU). Replays on the GPU cost models before 2026-12-07 ran with the CPU's per-request estimates.
On the recordings in ``benchmarks/results/2026-12-02-intel-r-xeon-r-processor/traces_*`` (16 /
64 / 128 nodes, 4 seeds, h200-fp32) the GPU defaults replay at 0.976x / 0.992x the best fixed
budget on code + math / Spec-Bench, without far probes 0.975x / 0.972x, and with the CPU's
per-request estimates 0.958x / 0.974x.

It does not model ``extend_depth`` (a step drafted deeper after a full accept): the recorded
trees stop at the recording's depth, so replayed steps keep their arm's depth.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import json
import math
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

# Cost models: verify latency curve (s, by tree size; ``buckets``: a step per CUDA-graph
# bucket), per-step host time in the verify (s + s per node), the rest of a step (s + s per
# node up to ``other_cap`` nodes), whether the controller overlaps the verify. Fitted to
# the 2026-12-02 sweeps (benchmarks/results/2026-12-02-h200-s7/, ...-intel-r-xeon-r-processor/).
COSTS = {
    # per-step times of the fixed budgets in the s7/s7b H200 float32 sweeps (verify + host per
    # bucket; the rest of a step): n16 2.55 + 1.13 ms, n64 2.95 + 1.32, n128 3.35 + 1.32 (with
    # 20% empty trees and 55% of 128-node trees over 63 nodes, as recorded)
    "h200-fp32": dict(sizes=[0, 1, 3, 7, 15, 31, 63, 127],
                      times=[0.0019, 0.00215, 0.0022, 0.00235, 0.0026, 0.00285, 0.0031, 0.00405],
                      buckets=True, host=0.0, host_per_node=0.0, other=0.001, other_per_node=8e-6,
                      other_cap=40, overlap=True),
    "xeon-cpu": dict(sizes=[0, 1, 2, 4, 8, 16, 32, 64, 128],
                     times=[0.108, 0.1205, 0.1265, 0.1856, 0.2452, 0.2482, 0.3151, 0.4447, 0.6536],
                     buckets=False, host=0.0, host_per_node=0.0, other=0.016, other_per_node=0.0005,
                     other_cap=10 ** 9, overlap=False),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.replay_controller", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="record the trees of a fixed-budget run")
    r.add_argument("--model", default=None, help="as benchmarks.run (default: smollm2)")
    r.add_argument("--dtype", default="float32")
    r.add_argument("--device", default="cpu")
    r.add_argument("--data-dir", default=None)
    r.add_argument("--datasets", default="humaneval,gsm8k,mbpp,spec_bench")
    r.add_argument("--limit", type=int, default=6)
    r.add_argument("--max-new-tokens", type=int, default=128)
    r.add_argument("--max-prompt-tokens", type=int, default=None)
    r.add_argument("--chat", choices=["auto", "always", "never"], default="auto")
    r.add_argument("--drafter", default="ngram+recycling")
    r.add_argument("--nodes", type=int, default=128)
    r.add_argument("--depth", type=int, default=8)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--out", required=True)
    s = sub.add_parser("replay", help="replay fixed budgets and controllers on recorded trees")
    s.add_argument("traces", nargs="+", help="recordings (several: of the same prompts at different budgets)")
    s.add_argument("--costs", default="h200-fp32", help=f"one of {sorted(COSTS)} or a JSON file of the same fields")
    s.add_argument("--fixed", default="1:1,4:4,16:8,64:8,128:8", help="nodes:depth,... fixed budgets")
    s.add_argument("--grid", default="1,4,16,64,128", help="the controllers' node grid")
    s.add_argument("--max-depth", type=int, default=8)
    s.add_argument("--variants", default='{"adaptive": {}}', help="JSON {name: BudgetController options}")
    s.add_argument("--seeds", type=int, default=3)
    s.add_argument("--repeats", type=int, default=2, help="passes over the prompts per seed (a controller keeps learning)")
    s.add_argument("--jitter", type=float, default=0.1, help="lognormal sigma of every time")
    s.add_argument("--out", default=None, help="JSON of the results")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- record
def record(args, model=None, tokenizer=None) -> dict:
    from specdec import TreeBudget, drafters, generate
    from specdec.generate import _as_runner

    from . import datasets, models
    from .run import _fit_prompts

    torch.set_num_threads(args.threads)
    loaded = models.Loaded(model, tokenizer or models.ByteTokenizer(model.config.vocab_size), "model") \
        if model is not None else models.load(args.model, dtype=args.dtype, device=args.device)
    names = datasets.parse_names(args.datasets)
    selected = datasets.select(names, data_dir=args.data_dir, limit=args.limit)
    prompts, _ = _fit_prompts(datasets.tokenize(selected, loaded.tokenizer, args.chat, loaded.is_instruct),
                              loaded.model, args)
    longest = max(p.prompt_ids.shape[1] for v in prompts.values() for p in v)
    runner = _as_runner(loaded.model, "auto", longest + args.max_new_tokens + args.nodes + 1)
    traces = []
    for subset, items in prompts.items():
        for p in items:
            drafter = drafters.make(args.drafter, target=loaded.model)
            steps = []
            update = drafter.update

            def keep(res, steps=steps, update=update):
                steps.append({"start": len(res.tokens) - len(res.committed), "parents": res.tree.parents.tolist(),
                              "depths": list(res.tree.depth_list), "accepted": [int(i) for i in res.accepted_nodes]})
                return update(res)

            drafter.update = keep
            out = generate(runner, p.prompt_ids.to(runner.device), drafter=drafter, max_new_tokens=args.max_new_tokens,
                           eos_token_id=loaded.eos_token_id, budget=TreeBudget(args.nodes, args.depth))
            traces.append({"subset": subset, "id": p.id, "new_tokens": out.stats.new_tokens, "steps": steps})
            print(f"{subset} {p.id}: {len(steps)} steps recorded, {out.stats.new_tokens} tokens", flush=True)
    doc = {"drafter": args.drafter, "budget": [args.nodes, args.depth], "max_new_tokens": args.max_new_tokens,
           "learns_from_tree": bool(getattr(drafter, "learns_from_tree", False)) if traces else False,
           "model": getattr(loaded, "name", None), "traces": traces}
    Path(args.out).write_text(json.dumps(doc))
    return doc


# ----------------------------------------------------------------------------- replay
def cut(step: dict, max_nodes: int, max_depth: int):
    """The recorded tree cut to a budget: (TokenTree, accepted node indices inside it)."""
    from specdec.tree import TokenTree

    parents, depths = step["parents"], step["depths"]
    keep = [i for i in range(min(len(parents), max_nodes)) if depths[i] <= max_depth]
    index = {old: new for new, old in enumerate(keep)}
    tree = TokenTree(torch.zeros(len(keep), dtype=torch.long),
                     torch.tensor([-1 if parents[i] < 0 else index[parents[i]] for i in keep], dtype=torch.long))
    path = []
    for v in step["accepted"]:
        if v not in index:
            break
        path.append(index[v])
    return tree, path


class CostModel:
    def __init__(self, spec: dict, jitter: float, seed: int):
        from specdec.adaptive import LatencyModel

        self.spec, self.jitter, self.rng = spec, float(jitter), random.Random(seed)
        self.curve = LatencyModel(spec["sizes"], spec["times"], buckets=spec["buckets"])  # the true curve

    def fit_nodes(self, n: int) -> int:
        """A bucketed runner's cut of a node budget (``GraphedCompactRunner.fit_nodes``): the
        largest bucket's tree size <= n, so a 64-node budget drafts 63 nodes, not 64 nodes
        priced as a 127-node bucket."""
        if not self.spec["buckets"] or n < 1:
            return n
        return max((s for s in self.spec["sizes"] if 1 <= s <= n), default=n)

    def _noise(self) -> float:
        return math.exp(self.rng.gauss(0.0, self.jitter)) if self.jitter > 0 else 1.0

    def step(self, n: int) -> tuple[float, float]:
        """(verify s, the rest of the step s) for a tree of n nodes."""
        s = self.spec
        verify = (self.curve.shape(n) + s["host"] + s["host_per_node"] * n) * self._noise()
        other = (s["other"] + s["other_per_node"] * min(n, s["other_cap"])) * self._noise()
        return verify, other


def replay_prompt(trace: dict, costs: CostModel, *, budget=None, controller=None, overlap=False,
                  visited: list | None = None, learns_from_tree: bool = True) -> tuple[int, float]:
    """(tokens, seconds) of one prompt under a fixed ``budget`` or a ``controller``;
    ``trace``: one recording of the prompt, or {recorded max_nodes: recording} (see the
    module docstring); ``visited`` collects the position of every step."""
    from specdec.config import TreeBudget

    by_nodes = trace if "steps" not in trace else {0: trace}
    first = next(iter(by_nodes.values()))
    starts_of = {n: [s["start"] for s in t["steps"]] for n, t in by_nodes.items()}
    goal, new, elapsed = first["new_tokens"], 0, 0.0
    if controller is not None:
        controller.begin_request("replay", learns_from_tree=learns_from_tree)
    pending, ahead, context = None, None, None
    while new < goal:
        if controller is None:
            chosen = budget
        elif ahead is not None:
            chosen, ahead = ahead, None
        else:
            chosen = controller.choose("replay")
            context = controller.chosen_context("replay")
        rec = min((n for n in by_nodes if n >= chosen.max_nodes), default=max(by_nodes))
        steps, starts = by_nodes[rec]["steps"], starts_of[rec]
        pos = starts[0] + new
        if visited is not None:
            visited.append(pos)
        i = max(bisect.bisect_right(starts, pos) - 1, 0)
        if i + 1 < len(starts) and starts[i + 1] - pos < pos - starts[i]:
            i += 1  # the nearest recorded start
        arm = TreeBudget(chosen.max_nodes, min(chosen.max_depth, goal - new - 1))
        tree, path = cut(steps[i], costs.fit_nodes(arm.max_nodes), arm.max_depth)
        verify, other = costs.step(len(tree))
        elapsed += verify + other
        new += min(len(path) + 1, goal - new)
        if controller is not None:
            planned = overlap and new < goal  # decide the next step ahead, as ``generate``
            if overlap:  # learn from the last step while this one verifies
                if pending is not None:
                    controller.observe(**pending)
                    pending = None
                if planned:
                    controller.choose_ahead("replay")
            seen = dict(key="replay", tree_size=len(tree), accepted=len(path), draft_time=other, verify_time=verify,
                        tree=tree, accepted_nodes=path, budget=arm, overlapped=overlap, context=context)
            if planned:  # the next step's budget, for this step's outcome
                context = len(path)
                ahead = controller.take("replay", context)
            if overlap and new < goal:
                pending = seen
            else:
                controller.observe(**seen)
    if pending is not None:
        controller.observe(**pending)
    return new, elapsed


def group_recordings(docs: list[dict]) -> list[dict]:
    """Per prompt (in the first recording's order): {recorded max_nodes: its recording}."""
    by_prompt: dict[tuple, dict] = {}
    for d in docs:
        nodes = int(d["budget"][0])
        for t in d["traces"]:
            runs = by_prompt.setdefault((t["subset"], t["id"]), {})
            if nodes in runs:
                raise ValueError(f"two recordings of {t['subset']} {t['id']} at {nodes} nodes")
            runs[nodes] = t
    full = [p for p in by_prompt.values() if len(p) == len(docs)]
    if len(full) < len(by_prompt):
        raise ValueError("the recordings do not cover the same prompts")
    return [dict(sorted(p.items())) for p in full]


def replay(args, doc: dict | None = None) -> dict:
    from specdec.adaptive import BudgetController, LatencyModel
    from specdec.config import TreeBudget

    docs = [doc] if doc is not None else [json.loads(Path(f).read_text()) for f in args.traces]
    prompts = group_recordings(docs)
    learns = all(d.get("learns_from_tree", "recycling" in d.get("drafter", "")) for d in docs)
    spec = COSTS.get(args.costs) or json.loads(Path(args.costs).read_text())
    fixed = {f"n{a}_d{b}": TreeBudget(int(a), int(b)) for a, b in (x.split(":") for x in args.fixed.split(","))}
    variants = json.loads(args.variants)
    grid = [int(n) for n in args.grid.split(",")]
    totals = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0.0]))  # subset -> method -> [tok, s]
    for seed in range(args.seeds):
        # one cost model per method, all seeded alike: every method draws the same jitter
        # sequence (common random numbers), so identical controllers replay identically
        costs = {m: CostModel(spec, args.jitter, seed) for m in list(fixed) + list(variants)}
        controllers = {name: BudgetController(grid=grid, max_depth=args.max_depth, max_control_share=0.0,
                                              latency=LatencyModel(spec["sizes"], spec["times"], buckets=spec["buckets"]),
                                              **opts) for name, opts in variants.items()}
        # the runner's device settles the device-dependent defaults (``request_prior``,
        # ``probe_far``) as in ``generate``; the cost model's cut of a budget is the runner's
        runner = SimpleNamespace(device="cuda" if spec["overlap"] else "cpu",
                                 fit_nodes=costs[next(iter(costs))].fit_nodes)
        for c in controllers.values():
            c.attach(runner)
        for _ in range(args.repeats):
            for trace in prompts:
                runs = {m: replay_prompt(trace, costs[m], budget=b) for m, b in fixed.items()}
                runs.update({m: replay_prompt(trace, costs[m], controller=c, overlap=spec["overlap"], learns_from_tree=learns)
                             for m, c in controllers.items()})
                for m, (tok, sec) in runs.items():
                    for subset in (next(iter(trace.values()))["subset"], "all"):
                        totals[subset][m][0] += tok
                        totals[subset][m][1] += sec
    methods = list(fixed) + list(variants)
    table = {}
    for subset, by in totals.items():
        rate = {m: by[m][0] / by[m][1] for m in methods}
        best = max(rate[m] for m in fixed)
        table[subset] = {m: {"tokens_per_s": rate[m], "vs_best_fixed": rate[m] / best} for m in methods}
    print("relative to the best fixed budget per dataset (" + args.costs + ")")
    print(f"{'dataset':28s}" + "".join(f"{m[:12]:>13s}" for m in methods))
    for subset in sorted(table, key=lambda s: (s == "all", s)):
        print(f"{subset:28s}" + "".join(f"{table[subset][m]['vs_best_fixed']:13.3f}" for m in methods))
    result = {"costs": args.costs, "cost_model": spec, "variants": variants, "seeds": args.seeds,
              "repeats": args.repeats, "jitter": args.jitter, "prompts": len(prompts),
              "recorded_budgets": sorted({d["budget"][0] for d in docs}), "table": table}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def main(argv=None, *, model=None, tokenizer=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.cmd == "record":
        record(args, model=model, tokenizer=tokenizer)
    else:
        replay(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
