"""Micro-benchmark: each verify-step op's kept implementation against its reference.

One reference and at most one device implementation per op (DESIGN.md rule 15); this
shows what each second implementation buys:

- ``greedy``: ``greedy_accept`` on host lists, its one implementation on every device:
  the argmax row's read-back plus the walk; ``greedy after forward`` (CUDA): the latency
  it adds after a 200 us busy kernel standing in for the verify forward (the time minus
  that of the busy kernel followed by a one-element read-back).
- ``rejection``: the Triton tree rejection sampler vs ``tree_rejection_sample_ref``
  (one-hot proposals, ``--vocab`` tokens, fp32 probabilities).
- ``compact_kv``: the Triton kernel vs ``compact_kv_ref`` on a SmolLM2-135M-shaped cache
  (``--kv-shape`` 30 layers x 3 KV heads x 2048 positions x head dim 64; bf16 on CUDA,
  fp32 on CPU); the tree starts at position 1024 and ``min(n, 8)`` nodes are kept.
- ``ngram``: the native index (``specdec._C.NgramIndex``) vs ``NgramIndexRef`` (host
  work on any device): the insert of a ``--history``-token prompt (``prefill``), then
  decoding steps through 768 new tokens (each: lookup of 8 continuations, 3 new tokens
  recorded, the target's top-4 recorded at 3 nodes), per step. Size = prompt length.

Tree sizes ``--sizes`` (16, 64, 128); random trees (a node's parent is the previous node
60% of the time), tokens from a 3-token alphabet so that paths get accepted. Times are
medians in microseconds: ``triton.testing.do_bench`` on CUDA (launch overhead included:
these ops run eagerly between graph replays), ``time.perf_counter`` loops on CPU
(``--threads`` torch threads; the n-gram index is host work on any device). Writes
``ops_<device>[_tag].json`` and ``.md`` to ``--out``.

Usage::

    python -m benchmarks.bench_ops --out benchmarks/results/ops          # CUDA if present
    python -m benchmarks.bench_ops --device cpu --quick --out /tmp/ops   # smoke test
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from specdec.ops import backend
from specdec.ops.accept import greedy_accept, tree_rejection_sample, tree_rejection_sample_ref, tree_uniforms
from specdec.ops.kv import compact_kv, compact_kv_ref
from specdec.ops.ngram import NgramIndexRef, has_native_ngram_index, make_ngram_index

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_BUSY_CYCLES = 400_000  # torch.cuda._sleep: ~200 us at an H100's ~2 GHz


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(RESULTS_DIR / "ops"), help="output folder")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    p.add_argument("--sizes", type=int, nargs="+", help="tree sizes (nodes); default 16 64 128")
    p.add_argument("--vocab", type=int, help="vocabulary of the rejection sampler; default 49152 (SmolLM2)")
    p.add_argument("--kv-shape", type=int, nargs=4, metavar=("LAYERS", "KV_HEADS", "POSITIONS", "HEAD_DIM"),
                   help="KV cache shape; default 30 3 2048 64 (SmolLM2-135M)")
    p.add_argument("--history", type=int, nargs="+", help="n-gram prompt lengths; default 2000 4000")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--quick", action="store_true", help="tiny default sizes, few repetitions (smoke test)")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    defaults = (dict(sizes=[4, 9], vocab=101, kv_shape=[2, 2, 64, 8], history=[300]) if args.quick else
                dict(sizes=[16, 64, 128], vocab=49152, kv_shape=[30, 3, 2048, 64], history=[2000, 4000]))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# ----------------------------------------------------------------------- timing
class Timer:
    def __init__(self, device: torch.device, quick: bool):
        self.device, self.quick = device, quick

    def __call__(self, fn) -> float:
        """Median microseconds of one call of ``fn``."""
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return 1e3 * do_bench(fn, warmup=5 if self.quick else 25, rep=20 if self.quick else 200,
                                  return_mode="median")
        fn()  # warm-up
        t0 = time.perf_counter()
        fn()
        once = max(time.perf_counter() - t0, 1e-7)
        budget = 0.01 if self.quick else 0.2  # seconds per repeat
        inner = max(1, min(10_000, int(budget / once)))
        reps = []
        for _ in range(3 if self.quick else 7):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            reps.append((time.perf_counter() - t0) / inner)
        return 1e6 * statistics.median(reps)


# -------------------------------------------------------------------- the ops
def _tree(n: int, rng: random.Random) -> list[int]:
    return [i - 1 if rng.random() < 0.6 else rng.randint(-1, i - 1) for i in range(n)]


def bench_greedy(n, dev, timer, rng):
    parents = _tree(n, rng)  # the tree is drafted on the host
    tokens = [rng.randrange(3) for _ in range(n)]
    argmax = torch.randint(0, 3, (n + 1,), device=dev)

    def step():  # the argmax row comes to the host, the path is chosen there
        return greedy_accept(parents, tokens, argmax.tolist())

    rows = [("greedy", n, "greedy_accept (host)", timer(step))]
    if dev.type == "cuda":
        # In a step the read-back waits for the verify forward: what counts is the latency
        # added after it. A 200 us busy kernel stands in for the forward.
        def behind(fn):
            return lambda: (torch.cuda._sleep(_BUSY_CYCLES), fn())

        alone = timer(behind(lambda: argmax[:1].tolist()))
        rows.append(("greedy after forward", n, "greedy_accept (host)", max(timer(behind(step)) - alone, 0.01)))
    return rows


def bench_rejection(n, dev, timer, rng, kernel: bool, vocab: int):
    parents = torch.tensor(_tree(n, rng), device=dev)
    target = torch.softmax(torch.randn(n + 1, vocab, device=dev) * 3, -1)
    tokens = target[:n].argmax(-1)  # likely tokens: the walk goes deep
    uniforms = tree_uniforms(n, device=dev)
    rows = [("rejection", n, "ref (torch)", timer(lambda: tree_rejection_sample_ref(parents, tokens, target, uniforms)))]
    if kernel:
        rows.append(("rejection", n, "triton", timer(lambda: tree_rejection_sample(parents, tokens, target, uniforms))))
    return rows


def bench_compact(n, dev, timer, rng, kernel: bool, shape, dtype):
    layers, heads, positions, head_dim = shape
    k = torch.randn(layers, heads, positions, head_dim, device=dev).to(dtype)
    v = torch.randn_like(k)
    start = min(positions // 2, positions - n)
    idx = torch.tensor(sorted(rng.sample(range(n), min(n, 8))), device=dev)
    rows = [("compact_kv", n, "ref (torch)", timer(lambda: compact_kv_ref(k, v, idx, start=start)))]
    if kernel:
        rows.append(("compact_kv", n, "triton", timer(lambda: compact_kv(k, v, idx, start=start))))
    return rows


def _text(length: int, rng: random.Random) -> list[int]:
    """Token ids with the repetition of real text: Zipf-like phrases, some fresh tokens."""
    phrases = [[int(rng.paretovariate(1.1)) % 49152 for _ in range(rng.randint(3, 12))] for _ in range(300)]
    out: list[int] = []
    while len(out) < length + 64:
        out += rng.choice(phrases) if rng.random() < 0.7 else [rng.randrange(49152)]
    return out


def bench_ngram(history: int, rng: random.Random, quick: bool):
    """NgramDrafter's index work: the prompt's insert, then decoding steps through new text
    (each: lookup, 3 new tokens recorded as ``NgramDrafter._sync`` does, top-4 at 3 nodes).
    Medians over fresh indexes; host work, so timed with perf_counter on any device."""
    steps, repeats = (16, 2) if quick else (256, 5)
    text = _text(history + 3 * steps, rng)
    order, cont = 4, 16  # NgramDrafter's defaults
    top = [[rng.randrange(49152) for _ in range(4)] for _ in range(3)]
    impls = [("ref (python)", lambda: NgramIndexRef(order, cont, 65536, 8))]
    if has_native_ngram_index():
        impls.append(("native", lambda: make_ngram_index(order, cont, 65536, 8, native=True)))
    rows = []
    for name, make in impls:
        prefill, step = [], []
        for _ in range(repeats):
            index = make()
            t0 = time.perf_counter()
            index.insert(text[:history])
            t1 = time.perf_counter()
            for seen in range(history, history + 3 * steps, 3):
                index.lookup(text[seen - order:seen], 8)
                start = seen - cont + 1
                index.insert(text[start - order:seen + 3], order)
                for r in range(3):
                    index.insert_next(text[seen + 3 - order - r:seen + 3 - r], top[r])
            t2 = time.perf_counter()
            prefill.append(t1 - t0)
            step.append((t2 - t1) / steps)
        rows += [("ngram step", history, name, 1e6 * statistics.median(step)),
                 ("ngram prefill", history, name, 1e6 * statistics.median(prefill))]
    return rows


# ----------------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    lines = ["| op | size | implementation | us (median) | ref / this |", "|---|---:|---|---:|---:|"]
    ref = {(r["op"], r["size"]): r["us"] for r in rows if r["impl"].startswith("ref")}
    for r in rows:
        base = ref.get((r["op"], r["size"]))
        ratio = f"{base / r['us']:.2f}x" if base and r["us"] > 0 else ""
        lines.append(f"| {r['op']} | {r['size']} | {r['impl']} | {r['us']:.1f} | {ratio} |")
    return "\n".join(lines)


def environment(dev: torch.device, argv: list[str]) -> dict:
    env = {"date": _dt.datetime.now().isoformat(timespec="seconds"),
           "command": " ".join(["python -m benchmarks.bench_ops", *argv]),
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or "cpu"),
           "torch": torch.__version__, "python": platform.python_version(), "backend": backend.describe(),
           "threads": torch.get_num_threads()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if dev.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    env["device"] = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return env


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    kernel = dev.type == "cuda" and backend.use_triton(dev)
    timer, rng = Timer(dev, args.quick), random.Random(args.seed)
    torch.manual_seed(args.seed)
    kv_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows = []
    for n in args.sizes:
        rows += bench_greedy(n, dev, timer, rng)
        rows += bench_rejection(n, dev, timer, rng, kernel, args.vocab)
        rows += bench_compact(n, dev, timer, rng, kernel, args.kv_shape, kv_dtype)
    for h in args.history:
        rows += bench_ngram(h, rng, args.quick)
    order = {op: i for i, op in enumerate(dict.fromkeys(r[0] for r in rows))}
    rows.sort(key=lambda r: (order[r[0]], r[1]))  # stable: the reference first within a size
    records = [dict(op=op, size=size, impl=impl, us=us) for op, size, impl, us in rows]
    env = environment(dev, argv)
    md = "\n".join([
        f"# Verify-step ops: kept implementation vs reference ({env['device']})", "",
        f"- command: `{env['command']}`; date {env['date']}",
        f"- versions: torch {env['torch']}, triton {env['triton']}, python {env['python']}; "
        f"native n-gram index: {has_native_ngram_index()}; Triton kernels timed: {kernel}",
        f"- sizes: tree nodes {args.sizes}; rejection vocab {args.vocab}; KV cache {args.kv_shape} "
        f"{str(kv_dtype).replace('torch.', '')}; n-gram history {args.history}; torch threads {env['threads']}",
        "- median microseconds per call (" + ("triton.testing.do_bench" if dev.type == "cuda" else
                                             "time.perf_counter loops") + "); ref / this = speed-up over the reference",
        "", table(records), ""])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"ops_{dev.type}" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(dict(environment=env, args=vars(args), rows=records), indent=1))
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
