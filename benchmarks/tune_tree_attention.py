"""Tune the tree-attention kernel's launch config and split count on this GPU (CUDA only).

Times every candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) x split count for a
grid of (n, prefix) cases, each call replayed from a CUDA graph and timed with
``triton.testing.do_bench`` (median, L2 cleared before each repetition). Prints the
best per case and writes JSON to ``--out``; use it to revise ``block_config`` /
``default_num_splits`` in specdec/kernels/tree_attention.py.

    python benchmarks/tune_tree_attention.py --out benchmarks/results/
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_tree_attention import graph_time, random_tree_mask, warm_gpu  # noqa: E402

TAILS = [(64, 4, 2), (64, 4, 3), (128, 4, 3), (128, 8, 3), (64, 8, 3), (32, 4, 3)]  # (BLOCK_N, warps, stages)
CASES = [(32, 8, 128, n, L) for L in (512, 4096, 32768) for n in (1, 16, 64, 128)] + \
        [(16, 8, 256, n, L) for L in (4096, 32768) for n in (1, 64)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rep", type=int, default=15)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_tree_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    from specdec.kernels import tree_attention as tk
    from specdec.ops import attention as attn

    warm_gpu()
    results = []
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for hq, hkv, d, n, L in CASES:
        rows = n * hq // hkv
        dev = torch.device("cuda")
        q = torch.randn(n, hq, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(hkv, L + n, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        mask = random_tree_mask(n, n).to(dev)
        packed, qpos = attn.pack_tree_mask(mask), attn.tree_query_positions(mask, L).to(torch.int32)
        bms = [bm for bm in (16, 32, 64, 128) if bm <= max(16, 2 ** math.ceil(math.log2(rows)))]
        if d > 128:
            bms = [bm for bm in bms if bm <= 64]
        splits = [s for s in (1, 2, 4, 8, 16, 32, 64) if L // s >= 128]
        auto = tk.default_num_splits(rows, hkv, L, d, dev)
        case = {"hq": hq, "hkv": hkv, "d": d, "n": n, "L": L, "auto_config": tk.block_config(rows, d, 2, dev, L, auto),
                "auto_splits": auto, "timings": []}

        def run(cfg, s):
            return tk.tree_attention_fwd(q, k, v, packed, qpos, L, scale=d ** -0.5, num_splits=s, config=cfg)

        case["auto_us"] = graph_time(lambda: run(None, None), args.warmup, args.rep)
        for bm in bms:
            for bn, w, st in TAILS:
                if d > 128 and bn > 64:
                    continue
                cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
                for s in splits:
                    try:
                        t = graph_time(lambda: run(cfg, s), args.warmup, args.rep)
                    except Exception as e:  # e.g. out of shared memory
                        t = None
                        case.setdefault("errors", []).append(f"{cfg} s={s}: {type(e).__name__}: {str(e)[:120]}")
                    case["timings"].append({**cfg, "splits": s, "us": t})
        ok = [r for r in case["timings"] if r["us"] is not None]
        best = min(ok, key=lambda r: r["us"])
        case["best"] = best
        kv_bytes = 2 * hkv * (L + n) * d * 2
        print(f"hq={hq} hkv={hkv} d={d} n={n:4d} L={L:6d} auto={case['auto_us']:7.1f}us (s={auto}) "
              f"best={best['us']:7.1f}us ({kv_bytes / best['us'] / 1e3:5.0f} GB/s) "
              f"BM={best['BLOCK_M']} BN={best['BLOCK_N']} w={best['num_warps']} st={best['num_stages']} "
              f"s={best['splits']}", flush=True)
        results.append(case)
        (out_dir / "tune_tree_attention.json").write_text(json.dumps(
            {"gpu": torch.cuda.get_device_name(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
