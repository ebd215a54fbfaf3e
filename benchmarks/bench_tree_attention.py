"""Benchmark: Triton tree attention (verify step) vs PyTorch SDPA with an explicit mask.

Llama-3-8B head config by default (32 query heads, 8 KV heads, head dim 128, bf16),
one sequence, one layer: n tree nodes attend to a cached prefix of L tokens plus
their tree ancestors. Timed with ``triton.testing.do_bench`` (median; it clears the
L2 cache before every repetition, so every run reads K/V from HBM).

Peers:
- ``sdpa_gqa``: ``F.scaled_dot_product_attention`` on [1, Hq, n, D] queries, the
  [Hkv, L + n, D] cache and a precomputed [n, L + n] bool mask, ``enable_gqa=True``;
- ``sdpa_packed``: the CPU fallback's arrangement (the G query heads of a KV head
  stacked as G * n rows, no K/V copy), mask precomputed;
- ``flash_attn``: ``flash_attn_with_kvcache`` with causal masking over the n nodes
  as a *chain* (flash-attn has no tree mask: a speed reference, not the same math),
  on a [1, S, Hkv, D] copy of the cache. Reported as absent when the import fails.

Usage (CUDA only)::

    python -m benchmarks.bench_tree_attention --out benchmarks/results/
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import math
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import RESULTS_DIR, random_tree_mask, versions, warm_gpu, write_run
from .models import to_dtype


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(RESULTS_DIR), help="output folder")
    p.add_argument("--n", type=int, nargs="+", default=[1, 16, 64, 128], help="tree sizes")
    p.add_argument("--prefix", type=int, nargs="+", default=[512, 4096, 32768], help="cached prefix lengths")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--window", type=int, default=None, help="sliding window (Gemma 3 local layers)")
    p.add_argument("--splits", type=int, nargs="*", default=None,
                   help="also time the kernel at these fixed split counts (tuning)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix for the output file names")
    return p.parse_args(argv)


def graph_time(fn, warmup: int, rep: int) -> float:
    """Median microseconds of one call of ``fn`` replayed from a CUDA graph (no launch
    overhead; do_bench clears the L2 cache before each repetition)."""
    from triton.testing import do_bench

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return 1e3 * do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")


def eager_time(fn, warmup: int, rep: int) -> float:
    from triton.testing import do_bench

    return 1e3 * do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def bench_case(n, prefix, args, dtype, flash):
    from specdec.ops import attention as attn

    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    group = hq // hkv
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(args.seed + n + prefix)
    s_max = prefix + n
    q = torch.randn(n, hq, d, device=dev, dtype=dtype, generator=g)
    k_cache = torch.randn(hkv, s_max, d, device=dev, dtype=dtype, generator=g)
    v_cache = torch.randn(hkv, s_max, d, device=dev, dtype=dtype, generator=g)
    mask = random_tree_mask(n, args.seed + n).to(dev)
    packed = attn.pack_tree_mask(mask)
    qpos = attn.tree_query_positions(mask, prefix).to(torch.int32)
    window = args.window
    scale = 1.0 / math.sqrt(d)

    # the full [n, L + n] visibility mask, built once (not timed) for the SDPA peers
    kpos = torch.cat([torch.arange(prefix, device=dev), qpos.long()])
    full = torch.cat([torch.ones(n, prefix, dtype=torch.bool, device=dev), mask], 1)
    if window is not None:
        full &= kpos[None, :] > qpos.long()[:, None] - window
    full_packed = full.repeat(group, 1)
    keys, vals = k_cache[None], v_cache[None]  # [1, Hkv, L + n, D]

    def triton_fn(splits=None):
        return attn.tree_attention(q, k_cache, v_cache, prefix, packed, query_pos=qpos, window=window,
                                   scale=scale, num_splits=splits)

    def sdpa_gqa():
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, vals, attn_mask=full,
                                             scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)

    def sdpa_packed():
        qg = q.view(n, hkv, group, d).permute(1, 2, 0, 3).reshape(hkv, group * n, d)
        out = F.scaled_dot_product_attention(qg, k_cache, v_cache, attn_mask=full_packed, scale=scale)
        return out.view(hkv, group, n, d).permute(2, 0, 1, 3).reshape(n, hq, d)

    ref = attn.tree_attention_ref(q.float(), k_cache.float(), v_cache.float(), prefix, mask,
                                  query_pos=qpos, window=window, scale=scale)
    visible_prefix = prefix if window is None else min(prefix, window)  # keys a window lets anyone see
    kv_bytes = 2 * hkv * (visible_prefix + n) * d * k_cache.element_size()
    row = {"n": n, "prefix": prefix, "kv_MB": kv_bytes / 1e6,
           "num_splits_auto": attn.tree_attention_num_splits(q, k_cache, prefix, window=window)}
    peers = {"triton": triton_fn, "sdpa_gqa": sdpa_gqa, "sdpa_packed": sdpa_packed}
    if flash is not None:
        k_fa = k_cache.transpose(0, 1)[None].contiguous()  # [1, S, Hkv, D]
        v_fa = v_cache.transpose(0, 1)[None].contiguous()
        seqlens = torch.tensor([prefix], dtype=torch.int32, device=dev)
        k_new, v_new = k_fa[:, prefix:], v_fa[:, prefix:]
        win = (-1, -1) if window is None else (window - 1, 0)

        def flash_chain():  # appends the n nodes' K/V at cache_seqlens, causal over them
            return flash(q[None], k_fa, v_fa, k=k_new, v=v_new, cache_seqlens=seqlens, softmax_scale=scale,
                         causal=True, window_size=win)[0]

        peers["flash_attn_chain"] = flash_chain
    for name, fn in peers.items():
        try:
            out = fn()
            if name != "flash_attn_chain":
                row[f"{name}_maxerr"] = (out.float() - ref).abs().max().item()
            row[f"{name}_us"] = graph_time(fn, args.warmup, args.rep)
            row[f"{name}_eager_us"] = eager_time(fn, args.warmup, args.rep)
        except Exception as e:  # e.g. an SDPA backend that refuses the shape: record, go on
            row.setdefault(f"{name}_us", None)
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if row.get("triton_us"):
        row["triton_GBps"] = kv_bytes / (row["triton_us"] * 1e-6) / 1e9
        for name in peers:
            if name != "triton" and row.get(f"{name}_us"):
                row[f"speedup_vs_{name}"] = row[f"{name}_us"] / row["triton_us"]
    for s in args.splits or []:
        row[f"triton_splits{s}_us"] = graph_time(lambda: triton_fn(s), args.warmup, args.rep)
    return row


def to_markdown(meta: dict, rows: list[dict]) -> str:
    peers = [p for p in ("sdpa_gqa", "sdpa_packed", "flash_attn_chain") if any(f"{p}_us" in r for r in rows)]
    lines = [f"# Tree attention benchmark ({meta['gpu']})", "",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}",
             f"- heads: {meta['config']['heads']} q / {meta['config']['kv_heads']} kv, head dim "
             f"{meta['config']['head_dim']}, dtype {meta['config']['dtype']}, window {meta['config']['window']}, "
             "batch 1 (one sequence, one layer)",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
             "- times: microseconds, triton.testing.do_bench median (L2 cleared before each repetition) of "
             "one call replayed from a CUDA graph (GPU time, no launch overhead); 'eager' columns time the "
             "plain Python call (launch and wrapper overhead included)",
             "- GB/s: K/V bytes of [visible prefix | tree] over the Triton time (H100 HBM3: ~3000 GB/s "
             "measured copy); with a window only the last `window` prefix keys count", ""]
    if "flash_attn_chain" in peers:
        lines.append("- flash_attn_chain: causal over the nodes as a chain (no tree mask): speed reference only")
    head = ["n", "prefix", "splits", "triton us", "GB/s", "triton eager us"] + [f"{p} us" for p in peers] + \
           [f"x vs {p}" for p in peers] + [f"{p} eager us" for p in peers] + ["max err"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(x, f="{:.1f}"):
        return "—" if x is None else f.format(x)

    for r in rows:
        cells = [str(r["n"]), str(r["prefix"]), str(r["num_splits_auto"]), fmt(r.get("triton_us")),
                 fmt(r.get("triton_GBps"), "{:.0f}"), fmt(r.get("triton_eager_us"))]
        cells += [fmt(r.get(f"{p}_us")) for p in peers]
        cells += [fmt(r.get(f"speedup_vs_{p}"), "{:.2f}") for p in peers]
        cells += [fmt(r.get(f"{p}_eager_us")) for p in peers]
        cells.append(fmt(r.get("triton_maxerr"), "{:.1e}"))
        lines.append("| " + " | ".join(cells) + " |")
    split_cols = sorted({k for r in rows for k in r if k.startswith("triton_splits")},
                        key=lambda k: int(k[len("triton_splits"):-3]))
    if split_cols:
        lines += ["", "Fixed split counts (us):", "", "| n | prefix | auto | " +
                  " | ".join(c[len("triton_"):-3] for c in split_cols) + " |", "|" + "---|" * (3 + len(split_cols))]
        for r in rows:
            lines.append(f"| {r['n']} | {r['prefix']} | {fmt(r.get('triton_us'))} | " +
                         " | ".join(fmt(r.get(c)) for c in split_cols) + " |")
    errors = [(r["n"], r["prefix"], k, v) for r in rows for k, v in r.items() if k.endswith("_error")]
    if errors:
        lines += ["", "Errors:"] + [f"- n={n} prefix={p} {k}: {v}" for n, p, k, v in errors]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_tree_attention: needs a CUDA GPU (torch.cuda.is_available() is False); "
              "the Triton interpreter on CPU is far too slow to time. Nothing was run.", file=sys.stderr)
        return 2
    from specdec.ops import backend

    if not backend.use_triton(torch.device("cuda")):
        print("bench_tree_attention: Triton is not available (or disabled); nothing to time.", file=sys.stderr)
        return 2
    if args.heads % args.kv_heads:
        print("bench_tree_attention: --heads must be a multiple of --kv-heads", file=sys.stderr)
        return 2
    dtype = to_dtype(args.dtype)
    vers = versions("flash_attn")
    flash = None
    if backend.has_flash_attn():
        try:
            flash = importlib.import_module("flash_attn").flash_attn_with_kvcache
        except Exception as e:
            vers["flash_attn"] = f"absent ({type(e).__name__}: {e})"
    else:
        vers.setdefault("flash_attn", "absent")
    meta = {"gpu": torch.cuda.get_device_name(), "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
            "versions": vers, "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            "config": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                       "dtype": args.dtype, "window": args.window, "batch": 1, "warmup_ms": args.warmup,
                       "rep_ms": args.rep}}
    print(f"# {meta['gpu']} | " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    warm_gpu()
    rows = []
    for prefix in args.prefix:
        for n in args.n:
            row = bench_case(n, prefix, args, dtype, flash)
            rows.append(row)
            peers = "  ".join(f"{k[:-3]}={v:.1f}" for k, v in row.items() if k.endswith("_us") and v and
                              not k.startswith("triton") and not k.endswith("eager_us"))
            print(f"n={n:4d} L={prefix:6d} splits={row['num_splits_auto']:2d} triton={row.get('triton_us') or 0:8.1f}us"
                  f" ({row.get('triton_GBps') or 0:5.0f} GB/s)  {peers}  err={row.get('triton_maxerr', float('nan')):.1e}",
                  flush=True)
    out = Path(args.out)
    write_run(out, "tree_attention" + (f"_{args.tag}" if args.tag else ""), {"meta": meta, "rows": rows},
              to_markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
