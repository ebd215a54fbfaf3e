"""Where a verify step's GPU time goes: per-kernel time of one compact-runtime forward
of an n-node tree, from ``torch.profiler``, for a few tree sizes side by side.

Answers "why is a 64-node step 1.7x a one-token step on the SmolLM2 shape" and "what
keeps 8B decoding from the memory-bound floor" without guessing: the kernels whose
time grows with n, and the share of launch-bound small kernels.

Usage (CUDA)::

    python -m tools.profile_step --shapes smollm2-shape llama3-8b-shape --n 1 16 32 64 --out OUT

On CPU it runs (``--device cpu --shape tiny``) as a smoke test; CPU op times say
nothing about the GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, random_tree, sync, versions
from benchmarks.models import build_compact, to_dtype


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", "--shape", nargs="+", default=["smollm2-shape", "llama3-8b-shape"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--prefix", type=int, default=512)
    p.add_argument("--n", type=int, nargs="+", default=[1, 16, 32, 64])
    p.add_argument("--steps", type=int, default=20, help="profiled forwards per tree size")
    p.add_argument("--top", type=int, default=14, help="kernels listed per table")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="profile CUDA-graph replays (what decoding runs) rather than eager forwards")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--tag", default="")
    return p.parse_args(argv)


def kernel_times(prof, steps: int, device_type: str) -> dict[str, float]:
    """Kernel name -> microseconds per step (device time; CPU time on CPU)."""
    per = defaultdict(float)
    for e in prof.key_averages():
        t = e.device_time_total if device_type == "cuda" else e.self_cpu_time_total
        if device_type == "cuda" and getattr(e, "device_type", None) is not None \
                and "CUDA" not in str(e.device_type):
            continue
        if t > 0:
            per[e.key] += t / steps
    return dict(per)


def profile_shape(shape: str, args, device, dtype) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from specdec.backends.compact import CompactRunner
    from specdec.backends.cuda_graphs import GraphedCompactRunner

    hf, model = build_compact(shape, dtype, device, args.seed)
    del hf
    cap = -(-(args.prefix + max(args.n) + 8) // 64) * 64
    runner = CompactRunner(model, max_length=cap)
    use_graphs = args.graphs and device.type == "cuda"
    r = GraphedCompactRunner(runner, buckets=args.n) if use_graphs else runner
    g = torch.Generator().manual_seed(args.seed)
    with torch.inference_mode():
        if args.prefix:
            prompt = torch.randint(3, model.vocab_size, (args.prefix,), generator=g).to(device)
            runner.forward(prompt, torch.arange(args.prefix, device=device))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {"shape": shape, "graphs": use_graphs, "n": {}}
    for n in args.n:
        _, depth, mask = random_tree(n, g)
        toks = torch.randint(0, runner.vocab_size, (n,), generator=g).to(device)
        pos, mask = (args.prefix + depth).to(device), mask.to(device)
        with torch.inference_mode():
            for _ in range(3):  # warm-up / capture
                r.forward(toks, pos, mask)
                r.crop(args.prefix)
            sync(device)
            with profile(activities=acts) as prof:
                for _ in range(args.steps):
                    r.forward(toks, pos, mask)
                    r.crop(args.prefix)
                sync(device)
        times = kernel_times(prof, args.steps, device.type)
        total = sum(times.values())
        out["n"][n] = {"total_us": total, "kernels": dict(sorted(times.items(), key=lambda kv: -kv[1]))}
        print(f"[{shape}] n={n}: {total:.0f} us of kernels per step over {len(times)} kernel names", flush=True)
    del r, runner, model
    return out


def to_markdown(meta: dict, results: list[dict], top: int) -> str:
    lines = [f"# Verify-step kernel profile ({meta['gpu']})", "",
             f"- command: `{meta['command']}`",
             f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
             f"- dtype {meta['dtype']}, batch 1, cached prefix {meta['prefix']}, random weights, random trees; "
             f"microseconds of device time per step (mean over {meta['steps']} steps, torch.profiler); "
             "kernels ranked by their time at the largest n", ""]
    for res in results:
        if "error" in res:
            lines += [f"## {res['shape']}", "", f"error: {res['error']}", ""]
            continue
        ns = list(res["n"])
        big = res["n"][ns[-1]]["kernels"]
        lines += [f"## {res['shape']} ({'CUDA-graph replays' if res['graphs'] else 'eager forwards'})", "",
                  "| kernel | " + " | ".join(f"n={n} us" for n in ns) + " |",
                  "|---|" + "---:|" * len(ns)]
        for name in list(big)[:top]:
            short = name if len(name) <= 70 else name[:67] + "..."
            lines.append(f"| `{short}` | " + " | ".join(f"{res['n'][n]['kernels'].get(name, 0.0):.1f}" for n in ns)
                         + " |")
        lines.append("| **all kernels** | " + " | ".join(f"**{res['n'][n]['total_us']:.0f}**" for n in ns) + " |")
        lines.append("| kernel names | " + " | ".join(str(len(res["n"][n]["kernels"])) for n in ns) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import datetime as _dt
    import platform
    import shlex
    import traceback

    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("profile_step: needs CUDA (or --device cpu --shape tiny for a smoke test)", file=sys.stderr)
        return 2
    meta = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor()})",
            "versions": versions(), "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            "dtype": args.dtype, "prefix": args.prefix, "steps": args.steps}
    results = []
    for shape in args.shapes:
        try:
            results.append(profile_shape(shape, args, device, to_dtype(args.dtype)))
        except Exception as e:  # noqa: BLE001 -- keep the other shapes' tables
            traceback.print_exc()
            results.append({"shape": shape, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "step_profile" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    md = to_markdown(meta, results, args.top)
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
