"""Distil an early-exit adapter: make the target's first L layers predict like all of them.

    python -m specdec.train_adapter --text FILE --layers L --steps N --out adapter.safetensors
    python -m specdec.train_adapter --self-generate 64 --layers 8 --steps 300 --out a.safetensors

The target (default: the embedded SmolLM2-135M-Instruct; ``--model DIR`` for a local HF
checkpoint) runs once over the training sequences, recording layer L's hidden state and
its own top-k next-token probabilities. Training then only runs adapter + final norm +
LM head: the loss is KL(target || early exit) over the target's top-k tokens plus one
"all other tokens" bucket (a lower bound of the full KL, exact when k covers the
vocabulary). ``--self-generate N`` trains on the target's own continuations (N tokens
after each prompt chunk) instead of raw text. The mean accepted length of
EarlyExitDrafter is reported before and after training.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .drafters.early_exit import EarlyExitDrafter, ResidualAdapter, _base, num_layers

DEFAULT_PROMPTS = [
    "The history of the printing press begins",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Question: A train travels 60 miles per hour for 3 hours. How far does it go?\nAnswer:",
    "Here are three tips for staying healthy:",
    "import numpy as np\n\ndef normalize(x):\n",
    "Once upon a time, in a small village by the sea,",
    "The main difference between a list and a tuple in Python is",
    "Photosynthesis is the process by which",
]


# ------------------------------------------------------------------ data
def _text_config(model):
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def chunk_text(ids: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    """[T] token ids -> [N, seq_len] non-overlapping chunks (at most max_tokens tokens)."""
    n = min(ids.numel(), max_tokens) // seq_len
    if n == 0:
        raise ValueError(f"need at least seq_len={seq_len} tokens of text, got {ids.numel()}")
    return ids[:n * seq_len].reshape(n, seq_len)


@torch.no_grad()
def self_generate(target, prompts: torch.Tensor, new_tokens: int, *, batch_size: int = 8,
                  temperature: float = 0.8, seed: int = 0) -> torch.Tensor:
    """prompts [N, P] -> [N, P + new_tokens]: the target's own sampled continuations."""
    torch.manual_seed(seed)
    dev = next(target.parameters()).device
    outs = []
    for b in range(0, prompts.shape[0], batch_size):
        p = prompts[b:b + batch_size].to(dev)
        o = target.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            do_sample=True, temperature=temperature, top_k=0, top_p=1.0, pad_token_id=0)
        outs.append(o.cpu())
    return torch.cat(outs)


@torch.no_grad()
def collect(target, seqs: torch.Tensor, layers: int, *, topk: int = 64, batch_size: int = 8):
    """One target pass over seqs [N, T] -> (layer-L hidden [N, T, H], teacher top-k probs
    [N, T, k], their token ids [N, T, k])."""
    dev = next(target.parameters()).device
    layer = _base(target).layers[layers - 1]
    feats, probs, ids = [], [], []
    grab = {}
    hook = layer.register_forward_hook(lambda m, i, o: grab.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    try:
        for b in range(0, seqs.shape[0], batch_size):
            x = seqs[b:b + batch_size].to(dev)
            logits = target(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits.float()
            p, i = torch.softmax(logits, -1).topk(min(topk, logits.shape[-1]), dim=-1)
            feats.append(grab["h"].detach().cpu())
            probs.append(p.cpu())
            ids.append(i.cpu())
    finally:
        hook.remove()
    return torch.cat(feats), torch.cat(probs), torch.cat(ids)


# ------------------------------------------------------------------ loss
def head_logits(target, adapter, hidden: torch.Tensor) -> torch.Tensor:
    """[..., H] layer-L hidden -> [..., vocab] early-exit logits (adapter, norm, head, softcap)."""
    h = adapter(hidden) if adapter is not None else hidden
    logits = target.get_output_embeddings()(_base(target).norm(h)).float()
    cap = getattr(_text_config(target), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def bucket_kl(student_logits: torch.Tensor, top_p: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top-k tokens + one tail bucket, averaged
    over positions. student_logits [..., V]; top_p, top_i [..., k]."""
    logq = torch.log_softmax(student_logits.float(), -1).gather(-1, top_i)  # [..., k]
    p = top_p.float()
    p_tail = (1 - p.sum(-1)).clamp(min=0)
    q_tail = (1 - logq.exp().sum(-1)).clamp(min=1e-12)
    kl = (p * (p.clamp(min=1e-12).log() - logq)).sum(-1)
    kl = kl + torch.where(p_tail > 1e-6, p_tail * (p_tail.clamp(min=1e-12).log() - q_tail.log()), 0.0)
    return kl.mean()


def train_adapter(target, seqs: torch.Tensor, *, layers: int, steps: int, batch_size: int = 4,
                  lr: float = 1e-3, topk: int = 64, bottleneck: int | None = None, seed: int = 0,
                  log_every: int = 50, log=print) -> tuple[ResidualAdapter, list[float]]:
    """Distil a ResidualAdapter for the first ``layers`` layers on seqs [N, T]; returns
    (adapter, per-step losses). The target's parameters are left untouched."""
    torch.manual_seed(seed)
    p0 = next(target.parameters())
    t0 = time.perf_counter()
    feats, top_p, top_i = collect(target, seqs, layers, topk=topk)
    log(f"collected {feats.shape[0]}x{feats.shape[1]} positions from the target in {time.perf_counter() - t0:.1f}s")
    hidden = feats.shape[-1]
    adapter = ResidualAdapter(hidden, bottleneck, eps=getattr(_text_config(target), "rms_norm_eps", 1e-6))
    adapter = adapter.to(device=p0.device, dtype=torch.float32)
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(0.1, 1 - s / max(1, steps)))
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, feats.shape[0], (min(batch_size, feats.shape[0]),), generator=g)
        h = feats[idx].to(p0.device, torch.float32)
        logits = head_logits(target, lambda x: adapter(x).to(p0.dtype), h)  # [b, T, vocab]
        loss = bucket_kl(logits, top_p[idx].to(p0.device), top_i[idx].to(p0.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach().item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            log(f"step {step:4d}  kl {losses[-1]:.4f}  ({time.perf_counter() - t0:.1f}s)")
    return adapter.to(p0.dtype).eval(), losses


@torch.no_grad()
def acceptance(target, prompts: list[torch.Tensor], *, layers: int, adapter=None, gamma: int = 4,
               max_new_tokens: int = 48) -> float:
    """Mean accepted length (tau) of EarlyExitDrafter over greedy runs of ``prompts``."""
    from .generate import generate

    drafter = EarlyExitDrafter(target, layers=layers, adapter=adapter, gamma=gamma)
    new = steps = 0
    for ids in prompts:
        st = generate(target, ids, drafter=drafter, max_new_tokens=max_new_tokens, eos_token_id=-1).stats
        new, steps = new + st.new_tokens, steps + st.steps
    return new / max(1, steps)


# ------------------------------------------------------------------- CLI
def _load(args):
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    else:
        from .assets import load_smollm2

        model, tok = load_smollm2(args.dtype)
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(dev).eval().requires_grad_(False), tok


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m specdec.train_adapter", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="local HF model dir (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--text", help="training text file (default: built-in prompts, needs --self-generate)")
    ap.add_argument("--self-generate", type=int, default=0, metavar="N",
                    help="train on the target's own N-token continuations of prompt chunks")
    ap.add_argument("--layers", type=int, required=True, help="L: decoder layers the drafter uses")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=4096, help="training tokens taken from --text")
    ap.add_argument("--num-prompts", type=int, default=16, help="prompt chunks for --self-generate")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--topk", type=int, default=64, help="teacher tokens kept per position for the KL")
    ap.add_argument("--bottleneck", type=int, default=None)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--eval-prompts", type=int, default=3)
    ap.add_argument("--eval-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.text and not args.self_generate:
        ap.error("give --text FILE, --self-generate N, or both")

    model, tok = _load(args)
    total = num_layers(model)
    if not 1 <= args.layers < total:
        ap.error(f"--layers must be in [1, {total - 1}] for this {total}-layer model")
    if args.text:
        ids = tok(Path(args.text).read_text(), return_tensors="pt").input_ids[0]
        eval_ids = [ids[-(i + 1) * 64:][:32][None] for i in range(args.eval_prompts)]  # held out: the text's end
        ids = ids[:-args.eval_prompts * 64] if ids.numel() > args.eval_prompts * 64 + args.seq_len else ids
    else:
        ids = torch.cat([tok(p, return_tensors="pt").input_ids[0] for p in DEFAULT_PROMPTS * 4])
        eval_ids = [tok(p, return_tensors="pt").input_ids for p in DEFAULT_PROMPTS[-args.eval_prompts:]]
    if args.self_generate:
        plen = max(4, args.seq_len // 2)
        prompts = chunk_text(ids, plen, args.num_prompts * plen)
        seqs = self_generate(model, prompts, args.self_generate, seed=args.seed)
        print(f"self-generated {seqs.shape[0]} x {args.self_generate} tokens")
    else:
        seqs = chunk_text(ids, args.seq_len, args.max_tokens)

    before = acceptance(model, eval_ids, layers=args.layers, gamma=args.gamma, max_new_tokens=args.eval_tokens)
    print(f"mean accepted length before: {before:.3f} (plain early exit at layer {args.layers}/{total})")
    adapter, losses = train_adapter(model, seqs, layers=args.layers, steps=args.steps, batch_size=args.batch_size,
                                    lr=args.lr, topk=args.topk, bottleneck=args.bottleneck, seed=args.seed)
    after = acceptance(model, eval_ids, layers=args.layers, adapter=adapter, gamma=args.gamma,
                       max_new_tokens=args.eval_tokens)
    print(f"mean accepted length after:  {after:.3f}")
    meta = {"layers": args.layers, "total_layers": total, "model": args.model or "SmolLM2-135M-Instruct",
            "steps": args.steps, "tau_before": before, "tau_after": after}
    adapter.save(args.out, **meta)
    print(f"saved {args.out}: {json.dumps(meta)}")
    return {**meta, "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}


if __name__ == "__main__":
    main()
