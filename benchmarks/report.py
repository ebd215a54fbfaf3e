"""Summaries, Markdown and PNG plots for a benchmark run (see run.py)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

# the per-step time split every specdec record carries (GenerationStats' *_time_s), seconds
STEP_TIMES = ("draft_s", "verify_s", "update_s", "control_s")


def groups_of(subsets: list[str]) -> dict[str, list[str]]:
    """Report groups: every subset, 'spec_bench' (all its categories) and 'all'."""
    groups = {s: [s] for s in subsets}
    spec = [s for s in subsets if s.startswith("spec_bench/")]
    if spec:
        groups["spec_bench"] = spec
    if len(subsets) > 1:
        groups["all"] = list(subsets)
    return groups


def _rate(tokens: float, seconds: float) -> float | None:
    return tokens / seconds if seconds > 0 else None


def _aggregate(recs: list[dict], family: str) -> dict:
    new = sum(r["new_tokens"] for r in recs)
    wall = sum(r["wall_s"] for r in recs)
    out = {"prompts": len(recs), "new_tokens": new, "wall_s": wall, "tokens_per_s": _rate(new, wall)}
    timed = [r for r in recs if r.get("prefill_s") is not None]
    if timed:
        # HF: decode = after the first token arrived (n - 1 tokens); specdec: after the prefill forward.
        dec_tok = sum(r["new_tokens"] - (1 if family == "hf" else 0) for r in timed)
        dec_s = sum(r["wall_s"] - r["prefill_s"] for r in timed)
        out.update(prefill_s=sum(r["prefill_s"] for r in timed), decode_tokens_per_s=_rate(dec_tok, dec_s))
    if recs and "steps" in recs[0]:
        steps = sum(r["steps"] for r in recs)
        hist = Counter(a for r in recs for a in r["accepted_per_step"])
        out.update(steps=steps, mean_accepted_length=new / steps if steps else None,
                   acceptance_histogram={int(k): v for k, v in sorted(hist.items())},
                   mean_tree_size=sum(r["mean_tree_size"] * r["steps"] for r in recs) / max(1, steps),
                   **{k: sum(r.get(k, 0.0) for r in recs) for k in STEP_TIMES})
    compared = [r for r in recs if "match" in r]
    if compared:
        bad = [r for r in compared if not r["match"]]
        out.update(exact_match=(len(compared) - len(bad)) / len(compared), compared=len(compared),
                   mismatches=[{k: r[k] for k in ("subset", "id", "first_diff", "n_diff", "ref_len", "out_len")}
                               for r in bad])
    return out


def summarise(results: dict, *, reference: str, plain: str) -> dict:
    """{group: {method: metrics}} with speedups over the prompts both methods completed."""
    recs = results["records"]
    subsets = list(dict.fromkeys(r["subset"] for r in recs))
    by_key = {(r["method"], r["subset"], r["id"]): r for r in recs}
    names = list(dict.fromkeys(r["method"] for r in recs))
    fam = {n: results["methods"].get(n, {}).get("family", "?") for n in names}
    summary = {}
    for g, subs in groups_of(subsets).items():
        row = {}
        for n in names:
            mine = [r for r in recs if r["method"] == n and r["subset"] in subs]
            if not mine:
                continue
            m = _aggregate(mine, fam[n])
            for label, base in (("speedup_vs_" + reference, reference), ("speedup_vs_" + plain, plain)):
                pair = [(r, by_key.get((base, r["subset"], r["id"]))) for r in mine]
                pair = [(a, b) for a, b in pair if b is not None]
                if pair and base != n:
                    mine_tps = _rate(sum(a["new_tokens"] for a, _ in pair), sum(a["wall_s"] for a, _ in pair))
                    base_tps = _rate(sum(b["new_tokens"] for _, b in pair), sum(b["wall_s"] for _, b in pair))
                    m[label] = mine_tps / base_tps if mine_tps and base_tps else None
                elif base == n:
                    m[label] = 1.0
            row[n] = m
        summary[g] = row
    return summary


# --- Markdown ----------------------------------------------------------------------------------------

def _f(v, fmt="{:.1f}", empty="") -> str:
    return empty if v is None else fmt.format(v)


def _hist(h: dict | None, width: int = 8) -> str:
    if not h:
        return ""
    total = sum(h.values())
    return " ".join(f"{k}:{100 * v / total:.0f}%" for k, v in list(h.items())[:width])


def length_stats(results: dict, reference: str) -> dict:
    out = {}
    for r in results["records"]:
        if r["method"] == reference:
            out.setdefault(r["subset"], []).append((r["prompt_tokens"], r["new_tokens"]))
    return {s: {"prompts": len(v), "prompt_tokens_mean": sum(a for a, _ in v) / len(v),
                "prompt_tokens_min": min(a for a, _ in v), "prompt_tokens_max": max(a for a, _ in v),
                "output_tokens_mean": sum(b for _, b in v) / len(v)} for s, v in out.items()}


def _parts(results: dict) -> list[str]:
    """Bullets naming the parts of a merged run (benchmarks.merge) and what each measured."""
    parts = results.get("parts") or []
    if not parts:
        return []
    out = [f"- merged from {len(parts)} parts (each record's `part` says which):"]
    for i, pt in enumerate(parts):
        n = len({(r["subset"], r["id"]) for r in results["records"] if r.get("part") == i})
        out.append(f"  - part {i}: {n} prompts, {pt['date']}, specdec {pt['specdec_commit']}: `{pt['command']}`")
    return out


def headline_table(results: dict, reference: str) -> list[str]:
    summary = results["summary"]
    cols = [g for g in summary if not g.startswith("spec_bench/")]
    if not cols:
        cols = list(summary)
    names = list(dict.fromkeys(n for g in cols for n in summary[g]))
    key = "speedup_vs_" + reference
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for n in names:
        cells = []
        for g in cols:
            m = summary[g].get(n)
            cells.append("" if m is None else f"{_f(m['tokens_per_s'])} ({_f(m.get(key), '{:.2f}x')})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict, plots: list[str], *, reference: str, plain: str) -> str:
    s, hw, v = results["settings"], results["hardware"], results["versions"]
    summary = results["summary"]
    model = s["model"]
    L = [f"# specdec benchmark: {model['name']} on {hw['device_name']}", "",
         f"- date: {results['date']}; command: `{results['command']}`",
         f"- hardware: {hw['device_name']} ({hw['device']}); CPU {hw['cpu']}, {hw['cpu_count']} cores, "
         f"{hw['torch_threads']} torch threads" + (f"; CUDA {hw.get('cuda')}" if hw.get("cuda") else ""),
         f"- versions: torch {v['torch']}, transformers {v['transformers']}, triton {v['triton']}, "
         f"specdec {v['specdec']} ({v['specdec_commit']})",
         f"- model: {model['name']} ({model['parameters'] / 1e6:.4g}M parameters, {s['dtype']}"
         + (", RANDOM weights: timing only, acceptance is meaningless" if model.get("random_weights") else "") + ")"
         + (f"; draft: {s['draft_model']['name']}" if s.get("draft_model") else ""),
         f"- batch 1; max_new_tokens {s['max_new_tokens']}; "
         + ("greedy" if s["temperature"] <= 0 else f"sampling T={s['temperature']}, top-p {s['top_p']}, "
                                                   f"top-k {s['top_k']}, seed {s['seed']} + prompt index")
         + ("; EOS ignored" if s["ignore_eos"] else "") + f"; chat template: {s['chat']}",
         f"- warm-up excluded ({s['warmup']}); methods run {s['order']}"
         + ("\n- **stopped early** (Ctrl-C or SIGTERM): the prompts column shows what ran" if results.get("interrupted") else "")]
    L += _parts(results) + ["",
         "| subset | prompts | prompt tokens mean (min-max) | output tokens mean |", "|---|---:|---:|---:|"]
    for sub, st in length_stats(results, reference).items():
        L.append(f"| {sub} | {st['prompts']} | {st['prompt_tokens_mean']:.0f} ({st['prompt_tokens_min']}-"
                 f"{st['prompt_tokens_max']}) | {st['output_tokens_mean']:.1f} |")
    L += ["", f"## Tokens/s (speedup vs {reference})", "",
          "Tokens/s = new tokens / wall time of the whole generate call (prefill included), summed over prompts.",
          ""] + headline_table(results, reference)
    spec = [g for g in summary if g.startswith("spec_bench/")]
    if len(spec) > 1:
        names = list(dict.fromkeys(n for g in spec for n in summary[g]))
        L += ["", f"## Spec-Bench per category (speedup vs {reference})", "",
              "| method | " + " | ".join(g.split("/", 1)[1] for g in spec) + " |", "|---|" + "---:|" * len(spec)]
        for n in names:
            L.append(f"| {n} | " + " | ".join(_f(summary[g].get(n, {}).get("speedup_vs_" + reference), "{:.2f}x")
                                              for g in spec) + " |")
    top = "all" if "all" in summary else next(iter(summary))
    L += ["", f"## Details ({top})", "",
          "decode tok/s: after the first token (HF, time-to-first-token excluded) or after the prefill forward "
          "(specdec). tau: committed tokens per target forward. Histogram: share of steps that accepted k drafted "
          f"tokens. Exact match: output identical to {s.get('exact_match_reference', reference)}'s. Peak memory: "
          + ("torch.cuda.max_memory_allocated." if s["memory"]["kind"].startswith("cuda")
             else "process RSS after the calls (CPU; max)."), "",
          f"| method | tok/s | decode tok/s | vs {reference} | vs {plain} | tau | accepted histogram | exact match "
          "| peak MiB | prefill s | draft s | verify s | update s | control s |",
          "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n, m in summary[top].items():
        em = f"{100 * m['exact_match']:.0f}% of {m['compared']}" if "exact_match" in m else ""
        peak = results["peak_memory_bytes"].get(n)
        L.append(f"| {n} | {_f(m['tokens_per_s'])} | {_f(m.get('decode_tokens_per_s'))} | "
                 f"{_f(m.get('speedup_vs_' + reference), '{:.2f}x')} | {_f(m.get('speedup_vs_' + plain), '{:.2f}x')} "
                 f"| {_f(m.get('mean_accepted_length'), '{:.2f}')} | {_hist(m.get('acceptance_histogram'))} | {em} | "
                 f"{_f(peak / 2**20 if peak else None, '{:.0f}')} | {_f(m.get('prefill_s'), '{:.2f}')} | "
                 f"{_f(m.get('draft_s'), '{:.2f}')} | {_f(m.get('verify_s'), '{:.2f}')} | "
                 f"{_f(m.get('update_s'), '{:.2f}')} | {_f(m.get('control_s'), '{:.2f}')} |")
    bad = [(n, x) for n, m in summary[top].items() for x in m.get("mismatches", [])]
    if bad:
        L += ["", f"## Outputs that differ from {s.get('exact_match_reference', reference)}", ""]
        if s["dtype"] != "float32":
            L.append(f"({s['dtype']}: batched verification rounds differently from one-token decoding, so "
                     "near-ties can flip; fp32 runs should match exactly.)\n")
        L += [f"- {n} / {x['id']}: first difference at token {x['first_diff']}, {x['n_diff']} tokens differ "
              f"(lengths {x['ref_len']} vs {x['out_len']})" for n, x in bad]
    if results["absent"] or results["failed"]:
        L += ["", "## Absent or failed methods", ""]
        L += [f"- {n}: absent ({why})" for n, why in results["absent"].items()]
        L += [f"- {n}: failed mid-run, partial results ({why})" for n, why in results["failed"].items()]
    L += ["", "## Methods", ""] + [f"- {n}: {d['description']}" for n, d in results["methods"].items()]
    if plots:
        L += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(L) + "\n"


# --- plots -------------------------------------------------------------------------------------------

def plot(results: dict, folder: Path, stem: str, *, reference: str) -> list[str]:
    """PNG plots (file names); [] with a message when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plots (pip install matplotlib)")
        return []
    summary, files = results["summary"], []
    groups = [g for g in summary if not g.startswith("spec_bench/")] or list(summary)
    names = [n for n in dict.fromkeys(n for g in groups for n in summary[g]) if n != reference]
    key = "speedup_vs_" + reference
    if names:
        fig, ax = plt.subplots(figsize=(min(16, max(7, 0.3 * len(groups) * len(names))), 4.5))
        width = 0.8 / len(names)
        colors = plt.get_cmap("tab20").colors
        for i, n in enumerate(names):
            ys = [summary[g].get(n, {}).get(key) or 0 for g in groups]
            ax.bar([j + i * width - 0.4 + width / 2 for j in range(len(groups))], ys, width, label=n,
                   color=colors[i % len(colors)])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylabel(f"speedup vs {reference} (tokens/s)")
        ax.set_title(f"{results['settings']['model']['name']}, {results['hardware']['device_name']}, "
                     f"{results['settings']['dtype']}")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        files.append(f"{stem}_speedup.png")
        fig.savefig(folder / files[-1], dpi=120)
        plt.close(fig)
    spec = [n for n in dict.fromkeys(n for g in groups for n in summary[g])
            if summary[groups[-1]].get(n, {}).get("acceptance_histogram") and not n.endswith("_none")]
    if spec:
        ncol = min(4, len(spec))
        nrow = (len(spec) + ncol - 1) // ncol
        fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3.2 * nrow), squeeze=False)
        for ax in axes.flat[len(spec):]:
            ax.set_visible(False)
        data_groups = [g for g in groups if g != "all"] or groups
        for ax, n in zip(axes.flat, spec):
            hists = {g: {int(k): v for k, v in (summary[g].get(n, {}).get("acceptance_histogram") or {}).items()}
                     for g in data_groups}  # int keys, also for results read back from JSON
            kmax = max((k for h in hists.values() for k in h), default=0)
            width = 0.8 / len(data_groups)
            for i, g in enumerate(data_groups):
                h = hists[g]
                tot = sum(h.values()) or 1
                ax.bar([k + i * width - 0.4 + width / 2 for k in range(kmax + 1)],
                       [h.get(k, 0) / tot for k in range(kmax + 1)], width, label=g)
            tau = summary[groups[-1]][n].get("mean_accepted_length")
            ax.set_title(f"{n} (tau {tau:.2f})" if tau else n, fontsize=9)
            ax.set_xticks(range(kmax + 1))
            ax.set_xlabel("drafted tokens accepted per step")
            ax.set_ylabel("share of steps")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        files.append(f"{stem}_acceptance.png")
        fig.savefig(folder / files[-1], dpi=120)
        plt.close(fig)
    return files


# --- files -------------------------------------------------------------------------------------------

def write_all(results: dict, where: tuple[Path, str], *, plots: bool = True,
              reference: str = "hf_greedy", plain: str = "specdec_none") -> list[str]:
    folder, stem = where
    folder.mkdir(parents=True, exist_ok=True)
    files = [str(folder / f"{stem}.json"), str(folder / f"{stem}.md")]

    def write(pngs):
        results["out_files"] = files + [str(folder / p) for p in pngs]
        (folder / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        (folder / f"{stem}.md").write_text(markdown(results, pngs, reference=reference, plain=plain))

    # the numbers first: a plot that fails or is interrupted (the first matplotlib import
    # on a fresh machine builds its font cache) must not lose them
    write([])
    pngs = plot(results, folder, stem, reference=reference) if plots else []
    if pngs:
        write(pngs)
    return list(results["out_files"])


def console_summary(results: dict, reference: str = "hf_greedy") -> str:
    return "\n".join(["", *headline_table(results, reference)])
