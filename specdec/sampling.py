"""Logits processing (HF semantics) and lossless acceptance over a token tree.

Row convention for a verified tree of n nodes: row 0 holds the target's logits at
the root (the last committed token), row i + 1 the logits after node i.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SamplingParams
from .ops import greedy_accept
from .tree import TokenTree


# ----------------------------------------------------------- logits processing
def context_counts(base_counts: torch.Tensor, tree: TokenTree) -> torch.Tensor:
    """Token counts of the context each row conditions on: [n + 1, vocab].

    base_counts [vocab] counts the committed tokens (root included); row i + 1 adds
    the tokens on the path root -> node i."""
    vocab = base_counts.numel()
    n = len(tree)
    if n == 0:
        return base_counts[None].clone()
    onehot = torch.nn.functional.one_hot(tree.tokens.to(base_counts.device), vocab).to(base_counts.dtype)
    path_counts = tree.ancestor_mask.to(base_counts.device, base_counts.dtype) @ onehot  # [n, vocab]
    return torch.cat([base_counts[None], base_counts[None] + path_counts], dim=0)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """logits [m, vocab], counts [m, vocab] -> penalized logits (HF repetition penalty,
    OpenAI-style frequency / presence penalties)."""
    if sp.repetition_penalty != 1.0:
        seen = counts > 0
        penalized = torch.where(logits < 0, logits * sp.repetition_penalty, logits / sp.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if sp.frequency_penalty != 0.0:
        logits = logits - sp.frequency_penalty * counts
    if sp.presence_penalty != 0.0:
        logits = logits - sp.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def warp(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, in transformers' order and with its tie rules."""
    logits = logits / sp.temperature
    neg_inf = torch.finfo(logits.dtype).min
    if sp.top_k > 0 and sp.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sp.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, neg_inf)
    if sp.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - sp.top_p)
        remove_sorted[..., -1:] = False  # keep at least one token
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, neg_inf)
    return logits


def process(logits: torch.Tensor, sp: SamplingParams, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Raw logits [m, vocab] -> processed logits (greedy: penalties only, like HF)."""
    if torch.isnan(logits).any():
        raise FloatingPointError("the model produced NaN logits; check the weights and dtype "
                                 "(fp16 overflow is a common cause: try bfloat16 or float32)")
    if sp.has_penalties:
        if counts is None:
            raise ValueError("penalties need the context token counts")
        logits = apply_penalties(logits, counts.to(logits.dtype), sp)
    if sp.do_sample:
        logits = warp(logits, sp)
    return logits


def probs_from_logits(logits: torch.Tensor, sp: SamplingParams, counts: torch.Tensor | None = None):
    return torch.softmax(process(logits, sp, counts), dim=-1)


# ------------------------------------------------------------------- acceptance
@dataclass
class Acceptance:
    accepted_nodes: list[int]  # node indices, root to tip
    bonus_token: int


def accept_greedy(tree: TokenTree, processed_logits: torch.Tensor) -> Acceptance:
    """processed_logits [n + 1, vocab]: longest path matching the argmax, plus bonus."""
    argmax = processed_logits.argmax(dim=-1)
    path = greedy_accept(tree.parents, tree.tokens, argmax) if len(tree) else []
    row = path[-1] + 1 if path else 0
    return Acceptance(path, int(argmax[row]))


def accept_sampling(tree: TokenTree, target_probs: torch.Tensor,
                    generator: torch.Generator | None = None) -> Acceptance:
    """Lossless multi-draft rejection sampling over a tree (SpecInfer's MSS).

    target_probs [n + 1, vocab] (processed). At each node the children are tried in
    order: child c (drafted from q_c, or one-hot when the tree has no draft_probs) is
    accepted with probability min(1, p(x_c) / q_c(x_c)); on rejection
    p <- normalize(max(p - q_c, 0)). If no child is accepted, the bonus token is drawn
    from the residual p. Siblings with draft_probs must be i.i.d. draws from the same q.
    """
    children = tree.children()
    tokens = tree.tokens.tolist()
    dp = tree.draft_probs
    node, path = -1, []
    while True:
        p = target_probs[node + 1].clone()
        nxt = None
        for c in children[node + 1]:
            x = tokens[c]
            q_x = 1.0 if dp is None else float(dp[c, x])
            u = torch.rand((), generator=generator, device=p.device)
            if q_x > 0 and float(u) * q_x < float(p[x]):  # u < p(x)/q(x)
                nxt = c
                break
            if dp is None:
                p[x] = 0.0
            else:
                p = torch.clamp(p - dp[c].to(p.dtype), min=0.0)
            total = p.sum()
            if total <= 0:  # p == q exactly: every mass was proposed; nothing left to reject into
                p = target_probs[node + 1].clone()
                break
            p = p / total
        if nxt is None:
            bonus = int(torch.multinomial(p, 1, generator=generator))
            return Acceptance(path, bonus)
        path.append(nxt)
        node = nxt
