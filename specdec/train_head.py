"""Training of the EAGLE-style draft head (``specdec train-draft --kind head``, #24).

Data: sequences the target wrote itself (prompt + its greedy answer; ``train_draft``), run
once through the target to collect, at every position, its feature (the residual stream into
the final norm, the same tensor ``Runner.last_hidden`` gives at decode time) and its top-k
next-token probabilities.

Training is unrolled ("training-time test", as in HASS / EAGLE-3): pass 1 reads the true
features; pass j reads the features pass j - 1 predicted, and its entry t attends to the true
entries up to t - j + 1 and to its own chain of predicted entries -- exactly what a node at
depth j - 1 of a draft tree sees. Each pass is scored at every position by

    smooth-L1(norm(f^), norm(f))  +  kl_weight * KL(target top-k || head)

(the KL over the target's top-k plus a tail bucket, ``train_adapter.bucket_kl``), pass j
weighted ``decay ** (j - 1)``. Only the head trains; the target is untouched.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from .backends.generic import final_norm
from .drafters.head import DraftHead
from .train_adapter import bucket_kl


@dataclass
class HeadData:
    """Per sequence: tokens [T] int64, features [T, hidden] (model dtype), the target's top-k
    next-token probabilities [T, k] fp16 and ids [T, k] int32 (row t: the token after t)."""

    tokens: list[torch.Tensor]
    features: list[torch.Tensor]
    top_p: list[torch.Tensor]
    top_i: list[torch.Tensor]

    @property
    def positions(self) -> int:
        return sum(t.numel() for t in self.tokens)


@torch.no_grad()
def collect(target, seqs: list[torch.Tensor], *, topk: int = 32, batch_tokens: int = 8192, log=print) -> HeadData:
    """Run the sequences through the target (right-padded batches of similar length) and keep
    each position's feature and top-k next-token probabilities, on the target's device."""
    dev = next(target.parameters()).device
    norm = final_norm(target)
    if norm is None:
        raise ValueError(f"{type(target).__name__} has no final norm (model.model.norm): no features for a head")
    seen: list[torch.Tensor] = []
    hook = norm.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    order = sorted(range(len(seqs)), key=lambda i: seqs[i].numel())
    data = HeadData([None] * len(seqs), [None] * len(seqs), [None] * len(seqs), [None] * len(seqs))
    t0 = time.perf_counter()
    try:
        i = 0
        while i < len(order):  # ascending lengths: the last row of a group is its longest
            group = [order[i]]
            while (i + len(group) < len(order) and len(group) < 64
                   and (len(group) + 1) * seqs[order[i + len(group)]].numel() <= batch_tokens):
                group.append(order[i + len(group)])
            width = seqs[group[-1]].numel()
            ids = torch.zeros(len(group), width, dtype=torch.long)
            for r, j in enumerate(group):  # right padding: a causal model's real positions never see it
                ids[r, :seqs[j].numel()] = seqs[j]
            seen.clear()
            logits = target(input_ids=ids.to(dev), use_cache=False).logits
            feats = seen[-1]
            probs = torch.softmax(logits.float(), -1).topk(topk, dim=-1)
            for r, j in enumerate(group):
                n = seqs[j].numel()
                data.tokens[j] = seqs[j].to(dev)
                data.features[j] = feats[r, :n].clone()
                data.top_p[j] = probs.values[r, :n].half()
                data.top_i[j] = probs.indices[r, :n].int()
            i += len(group)
    finally:
        hook.remove()
    log(f"features of {data.positions} positions in {time.perf_counter() - t0:.0f}s")
    return data


def draft_vocab(seqs: list[torch.Tensor], size: int) -> torch.Tensor:
    """The ``size`` most frequent tokens of the sequences, ascending ids [size] int64: the rows
    the head scores when drafting (``DraftHead.draft_vocab``)."""
    counts = torch.bincount(torch.cat([s.reshape(-1).cpu() for s in seqs]))
    size = min(size, int((counts > 0).sum()))
    return counts.topk(size).indices.sort().values


def init_head(target) -> DraftHead:
    """A head shaped like a target layer, its layer initialised from the target's last layer
    (fc: the feature passed through, the embedding added small), fp32 on the target's device."""
    head = DraftHead.for_target(target)
    layer = target.model.layers[-1]
    names = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    with torch.no_grad():
        for mine, theirs in (("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"),
                             ("v_proj", "self_attn.v_proj"), ("o_proj", "self_attn.o_proj"),
                             ("gate_proj", "mlp.gate_proj"), ("up_proj", "mlp.up_proj"),
                             ("down_proj", "mlp.down_proj"), *names.items()):
            src = layer.get_submodule(theirs).weight if "norm" not in mine else None
            if src is None:
                norm = layer.get_submodule(theirs)
                w = norm.weight.float()
                if getattr(norm, "offset", False) or type(norm).__name__.startswith("Gemma"):
                    w = 1.0 + w  # Gemma's norms scale by (1 + w)
                getattr(head, mine).weight.copy_(w)
            elif src.shape == getattr(head, mine).weight.shape:
                getattr(head, mine).weight.copy_(src.float())
        hidden = head.fc.out_features
        head.fc.weight.zero_()
        head.fc.weight[:, hidden:].copy_(torch.eye(hidden))
        head.fc.weight[:, :hidden].normal_(0.0, 0.02)
        head.fc.bias.zero_()
    return head.to(next(target.parameters()).device)


def unrolled_mask(n: int, j: int, device) -> torch.Tensor:
    """[n, j * n] bool: what pass j's entry t sees of passes 1..j's keys (concatenated in pass
    order): pass 1 up to t - j + 1, pass i (2 <= i <= j) exactly at t - j + i."""
    t = torch.arange(n, device=device)[:, None]
    s = torch.arange(n, device=device)[None, :]
    blocks = [s <= t - j + 1] + [s == t - j + i for i in range(2, j + 1)]
    return torch.cat(blocks, 1)


def unrolled_loss(head: DraftHead, target, tokens: torch.Tensor, feats: torch.Tensor, top_p: torch.Tensor,
                  top_i: torch.Tensor, *, passes: int = 3, kl_weight: float = 0.1, decay: float = 0.8
                  ) -> tuple[torch.Tensor, dict]:
    """tokens [B, N], feats [B, N, hidden] (the target's), top_p/top_i [B, N, k] -> (loss, per-pass
    top-1 agreement with the target). Entry t reads (feature t, token t + 1), predicts feature t + 1."""
    norm, embed, lm_head = final_norm(target), target.get_input_embeddings(), target.get_output_embeddings()
    n = tokens.shape[1] - 1
    dt = head.fc.weight.dtype
    emb = embed(tokens[:, 1:]).to(dt)  # [B, n, H]
    true_in = norm(feats[:, :n]).to(dt)  # [B, n, H]
    want = norm(feats[:, 1:]).to(dt)  # [B, n, H] targets: the feature at t + 1
    pos = torch.arange(n, device=tokens.device)
    keys, vals, stats, total = [], [], {}, 0.0
    feat_in = true_in
    for j in range(1, passes + 1):
        ctx_k = torch.cat(keys, -2) if keys else None
        ctx_v = torch.cat(vals, -2) if vals else None
        out, k, v = head(emb, feat_in, pos, ctx_k, ctx_v, unrolled_mask(n, j, tokens.device))
        keys.append(k)
        vals.append(v)
        pred = norm(out.to(feats.dtype)).to(dt)
        valid = slice(j - 1, n)  # entries with a full chain of j - 1 predicted predecessors
        reg = F.smooth_l1_loss(pred[:, valid].float(), want[:, valid].float())
        logits = lm_head(pred[:, valid].to(lm_head.weight.dtype))
        kl = bucket_kl(logits, top_p[:, 1:][:, valid].float(), top_i[:, 1:][:, valid].long())
        total = total + decay ** (j - 1) * (reg + kl_weight * kl)
        with torch.no_grad():
            stats[f"acc{j}"] = float((logits.argmax(-1) == top_i[:, 1:][:, valid, 0]).float().mean())
        # the next pass reads this pass's prediction for its own position: entry t <- out[t - 1]
        feat_in = torch.cat([true_in[:, :1], pred[:, :-1]], 1)
    return total, stats


def _batch(data: HeadData, rows: int, length: int, g: torch.Generator):
    """rows windows of ``length`` + 1 positions (shorter if the picked sequences are)."""
    picks = torch.randint(0, len(data.tokens), (rows,), generator=g).tolist()
    n = min(length + 1, *(data.tokens[i].numel() for i in picks))
    starts = [int(torch.randint(0, data.tokens[i].numel() - n + 1, (1,), generator=g)) for i in picks]
    take = lambda xs: torch.stack([xs[i][s:s + n] for i, s in zip(picks, starts)])  # noqa: E731
    return take(data.tokens), take(data.features), take(data.top_p), take(data.top_i)


def train(head: DraftHead, target, data: HeadData, *, steps: int, lr: float = 5e-4, rows: int = 8,
          length: int = 256, passes: int = 3, kl_weight: float = 0.1, seed: int = 0,
          checkpoint: Path | None = None, log_every: int = 50, time_budget_s: float | None = None,
          log=print) -> list[float]:
    """AdamW with warm-up and cosine decay on the unrolled loss; returns the per-step losses
    (those before a resumed checkpoint included). Only the head's parameters change.
    ``time_budget_s``: after 20 steps, cut ``steps`` to what fits (the decay follows)."""
    dev = next(target.parameters()).device
    flags = [(p, p.requires_grad) for p in target.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    head.float().train().requires_grad_(True)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    total = [steps]  # (cut by the time budget)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, total[0])))))
    losses: list[float] = []
    start = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=dev)
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        losses, start = state["losses"], state["step"]
        log(f"resumed at step {start}")
    g = torch.Generator().manual_seed(seed + start)
    t0 = time.perf_counter()
    try:
        step = start
        while step < total[0]:
            if time_budget_s is not None and step == start + 5:
                t_warm = time.perf_counter()  # the first steps compile and allocate: not timed
            if time_budget_s is not None and step == start + 25:
                per_step = (time.perf_counter() - t_warm) / 20
                fit = step + int((time_budget_s - (time.perf_counter() - t0)) / per_step)
                if fit < total[0]:
                    total[0] = max(step + 1, fit)
                    log(f"time budget {time_budget_s:.0f}s at {per_step * 1e3:.0f} ms a step: {total[0]} steps")
            steps = total[0]
            tokens, feats, top_p, top_i = _batch(data, rows, length, g)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                loss, stats = unrolled_loss(head, target, tokens, feats, top_p, top_i, passes=passes,
                                            kl_weight=kl_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if log_every and (step % log_every == 0 or step == steps - 1):
                accs = " ".join(f"{k} {v:.3f}" for k, v in stats.items())
                log(f"step {step + 1}/{steps}  loss {losses[-1]:.4f}  top-1 agreement {accs}  "
                    f"({time.perf_counter() - t0:.0f}s)")
            if checkpoint is not None and ((step + 1) % 200 == 0 or step == steps - 1):
                torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                            "losses": losses, "step": step + 1}, checkpoint)
            step += 1
    finally:
        head.eval().requires_grad_(False)
        for p, flag in flags:
            p.requires_grad_(flag)
    return losses
