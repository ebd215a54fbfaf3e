"""Batched decoding (#23): specdec's batched plain and speculative decoding against
transformers' batched ``generate``, side by side in one process on the same prompts.

    python -m benchmarks.bench_batch --model PATH.gguf --dtype bfloat16 --batch 8 32

For each batch size B, the prompts are cut into batches of B (left-padded, with an
attention mask, as a tokenizer gives them) and every method decodes every batch:

- ``hf``: transformers ``model.generate`` (greedy, its own batching; ``--no-hf`` skips it);
- ``plain``: ``specdec.generate_batch`` without a drafter (batched plain decoding);
- each ``--drafters`` entry: ``generate_batch`` with that drafter (one copy per row).

tok/s = new tokens summed over rows / wall time of the whole call (prefill included), summed
over batches. tau = committed tokens per row-step. ``identical``: rows whose tokens equal
the same rows under ``plain`` (in bf16 this is the exact mode's reach). Writes JSON +
Markdown into --out.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks import datasets, models
from benchmarks.common import RESULTS_DIR, device_name, environment, fit_prompts, sync, write_run


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_batch", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--datasets", default="humaneval,gsm8k,spec_bench")
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--drafters", default="ngram+recycling,suffix")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="generate_batch's token cap (default its own)")
    p.add_argument("--exact", choices=["default", "on", "off"], default="default")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default="")
    return p.parse_args(argv)


def left_pad(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [T_b] -> ids [B, T] left-padded with ``pad`` and the attention mask [B, T]."""
    width = max(r.numel() for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - r.numel():] = r
        mask[b, width - r.numel():] = 1
    return ids, mask


def main(argv=None) -> int:
    from specdec.batch_generate import generate_batch
    from specdec.drafters import make

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    loaded = models.load(args.model, dtype=args.dtype, device=device)
    model, eos, tok = loaded.model, loaded.eos_token_id, loaded.tokenizer
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    prompts = datasets.load(datasets.parse_names(args.datasets), tok, data_dir=args.data_dir, limit=args.limit,
                            per_category=args.per_category, instruct=loaded.is_instruct)
    prompts, _ = fit_prompts(prompts, model, max_new_tokens=args.max_new_tokens)
    rows = [p.prompt_ids[0] for ps in prompts.values() for p in ps]
    exact = {"default": None, "on": True, "off": False}[args.exact]
    drafters = [d for d in args.drafters.split(",") if d]
    eos_list = eos if isinstance(eos, list) else ([eos] if eos is not None else None)

    def run(method: str, ids, mask) -> dict:
        sync(device)
        t0 = time.perf_counter()
        if method == "hf":
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                     do_sample=False, eos_token_id=eos_list, pad_token_id=pad)
            sync(device)
            wall = time.perf_counter() - t0
            new = [_cut(r[ids.shape[1]:].tolist(), eos_list) for r in out]
            return {"new": new, "wall": wall, "row_steps": None, "forwards": None}
        drafter = None if method == "plain" else make(method, target=model)
        out = generate_batch(model, ids, attention_mask=mask, drafter=drafter, max_new_tokens=args.max_new_tokens,
                             eos_token_id=eos, pad_token_id=pad, exact=exact, max_batch_tokens=args.max_batch_tokens)
        sync(device)
        wall = time.perf_counter() - t0
        return {"new": out.new_token_lists, "wall": wall, "row_steps": sum(r.steps for r in out.stats.rows),
                "forwards": out.stats.forwards}

    methods = (["hf"] if not args.no_hf else []) + ["plain"] + drafters
    summary = {}
    for B in args.batch:
        batches = [rows[i:i + B] for i in range(0, len(rows) - B + 1, B)] or [rows[:B]]
        print(f"batch {B}: {len(batches)} batches of {len(batches[0])} rows; methods {methods}", flush=True)
        ids0, mask0 = left_pad(batches[0], pad)
        for m in methods:  # warm-up: compiles, allocations
            run(m, ids0.to(device), mask0.to(device))
        res = {m: [] for m in methods}
        for i, batch in enumerate(batches):
            ids, mask = (t.to(device) for t in left_pad(batch, pad))
            for m in methods:
                res[m].append(run(m, ids, mask))
            print(f"  [{i + 1}/{len(batches)}] " + ", ".join(
                f"{m} {sum(map(len, res[m][-1]['new'])) / res[m][-1]['wall']:.0f}" for m in methods), flush=True)
        for m in methods:
            toks = sum(len(n) for r in res[m] for n in r["new"])
            wall = sum(r["wall"] for r in res[m])
            steps = None if m == "hf" else sum(r["row_steps"] for r in res[m])
            same = sum(a == b for r, q in zip(res[m], res["plain"]) for a, b in zip(r["new"], q["new"]))
            summary[f"B{B} {m}"] = {"batch": B, "method": m, "tokens": toks, "wall_s": wall, "tok_s": toks / wall,
                                    "tau": toks / steps if steps else None,
                                    "forwards": None if m == "hf" else sum(r["forwards"] for r in res[m]),
                                    "identical_to_plain": same, "rows": sum(len(r["new"]) for r in res[m])}
        plain = summary[f"B{B} plain"]["tok_s"]
        for m in methods:
            summary[f"B{B} {m}"]["vs_plain"] = summary[f"B{B} {m}"]["tok_s"] / plain

    env = environment(device, command="python -m benchmarks.bench_batch " + " ".join(argv), argv=argv)
    data = {"env": env, "args": vars(args), "summary": summary, "model": loaded.name}
    out = Path(args.out) if args.out else RESULTS_DIR / f"{time.strftime('%Y-%m-%d')}-{device.type}"
    write_run(out, f"batch_{args.dtype}{args.tag}", data, to_markdown(data, device))
    return 0


def _cut(tokens: list[int], eos: list[int] | None) -> list[int]:
    """transformers pads a finished row after its EOS: keep up to the first EOS."""
    for i, t in enumerate(tokens):
        if eos and t in eos:
            return tokens[:i + 1]
    return tokens


def to_markdown(data: dict, device) -> str:
    a, env = data["args"], data["env"]
    lines = [f"# Batched decoding ({device_name(device)}, {a['dtype']}, greedy)", "",
             f"- model: {data['model']}; {a['max_new_tokens']} new tokens; datasets {a['datasets']} "
             f"(limit {a['limit']}, Spec-Bench {a['per_category']} per category); exact mode {a['exact']}",
             f"- torch {env.get('versions', {}).get('torch')}, specdec {env.get('versions', {}).get('specdec_commit')}",
             f"- command: `{env.get('command')}`", "",
             "| batch | method | tok/s (sum over rows) | vs own batched plain | tau | forwards | identical to plain |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for s in data["summary"].values():
        tau = f"{s['tau']:.2f}" if s["tau"] else "-"
        fw = s["forwards"] if s["forwards"] is not None else "-"
        lines.append(f"| {s['batch']} | {s['method']} | {s['tok_s']:.0f} | {s['vs_plain']:.2f}x | {tau} | {fw} | "
                     f"{s['identical_to_plain']}/{s['rows']} |")
    lines += ["", "tok/s: new tokens summed over rows / wall time of whole calls (prefill included). hf: "
              "transformers' batched generate on the same weights. identical: rows equal to the same row "
              "under specdec's batched plain decoding."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
