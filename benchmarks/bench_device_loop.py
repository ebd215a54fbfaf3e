"""The device-resident loop side by side with the host loop and the bare graphed step.

    python -m benchmarks.bench_device_loop --model PATH.gguf --dtype bfloat16 --limit 5 --per-category 2

One process, one model, the same prompts for every method, interleaved per prompt (the
round with the median time counts with --repeats > 1). Methods:

- ``bare_step``: the graphed one-token step replayed back to back with the argmax fed back
  on the device and no stop rule (greedy only): the ceiling for plain decoding;
- ``plain`` / ``plain_host``: ``specdec.generate`` without a drafter, on the device loop /
  with ``SPECDEC_DEVICE_LOOP=0`` (the host loop);
- ``dev_SPEC`` (each ``--shapes`` entry) / ``host_SPEC`` (the first one): the drafter SPEC on
  the device loop / the host loop. SPEC: ``CxL`` the suffix drafter (C candidates of up to L
  tokens), ``rN`` Token Recycling with an N-node best-first template (depth <= 8, k = 8),
  ``CxL+rN`` both merged;
- ``--host-drafters`` (default ngram, ngram+recycling): those drafters (host loop).

tok/s is new tokens over the whole call (prefill included), summed over prompts. Greedy
outputs of every specdec method are checked against ``plain`` (bf16: the share that is
identical is reported). ``--profile`` adds a torch.profiler summary of one call of the
first shape (host vs device time). Writes JSON + Markdown into --out.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import datasets, models
from benchmarks.common import RESULTS_DIR, device_name, environment, fit_prompts, sync, write_run


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_device_loop", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--datasets", default="humaneval,gsm8k,spec_bench")
    p.add_argument("--limit", type=int, default=5)
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--shapes", default="4x8,2x8,4x16,8x16,r32,r64,4x8+r32,4x8+r64",
                   help="drafters: CxL (suffix), rN (recycling), CxL+rN (both)")
    p.add_argument("--host-drafters", default="ngram,ngram+recycling")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default="")
    return p.parse_args(argv)


def bare_step(runner, ids: torch.Tensor, max_new: int) -> tuple[list[int], float]:
    """The graphed one-token step, argmax fed back on the device, no stop rule, no reads."""
    sync(runner.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        runner.reset()
        prompt = ids[0]
        runner.prefill(prompt[:-1], torch.arange(prompt.numel() - 1, device=runner.device))
        tok, pos = prompt[-1:].clone(), torch.tensor([prompt.numel() - 1], device=runner.device)
        out = []
        for _ in range(max_new):
            tok = runner.forward(tok, pos)[0].argmax().view(1)
            pos.add_(1)
            out.append(tok)
        toks = torch.cat(out).tolist()
    return toks, time.perf_counter() - t0


def drafter_for(spec: str, model):
    """``CxL``, ``rN`` or ``CxL+rN`` (see the module doc) -> a drafter."""
    from specdec.drafters import make
    from specdec.drafters.recycling import TreeTemplate

    opts = {}
    for part in spec.split("+"):
        if part.startswith("r"):
            opts["recycling"] = {"template": TreeTemplate.best_first(int(part[1:]), max_depth=8, k=8), "k": 8}
        else:
            c, d = (int(x) for x in part.split("x"))
            opts["suffix"] = {"num_candidates": c, "depth": d}
    if len(opts) == 2:
        return make("suffix+recycling", target=model, **opts)
    (name, o), = opts.items()
    return make(name, target=model, **o)


def main(argv=None) -> int:
    import specdec
    from specdec.backends.select import as_runner
    from specdec.drafters import make

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    loaded = models.load(args.model, dtype=args.dtype, device=device)
    model, eos = loaded.model, loaded.eos_token_id
    prompts = datasets.load(datasets.parse_names(args.datasets), loaded.tokenizer, data_dir=args.data_dir,
                            limit=args.limit, per_category=args.per_category, instruct=loaded.is_instruct)
    prompts, _ = fit_prompts(prompts, model, max_new_tokens=args.max_new_tokens)
    items = [(name, p) for name, ps in prompts.items() for p in ps]
    sampling = args.temperature > 0
    gen_kw = dict(do_sample=sampling, temperature=args.temperature or 1.0, eos_token_id=eos,
                  max_new_tokens=args.max_new_tokens)
    shapes = [s for s in args.shapes.split(",") if s]
    methods: dict[str, tuple] = {"plain": ("gen", None, True)}
    if not sampling:
        methods["bare_step"] = ("bare", None, True)
    methods["plain_host"] = ("gen", None, False)
    for i, spec in enumerate(shapes):
        methods[f"dev_{spec}"] = ("gen", drafter_for(spec, model), True)
        if i == 0:
            methods[f"host_{spec}"] = ("gen", drafter_for(spec, model), False)
    for name in filter(None, args.host_drafters.split(",")):
        methods[name] = ("gen", make(name, target=model), False)
    runner = as_runner(model, "auto", max(p.prompt_ids.shape[1] for _, p in items) + args.max_new_tokens + 200)

    def call(method: str, ids: torch.Tensor, seed: int, max_new: int | None = None) -> dict:
        kind, drafter, on_device = methods[method]
        if kind == "bare":
            toks, wall = bare_step(runner, ids, max_new or args.max_new_tokens)
            return {"tokens": toks, "wall": wall, "steps": len(toks), "host": None, "loop": "bare", "replays": len(toks),
                    "prefill": None}
        os.environ["SPECDEC_DEVICE_LOOP"] = "1" if on_device else "0"
        kw = dict(gen_kw, max_new_tokens=max_new or args.max_new_tokens)
        sync(device)
        t0 = time.perf_counter()
        out = specdec.generate(model, ids, drafter=drafter, seed=seed, **kw)
        sync(device)
        wall = time.perf_counter() - t0
        s = out.stats
        return {"tokens": out.new_tokens.tolist(), "wall": wall, "steps": s.steps, "loop": s.loop,
                "host": s.host_time_s if s.loop == "device" else None, "replays": s.replays or s.steps,
                "prefill": s.prefill_time_s}

    print(f"{len(items)} prompts, methods: {', '.join(methods)}", flush=True)
    for m in methods:  # warm-up: captures, compiles, every prompt length class once
        call(m, items[0][1].prompt_ids.to(device), 0, 8)
        call(m, items[0][1].prompt_ids.to(device), 0)
    rows = {m: [] for m in methods}
    first_prefill = []  # the first call on each prompt: its prefill meets the prompt's length first
    for i, (ds, p) in enumerate(items):
        ids = p.prompt_ids.to(device)
        first_prefill.append(call("plain", ids, 1000 + i, 1)["prefill"])
        runs = {m: [] for m in methods}
        for r in range(args.repeats):
            order = list(methods)[r % len(methods):] + list(methods)[:r % len(methods)]
            order = ["plain"] + [m for m in order if m != "plain"]  # bare_step decodes as many tokens as plain
            for m in order:
                runs[m].append(call(m, ids, 1000 + i, len(runs["plain"][-1]["tokens"]) if m == "bare_step" else None))
        for m in methods:
            med = sorted(runs[m], key=lambda x: x["wall"])[len(runs[m]) // 2]
            rows[m].append(dict(med, dataset=ds, id=p.id))
        print(f"[{i + 1}/{len(items)}] {p.id}: " + ", ".join(
            f"{m} {len(rows[m][-1]['tokens']) / rows[m][-1]['wall']:.0f}" for m in methods), flush=True)

    summary = {}
    ref = rows["plain"]
    for m, rs in rows.items():
        toks = sum(len(r["tokens"]) for r in rs)
        wall = sum(r["wall"] for r in rs)
        steps = sum(r["steps"] for r in rs)
        same = sum(r["tokens"] == q["tokens"] for r, q in zip(rs, ref)) if m != "bare_step" else None
        host = [r["host"] for r in rs if r["host"] is not None]
        summary[m] = {"tokens": toks, "wall_s": wall, "tok_s": toks / wall, "tau": toks / max(1, steps),
                      "steps": steps, "replays": sum(r["replays"] for r in rs),
                      "host_share": (sum(host) / sum(r["wall"] for r in rs if r["host"] is not None)) if host else None,
                      "identical_to_plain": same, "prompts": len(rs)}
    later = [r["prefill"] for r in rows["plain"]]
    summary["_prefill"] = {"first_mean_ms": 1e3 * statistics.mean(first_prefill), "first_max_ms": 1e3 * max(first_prefill),
                           "later_mean_ms": 1e3 * statistics.mean(later), "later_max_ms": 1e3 * max(later)}
    plain = summary["plain"]["tok_s"]
    for m, s in summary.items():
        if not m.startswith("_"):
            s["vs_plain"] = s["tok_s"] / plain

    profile = profile_call(call, methods, items, device) if args.profile else None
    env = environment(device, command="python -m benchmarks.bench_device_loop " + " ".join(argv), argv=argv)
    data = {"env": env, "args": vars(args), "summary": summary, "rows": rows, "profile": profile,
            "model": loaded.name}
    md = to_markdown(data, device)
    out = Path(args.out) if args.out else RESULTS_DIR / f"{time.strftime('%Y-%m-%d')}-{device.type}"
    stem = f"device_loop_{'t' + str(args.temperature) if sampling else 'greedy'}{args.tag}"
    write_run(out, stem, data, md)
    return 0


def profile_call(call, methods, items, device) -> dict:
    """torch.profiler over one call of the first --shapes drafter: where host and device time go."""
    from torch.profiler import ProfilerActivity, profile

    m = next(k for k in methods if k.startswith("dev_"))
    ids = items[0][1].prompt_ids.to(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        res = call(m, ids, 0)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=48)
    events = prof.key_averages()
    cpu_self = sum(e.self_cpu_time_total for e in events) / 1e3
    dev_self = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events) / 1e3
    return {"method": m, "wall_ms": res["wall"] * 1e3, "host_ms_outside_waits": (res["host"] or 0) * 1e3,
            "replays": res["replays"], "cpu_self_ms": cpu_self, "device_self_ms": dev_self, "table": table}


def to_markdown(data: dict, device) -> str:
    a, env = data["args"], data["env"]
    lines = [f"# Device loop vs host loop ({device_name(device)}, {a['dtype']}, "
             f"{'T=' + str(a['temperature']) if a['temperature'] else 'greedy'})", "",
             f"- model: {data['model']}; {a['max_new_tokens']} new tokens; batch 1; datasets {a['datasets']} "
             f"(limit {a['limit']}, Spec-Bench {a['per_category']} per category)",
             f"- torch {env.get('versions', {}).get('torch')}, specdec {env.get('versions', {}).get('specdec_commit')}",
             f"- command: `{env.get('command')}`", "",
             "| method | tok/s | vs plain | tau | steps | replays | host share | identical to plain |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, s in data["summary"].items():
        if m.startswith("_"):
            continue
        host = f"{100 * s['host_share']:.0f}%" if s["host_share"] is not None else "-"
        same = f"{s['identical_to_plain']}/{s['prompts']}" if s["identical_to_plain"] is not None else "-"
        lines.append(f"| {m} | {s['tok_s']:.0f} | {s['vs_plain']:.2f}x | {s['tau']:.2f} | {s['steps']} | "
                     f"{s['replays']} | {host} | {same} |")
    lines += ["", "tok/s: new tokens over whole calls (prefill included). host share: time the host spent "
              "outside waiting for the device, over the call (device loop only). replays: steps run, "
              "those queued past a stop included. bare_step decodes as many tokens as plain did on each "
              "prompt, with no stop rule and no reads."]
    pf = data["summary"]["_prefill"]
    lines += ["", f"Prefill (plain, the prompt minus its last token): first call on each prompt {pf['first_mean_ms']:.1f} ms "
              f"mean, {pf['first_max_ms']:.1f} ms max; the timed calls after it {pf['later_mean_ms']:.1f} ms mean, "
              f"{pf['later_max_ms']:.1f} ms max."]
    p = data.get("profile")
    if p:
        lines += ["", f"## Profile of one call ({p['method']})", "",
                  f"wall {p['wall_ms']:.1f} ms, host outside waits {p['host_ms_outside_waits']:.1f} ms, "
                  f"{p['replays']} replays; profiler self time: CPU {p['cpu_self_ms']:.1f} ms, device "
                  f"{p['device_self_ms']:.1f} ms", "", "```", p["table"], "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
