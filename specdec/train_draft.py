"""``specdec train-draft``: distil a drafter for a target from the target's OWN outputs (#24).

    specdec train-draft --out DIR [--model DIR] [--kind head|model] [--prompts N|FILE] [--steps N]

1. prompts: Magpie-style, the target writes them itself -- its chat template up to the user
   turn, sampled (no benchmark prompt is ever used); or ``--prompts FILE`` (one per line, or
   ``.jsonl`` records; ``python -m benchmarks.train_prompts`` writes one from the benchmark
   files minus every prompt the evaluation reads), plus ``--extra-prompts`` self-written ones;
2. answers: the target's greedy completions (transformers' batched generate), so they are
   exactly what it will be asked to predict; kept in ``DIR/seqs.pt`` for ``--resume``;
3. training, by kind:
   - ``head`` (default): an EAGLE-style head -- one decoder layer on the target's hidden
     states and the next token's embedding (``drafters/head.py``), trained unrolled
     (``train_head``); saved as ``head.safetensors`` (fp16) + ``head.json``; drafting:
     ``drafters.make("head", target=model, path=DIR)`` or ``"head+ngram"``;
   - ``model``: the target's first ``--layers`` decoder layers (embeddings, final norm and LM
     head shared, not saved), distilled by KL(target || draft) over the target's top-k plus a
     tail bucket (``train_adapter.bucket_kl``); saved as ``draft.safetensors`` + ``draft.json``;
     drafting: ``drafters.make("distilled", target=model, path=DIR)`` (a ``ModelDrafter``).

Both record the target's fingerprint: loading against another target is a clear error. The
loss curve goes to ``loss.json`` (and ``loss.png`` where matplotlib is installed); ``--resume``
continues from ``checkpoint.pt``.
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


def read_record(path: str | Path, name: str, kind: str, target, remedy: str) -> dict:
    """The JSON record ``name`` a ``train-draft --kind kind`` run wrote in ``path``, checked
    against ``target``'s fingerprint; ``remedy`` ends the error for another target."""
    path = Path(path)
    if not (path / name).exists():
        raise FileNotFoundError(f"{path} holds no {name}: train one with "
                                f"`specdec train-draft --kind {kind} --out {path}`")
    meta = json.loads((path / name).read_text())
    if meta.get("kind") != kind:
        raise ValueError(f"{path}: draft kind {meta.get('kind')!r} is not supported here (kind {kind!r})")
    if meta["target_fingerprint"] != fingerprint(target):
        raise ValueError(f"{path} was trained for target {meta.get('target')!r} (fingerprint "
                         f"{meta['target_fingerprint']}), not this model ({fingerprint(target)}); {remedy}")
    return meta


def load(path: str | Path, target) -> torch.nn.Module:
    """The draft model saved in ``path`` for ``target`` (its dtype and device)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_record(path, "draft.json", "model", target,
                       "train a draft for this target with `specdec train-draft --kind model`")
    student = student_from_target(target, int(meta["layers"]))
    weights = load_file(str(path / "draft.safetensors"))
    p0 = next(target.parameters())
    with torch.no_grad():
        for name, p in own_parameters(student).items():
            p.copy_(weights[name].to(p0.device, p.dtype))
    return student


# ------------------------------------------------------------------ data
def _end_of_turn(tok) -> list[int]:
    extra = [t for t in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>") if t in tok.get_vocab()]
    return sorted({tok.eos_token_id} | set(tok.convert_tokens_to_ids(extra)) - {None})


def _chat(tok, text: str) -> torch.Tensor:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"][0]


@torch.no_grad()
def _generate_rows(target, rows: list[torch.Tensor], pad: int, *, max_new_tokens: int, eos: list[int],
                   batch: int, do_sample: bool = False, seed: int = 0) -> list[torch.Tensor]:
    """transformers' batched ``generate`` on left-padded rows: each row's new tokens (cut after
    its first end-of-turn)."""
    dev = next(target.parameters()).device
    out = []
    torch.manual_seed(seed)
    for b in range(0, len(rows), batch):
        part = rows[b:b + batch]
        width = max(r.numel() for r in part)
        ids = torch.full((len(part), width), pad, dtype=torch.long)
        mask = torch.zeros(len(part), width, dtype=torch.long)
        for r, row in enumerate(part):
            ids[r, width - row.numel():], mask[r, width - row.numel():] = row, 1
        gen = target.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                              do_sample=do_sample, temperature=1.0 if do_sample else None, top_k=0 if do_sample
                              else None, top_p=1.0 if do_sample else None, eos_token_id=eos, pad_token_id=pad)
        for r in gen[:, width:].cpu():
            ends = [i for i, t in enumerate(r.tolist()) if t in eos]
            out.append(r[:ends[0] + 1] if ends else r)
    return out


@torch.no_grad()
def magpie_prompts(target, tok, n: int, *, max_tokens: int = 48, seed: int = 0, batch: int = 64) -> list[torch.Tensor]:
    """``n`` user turns the target writes itself: its chat template up to the user message,
    sampled at T=1 until the end of the turn (batched). Returns each as a chat prompt [T]
    (template applied, generation prompt added)."""
    marker = "\x00"
    text = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    prefix = tok(text[:text.index(marker)], return_tensors="pt", add_special_tokens=False).input_ids[0]
    eos = _end_of_turn(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    out: list[torch.Tensor] = []
    for attempt in range(3):
        if len(out) >= n:
            break
        need = n - len(out)
        for new in _generate_rows(target, [prefix] * need, pad, max_new_tokens=max_tokens, eos=eos, batch=batch,
                                  do_sample=True, seed=seed + attempt):
            question = tok.decode(new, skip_special_tokens=True).strip()
            if len(question) >= 8:
                out.append(_chat(tok, question))
    return out[:n]


@torch.no_grad()
def answers(target, prompts: list[torch.Tensor], *, max_new_tokens: int, eos_token_id=None, batch: int = 32,
            pad_token_id: int | None = None, log=print) -> list[torch.Tensor]:
    """prompt + the target's greedy answer, for each prompt (transformers' batched generate)."""
    eos = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id] if eos_token_id is not None else []
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    seqs, t0 = [], time.perf_counter()
    for b in range(0, len(prompts), batch):
        part = prompts[b:b + batch]
        new = _generate_rows(target, part, pad, max_new_tokens=max_new_tokens, eos=eos, batch=batch)
        seqs += [torch.cat([p.cpu(), a]) for p, a in zip(part, new)]
        log(f"answers {len(seqs)}/{len(prompts)} ({time.perf_counter() - t0:.0f}s)")
    return seqs


def prompts_from_file(tok, path: Path) -> list[torch.Tensor]:
    """One prompt per line; a ``.jsonl`` file holds {"text": ..., "chat": true|false} records
    (chat: wrap in the chat template, the default; false: a raw completion prefix)."""
    if path.suffix == ".jsonl":
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [_chat(tok, r["text"]) if r.get("chat", True) else
                tok(r["text"], return_tensors="pt").input_ids[0] for r in recs]
    return [_chat(tok, line) for line in path.read_text().splitlines() if line.strip()]


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


def plot(losses: list[float], out: Path, ylabel: str = "loss") -> Path | None:
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
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    return out / "loss.png"


# ------------------------------------------------------------------ CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="specdec train-draft", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", "--target", dest="model", default=None, help="a local HF checkpoint (default: SmolLM2)")
    p.add_argument("--kind", choices=["head", "model"], default="head",
                   help="head: an EAGLE-style head on the target's hidden states; model: its first layers")
    p.add_argument("--layers", type=int, default=1, help="(kind model) decoder layers of the draft model")
    p.add_argument("--prompts", default="64",
                   help="how many self-written prompts, or a file (one prompt a line, or .jsonl records)")
    p.add_argument("--extra-prompts", type=int, default=0, help="self-written prompts added to a --prompts file")
    p.add_argument("--answer-tokens", type=int, default=128)
    p.add_argument("--gen-batch", type=int, default=32, help="rows per batched generate call")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=None, help="default 3e-4 (model), 5e-4 (head)")
    p.add_argument("--batch-tokens", type=int, default=1024, help="tokens per training step")
    p.add_argument("--passes", type=int, default=3, help="(kind head) unrolled passes (training-time test)")
    p.add_argument("--draft-vocab", type=int, default=16384,
                   help="(kind head) tokens drafting scores: the most frequent in the data (0: all)")
    p.add_argument("--kl-weight", type=float, default=0.1, help="(kind head) weight of the token KL vs the feature loss")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", action="store_true", help="reuse DIR/seqs.pt and continue from DIR/checkpoint.pt")
    p.add_argument("--train-seconds", type=float, default=None, help="(kind head) cut the steps to fit this time")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from .cli import _load

    target, tok = _load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(f"[train-draft] {s}", flush=True)  # noqa: E731
    t0 = time.perf_counter()
    from_file = Path(args.prompts).is_file()
    cached = out / "seqs.pt"  # the generated data, reused by --resume
    source = (f"file {Path(args.prompts).name}" if from_file else "self-written (Magpie-style)") \
        + (f" + {args.extra_prompts} self-written" if from_file and args.extra_prompts else "")
    if args.resume and cached.exists():
        prompts, seqs, source = torch.load(cached)
        log(f"{len(seqs)} sequences from {cached}")
    elif from_file:
        prompts = prompts_from_file(tok, Path(args.prompts))
        if args.extra_prompts:
            prompts += magpie_prompts(target, tok, args.extra_prompts, seed=args.seed, batch=args.gen_batch)
    else:
        prompts = magpie_prompts(target, tok, int(args.prompts), seed=args.seed, batch=args.gen_batch)
    if not (args.resume and cached.exists()):
        log(f"{len(prompts)} prompts ({time.perf_counter() - t0:.0f}s)")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        seqs = answers(target, prompts, max_new_tokens=args.answer_tokens, eos_token_id=_end_of_turn(tok),
                       batch=args.gen_batch, pad_token_id=pad, log=log)
        torch.save((prompts, seqs, source), cached)
    checkpoint = out / "checkpoint.pt"
    if not args.resume:
        checkpoint.unlink(missing_ok=True)
    record = {"prompts": len(prompts), "prompt_source": source, "answer_tokens": args.answer_tokens,
              "tokens": int(sum(s.numel() for s in seqs)), "steps": args.steps}
    if args.kind == "head":
        from . import train_head
        from .drafters.head import save_head

        data = train_head.collect(target, seqs, log=log)
        head = train_head.init_head(target)
        if args.draft_vocab:
            head.draft_vocab = train_head.draft_vocab(seqs, args.draft_vocab)
        rows = max(1, args.batch_tokens // 256)
        losses = train_head.train(head, target, data, steps=args.steps, lr=args.lr or 5e-4, rows=rows,
                                  length=min(256, args.batch_tokens), passes=args.passes,
                                  kl_weight=args.kl_weight, seed=args.seed, checkpoint=checkpoint,
                                  time_budget_s=args.train_seconds, log=log)
        record.update(final_loss=losses[-1] if losses else None, passes=args.passes,
                      draft_vocab=None if head.draft_vocab is None else int(head.draft_vocab.numel()),
                      seconds=round(time.perf_counter() - t0, 1))
        save_head(head, target, out, record)
        saved = out / "head.safetensors"
    else:
        student = student_from_target(target, args.layers)
        losses = train(student, target, seqs, steps=args.steps, lr=args.lr or 3e-4, batch_tokens=args.batch_tokens,
                       seed=args.seed, checkpoint=checkpoint, log=log)
        record.update(final_kl=losses[-1] if losses else None, seconds=round(time.perf_counter() - t0, 1))
        save(student, target, out, record)
        saved = out / "draft.safetensors"
    (out / "loss.json").write_text(json.dumps(losses))
    png = plot(losses, out, "unrolled loss (feature + KL)" if args.kind == "head" else "KL(target || draft)")
    log(f"saved {saved}{' and ' + str(png) if png else ''} in {round(time.perf_counter() - t0, 1)}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
