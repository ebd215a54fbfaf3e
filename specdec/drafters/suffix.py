"""SuffixDrafter: prompt lookup over the whole history, computed on the device.

Proposes the trie of what followed the latest, longest matches of the context's suffix
(``specdec.ops.suffix_match``: fixed shapes, no host sync, a device-side length), the
building block of the device-resident loop (#8). In today's host loop the trie is
compacted to a TokenTree on the host (one transfer per step). Proposals are
deterministic (one-hot for acceptance); ``update`` has nothing to learn: the history is
the state.
"""
from __future__ import annotations

import torch

from ..ops.suffix_match import candidates_to_tree, suffix_candidates
from ..tree import TokenTree
from .base import DraftRequest, VerifyResult


class SuffixDrafter:
    """max_order: longest suffix matched; num_candidates: continuations per step; depth: the
    longest continuation; max_scan: matches read (longest first, most recent first)."""

    def __init__(self, *, max_order: int = 4, num_candidates: int = 8, depth: int = 16, max_scan: int = 64,
                 device: str | torch.device | None = None):
        for name, v in (("max_order", max_order), ("num_candidates", num_candidates), ("depth", depth),
                        ("max_scan", max_scan)):
            if int(v) < 1:
                raise ValueError(f"SuffixDrafter: {name} must be >= 1, got {v}")
        self.opts = dict(max_order=int(max_order), num_candidates=int(num_candidates), depth=int(depth),
                         max_scan=int(max_scan))
        self.device = None if device is None else torch.device(device)

    def reset(self, prompt: torch.Tensor) -> None:
        pass

    def propose(self, request: DraftRequest) -> TokenTree:
        budget = request.budget
        if budget.max_nodes <= 0 or budget.max_depth <= 0 or request.tokens.numel() < 2:
            return TokenTree.empty()
        history = request.tokens if self.device is None else request.tokens.to(self.device)
        opts = dict(self.opts, depth=min(self.opts["depth"], budget.max_depth))
        cands, lengths = suffix_candidates(history, history.numel(), **opts)  # [C, L], [C]
        tokens, parents, valid = candidates_to_tree(cands, lengths)  # [C * L] each
        # one transfer (the host loop's); invalid nodes' parent entries are arbitrary: root them
        tokens, parents, valid = torch.stack([tokens, torch.where(valid, parents, -1), valid.long()]).cpu()
        return TokenTree(tokens, parents).select(valid.nonzero().flatten()).truncate(budget.max_nodes)

    def update(self, result: VerifyResult) -> None:
        pass
