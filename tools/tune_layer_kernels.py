"""Tune a verify step's two big kernel families as they run inside a model (CUDA only).

An isolated call timed with the L2 cleared is not what a model runs: inside a model
each layer's call follows the previous layer's, from a CUDA graph, on K/V the L2 no
longer holds. Here each candidate is captured as a graph of many back-to-back calls,
each on its own K/V (or weight) copy, enough copies that they do not fit in the L2,
and timed per call (CUDA events over graph replays).

(a) tree attention: launch config x split count, for the real model shapes (SmolLM2:
    9/3 heads, D 64; Llama-3-8B: 32/8 heads, D 128), tree sizes n and prefixes L;
(b) the linear layers of those shapes at m = 1, 16, 64 rows: ``F.linear`` on [N, K]
    weights vs ``x @ W`` on [K, N] weights, under cuBLAS and cuBLASLt.

    python -m tools.tune_layer_kernels --out OUT

The launch heuristic in specdec/kernels/tree_attention.py and the GEMV configs in
specdec/kernels/gemv.py come from its H200 run (benchmarks/results/2026-12-01-h200-s3/);
tests/test_benchmarks.py checks the heuristic against that run's timings. Rerun it to
retune for another GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS_DIR, random_tree_mask, warm_gpu

SHAPES = {  # name: (Hq, Hkv, D, [(K, N) of qkv, o, gate_up, down, lm_head])
    "smollm2": (9, 3, 64, [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)]),
    "llama3-8b": (32, 8, 128, [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 128256)]),
}
FOOTPRINT = 96 << 20  # bytes of distinct operands per graph: about twice the 50 MB L2


def per_call_us(fn_i, copies: int, reps: int = 10) -> float:
    """Microseconds per call of ``fn_i(i)`` for i in range(copies), from one graph replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(copies, 2)):
            fn_i(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn_i(i)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return 1e3 * times[len(times) // 2] / copies


def attention_candidates(rows: int, d: int) -> list[dict]:
    top = max(16, 2 ** math.ceil(math.log2(max(rows, 1))))
    out = []
    for bm in (16, 32, 64, 128):
        if bm > top or (d > 128 and bm > 64):
            continue
        warps = 8 if bm >= 128 else 4
        for bn in ((32, 64) if bm <= 16 else (64,)) if d <= 128 else (32,):
            for st in (2, 3):
                out.append({"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": st})
    return out


def tune_attention(args) -> list[dict]:
    from specdec.kernels import tree_attention as tk
    from specdec.ops import attention as attn

    dev = torch.device("cuda")
    rows_out = []
    for shape in args.shapes:
        hq, hkv, d, _ = SHAPES[shape]
        for L in args.prefixes:
            for n in args.n:
                cap = L + n + 64
                per_copy = 2 * hkv * cap * d * 2
                copies = max(32, min(128, FOOTPRINT // per_copy))
                ks = [torch.randn(hkv, cap, d, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
                vs = [torch.randn_like(k) for k in ks]
                q = torch.randn(n, hq, d, device=dev, dtype=torch.bfloat16)
                mask = random_tree_mask(n, n).to(dev)
                packed = attn.pack_tree_mask(mask)
                plen = torch.tensor([L], device=dev, dtype=torch.int32)
                qpos = attn.tree_query_positions(mask, L).to(dev, torch.int32)
                rows = n * hq // hkv
                auto_s = tk.default_num_splits(rows, hkv, L, d, dev)
                auto_cfg = tk.block_config(rows, d, 2, dev, L, auto_s)
                case = {"shape": shape, "L": L, "n": n, "copies": copies, "auto": {**auto_cfg, "splits": auto_s},
                        "timings": []}

                def run(cfg, s):
                    return lambda i: tk.tree_attention_fwd(q, ks[i], vs[i], packed, qpos, plen, scale=d ** -0.5,
                                                           num_splits=s, config=cfg, prefix_bound=L)

                t0 = time.perf_counter()
                case["auto_us"] = per_call_us(run(None, None), copies)
                for cfg in attention_candidates(rows, d):
                    for s in args.splits:
                        if s > 1 and L // s < 16:
                            continue
                        try:
                            us = per_call_us(run(cfg, s), copies)
                        except Exception as e:  # noqa: BLE001 -- e.g. out of shared memory
                            case.setdefault("errors", []).append(f"{cfg} s={s}: {type(e).__name__}: {str(e)[:100]}")
                            continue
                        case["timings"].append({**cfg, "splits": s, "us": us})
                best = min(case["timings"], key=lambda r: r["us"])
                case["best"] = best
                print(f"attn {shape:9s} L={L:5d} n={n:3d}: auto {case['auto_us']:6.2f} us "
                      f"(BM={auto_cfg['BLOCK_M']} BN={auto_cfg['BLOCK_N']} st={auto_cfg['num_stages']} s={auto_s})  "
                      f"best {best['us']:6.2f} us (BM={best['BLOCK_M']} BN={best['BLOCK_N']} "
                      f"st={best['num_stages']} s={best['splits']})  [{time.perf_counter() - t0:.0f} s]", flush=True)
                rows_out.append(case)
                del ks, vs
    return rows_out


def tune_linear(args) -> list[dict]:
    dev = torch.device("cuda")
    out = []
    libs = ["cublas", "cublaslt"]
    for shape in args.shapes:
        for k, n in SHAPES[shape][3]:
            per_copy = k * n * 2
            copies = max(4, min(256, -(-FOOTPRINT // per_copy)))
            w_nk = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
            w_kn = [w.t().contiguous() for w in w_nk]
            for m in args.m:
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                row = {"shape": shape, "K": k, "N": n, "m": m, "copies": copies}
                for lib in libs:
                    try:
                        torch.backends.cuda.preferred_blas_library(lib)
                    except Exception as e:  # noqa: BLE001
                        row[f"{lib}_error"] = str(e)[:100]
                        continue
                    row[f"linear_nk_{lib}_us"] = per_call_us(lambda i: F.linear(x, w_nk[i]), copies)
                    row[f"mm_kn_{lib}_us"] = per_call_us(lambda i: x @ w_kn[i], copies)
                torch.backends.cuda.preferred_blas_library("cublas")
                ts = {key: v for key, v in row.items() if key.endswith("_us")}
                best = min(ts, key=ts.get)
                gbs = per_copy / (ts[best] * 1e-6) / 1e9
                print(f"linear {shape:9s} K={k:6d} N={n:6d} m={m:3d}: " +
                      "  ".join(f"{key[:-3]} {v:7.1f}" for key, v in ts.items()) + f"  best {best} {gbs:.0f} GB/s",
                      flush=True)
                out.append(row)
            del w_nk, w_kn
            torch.cuda.empty_cache()
    return out


def tune_gemv(args) -> list[dict]:
    """The one-row GEMV's configs vs cuBLAS per weight shape (do_bench, L2 cleared)."""
    import itertools

    from triton.testing import do_bench

    from specdec.kernels import gemv as kernel

    dev = torch.device("cuda")
    cands = [c for c in itertools.product((4, 8, 16, 32), (256, 512, 1024, 2048), (4, 8), (2, 3, 4))
             if c[0] * c[1] <= 32768]
    out = []
    for shape in args.shapes:
        for k, n in SHAPES[shape][3][:4]:
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
            x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
            y = torch.empty(n, device=dev, dtype=torch.bfloat16)
            row = {"shape": shape, "K": k, "N": n,
                   "cublas_us": 1e3 * do_bench(lambda: F.linear(x, w), warmup=5, rep=25, return_mode="median")}
            times = {}
            for c in cands:
                try:
                    times[str(c)] = 1e3 * do_bench(lambda: kernel.gemv(x.view(-1), w, None, y, c), warmup=5, rep=25,
                                                   return_mode="median")
                except Exception:  # noqa: BLE001
                    pass
            best = sorted(times.items(), key=lambda kv: kv[1])[:5]
            row.update(gemv=times, best=best)
            gb = n * k * 2 / 1e3
            print(f"gemv {shape:9s} K={k:6d} N={n:6d}: cuBLAS {row['cublas_us']:6.1f} us ({gb / row['cublas_us']:.0f} GB/s)"
                  f"  best " + ", ".join(f"{c} {t:.1f} us ({gb / t:.0f} GB/s)" for c, t in best[:3]), flush=True)
            out.append(row)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--prefixes", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--n", type=int, nargs="+", default=[1, 4, 16, 32, 64, 128])
    p.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--skip", choices=["attention", "linear", "gemv"], nargs="*", default=[])
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_layer_kernels: needs a CUDA GPU", file=sys.stderr)
        return 2
    warm_gpu()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "argv": sys.argv[1:]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("tune_layer_kernels" + (f"_{args.tag}" if args.tag else "") + ".json")
    if "linear" not in args.skip:
        res["linear"] = tune_linear(args)
        path.write_text(json.dumps(res, indent=1))
    if "gemv" not in args.skip:
        res["gemv"] = tune_gemv(args)
        path.write_text(json.dumps(res, indent=1))
    if "attention" not in args.skip:
        res["attention"] = tune_attention(args)
        path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
