"""Benchmark suite: transformers decoding methods vs specdec drafters on HumanEval, GSM8K,
MBPP and Spec-Bench prompts, one model, one machine, one run.

    python -m benchmarks.run --limit 40 --max-new-tokens 128          # or: specdec bench ...

Writes raw JSON, a Markdown table and PNG plots into --out (default
benchmarks/results/<date>-<device>/).
See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import shlex
import signal
import sys
import time
from pathlib import Path

import torch

from . import datasets, methods, models, report
from .common import RESULTS_DIR, device_name, environment, fit_prompts, ints, slug

REFERENCE = "hf_greedy"
PLAIN = "specdec_none"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="specdec bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--datasets", default="humaneval,gsm8k,mbpp,spec_bench",
                   help="comma list of humaneval, gsm8k, mbpp, spec_bench, spec_bench/<category>")
    p.add_argument("--data-dir", default=None, help=f"folder of the .jsonl files (default {datasets.DEFAULT_DATA_DIR})")
    p.add_argument("--limit", type=int, default=None, help="prompts per dataset (Spec-Bench: spread over categories)")
    p.add_argument("--per-category", type=int, default=None, help="Spec-Bench prompts per category (overrides)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="skip longer prompts")
    p.add_argument("--chat", choices=["auto", "always", "never"], default="auto",
                   help="chat template (if the tokenizer has one): auto = Spec-Bench always, GSM8K/MBPP for instruct "
                        "models, HumanEval never")
    p.add_argument("--model", default="smollm2",
                   help="smollm2 | gemma3-270m | llama3-8b-shape | llama3.2-1b-shape | smollm2-shape | DIR | FILE.gguf")
    p.add_argument("--draft-model", default=None, help="same names as --model; enables hf_assisted_* and specdec_model")
    p.add_argument("--dtype", default=None, choices=sorted(models.DTYPES),
                   help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (exact match is checked)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i (every method alike)")
    p.add_argument("--prompt-warmup", choices=["auto", "on", "off"], default="auto",
                   help="before timing a prompt, run every method on it for one token, untimed: one-time "
                        "costs of a new prompt shape (kernel specialisations, allocations) then fall on no "
                        "method (auto: on for CUDA, where the first method on a prompt paid 0.1-1.4 s more "
                        "prefill than the next on the H200; off on CPU)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--methods", default="all",
                   help="comma list of method names or globs (e.g. 'hf_greedy,specdec_*'); "
                        f"{REFERENCE} is always added as the reference")
    p.add_argument("--match-reference", default=REFERENCE,
                   help="greedy runs: the method whose output every other method's is compared with (exact "
                        "match); e.g. specdec_none for a bf16 run, where batched verification may flip near-ties")
    p.add_argument("--assist-tokens", default="3,5,8", help="num_assistant_tokens values for hf_assisted_k*")
    p.add_argument("--lookup-tokens", default="3,10", help="prompt_lookup_num_tokens values")
    p.add_argument("--compact", action="store_true", help="also run specdec_compact_* (compact runtime)")
    p.add_argument("--adaptive", action="store_true",
                   help="specdec methods choose each step's budget adaptively (default: fixed TreeBudget())")
    p.add_argument("--drafter-opts", default="{}", help='JSON: {"ngram": {"max_continuation": 10}, ...}')
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<date>-<device>/)")
    p.add_argument("--tag", default="", help="suffix for the output file names (e.g. when a run is split)")
    p.add_argument("--skip-measured", nargs="+", default=[], metavar="JSON",
                   help="skip prompts that every selected method already ran in these result files "
                        "(continue a run that was stopped; merge the parts with benchmarks.merge)")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="run only every N-th prompt from the K-th (0-based), to split a run over processes "
                        "or machines; merge the parts with benchmarks.merge")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--list-methods", action="store_true", help="print the methods and exit")
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if str(args.device).startswith("cuda") else "float32"
    return args


# --- environment -------------------------------------------------------------------------------------

def command_line(argv) -> str:
    """The command as typed: ``python -m benchmarks.run ...`` or ``specdec bench ...``."""
    prog = sys.argv[0] if sys.argv else ""
    if prog.endswith(("benchmarks/run.py", "benchmarks\\run.py")):
        head = ["python", "-m", "benchmarks.run"]
    elif Path(prog).name == "specdec":
        head = ["specdec", "bench"]
    else:
        return shlex.join(sys.argv)
    return shlex.join(head + list(argv if argv is not None else sys.argv[1:]))


class Memory:
    """Peak memory per method: CUDA max_memory_allocated around each call; on CPU the
    process RSS after each call (max) and the process-wide ru_maxrss."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.peak: dict[str, int] = {}

    def before(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def after(self, name: str):
        if self.cuda:
            v = torch.cuda.max_memory_allocated()
        else:
            try:
                v = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError):
                v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak[name] = max(self.peak.get(name, 0), v)

    def describe(self) -> dict:
        kind = "cuda_max_memory_allocated" if self.cuda else "rss_after_call"
        return {"kind": kind, "process_ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# --- the run -----------------------------------------------------------------------------------------

def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="prompt", dynamic_ncols=True)
    except ImportError:
        class _Plain:
            def __init__(self):
                self.n = 0

            def update(self, k=1):
                self.n += k
                if self.n == total or self.n % max(1, total // 20) == 0:
                    print(f"{desc}: {self.n}/{total}", flush=True)

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass

        return _Plain()


def compare(ref: list[int], out: list[int]) -> dict:
    """Exact match of two token lists; else the first differing position and how many differ."""
    if ref == out:
        return {"match": True}
    n = max(len(ref), len(out))
    diff = [i for i in range(n) if i >= len(ref) or i >= len(out) or ref[i] != out[i]]
    first = diff[0]
    return {"match": False, "first_diff": first, "n_diff": len(diff), "ref_len": len(ref), "out_len": len(out),
            "ref_tail": ref[first:first + 16], "out_tail": out[first:first + 16]}


def _setup_methods(args, ctx, prompts) -> tuple[list, list, dict]:
    """(chosen, active, absent): set up and warm up every selected method; the reference first."""
    catalogue = methods.catalogue(assist_tokens=ints(args.assist_tokens), lookup_tokens=ints(args.lookup_tokens),
                                  compact=args.compact or "compact" in (args.methods or ""))
    chosen, unknown = methods.select(catalogue, args.methods)
    # the reference runs first per prompt, then the exact-match reference (when another method)
    match = [] if args.match_reference == REFERENCE else [m for m in catalogue if m.name == args.match_reference]
    if args.match_reference != REFERENCE and not match:
        raise SystemExit(f"--match-reference {args.match_reference}: no such method")
    chosen = [catalogue[0]] + match + [m for m in chosen if m.name not in (REFERENCE, args.match_reference)]
    absent = {u: f"no such method here (this build has: {', '.join(m.name for m in catalogue)})" for u in unknown}
    first = next(iter(prompts.values()))[0].prompt_ids
    all_ids = [p.prompt_ids for v in prompts.values() for p in v]
    active = []
    for m in chosen:
        try:
            m.setup(ctx)
            print(f"warm-up {m.name} ...", flush=True)
            m.warmup(ctx, [first] + all_ids)
            active.append(m)
        except methods.Unavailable as e:
            absent[m.name] = str(e)
        except Exception as e:  # noqa: BLE001 -- a peer that breaks is reported, never fatal
            absent[m.name] = f"{type(e).__name__}: {e}"
    for name, why in absent.items():
        print(f"  {name}: absent ({why})", flush=True)
    if not active or active[0].name != REFERENCE:
        raise SystemExit(f"the reference method {REFERENCE} failed: {absent.get(REFERENCE)}")
    active[0].warmup(ctx, [first])  # the first timed call follows the other methods' warm-ups
    return chosen, active, absent


def round_robin(prompts: dict[str, list]) -> list[tuple[str, object]]:
    """[(subset, prompt)] taking the i-th prompt of every subset before any (i+1)-th, so a run
    stopped early (Ctrl-C, SIGTERM) still covers every subset evenly."""
    longest = max((len(v) for v in prompts.values()), default=0)
    return [(subset, items[i]) for i in range(longest) for subset, items in prompts.items() if i < len(items)]


def parse_shard(text: str | None) -> tuple[int, int]:
    """'K/N' -> (K, N) with 0 <= K < N; None -> (0, 1)."""
    if not text:
        return 0, 1
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected K/N, e.g. 0/2 and 1/2") from None
    if not 0 <= k < n:
        raise ValueError(f"--shard {text!r}: need 0 <= K < N")
    return k, n


def measured_prompts(files: list[str], method_names: list[str]) -> set[tuple[str, str]]:
    """(subset, prompt id) pairs that every one of method_names ran in the result files."""
    seen: dict[tuple[str, str], set[str]] = {}
    for f in files:
        for r in json.loads(Path(f).read_text())["records"]:
            seen.setdefault((r["subset"], r["id"]), set()).add(r["method"])
    return {key for key, done in seen.items() if set(method_names) <= done}


def plan(prompts: dict[str, list], *, skip: set[tuple[str, str]] = frozenset(),
         shard: tuple[int, int] = (0, 1)) -> list[tuple[str, object, int]]:
    """The timed order [(subset, prompt, index)]: round-robin over subsets, minus the skipped
    prompts, then this shard's share (every N-th, so each shard still covers every subset
    evenly). ``index`` is the prompt's place in the whole round-robin order (its seed is
    seed + index, whatever the shard or skip)."""
    todo = [(s, p, i) for i, (s, p) in enumerate(round_robin(prompts)) if (s, p.id) not in skip]
    k, n = shard
    return todo[k::n]


def _stop_on_sigterm() -> None:
    """`kill PID` ends a long run like Ctrl-C does: the results measured so far are written."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background


def _warm_prompt(ctx, active, failed, prompt_ids, seed) -> None:
    """Every active method on this prompt for one new token, untimed (``--prompt-warmup``);
    an error here is left for the timed run to report."""
    for m in active:
        if m.name not in failed:
            try:
                m.run(ctx, prompt_ids, seed=seed, max_new_tokens=1)
            except Exception:  # noqa: BLE001
                pass


def _timed_loop(args, ctx, order, active, memory) -> tuple[list, dict, bool]:
    """(records, failed, interrupted): every prompt through every active method, interleaved
    (each method sees the same machine load); Ctrl-C stops early and keeps what was measured."""
    records, failed = [], {}
    _stop_on_sigterm()  # installed here, after loading and warm-ups (libraries may set their own)
    bar = _progress(len(order), f"{len(active)} methods")
    try:
        for subset, p, index in order:
            bar.set_postfix_str(f"{subset} {p.id}")
            if args.prompt_warmup_on:
                _warm_prompt(ctx, active, failed, p.prompt_ids, args.seed + index)
            ref_tokens = None
            for m in active:
                if m.name in failed:
                    continue
                memory.before()
                try:
                    r = m.run(ctx, p.prompt_ids, seed=args.seed + index)
                except Exception as e:  # noqa: BLE001
                    failed[m.name] = f"{subset} {p.id}: {type(e).__name__}: {e}"
                    print(f"\n{m.name} failed on {p.id}: {failed[m.name]}", flush=True)
                    continue
                memory.after(m.name)
                rec = {"method": m.name, "subset": subset, "id": p.id,
                       "prompt_tokens": int(p.prompt_ids.shape[1]), "new_tokens": len(r.new_tokens),
                       "wall_s": r.wall_s, "prefill_s": r.prefill_s}
                if r.stats is not None:
                    rec.update(steps=r.stats["steps"], accepted_per_step=r.stats["accepted_per_step"],
                               mean_tree_size=r.stats["mean_tree_size"], draft_s=r.stats["draft_time_s"],
                               verify_s=r.stats["verify_time_s"], update_s=r.stats.get("update_time_s", 0.0),
                               control_s=r.stats.get("control_time_s", 0.0))
                if m.name == args.match_reference:
                    ref_tokens = r.new_tokens
                elif not ctx.do_sample and ref_tokens is not None:
                    rec.update(compare(ref_tokens, r.new_tokens))
                records.append(rec)
            bar.update(1)
    except KeyboardInterrupt:
        print("\ninterrupted: writing the results measured so far", flush=True)
        return records, failed, True
    finally:
        bar.close()
    return records, failed, False


def run_benchmark(args, *, loaded: models.Loaded | None = None, draft: models.Loaded | None = None) -> dict:
    """Run every selected method on every prompt; returns the results dict (also written)."""
    device = torch.device(args.device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    argv = getattr(args, "_argv", None)
    env = environment(device, command=command_line(argv), argv=argv)
    selected = datasets.select(args.datasets, data_dir=args.data_dir, limit=args.limit,
                               per_category=args.per_category)  # fails early on a missing --data-dir
    if loaded is None:
        print(f"loading {args.model} ({args.dtype}, {device}) ...", flush=True)
        loaded = models.load(args.model, dtype=args.dtype, device=device, seed=args.seed)
    if draft is None and args.draft_model:
        print(f"loading draft {args.draft_model} ...", flush=True)
        draft = models.load(args.draft_model, dtype=args.dtype, device=device, seed=args.seed + 1)
    eos = None if args.ignore_eos else loaded.eos_token_id
    ctx = methods.Context(model=loaded.model, tokenizer=loaded.tokenizer, device=device,
                          max_new_tokens=args.max_new_tokens, eos_token_id=eos, do_sample=args.temperature > 0,
                          temperature=args.temperature if args.temperature > 0 else 1.0, top_k=args.top_k,
                          top_p=args.top_p, draft_model=draft.model if draft else None,
                          drafter_opts=json.loads(args.drafter_opts), adaptive=args.adaptive)
    tokenized = datasets.tokenize(selected, loaded.tokenizer, args.chat, loaded.is_instruct)
    prompts, skipped = fit_prompts(tokenized, loaded.model, max_new_tokens=args.max_new_tokens,
                                   max_prompt_tokens=args.max_prompt_tokens)
    chosen, active, absent = _setup_methods(args, ctx, prompts)
    skip = measured_prompts(args.skip_measured, [m.name for m in active])
    order = plan(prompts, skip=skip, shard=parse_shard(args.shard))
    print(f"{len(order)} prompts to run ({len(skip)} already measured, shard {args.shard or '0/1'})", flush=True)
    if not order:
        raise SystemExit("nothing left to run: every prompt of this shard is in --skip-measured")
    memory = Memory(device)
    args.prompt_warmup_on = args.prompt_warmup == "on" or (args.prompt_warmup == "auto" and device.type == "cuda")
    records, failed, interrupted = _timed_loop(args, ctx, order, active, memory)

    results = {
        **env,
        "settings": {"model": models.describe(loaded), "draft_model": models.describe(draft) if draft else None,
                     "dtype": args.dtype, "batch_size": 1, "max_new_tokens": args.max_new_tokens,
                     "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed,
                     "ignore_eos": args.ignore_eos, "eos_token_id": eos, "chat": args.chat,
                     "datasets": args.datasets, "limit": args.limit, "data_dir": str(args.data_dir or
                                                                                        datasets.DEFAULT_DATA_DIR),
                     "prompts": {k: len(v) for k, v in prompts.items()}, "skipped_prompts": skipped,
                     "shard": args.shard, "skip_measured": list(args.skip_measured),
                     "warmup": "one short run per method before timing (excluded); hf_static: one full run on "
                               "the longest prompt to size the cache" + ("; every method on each prompt for one "
                               "token before that prompt is timed" if args.prompt_warmup_on else ""),
                     "prompt_warmup": args.prompt_warmup_on, "order": "interleaved per prompt, round-robin over subsets",
                     "memory": memory.describe(), "exact_match_reference": args.match_reference},
        "methods": {m.name: {"family": m.family, "description": m.description} for m in chosen},
        "absent": absent, "failed": failed, "interrupted": interrupted,
        "peak_memory_bytes": memory.peak,
        "records": records,
    }
    results["summary"] = report.summarise(results, reference=REFERENCE, plain=PLAIN)
    results["out_files"] = report.write_all(results, out_dir(args, device, loaded), plots=not args.no_plots)
    return results


def out_dir(args, device, loaded) -> tuple[Path, str]:
    """(folder, file stem): benchmarks/results/<date>-<device>/<model>_<dtype>_<greedy|tX>."""
    folder = Path(args.out) if args.out else RESULTS_DIR / f"{_dt.date.today().isoformat()}-{slug(device_name(device))}"
    mode = "greedy" if args.temperature <= 0 else f"t{args.temperature:g}"
    return folder, f"{slug(loaded.name)}_{args.dtype}_{mode}" + (f"_{slug(args.tag)}" if args.tag else "")


def main(argv=None, *, model=None, tokenizer=None, draft_model=None) -> int:
    """CLI entry (``specdec bench`` forwards here). Tests may pass a built ``model`` /
    ``tokenizer`` (and ``draft_model``) instead of loading ``--model``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args._argv = argv
    if args.list_methods:
        for m in methods.catalogue(assist_tokens=ints(args.assist_tokens), lookup_tokens=ints(args.lookup_tokens),
                                   compact=True):
            print(f"{m.name:28s} {m.description}")
        return 0
    try:  # fail early and plainly on bad data arguments
        datasets.parse_names(args.datasets)
        datasets.data_dir_or_fail(args.data_dir)
        json.loads(args.drafter_opts)
        parse_shard(args.shard)
        for f in args.skip_measured:
            json.loads(Path(f).read_text())["records"]
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"specdec bench: error: {e}", file=sys.stderr)
        return 2
    loaded = None
    if model is not None:
        if tokenizer is None:
            tokenizer = models.ByteTokenizer(model.config.vocab_size)
        loaded = models.Loaded(model, tokenizer, getattr(model.config, "name_or_path", "") or type(model).__name__)
    draft = models.Loaded(draft_model, tokenizer, "draft") if draft_model is not None else None
    t0 = time.perf_counter()
    results = run_benchmark(args, loaded=loaded, draft=draft)
    print(report.console_summary(results))
    print(f"\nwrote {', '.join(results['out_files'])} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
