"""The Runner: how the engine drives a model that owns a KV cache.

A runner holds the K/V of a prefix (``length`` tokens). ``forward`` appends ``m`` new
tokens whose attention to the cached prefix [0, mask_start) is unrestricted and to keys
[mask_start, length + m) follows ``tree_mask``; ``commit`` then keeps the accepted path
of the appended tokens, so the cache holds exactly the committed tokens.

Backends subclass ``Runner``; the methods with a body are defaults a backend may override.
"""
from __future__ import annotations

import threading

import torch


class Runner:
    vocab_size: int
    max_length: int  # the model's context length (positions)
    device: torch.device
    captures: int = 0  # CUDA graphs captured so far (a forward that captured is no timing sample)
    pads_trees: bool = False  # every tree runs padded to a bucket (CUDA graphs): verify cost steps
    # Set by ``generate`` when its drafter reads the target's hidden states (the EAGLE-style
    # head, drafters/head.py): each forward then leaves ``last_hidden`` [m, hidden], the
    # residual stream its m rows carried into the final norm (model dtype, valid until the
    # next forward).
    keep_hidden: bool = False
    last_hidden: torch.Tensor | None = None

    @property
    def lock(self) -> threading.Lock:
        """Held by ``generate`` for a whole sequence: the cache holds one sequence, so two
        threads decoding on one model (whose compact runner is kept) take turns here."""
        if "_lock" not in self.__dict__:
            self.__dict__["_lock"] = threading.Lock()
        return self.__dict__["_lock"]

    @property
    def length(self) -> int:
        """Number of tokens whose K/V the cache holds."""
        raise NotImplementedError

    def reset(self) -> None:
        """Empty the cache (start a new sequence)."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                tree_mask: torch.Tensor | None = None, mask_start: int | None = None) -> torch.Tensor:
        """input_ids [m], position_ids [m], tree_mask [m, length - mask_start + m] bool
        (None = causal). Appends the m tokens' K/V; returns logits [m, vocab] (fp32)."""
        raise NotImplementedError

    def prefill(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> None:
        """Append a causal run of tokens whose logits are not needed (the prompt)."""
        self.forward(input_ids, position_ids)

    def commit(self, start: int, keep_idx: torch.Tensor) -> None:
        """Keep cache entries [0, start) plus entries start + keep_idx (the accepted path),
        in that order; drop everything else. keep_idx [a] int64, increasing."""
        raise NotImplementedError

    def crop(self, length: int) -> None:
        """Drop cache entries at and after ``length``."""
        raise NotImplementedError

    def fit_nodes(self, n: int) -> int:
        """The nodes to draft for a budget of ``n`` (a bucketed runner trims it to fill a bucket)."""
        return n
