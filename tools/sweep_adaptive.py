"""Adaptive drafting vs fixed tree budgets: one drafter, one model, every dataset.

    python -m tools.sweep_adaptive --drafter ngram --limit 20 --max-new-tokens 128
    python -m tools.sweep_adaptive --drafter model --draft-model DIR --nodes 1,2,4,8,16 --depths 4,8

Runs ``specdec.generate`` with every fixed ``TreeBudget(max_nodes, max_depth)`` of
``--nodes`` x ``--depths`` (depth capped at the node count, duplicates dropped), then with
``adaptive=BudgetController`` (one controller for the whole run, so it learns across
prompts; its verify-latency curve is measured once and cached under
``~/.cache/specdec/latency/``). Methods run interleaved per prompt, after an excluded
warm-up; with ``--repeats R`` each prompt runs every setting R times (the order rotated
each round) and the round with the median decode time counts, so that one stray pause
(a garbage collection, another process) does not decide a ratio. Greedy outputs must all
be identical (checked). Writes JSON + Markdown with
tokens/s and mean accepted length per dataset -- adaptive vs the best, worst and
default (``TreeBudget()``) fixed settings -- into benchmarks/results/<date>-<device>/.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from benchmarks import datasets, models
from benchmarks.common import RESULTS_DIR, device_name, environment, fit_prompts, ints, slug, sync, write_run
from benchmarks.report import STEP_TIMES

ADAPTIVE = "adaptive"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.sweep_adaptive", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2", help="as in benchmarks.run (smollm2, gemma3-270m, DIR, FILE.gguf, ...)")
    p.add_argument("--draft-model", default=None, help="for --drafter model / dual")
    p.add_argument("--drafter", default="ngram", help="a name of specdec.drafters.NAMES")
    p.add_argument("--drafter-opts", default="{}", help='JSON options for the drafter, e.g. {"gamma": 6, "topk": 4}')
    p.add_argument("--no-drafter-controller", action="store_true",
                   help="adaptive run: do not hand the controller to the drafter (ModelDrafter: chain stopping, "
                        "dynamic tree), only let it pick the budget")
    p.add_argument("--datasets", default="humaneval,gsm8k,mbpp,spec_bench",
                   help="comma list; datasets whose file is missing from --data-dir are skipped")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit", type=int, default=10, help="prompts per dataset")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-prompt-tokens", type=int, default=None)
    p.add_argument("--chat", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--nodes", default="1,2,4,8,16,32,64", help="fixed max_nodes values")
    p.add_argument("--depths", default="4,8", help="fixed max_depth values")
    p.add_argument("--grid", default=None, help="the controller's node grid (default: --nodes)")
    p.add_argument("--max-depth", type=int, default=None, help="the controller's depth cap (default: max of --depths)")
    p.add_argument("--variants", default='{"adaptive": {}}',
                   help='JSON {name: ControllerConfig fields}: the adaptive methods to run, e.g. '
                        '\'{"adaptive": {}, "adaptive-nofar": {"probe_far": false}}\'')
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of every setting per prompt (order rotated); the median-time round counts")
    p.add_argument("--no-latency-sweep", action="store_true", help="learn verify latency online only")
    p.add_argument("--latency-grid", default="0,1,2,4,8,16,32,64,128", help="tree sizes the latency sweep times")
    p.add_argument("--dtype", default=None, choices=sorted(models.DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", choices=["auto", "generic", "compact", "graphs"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<date>-<device>/)")
    p.add_argument("--tag", default="")
    p.add_argument("--trace-controller", action="store_true",
                   help="keep every decision of the adaptive settings (per arm: estimated mean accepted, "
                        "seconds per step, index) in the JSON records")
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if str(args.device).startswith("cuda") else "float32"
    return args


def fixed_budgets(nodes: list[int], depths: list[int]):
    from specdec import TreeBudget

    seen, out = set(), []
    for n in nodes:
        for d in depths:
            b = TreeBudget(n, min(n, d))
            if b not in seen:
                seen.add(b)
                out.append(b)
    return out


def label(budget) -> str:
    return f"n{budget.max_nodes}_d{budget.max_depth}"


def available_datasets(spec: str, data_dir) -> list[str]:
    root = datasets.data_dir_or_fail(data_dir)
    names = datasets.parse_names(spec)
    keep = [n for n in names if (root / datasets.FILES[n.partition("/")[0]]).exists()]
    for n in set(names) - set(keep):
        print(f"{n}: {datasets.FILES[n.partition('/')[0]]} not in {root}; skipped", flush=True)
    if not keep:
        raise SystemExit(f"none of {spec} found in {root}")
    return keep


def make_drafter(args, loaded, draft):
    from specdec import drafters

    opts = json.loads(args.drafter_opts)
    kw = {"draft_model": draft.model} if draft is not None else {}
    return drafters.make(args.drafter, target=loaded.model, **kw, **opts)


def run_one(runner, ids, drafter, *, max_new_tokens, eos, budget=None, controller=None) -> dict:
    import specdec

    gc.collect()  # (not inside the timed run)
    sync(runner.device)
    t0 = time.perf_counter()
    kw = {"adaptive": controller} if controller is not None else {"budget": budget}
    trace = controller.trace if controller is not None else None
    if trace is not None:
        trace.clear()
    out = specdec.generate(runner, ids.to(runner.device), drafter=drafter, max_new_tokens=max_new_tokens,
                           eos_token_id=eos, **kw)
    sync(runner.device)
    s = out.stats
    return ({"controller_trace": list(trace)} if trace is not None else {}) | {"tokens": out.new_tokens.tolist(), "wall_s": time.perf_counter() - t0, "prefill_s": s.prefill_time_s,
            "new_tokens": s.new_tokens, "steps": s.steps, "accepted": sum(s.accepted_per_step),
            "tree_nodes": sum(s.tree_sizes), "budgets": list(s.budgets),
            "depth_caps": list(s.depth_caps), "draft_s": s.draft_time_s,
            "verify_s": s.verify_time_s, "update_s": s.update_time_s, "control_s": s.control_time_s}


def median_round(rounds: list[dict]) -> dict:
    """The round with the median decode time (the lower middle one of an even count)."""
    ordered = sorted(rounds, key=lambda r: r["wall_s"] - r["prefill_s"])
    return ordered[(len(ordered) - 1) // 2]


def summarise(records: list[dict], methods: list[str], default: str, adaptive=(ADAPTIVE,)) -> dict:
    """Per subset (and "all"): every method's totals; best / worst fixed setting by tokens/s."""
    out = {}
    subsets = list(dict.fromkeys(r["subset"] for r in records))
    for group in subsets + (["all"] if len(subsets) > 1 else []):
        rows = {}
        for m in methods:
            rs = [r for r in records if r["method"] == m and (group == "all" or r["subset"] == group)]
            if not rs:
                continue
            new, steps = sum(r["new_tokens"] for r in rs), sum(r["steps"] for r in rs)
            dec = sum(r["wall_s"] - r["prefill_s"] for r in rs)
            rows[m] = {"prompts": len(rs), "new_tokens": new, "steps": steps,
                       "tokens_per_s": new / dec if dec > 0 else None,
                       "mean_accepted_length": new / steps if steps else None,
                       "mean_tree_size": sum(r["tree_nodes"] for r in rs) / max(1, steps),
                       **{k: sum(r.get(k, 0.0) for r in rs) for k in STEP_TIMES},
                       "other_s": sum(r["wall_s"] - r["prefill_s"] - sum(r.get(k, 0.0) for k in STEP_TIMES)
                                      for r in rs),
                       "exact_match": all(r.get("match", True) for r in rs)}
            if m in adaptive:
                hist = Counter(b for r in rs for b in r["budgets"])
                rows[m]["budget_histogram"] = {int(k): v for k, v in sorted(hist.items())}
                deep = Counter(d for r in rs for d in r.get("depth_caps", ()))
                rows[m]["depth_cap_histogram"] = {int(k): v for k, v in sorted(deep.items())}
        fixed = {m: v for m, v in rows.items() if m not in adaptive and v["tokens_per_s"]}
        best = max(fixed, key=lambda m: fixed[m]["tokens_per_s"]) if fixed else None
        worst = min(fixed, key=lambda m: fixed[m]["tokens_per_s"]) if fixed else None
        out[group] = {"methods": rows, "best_fixed": best, "worst_fixed": worst, "default_fixed": default}
    return out


def markdown(results: dict) -> str:
    s = results["settings"]
    hw = results["hardware"]
    lines = [f"# Adaptive drafting sweep: {s['model']['name']}, drafter `{s['drafter']}`", "",
             f"{hw['device_name']} ({hw['device']}), {s['dtype']}, batch 1, greedy, max_new_tokens "
             f"{s['max_new_tokens']}, prompts per dataset <= {s['limit']}"
             + (f", median of {s['repeats']} rounds per prompt" if s.get('repeats', 1) > 1 else "") + f"; torch {results['versions']['torch']}, "
             f"transformers {results['versions']['transformers']}; {results['date']}.", "",
             f"Fixed budgets: {', '.join(s['fixed'])}; default `{s['default_fixed']}` (TreeBudget()). Adaptive: "
             f"BudgetController over max_nodes {s['controller_grid']}, latency curve "
             f"{'measured' if s['latency_measured'] else 'learned online'}. Decode tokens/s exclude the prefill; "
             "tau = committed tokens per target forward.", "",
             "| dataset | adaptive | tok/s | tau | best fixed | tok/s | tau | worst fixed | tok/s | default tok/s | tau "
             "| adaptive / best | adaptive / default | exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    variants = s.get("variants") or {ADAPTIVE: {}}
    if len(variants) > 1 or ADAPTIVE not in variants:
        lines[-3:-2] = [lines[-3], "Adaptive variants (ControllerConfig fields): "
                        + "; ".join(f"`{k}` {json.dumps(v)}" for k, v in variants.items()), ""]

    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    ratio = lambda x, y: (x["tokens_per_s"] / y["tokens_per_s"]) if x.get("tokens_per_s") and y.get("tokens_per_s") else None  # noqa: E731
    for group, g in results["summary"].items():
        rows = g["methods"]
        b, w, d = (rows.get(k) or {} for k in (g["best_fixed"], g["worst_fixed"], g["default_fixed"]))
        for v in variants:
            a = rows.get(v) or {}
            lines.append(f"| {group} | {v} | {f(a.get('tokens_per_s'))} | {f(a.get('mean_accepted_length'), '{:.2f}')} "
                         f"| {g['best_fixed']} | {f(b.get('tokens_per_s'))} "
                         f"| {f(b.get('mean_accepted_length'), '{:.2f}')} "
                         f"| {g['worst_fixed']} | {f(w.get('tokens_per_s'))} | {f(d.get('tokens_per_s'))} "
                         f"| {f(d.get('mean_accepted_length'), '{:.2f}')} | {f(ratio(a, b), '{:.2f}x')} "
                         f"| {f(ratio(a, d), '{:.2f}x')} | {all(r['exact_match'] for r in rows.values())} |")
    lines += ["", "## Every setting", "", "Seconds over the whole dataset: draft = propose, update = the drafter's "
              "update, control = the controller, other = the rest of the decode loop (on a GPU the "
              "controller mostly runs while the verify forward is in flight, so its time is also inside "
              "verify and other can be negative).", "",
              "| dataset | setting | tok/s | tau | mean tree | draft s | verify s | update s | control s | other s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for group, g in results["summary"].items():
        for m, r in g["methods"].items():
            lines.append(f"| {group} | {m} | {f(r['tokens_per_s'])} | {f(r['mean_accepted_length'], '{:.2f}')} "
                         f"| {r['mean_tree_size']:.1f} | {r['draft_s']:.2f} | {r['verify_s']:.2f} "
                         f"| {f(r.get('update_s'), '{:.2f}')} | {f(r.get('control_s'), '{:.2f}')} "
                         f"| {f(r.get('other_s'), '{:.2f}')} |")
    for name in variants:
        hist = {g: v["methods"].get(name, {}).get("budget_histogram") for g, v in results["summary"].items()}
        lines += ["", f"`{name}` budget choices (max_nodes: steps): "
                  + "; ".join(f"{g}: {h}" for g, h in hist.items() if h)]
        deep = {g: v["methods"].get(name, {}).get("depth_cap_histogram") for g, v in results["summary"].items()}
        if any(h and max(h) > min(h) for h in deep.values()):
            lines += ["", f"`{name}` depth caps (max_depth: steps): " + "; ".join(f"{g}: {h}" for g, h in deep.items() if h)]
    lines.append("")
    curves = results.get("latency") or {}
    if "sizes" in curves:  # results written before variants: one curve
        curves = {ADAPTIVE: curves}
    for name, lat in curves.items():
        lines += [f"Verify latency curve at the end (`{name}`, ms by tree size): "
                  + ", ".join(f"{n}: {t * 1e3:.1f}" for n, t in zip(lat["sizes"], lat["times"]) if t is not None), ""]
    lines.append(f"Command: `{results['command']}`")
    return "\n".join(lines) + "\n"


def main(argv=None, *, model=None, tokenizer=None) -> int:
    from specdec import TreeBudget
    from specdec.adaptive import BudgetController, ControllerConfig, LatencyModel
    from specdec.backends.select import as_runner

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args._argv = argv
    device = torch.device(args.device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    names = available_datasets(args.datasets, args.data_dir)
    if model is not None:
        loaded = models.Loaded(model, tokenizer or models.ByteTokenizer(model.config.vocab_size),
                               getattr(model.config, "name_or_path", "") or type(model).__name__)
    else:
        print(f"loading {args.model} ({args.dtype}, {device}) ...", flush=True)
        loaded = models.load(args.model, dtype=args.dtype, device=device, seed=args.seed)
    draft = models.load(args.draft_model, dtype=args.dtype, device=device, seed=args.seed + 1) \
        if args.draft_model else None
    eos = loaded.eos_token_id
    selected = datasets.select(names, data_dir=args.data_dir, limit=args.limit)
    prompts, skipped = fit_prompts(datasets.tokenize(selected, loaded.tokenizer, args.chat, loaded.is_instruct),
                                   loaded.model, max_new_tokens=args.max_new_tokens,
                                   max_prompt_tokens=args.max_prompt_tokens)
    longest = max(p.prompt_ids.shape[1] for v in prompts.values() for p in v)
    fixed = fixed_budgets(ints(args.nodes), ints(args.depths))
    grid = ints(args.grid) if args.grid else sorted({b.max_nodes for b in fixed})
    max_depth = args.max_depth or max(ints(args.depths))
    capacity = longest + args.max_new_tokens + max(max(grid), max(b.max_nodes for b in fixed)) + 1
    runner = as_runner(loaded.model, args.backend, capacity)

    latency = None
    if not args.no_latency_sweep:
        print("measuring the verify latency curve (cached per model/dtype/device/backend) ...", flush=True)
        latency = LatencyModel.for_runner(runner, model=loaded.model, grid=ints(args.latency_grid))
    variants = json.loads(args.variants)
    if not isinstance(variants, dict) or not variants:
        raise SystemExit("--variants: a JSON object {name: {ControllerConfig fields}}")
    controllers = {name: BudgetController(ControllerConfig(grid=tuple(grid), max_depth=max_depth, **opts),
                                          latency=latency.copy() if latency else None) for name, opts in variants.items()}
    if args.trace_controller:
        for ctl in controllers.values():
            ctl.trace = []
    default = TreeBudget()
    if default not in fixed:
        fixed.append(default)
    clash = set(variants) & {label(b) for b in fixed}
    if clash:
        raise SystemExit(f"--variants: {sorted(clash)} clash with the fixed settings' names")
    methods = [label(b) for b in fixed] + list(variants)
    drafters = {m: make_drafter(args, loaded, draft) for m in methods}
    for name, ctl in controllers.items():
        if not args.no_drafter_controller and hasattr(drafters[name], "controller"):
            drafters[name].controller = ctl

    def go(m, ids, max_new):
        if m in controllers:
            return run_one(runner, ids, drafters[m], max_new_tokens=max_new, eos=eos, controller=controllers[m])
        return run_one(runner, ids, drafters[m], max_new_tokens=max_new, eos=eos,
                       budget=fixed[methods.index(m)])

    first = next(iter(prompts.values()))[0].prompt_ids
    print(f"warm-up ({len(methods)} settings) ...", flush=True)
    for m in methods:
        go(m, first, min(8, args.max_new_tokens))
    records = []
    t_start = time.perf_counter()
    total = sum(len(v) for v in prompts.values())
    done = 0
    for subset, items in prompts.items():
        for p in items:
            rounds: dict[str, list[dict]] = {m: [] for m in methods}
            for k in range(max(1, args.repeats)):
                for m in methods[k % len(methods):] + methods[:k % len(methods)]:  # rotated per round
                    rounds[m].append(go(m, p.prompt_ids, args.max_new_tokens))
            ref = rounds[methods[0]][0]["tokens"]
            for m in methods:
                r = median_round(rounds[m])
                records.append({"method": m, "subset": subset, "id": p.id,
                                "match": all(x["tokens"] == ref for x in rounds[m]), "rounds": len(rounds[m]),
                                "decode_s_rounds": [x["wall_s"] - x["prefill_s"] for x in rounds[m]],
                                **{k: v for k, v in r.items() if k != "tokens"}})
            done += 1
            print(f"{done}/{total} {subset} {p.id}", flush=True)

    env = environment(device, command=shlex.join(["python", "-m", "tools.sweep_adaptive", *argv]), argv=argv)
    results = {**env, "settings": {
        "model": models.describe(loaded), "draft_model": models.describe(draft) if draft else None,
        "drafter": args.drafter, "drafter_opts": json.loads(args.drafter_opts), "dtype": args.dtype,
        "backend": type(runner).__name__, "max_new_tokens": args.max_new_tokens, "limit": args.limit,
        "datasets": names, "prompts": {k: len(v) for k, v in prompts.items()}, "skipped_prompts": skipped,
        "fixed": [label(b) for b in fixed], "default_fixed": label(default), "controller_grid": grid,
        "controller_max_depth": max_depth, "latency_measured": latency is not None,
        "drafter_controller": not args.no_drafter_controller, "variants": variants, "order": "interleaved per prompt",
        "repeats": max(1, args.repeats),
        "warmup": "one 8-token run per setting, excluded", "sweep_s": time.perf_counter() - t_start},
        "latency": {k: c.latency.to_json() for k, c in controllers.items() if c.latency is not None},
        "summary": summarise(records, methods, label(default), tuple(variants)), "records": records}
    folder = Path(args.out) if args.out else RESULTS_DIR / f"{_dt.date.today().isoformat()}-{slug(device_name(device))}"
    stem = f"sweep_adaptive_{slug(loaded.name)}_{slug(args.drafter)}_{args.dtype}" + (f"_{slug(args.tag)}" if args.tag else "")
    write_run(folder, stem, results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
