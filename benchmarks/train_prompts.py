"""Training prompts for ``specdec train-draft`` (#24), kept apart from the evaluation prompts.

    python -m benchmarks.train_prompts --out prompts.jsonl [--data-dir DIR]

The evaluation mix (HumanEval, GSM8K, Spec-Bench) takes the FIRST prompts of each file
(``benchmarks.datasets.select``). Training takes only what no evaluation here reads:

- MBPP (all 974 tasks; no evaluation in the mix uses MBPP), twice: the benchmark's task text
  in the chat template, and a raw completion prefix (the task's ``def`` line and the task
  text as a docstring), the shape of a HumanEval prompt without any HumanEval prompt;
- GSM8K test questions from index ``--gsm8k-from`` (default 400) on, in the benchmark's format;
- Spec-Bench's five single-turn categories from index ``--spec-bench-from`` (default 20) of
  each category on (the MT-bench questions are all left to evaluation).

Writes JSON Lines of {"text": ..., "chat": bool, "source": ...}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import datasets


def records(data_dir, gsm8k_from: int, spec_bench_from: int) -> list[dict]:
    folder = datasets.data_dir_or_fail(data_dir)
    out = []
    for r in datasets.read_jsonl(folder / "mbpp.jsonl"):
        out.append({"text": datasets._mbpp_task(r), "chat": True, "source": f"mbpp/{r['task_id']}"})
        head = next((line for line in r["code"].splitlines() if line.lstrip().startswith("def ")), None)
        if head is not None:
            out.append({"text": f"{head.strip()}\n    \"\"\"{r['text'].strip()}\"\"\"\n", "chat": False,
                        "source": f"mbpp/{r['task_id']}/raw"})
    gsm = datasets.gsm8k_texts(datasets.read_jsonl(folder / "gsm8k_test.jsonl"))
    out += [{"text": t, "chat": True, "source": i} for i, t in gsm[gsm8k_from:]]
    by_cat = datasets.spec_bench_texts(datasets.read_jsonl(folder / "spec_bench.jsonl"))
    for cat, items in by_cat.items():
        if cat != "multi_turn":
            out += [{"text": t, "chat": True, "source": i} for i, t in items[spec_bench_from:]]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_prompts", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--gsm8k-from", type=int, default=400)
    p.add_argument("--spec-bench-from", type=int, default=20)
    args = p.parse_args(argv)
    recs = records(args.data_dir, args.gsm8k_from, args.spec_bench_from)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in recs))
    print(f"{len(recs)} training prompts -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
