"""transformers logits processors and stopping criteria inside the speculative loop.

A verify step scores every tree node at once; a processor must see, for each row, the
context that row's token would follow in plain decoding: the committed tokens plus the
node's own ancestors (row 0: the committed tokens alone; row i + 1: those plus the path
root -> node i). ``TreeLogitsProcessor`` calls the list once per tree depth, on a batch
of the rows at that depth, so every processor that reads only ``input_ids`` and
``scores`` (penalties, n-gram bans, bad words, suppression, forced tokens, min length,
warpers, a user's own) gives each row exactly what it gives in plain decoding: acceptance
stays lossless. The contract for a user processor: ``input_ids`` [rows, context] is each
row's context; it may keep no state between calls.

Stopping criteria run on the committed tokens, one new token at a time: nothing after the
first token that stops is committed or emitted.
"""
from __future__ import annotations

import torch

from .tree import TokenTree


class TreeLogitsProcessor:
    """Apply ``processors`` (a transformers ``LogitsProcessorList`` or any callable
    ``(input_ids [rows, ctx], scores [rows, V]) -> scores``) to every row of a verify step."""

    def __init__(self, processors):
        self.processors = processors

    def __call__(self, logits: torch.Tensor,  # [n + 1, V] raw target logits
                 committed: torch.Tensor,  # [T] every committed token (the root last)
                 tree: TokenTree) -> torch.Tensor:  # -> [n + 1, V] processed
        device = logits.device
        committed = committed.to(device)
        depths = [0] + tree.depth_list
        tokens = tree.tokens.to(device)
        out = torch.empty_like(logits)
        for d in sorted(set(depths)):
            rows = [r for r, dr in enumerate(depths) if dr == d]
            if d == 0:
                ctx = committed[None]  # [1, T]
            else:
                paths = torch.tensor([tree.path_to(r - 1) for r in rows], device=device)  # [g, d]
                ctx = torch.cat([committed[None].expand(len(rows), -1), tokens[paths]], dim=1)  # [g, T + d]
            out[rows] = self.processors(ctx, logits[rows].clone())
        return out


class _Prefixed:
    """``fn(input_ids, ...)`` with ``prefix`` [P] prepended to every row of ``input_ids``."""

    def __init__(self, fn, prefix: torch.Tensor):
        self.fn, self.prefix = fn, prefix

    def __call__(self, input_ids: torch.Tensor, *args, **kwargs):
        prefix = self.prefix.to(input_ids.device)[None].expand(input_ids.shape[0], -1)
        return self.fn(torch.cat([prefix, input_ids], dim=1), *args, **kwargs)


def with_prefix(fn, prefix: torch.Tensor):
    """``fn`` seeing ``prefix`` before every context (a left-padded row's pads, as transformers'
    processors see them); ``fn`` itself when the prefix is empty."""
    return fn if prefix.numel() == 0 else _Prefixed(fn, prefix)


def first_stop(criteria, committed: torch.Tensor, new: list[int], device) -> int | None:
    """Index in ``new`` of the first token after which ``criteria`` (a transformers
    ``StoppingCriteriaList``, called as ``criteria(input_ids [1, L], scores=None)``) stops,
    or None. ``committed`` [T]: the tokens before ``new``."""
    ids = torch.cat([committed.to(device), torch.tensor(new, dtype=torch.long, device=device)])[None]
    base = committed.numel()
    for j in range(len(new)):
        if bool(torch.as_tensor(criteria(ids[:, :base + j + 1], None)).any()):
            return j
    return None
