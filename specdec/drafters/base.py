"""The Drafter protocol: ``propose`` a TokenTree, ``update`` after verification."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from ..config import SamplingParams, TreeBudget
from ..tree import TokenTree


@dataclass
class DraftRequest:
    """What a drafter knows when it proposes."""

    tokens: torch.Tensor  # [T] every committed token; tokens[-1] is the tree's root
    budget: TreeBudget
    sampling: SamplingParams
    generator: torch.Generator | None = None  # use it for any random draft choice


@dataclass
class VerifyResult:
    """What the target decided about a proposed tree."""

    tree: TokenTree
    accepted_nodes: list[int]  # node indices of the accepted path, root to tip
    committed: torch.Tensor  # [a + 1] accepted tokens then the bonus token
    tokens: torch.Tensor  # [T'] every committed token after this step
    # [n + 1, vocab] raw target logits: row 0 at the root, row i + 1 at node i.
    target_logits: torch.Tensor | None = None
    # [n + 1, hidden] the target's residual stream into its final norm, rows as target_logits;
    # only for a drafter with ``wants_target_hidden`` (drafters/head.py), else None.
    target_hidden: torch.Tensor | None = None
    _topk: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _topk_host: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def target_topk(self, k: int) -> torch.Tensor:
        """[n + 1, min(k, vocab)] ids of the target's top-k at every row, best first, on the
        logits' device. One ``topk`` per step, shared by the drafters that ask (the first
        ask should be the largest k: ``MergedDrafter`` asks for its drafters' maximum)."""
        if self.target_logits is None:
            raise ValueError("VerifyResult.target_topk: no target logits in this result")
        k = min(int(k), self.target_logits.shape[-1])
        if self._topk is None or self._topk.shape[-1] < k:
            self._topk = self.target_logits.topk(k, dim=-1).indices
            self._topk_host = None
        return self._topk[:, :k]

    def target_topk_host(self, k: int) -> torch.Tensor:
        """``target_topk(k)`` in host memory: one transfer per step (of every column computed)."""
        ids = self.target_topk(k)
        if self._topk_host is None:
            self._topk_host = self._topk.cpu()
        return self._topk_host[:, :ids.shape[-1]]


@runtime_checkable
class Drafter(Protocol):
    """A drafter proposes a token tree below the last committed token."""

    def reset(self, prompt: torch.Tensor) -> None:
        """Start a new sequence; ``prompt`` is [T] token ids."""

    def propose(self, request: DraftRequest) -> TokenTree:
        ...

    def update(self, result: VerifyResult) -> None:
        """Learn from the verification (roll caches back, record n-grams, ...)."""


class NoDrafter:
    """Proposes nothing: plain decoding through the same engine."""

    def reset(self, prompt: torch.Tensor) -> None:
        pass

    def propose(self, request: DraftRequest) -> TokenTree:
        return TokenTree.empty(request.tokens.device)

    def update(self, result: VerifyResult) -> None:
        pass
