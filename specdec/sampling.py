"""Logits processing (HF semantics) and lossless acceptance over a token tree.

Row convention for a verified tree of n nodes: row 0 holds the target's logits at
the root (the last committed token), row i + 1 the logits after node i.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SamplingParams
from .ops.accept import greedy_accept, tree_rejection_sample, tree_uniforms
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


def process(logits: torch.Tensor, sp: SamplingParams, counts: torch.Tensor | None = None,
            check_nan: bool = True) -> torch.Tensor:
    """Raw logits [m, vocab] -> processed logits (greedy: penalties only, like HF).

    ``check_nan=False`` skips the NaN check (a host sync); the acceptance functions
    check their inputs in the step's single transfer instead."""
    if check_nan and torch.isnan(logits).any():
        raise FloatingPointError(NAN_MESSAGE)
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


def _read_back(path: torch.Tensor, num: torch.Tensor, bonus: torch.Tensor, bad: torch.Tensor) -> Acceptance:
    """The step's one device-to-host transfer: [num, bonus, nan flag, path...]."""
    packed = torch.cat([num.view(1), bonus.view(1), bad.view(1).long(), path.view(-1)]).tolist()
    if packed[2]:
        raise FloatingPointError(NAN_MESSAGE)
    return Acceptance(packed[3:3 + packed[0]], packed[1])


NAN_MESSAGE = ("the model produced NaN logits; check the weights and dtype "
               "(fp16 overflow is a common cause: try bfloat16 or float32)")


def accept_greedy(tree: TokenTree, processed_logits: torch.Tensor) -> Acceptance:
    """processed_logits [n + 1, vocab]: longest path matching the argmax, plus bonus.

    The argmax row and a NaN flag come to the host in one transfer; the path is chosen
    there (``ops.greedy_accept``, on every device)."""
    argmax = processed_logits.argmax(dim=-1)  # [n + 1]
    # argmax propagates NaN (a row holding one picks it), so checking the picked values
    # finds every NaN row without a second pass over the logits
    bad = torch.isnan(processed_logits.gather(-1, argmax[:, None])).any()
    packed = torch.cat([bad.view(1).long(), argmax]).tolist()
    if packed[0]:
        raise FloatingPointError(NAN_MESSAGE)
    argmax = packed[1:]
    path = greedy_accept(tree.parents.tolist(), tree.tokens.tolist(), argmax) if len(tree) else []
    return Acceptance(path, argmax[path[-1] + 1 if path else 0])


def accept_sampling(tree: TokenTree, target_probs: torch.Tensor,
                    generator: torch.Generator | None = None) -> Acceptance:
    """Lossless multi-draft rejection sampling over a tree (SpecInfer's MSS).

    target_probs [n + 1, vocab] (processed). At each node the children are tried in
    order: child c (drafted from q_c, or one-hot when the tree has no draft_probs) is
    accepted with probability min(1, p(x_c) / q_c(x_c)); on rejection
    p <- normalize(max(p - q_c, 0)). If no child is accepted, the bonus token is drawn
    from the residual p. Siblings with draft_probs must be i.i.d. draws from the same q.
    The rule and its exact arithmetic live in ``ops.accept`` (Triton on CUDA, the
    torch reference elsewhere); the uniforms come from ``generator``.
    """
    dev = target_probs.device
    n = len(tree)
    uniforms = tree_uniforms(n, generator=generator).to(dev)  # [n + 1]
    dp = None if tree.draft_probs is None else tree.draft_probs.to(dev)
    bad = torch.isnan(target_probs).any()
    path, num, bonus = tree_rejection_sample(tree.parents.to(dev), tree.tokens.to(dev), target_probs, uniforms, dp)
    return _read_back(path, num, bonus, bad)
