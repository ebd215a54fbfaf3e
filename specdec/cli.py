"""Command line: ``specdec demo`` (speed vs plain generate), ``specdec generate``, ``specdec bench``,
``specdec train-draft``."""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

DEMO_PROMPTS = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number, computed iteratively."""\n',
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?\nAnswer:",
    "Rewrite this sentence in the passive voice, then explain the change: "
    "'The committee approved the new budget after a long debate.'",
]


def _drafter(name: str, target, args):
    from . import drafters

    return drafters.make(name, target=target, **({"draft_model": args.draft_model} if getattr(args, "draft_model", None) else {}))


def _encode(tok, text: str, chat: bool) -> torch.Tensor:
    if chat and getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"]
    return tok(text, return_tensors="pt").input_ids


def _load(args):
    from .assets import load_smollm2

    if args.model in (None, "smollm2", "SmolLM2-135M-Instruct"):
        return load_smollm2(args.dtype, args.device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, args.dtype)
    return (AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval(),
            AutoTokenizer.from_pretrained(args.model))


def cmd_demo(args) -> int:
    from . import generate

    torch.manual_seed(0)
    print(f"loading {args.model or 'SmolLM2-135M-Instruct (embedded)'} ({args.dtype}, {args.device}) ...", flush=True)
    model, tok = _load(args)
    eos = tok.eos_token_id
    prompts = [_encode(tok, p, chat=True) for p in DEMO_PROMPTS]
    # warm-up (excluded): one short run of each path
    model.generate(prompts[0], attention_mask=torch.ones_like(prompts[0]), max_new_tokens=4, do_sample=False)
    generate(model, prompts[0], drafter=_drafter(args.drafter, model, args), max_new_tokens=4)
    tot = {"hf_s": 0.0, "sd_s": 0.0, "hf_tok": 0, "sd_tok": 0, "steps": 0, "same": 0}
    for i, ids in enumerate(prompts):
        am = torch.ones_like(ids)
        t0 = time.perf_counter()
        ref = model.generate(ids, attention_mask=am, max_new_tokens=args.max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos)
        hf_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = generate(model, ids, drafter=_drafter(args.drafter, model, args), max_new_tokens=args.max_new_tokens,
                       eos_token_id=eos)
        sd_s = time.perf_counter() - t0
        n_hf, n_sd = ref.shape[1] - ids.shape[1], out.stats.new_tokens
        same = ref.tolist() == out.sequences.tolist()
        tot["hf_s"] += hf_s; tot["sd_s"] += sd_s; tot["hf_tok"] += n_hf; tot["sd_tok"] += n_sd  # noqa: E702
        tot["steps"] += out.stats.steps; tot["same"] += same  # noqa: E702
        print(f"[{i}] transformers generate: {n_hf / hf_s:7.1f} tok/s | specdec ({args.drafter}): "
              f"{n_sd / sd_s:7.1f} tok/s, tau {out.stats.mean_accepted_length:.2f} | identical: {same}")
        if args.show:
            print("   ", repr(tok.decode(out.new_tokens)[:200]))
    hf_tps, sd_tps = tot["hf_tok"] / tot["hf_s"], tot["sd_tok"] / tot["sd_s"]
    print(f"\nall prompts: transformers {hf_tps:.1f} tok/s, specdec {sd_tps:.1f} tok/s, speedup "
          f"{sd_tps / hf_tps:.2f}x, mean accepted length {tot['sd_tok'] / tot['steps']:.2f}, "
          f"identical outputs {tot['same']}/{len(prompts)}  "
          f"(greedy, {args.max_new_tokens} new tokens, {args.dtype}, {args.device}, torch {torch.__version__})")
    return 0 if tot["same"] == len(prompts) or args.dtype != "float32" else 1


def cmd_generate(args) -> int:
    from . import generate
    from .streaming import TextStreamer

    model, tok = _load(args)
    ids = _encode(tok, args.prompt, chat=not args.no_chat)
    streamer = TextStreamer(tok, on_text=lambda s: print(s, end="", flush=True))
    out = generate(model, ids, drafter=_drafter(args.drafter, model, args), max_new_tokens=args.max_new_tokens,
                   do_sample=args.temperature > 0, temperature=args.temperature or 1.0, top_p=args.top_p,
                   eos_token_id=tok.eos_token_id, streamer=streamer, seed=args.seed)
    s = out.stats
    print(f"\n\n[{s.new_tokens} tokens, {s.tokens_per_second:.1f} tok/s, tau {s.mean_accepted_length:.2f}]",
          file=sys.stderr)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="specdec", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--model", default=None, help="local transformers model dir (default: embedded SmolLM2)")
        sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        sp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        sp.add_argument("--drafter", default="ngram+recycling", help="drafter name (see specdec.drafters.NAMES)")
        sp.add_argument("--draft-model", default=None, help="local dir of a draft model (drafter=model)")
        sp.add_argument("--max-new-tokens", type=int, default=128)

    d = sub.add_parser("demo", help="speed of specdec vs plain transformers generate")
    common(d)
    d.add_argument("--show", action="store_true", help="print the generated text")
    d.set_defaults(fn=cmd_demo)
    g = sub.add_parser("generate", help="stream a completion")
    common(g)
    g.add_argument("prompt")
    g.add_argument("--no-chat", action="store_true")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=cmd_generate)
    b = sub.add_parser("bench", help="benchmarks (see benchmarks/run.py --help)", add_help=False)
    b.set_defaults(fn=None)
    t = sub.add_parser("train-draft", help="distil a draft model for a target (see specdec.train_draft)",
                       add_help=False)
    t.set_defaults(fn=None)
    args, rest = p.parse_known_args(argv)
    if args.cmd == "train-draft":
        from .train_draft import main as train_main

        return train_main(rest)
    if args.cmd == "bench":
        if os.path.isfile(os.path.join("benchmarks", "run.py")) and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # (a console script's path holds its bin/, not the checkout)
        try:
            from benchmarks.run import main as bench_main  # the suite lives in the source checkout
        except ModuleNotFoundError:
            raise SystemExit("specdec bench runs the benchmark suite of a source checkout: run it from the "
                             "repository root (or use `python -m benchmarks.run` there)") from None
        return bench_main(rest)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
