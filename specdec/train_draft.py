"""``specdec train-draft``: distil a small draft model for a target from the target's OWN outputs (#24).

    specdec train-draft --out DIR [--model DIR] [--kind model] [--layers 1] [--prompts N] [--steps N]

Kind "model" (this module): a same-tokenizer draft model made of the target's first
``layers`` decoder layers, with the target's embeddings, final norm and LM head shared (not
saved), distilled on the target's own greedy answers:

1. prompts: Magpie-style, the target writes them itself -- its chat template up to the user
   turn, sampled (no benchmark prompt is ever used); or ``--prompts FILE`` (one per line);
2. answers: the target's greedy completions (``specdec.generate``, so they are exactly what it
   will be asked to predict);
3. training: KL(target || draft) over the target's top-k next-token probabilities plus a tail
   bucket (``train_adapter.bucket_kl``) at every position of prompt + answer; only the draft's
   own layers train.

Saved: ``draft.safetensors`` (the layers, fp16) and ``draft.json`` (kind, layers, the target's
fingerprint, training record); loading against another target is a clear error. The loss
curve goes to ``loss.json`` (and ``loss.png`` where matplotlib is installed); ``--resume``
continues from ``checkpoint.pt``. Drafting: ``drafters.make("distilled", target=model,
path=DIR)`` -- a ``ModelDrafter`` (chains, or trees with ``topk`` > 1).

The EAGLE-style head (the issue's default kind, which needs the target's hidden states at
verify time) is not built yet.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from .train_adapter import bucket_kl

FORMAT = 1


# ------------------------------------------------------------------ the draft model
def fingerprint(target) -> str:
    """Identifies a target's weights and tokenizer space: architecture, vocabulary, width and
    a checksum of a few weight rows (so another checkpoint of the same shape is told apart)."""
    cfg = target.config
    emb = target.get_input_embeddings().weight
    probe = torch.cat([emb[:4].flatten(), emb[-4:].flatten()]).detach().to(torch.bfloat16).float().cpu()  # any dtype
    h = hashlib.sha256(f"{cfg.model_type}|{emb.shape[0]}|{emb.shape[1]}|{cfg.num_hidden_layers}".encode())
    h.update(probe.numpy().round(4).tobytes())
    return h.hexdigest()[:16]


def student_from_target(target, layers: int) -> torch.nn.Module:
    """A draft model: the target's first ``layers`` layers (copied: they train), its embeddings,
    final norm and LM head (shared with the target: they do not)."""
    cfg = copy.deepcopy(target.config)
    if not 1 <= layers <= cfg.num_hidden_layers:
        raise ValueError(f"layers must be in [1, {cfg.num_hidden_layers}], got {layers}")
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:layers]
    with torch.device("meta"):
        student = type(target)(cfg)
    base, tbase = student.model, target.model
    for name, child in tbase.named_children():  # embeddings, final norm, rotary tables: shared
        if name != "layers":
            setattr(base, name, child)
    student.lm_head = target.lm_head
    base.layers = torch.nn.ModuleList(copy.deepcopy(tbase.layers[i]) for i in range(layers))
    student.generation_config = copy.deepcopy(target.generation_config)
    return student.eval()


def own_parameters(student) -> dict[str, torch.nn.Parameter]:
    """The draft's trainable, saved weights: its layers."""
    return {f"model.layers.{n}": p for n, p in student.model.layers.named_parameters()}


def save(student, target, out: Path, record: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: p.detach().to(torch.float16).contiguous().cpu() for k, p in own_parameters(student).items()},
              str(out / "draft.safetensors"))
    meta = {"format": FORMAT, "kind": "model", "layers": len(student.model.layers),
            "target": getattr(target.config, "_name_or_path", "") or target.config.model_type,
            "target_fingerprint": fingerprint(target), **record}
    (out / "draft.json").write_text(json.dumps(meta, indent=2))


def load(path: str | Path, target) -> torch.nn.Module:
    """The draft model saved in ``path`` for ``target`` (its dtype and device)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "draft.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} holds no draft.json: train one with `specdec train-draft --out {path}`")
    meta = json.loads(cfg_file.read_text())
    if meta.get("kind") != "model":
        raise ValueError(f"{path}: draft kind {meta.get('kind')!r} is not supported here (kind 'model')")
    if meta["target_fingerprint"] != fingerprint(target):
        raise ValueError(f"{path} was trained for target {meta.get('target')!r} (fingerprint "
                         f"{meta['target_fingerprint']}), not this model ({fingerprint(target)}); "
                         "train a draft for this target with `specdec train-draft`")
    student = student_from_target(target, int(meta["layers"]))
    weights = load_file(str(path / "draft.safetensors"))
    p0 = next(target.parameters())
    with torch.no_grad():
        for name, p in own_parameters(student).items():
            p.copy_(weights[name].to(p0.device, p.dtype))
    return student


# ------------------------------------------------------------------ data
@torch.no_grad()
def magpie_prompts(target, tok, n: int, *, max_tokens: int = 48, seed: int = 0) -> list[torch.Tensor]:
    """``n`` user turns the target writes itself: its chat template up to the user message,
    sampled at T=1 until the end of the turn. Returns each as a chat prompt [T] (template
    applied, generation prompt added)."""
    from .generate import generate

    marker = "\x00"
    text = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    prefix = tok(text[:text.index(marker)], return_tensors="pt", add_special_tokens=False).input_ids[0]
    eos = {tok.eos_token_id} | set(tok.convert_tokens_to_ids([t for t in ("<|im_end|>", "<end_of_turn>")
                                                               if t in tok.get_vocab()]))
    out = []
    for i in range(n * 3):
        if len(out) == n:
            break
        new = generate(target, prefix, max_new_tokens=max_tokens, do_sample=True, temperature=1.0,
                       eos_token_id=list(eos), seed=seed + i).new_tokens
        question = tok.decode(new, skip_special_tokens=True).strip()
        if len(question) < 8:
            continue
        out.append(tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"][0])
    return out


@torch.no_grad()
def answers(target, prompts: list[torch.Tensor], *, max_new_tokens: int, eos_token_id=None,
            log=print) -> list[torch.Tensor]:
    """prompt + the target's greedy answer, for each prompt."""
    from . import drafters
    from .generate import generate

    seqs, t0 = [], time.perf_counter()
    drafter = drafters.make("ngram+recycling", target=target)
    for i, p in enumerate(prompts):
        out = generate(target, p, drafter=drafter, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
        seqs.append(out.sequences[0].cpu())
        if (i + 1) % 8 == 0 or i + 1 == len(prompts):
            log(f"answers {i + 1}/{len(prompts)} ({time.perf_counter() - t0:.0f}s)")
    return seqs


# ------------------------------------------------------------------ training
def train(student, target, seqs: list[torch.Tensor], *, steps: int, lr: float = 3e-4, batch_tokens: int = 1024,
          topk: int = 64, seed: int = 0, checkpoint: Path | None = None, log_every: int = 20,
          log=print) -> list[float]:
    """Distil ``student`` on the sequences (KL to the target's top-k at every position).
    Returns the per-step losses (those before a resumed checkpoint included)."""
    dev = next(target.parameters()).device
    params = list(own_parameters(student).values())
    flags = [(p, p.requires_grad) for p in target.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    dtypes = [p.dtype for p in params]
    for p in params:  # fp32 master weights for the trained layers
        p.data = p.data.float()
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    start = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=dev)
        for p, saved in zip(params, state["params"]):
            p.data.copy_(saved)
        opt.load_state_dict(state["opt"])
        losses, start = state["losses"], state["step"]
        log(f"resumed at step {start}")
    g = torch.Generator().manual_seed(seed + start)
    t0 = time.perf_counter()
    for step in range(start, steps):
        batch = _batch(seqs, batch_tokens, g)  # [b, T]
        x = batch.to(dev)
        with torch.no_grad():
            teacher = target(input_ids=x, use_cache=False).logits.float()
            top_p, top_i = torch.softmax(teacher, -1).topk(min(topk, teacher.shape[-1]), dim=-1)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            hidden = student.model(input_ids=x, use_cache=False).last_hidden_state
        logits = student.lm_head(hidden.to(student.lm_head.weight.dtype))
        loss = bucket_kl(logits, top_p, top_i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == steps - 1):
            log(f"step {step + 1}/{steps}  kl {losses[-1]:.4f}  ({time.perf_counter() - t0:.0f}s)")
        if checkpoint is not None and ((step + 1) % 100 == 0 or step == steps - 1):
            torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict(), "losses": losses,
                        "step": step + 1}, checkpoint)
    for p, dt in zip(params, dtypes):
        p.requires_grad_(False)
        p.data = p.data.to(dt)
    for p, flag in flags:  # the target as it was
        p.requires_grad_(flag)
    return losses


def _batch(seqs: list[torch.Tensor], batch_tokens: int, g: torch.Generator) -> torch.Tensor:
    """Sequences cut to one length and stacked: about ``batch_tokens`` tokens a batch."""
    i = int(torch.randint(0, len(seqs), (1,), generator=g))
    length = max(8, min(seqs[i].numel(), 512))
    rows = max(1, batch_tokens // length)
    picks = [seqs[int(j)] for j in torch.randint(0, len(seqs), (rows,), generator=g)]
    length = min(length, *(s.numel() for s in picks))
    return torch.stack([s[:length] for s in picks])


def plot(losses: list[float], out: Path) -> Path | None:
    """loss.png where matplotlib is installed (it is not a dependency), else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses)
    ax.set_xlabel("step")
    ax.set_ylabel("KL(target || draft)")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    return out / "loss.png"


# ------------------------------------------------------------------ CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="specdec train-draft", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", "--target", dest="model", default=None, help="a local HF checkpoint (default: SmolLM2)")
    p.add_argument("--kind", choices=["model"], default="model")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--prompts", default="64", help="how many self-written prompts, or a file (one prompt a line)")
    p.add_argument("--answer-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from .cli import _load

    target, tok = _load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(f"[train-draft] {s}", flush=True)  # noqa: E731
    t0 = time.perf_counter()
    if Path(args.prompts).is_file():
        lines = [s for s in Path(args.prompts).read_text().splitlines() if s.strip()]
        prompts = [tok.apply_chat_template([{"role": "user", "content": s}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"][0] for s in lines]
    else:
        prompts = magpie_prompts(target, tok, int(args.prompts), seed=args.seed)
    log(f"{len(prompts)} prompts ({time.perf_counter() - t0:.0f}s)")
    seqs = answers(target, prompts, max_new_tokens=args.answer_tokens, eos_token_id=tok.eos_token_id, log=log)
    student = student_from_target(target, args.layers)
    checkpoint = out / "checkpoint.pt"
    if not args.resume:
        checkpoint.unlink(missing_ok=True)
    losses = train(student, target, seqs, steps=args.steps, lr=args.lr, batch_tokens=args.batch_tokens,
                   seed=args.seed, checkpoint=checkpoint, log=log)
    record = {"prompts": len(prompts), "prompt_source": "self-written (Magpie-style)" if not Path(args.prompts).is_file()
              else f"file {args.prompts}", "tokens": int(sum(s.numel() for s in seqs)), "steps": args.steps,
              "final_kl": losses[-1] if losses else None, "seconds": round(time.perf_counter() - t0, 1)}
    save(student, target, out, record)
    (out / "loss.json").write_text(json.dumps(losses))
    png = plot(losses, out)
    log(f"saved {out / 'draft.safetensors'}{' and ' + str(png) if png else ''} in {record['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
