"""MergedDrafter: the union of several drafters' trees under one node budget."""
from __future__ import annotations

import torch

from ..tree import TokenTree, merge
from .base import DraftRequest, VerifyResult


class MergedDrafter:
    """Asks every drafter, merges their trees (shared prefixes deduplicated) and keeps
    at most ``budget.max_nodes`` nodes: best-first when every tree carries scores,
    otherwise in drafter order (the first drafter's nodes first).

    Mixed trees are verified as deterministic proposals (one-hot acceptance), which is
    lossless for any tokens: a sampled draft's ``draft_probs`` are only kept when a
    single drafter proposed the whole tree (the exact multi-draft rule needs siblings
    drawn i.i.d. from the same q, which merging and deduplication break)."""

    def __init__(self, drafters):
        if not drafters:
            raise ValueError("MergedDrafter needs at least one drafter")
        self.drafters = list(drafters)
        sizes = {getattr(d, "vocab_size", None) for d in self.drafters} - {None}
        if len(sizes) > 1:
            raise ValueError(f"merged drafters disagree on the vocabulary size: {sorted(sizes)}")
        self.vocab_size = sizes.pop() if sizes else None
        devices = {str(getattr(d, "device", None)) for d in self.drafters} - {"None"}
        self.device = torch.device(devices.pop()) if len(devices) == 1 else None
        model_devices = {str(getattr(d, "draft_device", None)) for d in self.drafters} - {"None"}
        if len(model_devices) > 1:
            raise ValueError(f"merged drafters' draft models are on different devices: {sorted(model_devices)}")
        self.draft_device = torch.device(model_devices.pop()) if model_devices else None
        self.wants_target_hidden = any(getattr(d, "wants_target_hidden", False) for d in self.drafters)

    def observe_prefill(self, hidden: torch.Tensor) -> None:
        """The target's hidden states over the prompt, to the drafters that read them."""
        for d in self.drafters:
            if getattr(d, "wants_target_hidden", False):
                d.observe_prefill(hidden)

    def reset(self, prompt: torch.Tensor) -> None:
        for d in self.drafters:
            d.reset(prompt)

    def propose(self, request: DraftRequest) -> TokenTree:
        trees = [t for t in (d.propose(request) for d in self.drafters) if len(t)]
        if not trees:
            return TokenTree.empty(request.tokens.device)
        if len(trees) == 1:
            return trees[0].truncate(request.budget.max_nodes)
        return merge([t.to("cpu") for t in trees], max_nodes=request.budget.max_nodes)

    def update(self, result: VerifyResult) -> None:
        want = max((getattr(d, "target_topk_wanted", 0) for d in self.drafters), default=0)
        if want and result.target_logits is not None:
            result.target_topk(want)  # one topk at the largest k, shared by the drafters
        for d in self.drafters:
            d.update(result)
