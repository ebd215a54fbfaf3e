"""The Runner protocol: how the engine drives a model that owns a KV cache.

A runner holds the KV of a prefix (``length`` tokens). ``forward`` appends ``m`` new
tokens whose attention to the cached prefix [0, mask_start) is unrestricted and to
keys [mask_start, length + m) follows ``tree_mask``; ``commit`` then keeps a subset of
the appended tokens (the accepted path), so the cache holds exactly committed tokens.
"""
from __future__ import annotations

from typing import Protocol

import torch


class Runner(Protocol):
    vocab_size: int
    max_length: int  # the model's context length (positions)
    device: torch.device

    @property
    def length(self) -> int:
        """Number of tokens whose K/V the cache holds."""

    def reset(self) -> None:
        """Empty the cache (start a new sequence)."""

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                tree_mask: torch.Tensor | None = None, mask_start: int | None = None) -> torch.Tensor:
        """input_ids [m], position_ids [m], tree_mask [m, length - mask_start + m] bool
        (None = causal). Appends the m tokens' K/V; returns logits [m, vocab] (fp32)."""

    def keep(self, start: int, keep_idx: torch.Tensor) -> None:
        """Keep cache entries [0, start) plus entries start + keep_idx, in that order;
        drop everything else. keep_idx [a] int64, increasing."""

    def crop(self, length: int) -> None:
        """Drop cache entries at and after ``length``."""
