"""The Drafter protocol: ``propose`` a TokenTree, ``update`` after verification."""
from __future__ import annotations

from dataclasses import dataclass
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
