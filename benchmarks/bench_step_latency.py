"""Benchmark: latency of one target forward (a verify step) on the compact runtime,
eager vs CUDA graphs, against the memory-bound floor and transformers' own decoding.

For random-weight Llama shapes (``smollm2-shape``: hidden 576, 30 layers, 9/3 heads,
FFN 1536, vocab 49152, tied; ``llama3-8b-shape``), bf16, built on the GPU:

(a) floor: the bytes one step must read -- every weight once (an untied input
    embedding table only gathers m rows, so it is left out) plus the prefix's K/V --
    over the measured device-to-device copy bandwidth (bytes read + written);
(b) verify-step latency vs tree size n at a cached prefix (default 512 tokens):
    ``CompactRunner`` (eager) and ``GraphedCompactRunner`` (CUDA graphs, bucket = n),
    each step = forward of an n-node random tree + crop back to the prefix, timed with
    ``triton.testing.do_bench`` (median; L2 cleared before every repetition; host
    overhead included, since the GPU waits for it). ``replay`` times the bare graph
    replay (GPU time only);
(c) plain decoding tokens/s after the prefix: graphed one-token steps with the argmax
    on the device (no host sync per token), the same reading each token on the host
    (what an engine loop pays), the eager runner, and transformers ``generate``
    (greedy, dynamic cache, sdpa) on the same weights.

Random weights: acceptance means nothing here; this times the machinery only.

Usage (CUDA; about a minute on an H100)::

    python -m benchmarks.bench_step_latency --out benchmarks/results/

Debug on CPU (no timing worth reading; the graphed runner runs its padded static
forward uncaptured)::

    python -m benchmarks.bench_step_latency --device cpu --shape tiny --prefix 32 --n 1 4 \
        --decode-tokens 8 --hf-tokens 4
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from .common import RESULTS_DIR, random_tree, sync, versions, warm_gpu
from .models import build_compact, shape_config, to_dtype

DEFAULT_N = [1, 2, 4, 8, 16, 32, 64, 128]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", "--shape", nargs="+", default=["smollm2-shape", "llama3-8b-shape"],
                   help="model shapes: smollm2-shape, llama3-8b-shape, llama3.2-1b-shape, tiny (CPU debug)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (debug only)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--prefix", type=int, default=512, help="cached prefix length for (b) and (c)")
    p.add_argument("--n", type=int, nargs="+", default=DEFAULT_N, help="tree sizes (also the graph buckets)")
    p.add_argument("--decode-tokens", type=int, default=256, help="graphed decode steps for (c)")
    p.add_argument("--eager-decode-tokens", type=int, default=64, help="eager decode steps for (c)")
    p.add_argument("--hf-tokens", type=int, default=64, help="transformers generate new tokens for (c)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers generate")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=True,
                   help="short timings (default); --no-quick repeats longer")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="the fused RMSNorm / RoPE kernels on or off (SPECDEC_FUSED_KERNELS=1 / 0); "
                        "default: the library's choice (on for CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS_DIR), help="output folder")
    p.add_argument("--tag", default="", help="suffix for the output file names")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.n) or args.prefix < 0:
        p.error("--n values must be >= 1 and --prefix >= 0")
    args.n = sorted(set(args.n))
    return args


# ----------------------------------------------------------------------------- timing

class Timer:
    """Median milliseconds of ``fn()``: triton's do_bench on CUDA (CUDA events, L2
    cleared before each repetition), else CUDA events by hand; perf_counter on CPU."""

    def __init__(self, device: torch.device, quick: bool):
        self.device = device
        self.warmup_ms, self.rep_ms = (10, 50) if quick else (25, 250)
        self.cpu_reps = 3 if quick else 10
        self.do_bench = None
        if device.type == "cuda":
            try:
                from triton.testing import do_bench
                self.do_bench = do_bench
            except Exception as e:  # noqa: BLE001
                print(f"# triton.testing.do_bench unavailable ({type(e).__name__}: {e}); timing with CUDA events",
                      flush=True)

    def __call__(self, fn) -> float:
        if self.device.type != "cuda":
            fn()
            times = []
            for _ in range(self.cpu_reps):
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
            return statistics.median(times)
        if self.do_bench is not None:
            return float(self.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        fn()
        torch.cuda.synchronize()
        times = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t_end = time.perf_counter() + self.rep_ms / 1e3
        while len(times) < 5 or time.perf_counter() < t_end:
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def copy_bandwidth(device: torch.device, timer: Timer) -> dict:
    """Device-to-device copy of a large fp32 tensor: (bytes read + written) / time."""
    nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))  # both freed on return
    return {"bytes": nbytes, "ms": ms, "GBps": 2 * nbytes / (ms * 1e-3) / 1e9}


def byte_counts(model, prefix: int) -> dict:
    unique = {}
    for p in model.parameters():
        unique.setdefault(p.data_ptr(), p)
    total = sum(p.numel() * p.element_size() for p in unique.values())
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    tied = embed.data_ptr() == head.data_ptr()
    read = total - (0 if tied else embed.numel() * embed.element_size())
    kv = 2 * model.num_layers * model.num_kv_heads * prefix * model.head_dim * embed.element_size()
    return {"params": sum(p.numel() for p in unique.values()), "weight_bytes": total, "tied_embeddings": tied,
            "weight_bytes_read_per_step": read, "kv_bytes_prefix": kv}


# ----------------------------------------------------------------------------- measurements

def bench_steps(runner, graphed, args, timer, device, counts, bw) -> list[dict]:
    """(b): one verify forward of an n-node tree at the prefix, eager vs graphed."""
    g = torch.Generator().manual_seed(args.seed + 1)
    rows = []
    for n in args.n:
        parents, depth, mask = random_tree(n, g)
        toks = torch.randint(0, runner.vocab_size, (n,), generator=g).to(device)
        pos = (args.prefix + depth).to(device)
        mask = mask.to(device)

        def step(r):
            r.forward(toks, pos, mask)
            r.crop(args.prefix)

        with torch.inference_mode():
            ref = runner.forward(toks, pos, mask)
            runner.crop(args.prefix)
            out = graphed.forward(toks, pos, mask)  # first use of the bucket: captures
            graphed.crop(args.prefix)
            sync(device)
            err = float((out - ref).abs().max()) / max(1e-6, float(ref.abs().max()))
        bucket = next((b for b in graphed.buckets if b >= n), None)
        row = {"n": n, "bucket": bucket, "max_rel_err_graph_vs_eager": err}
        row["eager_ms"] = timer(lambda: step(runner))
        row["graph_ms"] = timer(lambda: step(graphed))
        st = graphed._buckets.get(bucket)
        if st is not None and st.graph is not None:
            graphed._start.fill_(args.prefix)
            row["replay_ms"] = timer(st.graph.replay)  # writes only past the prefix
        row["graph_mode"] = graphed.mode
        step_bytes = counts["weight_bytes_read_per_step"] + counts["kv_bytes_prefix"]
        row["floor_ms"] = step_bytes / (bw * 1e9) * 1e3
        row["graph_speedup"] = row["eager_ms"] / row["graph_ms"]
        row["graph_over_floor"] = row["graph_ms"] / row["floor_ms"]
        rows.append(row)
        print(f"  n={n:4d} eager {row['eager_ms']:8.3f} ms  graph {row['graph_ms']:8.3f} ms  "
              f"replay {row.get('replay_ms', float('nan')):8.3f} ms  floor {row['floor_ms']:6.3f} ms  "
              f"x{row['graph_speedup']:.2f}  err {err:.1e}  [{graphed.mode}]", flush=True)
    return rows


def decode_tps(r, first: torch.Tensor, start: int, steps: int, device, *, host_sync: bool) -> dict:
    """Greedy one-token steps from cache length ``start``; argmax stays on the device
    unless ``host_sync`` (then each token is read on the host, as an engine loop does)."""
    with torch.inference_mode():
        r.crop(start)
        tok = first.view(1).clone()
        pos = torch.tensor([start], device=device)
        for _ in range(4):  # warm-up (and any lazy capture)
            tok = r.forward(tok, pos)[0].argmax().view(1)
        r.crop(start)
        tok = first.view(1).clone()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = r.forward(tok, pos)[0].argmax().view(1)
            pos.add_(1)
            if host_sync:
                int(tok)
        sync(device)
        dt = time.perf_counter() - t0
        r.crop(start)
    return {"tokens": steps, "s": dt, "tokens_per_s": steps / dt, "ms_per_token": 1e3 * dt / steps}


def hf_decode_tps(hf, prompt: torch.Tensor, new_tokens: int, device, quick: bool) -> dict:
    """transformers generate (greedy, dynamic cache): (new - 1) tokens over
    t(new tokens) - t(1 token), so the prefill is left out."""
    ids = prompt[None]
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, use_cache=True)

    def run(k):
        sync(device)
        t0 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=k, min_new_tokens=k, **kw)
        sync(device)
        assert out.shape[1] == ids.shape[1] + k, out.shape
        return time.perf_counter() - t0

    with torch.inference_mode():
        run(4)  # warm-up
        reps = 1 if quick else 3
        t1 = min(run(1) for _ in range(reps + 1))
        tn = min(run(new_tokens) for _ in range(reps))
    dt = max(tn - t1, 1e-9)
    return {"tokens": new_tokens, "s_total": tn, "s_prefill_plus_1": t1, "tokens_per_s": (new_tokens - 1) / dt,
            "ms_per_token": 1e3 * dt / (new_tokens - 1), "attn_implementation": hf.config._attn_implementation}


def bench_shape(shape: str, args, timer, device, dtype, bw) -> dict:
    from specdec.backends.compact import CompactRunner
    from specdec.backends.cuda_graphs import GraphedCompactRunner

    res: dict = {"shape": shape, "config": shape_config(shape)}
    t0 = time.perf_counter()
    hf, model = build_compact(shape, dtype, device, args.seed)
    sync(device)
    res["build_s"] = time.perf_counter() - t0
    counts = byte_counts(model, args.prefix)
    res.update(counts)
    cap = args.prefix + max(max(args.n), 1) + max(args.decode_tokens, args.eager_decode_tokens) + 8
    cap = -(-cap // 64) * 64
    res["cache_capacity"] = cap
    print(f"[{shape}] built in {res['build_s']:.1f} s: {counts['params'] / 1e6:.1f} M params, "
          f"{counts['weight_bytes'] / 1e9:.2f} GB; cache capacity {cap}", flush=True)
    runner = CompactRunner(model, max_length=cap)
    graphed = GraphedCompactRunner(runner, buckets=args.n, mode=None if device.type == "cuda" else "static")
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(3, model.vocab_size, (args.prefix + 1,), generator=g).to(device)
    with torch.inference_mode():
        if args.prefix:
            runner.forward(prompt[:-1], torch.arange(args.prefix, device=device))
    sync(device)
    res["steps"] = bench_steps(runner, graphed, args, timer, device, counts, bw)
    first = prompt[-1]
    res["decode"] = {}
    for name, r, steps, host_sync in (("graph", graphed, args.decode_tokens, False),
                                      ("graph_host_sync", graphed, args.decode_tokens, True),
                                      ("eager", runner, args.eager_decode_tokens, False)):
        res["decode"][name] = decode_tps(r, first, args.prefix, steps, device, host_sync=host_sync)
        d = res["decode"][name]
        print(f"  decode {name:16s} {d['tokens_per_s']:9.1f} tok/s ({d['ms_per_token']:.3f} ms/token)", flush=True)
    res["graph"] = graphed.describe()
    from specdec.ops import linear as linear_ops

    res["one_row_linear"] = linear_ops.choices()  # cuBLAS or GEMV per weight shape (measured)
    print(f"  one-row linears: {res['one_row_linear']}", flush=True)
    floor = (counts["weight_bytes_read_per_step"] + counts["kv_bytes_prefix"]) / (bw * 1e9)
    res["decode"]["floor_tokens_per_s"] = 1.0 / floor
    if not args.no_hf:
        try:
            res["decode"]["hf_generate"] = hf_decode_tps(hf, prompt[:-1], args.hf_tokens, device, args.quick)
            d = res["decode"]["hf_generate"]
            print(f"  decode {'hf_generate':16s} {d['tokens_per_s']:9.1f} tok/s ({d['ms_per_token']:.3f} ms/token)",
                  flush=True)
        except Exception as e:  # noqa: BLE001 -- say what the peer is rather than crash
            res["decode"]["hf_generate"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"  hf_generate failed: {type(e).__name__}: {e}", flush=True)
    g_tps, hf_tps = res["decode"]["graph"]["tokens_per_s"], res["decode"].get("hf_generate", {}).get("tokens_per_s")
    if hf_tps:
        res["decode"]["graph_speedup_vs_hf"] = g_tps / hf_tps
    del runner, graphed, model, hf
    return res


# ----------------------------------------------------------------------------- report

def to_markdown(meta: dict, results: list[dict]) -> str:
    def f(x, fmt="{:.3f}"):
        return "—" if x is None else fmt.format(x)

    lines = [f"# Verify-step latency: compact runtime, eager vs CUDA graphs ({meta['gpu']})", "",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
             f"- dtype {meta['dtype']}, batch 1, cached prefix {meta['prefix']} tokens, random weights "
             "(timing only), random trees (each node's parent among the previous four)",
             f"- device copy bandwidth {meta['copy_bandwidth']['GBps']:.0f} GB/s (read + write of a "
             f"{meta['copy_bandwidth']['bytes'] >> 20} MiB copy); floor = (weights read per step + prefix K/V) / "
             "that bandwidth (an untied input embedding only gathers m rows and is left out)",
             "- step = forward of an n-node tree + crop back to the prefix; ms = median of "
             f"{meta['timer']} (host overhead included); replay = the bare graph replay (GPU time only)",
             "- decode: one-token steps after the prefix; 'graph' keeps the argmax on the device (no host "
             "sync per token), 'graph + host sync' reads every token on the host; hf = transformers "
             "generate (greedy, dynamic cache, sdpa), (new - 1) tokens over t(new) - t(1)", ""]
    for r in results:
        lines.append(f"## {r['shape']}")
        if "error" in r:
            lines += ["", f"failed: `{r['error']}`", ""]
            continue
        gi = r.get("graph", {})
        lines += ["", f"- {r['params'] / 1e6:.1f} M parameters, {r['weight_bytes'] / 1e9:.3f} GB "
                  f"(tied embeddings: {r['tied_embeddings']}); prefix K/V {r['kv_bytes_prefix'] / 1e6:.1f} MB; "
                  f"built in {r['build_s']:.1f} s; cache capacity {r['cache_capacity']}",
                  f"- graphs: mode {gi.get('mode')}, captured buckets {gi.get('captured')}"
                  + (f", disabled: {gi['disabled_reason']}" if gi.get("disabled_reason") else "")
                  + (f", eager calls {gi['eager_calls']}" if gi.get("eager_calls") else ""),
                  "- one-row linears (measured per weight shape): "
                  + (", ".join(f"{k}: {v}" for k, v in r.get("one_row_linear", {}).items()) or "none"), "",
                  "| n | eager ms | graph ms | replay ms | floor ms | graph speed-up | graph / floor | "
                  "rel. err graph vs eager |", "|---|---|---|---|---|---|---|---|"]
        for s in r.get("steps", []):
            lines.append(f"| {s['n']} | {f(s['eager_ms'])} | {f(s['graph_ms'])} | {f(s.get('replay_ms'))} | "
                         f"{f(s['floor_ms'])} | {f(s['graph_speedup'], '{:.2f}')} | "
                         f"{f(s['graph_over_floor'], '{:.2f}')} | {f(s['max_rel_err_graph_vs_eager'], '{:.1e}')} |")
        dec = r.get("decode", {})
        if dec:
            lines += ["", "| decode | tokens | tokens/s | ms/token |", "|---|---|---|---|"]
            for key, label in (("graph", "graph"), ("graph_host_sync", "graph + host sync"), ("eager", "eager"),
                               ("hf_generate", "hf generate")):
                d = dec.get(key)
                if d is None:
                    continue
                if "error" in d:
                    lines.append(f"| {label} | — | failed: {d['error'][:80]} | — |")
                else:
                    lines.append(f"| {label} | {d['tokens']} | {d['tokens_per_s']:.1f} | {d['ms_per_token']:.3f} |")
            lines.append(f"| floor | — | {dec['floor_tokens_per_s']:.1f} | {1e3 / dec['floor_tokens_per_s']:.3f} |")
            if dec.get("graph_speedup_vs_hf"):
                lines += ["", f"graphed decode vs transformers generate: x{dec['graph_speedup_vs_hf']:.2f}"]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.fused is not None:
        os.environ["SPECDEC_FUSED_KERNELS"] = "1" if args.fused else "0"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_step_latency: needs a CUDA GPU (torch.cuda.is_available() is False). Nothing was run. "
              "For a CPU smoke test of the script: --device cpu --shape tiny", file=sys.stderr)
        return 2
    if device.type not in ("cuda", "cpu"):
        print(f"bench_step_latency: unsupported device {args.device!r}", file=sys.stderr)
        return 2
    for shape in args.shapes:
        try:
            shape_config(shape)
        except ValueError as e:
            print(f"bench_step_latency: {e}", file=sys.stderr)
            return 2
    dtype = to_dtype(args.dtype)
    timer = Timer(device, args.quick)
    t_start = time.perf_counter()
    from specdec.ops import backend

    meta = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor()})",
            "device": str(device), "versions": versions(), "backends": backend.describe(),
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            "dtype": args.dtype, "prefix": args.prefix, "n": args.n, "quick": args.quick, "batch": 1,
            "timer": (f"triton.testing.do_bench (warmup {timer.warmup_ms} ms, rep {timer.rep_ms} ms)"
                      if device.type == "cuda" else f"perf_counter x{timer.cpu_reps}")}
    if device.type == "cuda":
        meta["sm_count"] = torch.cuda.get_device_properties(device).multi_processor_count
    print(f"# {meta['gpu']} | " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), flush=True)
    if device.type == "cuda":
        warm_gpu()
    meta["copy_bandwidth"] = copy_bandwidth(device, timer)
    bw = meta["copy_bandwidth"]["GBps"]
    print(f"# copy bandwidth {bw:.0f} GB/s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "step_latency" + (f"_{args.tag}" if args.tag else "")
    results = []
    for shape in args.shapes:
        try:
            results.append(bench_shape(shape, args, timer, device, dtype, bw))
        except Exception as e:  # noqa: BLE001 -- keep the other shapes' numbers
            traceback.print_exc()
            results.append({"shape": shape, "error": f"{type(e).__name__}: {str(e)[:500]}"})
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        meta["total_s"] = time.perf_counter() - t_start
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    md = to_markdown(meta, results)
    (out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')} in {meta['total_s']:.0f} s", flush=True)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
