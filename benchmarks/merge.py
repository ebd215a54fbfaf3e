"""Merge the parts of one benchmark run (``--shard`` processes, a run continued with
``--skip-measured``) into one result: JSON, Markdown, plots.

    python -m benchmarks.merge --out benchmarks/results/DIR --tag drafters40 part0.json part1.json ...

The parts must share what makes numbers comparable (model, dtype, generation settings,
hardware); each record keeps the index of the part that measured it, and the merged JSON
lists every part's command, commit and date, so a run merged across code versions says so.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import report
from .common import slug
from .run import PLAIN, REFERENCE

# settings that must agree for records of different parts to sit in one table
SAME_SETTINGS = ("dtype", "batch_size", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos",
                 "eos_token_id", "chat", "exact_match_reference")


def _model_key(res: dict) -> tuple:
    m = res["settings"]["model"]
    return m.get("name"), m.get("parameters"), bool(m.get("random_weights"))


def check_compatible(parts: list[dict], names: list[str]) -> None:
    """ValueError naming the first setting on which a part differs from the first part."""
    first = parts[0]
    for name, res in zip(names[1:], parts[1:]):
        for key in SAME_SETTINGS:
            a, b = first["settings"].get(key), res["settings"].get(key)
            if a != b:
                raise ValueError(f"{name}: setting {key}={b!r} differs from {names[0]}'s {a!r}; "
                                 "only parts of the same run can be merged")
        if _model_key(res) != _model_key(first):
            raise ValueError(f"{name}: model {_model_key(res)} differs from {names[0]}'s {_model_key(first)}")
        for key in ("device_name", "cpu"):
            if res["hardware"].get(key) != first["hardware"].get(key):
                raise ValueError(f"{name}: hardware {key}={res['hardware'].get(key)!r} differs from "
                                 f"{names[0]}'s {first['hardware'].get(key)!r}")


def _partial_last_prompt(res: dict) -> tuple[str, str] | None:
    """An interrupted part's last prompt (it may lack methods), else None."""
    if not res.get("interrupted") or not res["records"]:
        return None
    last = res["records"][-1]
    return last["subset"], last["id"]


def _pick_records(parts: list[dict], names: list[str]) -> tuple[list[dict], list[dict]]:
    """(records tagged with their part, dropped prompts). A prompt measured in several parts
    keeps the one part whose methods include every other part's methods on it; failing
    that, an interrupted part's partial last prompt yields to the parts that ran it again
    (``--skip-measured`` reruns it with the methods still missing, possibly not the same
    ones); anything else is an error."""
    partial_last = [_partial_last_prompt(res) for res in parts]
    by_prompt: dict[tuple[str, str], dict[int, list[dict]]] = {}
    for i, res in enumerate(parts):
        for r in res["records"]:
            by_prompt.setdefault((r["subset"], r["id"]), {}).setdefault(i, []).append(r)
    records, dropped = [], []
    for prompt, per_part in by_prompt.items():
        keep = next(iter(per_part))
        if len(per_part) > 1:
            ran = {i: {r["method"] for r in recs} for i, recs in per_part.items()}
            complete = [i for i in ran if all(ran[j] <= ran[i] for j in ran)]
            if len(complete) != 1:
                whole = [i for i in ran if partial_last[i] != prompt]
                complete = [i for i in whole if all(ran[j] <= ran[i] for j in whole)]
            if len(complete) != 1:
                raise ValueError(f"prompt {prompt} was measured in {', '.join(names[i] for i in per_part)}; "
                                 "drop one of the parts (or run the later one with --skip-measured)")
            keep = complete[0]
            dropped += [{"prompt": list(prompt), "part": i, "records": len(recs)}
                        for i, recs in per_part.items() if i != keep]
        records += [{**r, "part": keep} for r in per_part[keep]]
    return records, dropped


def merge(parts: list[dict], names: list[str]) -> dict:
    """One results dict (as run.run_benchmark writes) holding every part's records."""
    if not parts:
        raise ValueError("nothing to merge")
    check_compatible(parts, names)
    records, dropped = _pick_records(parts, names)
    first = parts[0]
    methods, absent, failed, peak = {}, {}, {}, {}
    for res in parts:
        methods.update(res["methods"])
        absent.update(res["absent"])
        failed.update(res["failed"])
        for k, v in res["peak_memory_bytes"].items():
            peak[k] = max(peak.get(k, 0), v)
    subsets = list(dict.fromkeys(r["subset"] for r in records))
    commits = list(dict.fromkeys(res["versions"].get("specdec_commit") for res in parts))
    merged = {
        **{k: first[k] for k in ("hardware", "versions", "date")},
        "command": " ; ".join(dict.fromkeys(res["command"] for res in parts)),
        "argv": None,
        "settings": {**first["settings"], "prompts": {s: sum(r["subset"] == s for r in records
                                                             if r["method"] == REFERENCE) for s in subsets},
                     "shard": None, "skip_measured": []},
        "methods": methods, "absent": {k: v for k, v in absent.items() if k not in methods or
                                       not any(r["method"] == k for r in records)},
        "failed": failed, "interrupted": any(res.get("interrupted") for res in parts),
        "peak_memory_bytes": peak, "records": records, "dropped_partial_prompts": dropped,
        "parts": [{"file": name, "command": res["command"], "date": res["date"],
                   "specdec_commit": res["versions"].get("specdec_commit"), "versions": res["versions"],
                   "records": len(res["records"])} for name, res in zip(names, parts)],
    }
    if len(commits) > 1:
        merged["versions"] = {**first["versions"], "specdec_commit": "merged: " + ", ".join(map(str, commits))}
    merged["summary"] = report.summarise(merged, reference=REFERENCE, plain=PLAIN)
    return merged


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("parts", nargs="+", help="result JSON files of benchmarks.run")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tag", default="merged", help="suffix of the output file names")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    try:
        parts = [json.loads(Path(f).read_text()) for f in args.parts]
        merged = merge(parts, list(args.parts))
    except (OSError, ValueError, KeyError) as e:
        print(f"benchmarks.merge: error: {e}", file=sys.stderr)
        return 2
    s = merged["settings"]
    mode = "greedy" if s["temperature"] <= 0 else f"t{s['temperature']:g}"
    stem = f"{slug(s['model']['name'])}_{s['dtype']}_{mode}_{slug(args.tag)}"
    files = report.write_all(merged, (Path(args.out), stem), plots=not args.no_plots)
    print(report.console_summary(merged))
    print(f"\nmerged {len(args.parts)} parts, {len(merged['records'])} records: wrote {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
