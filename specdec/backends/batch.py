"""The BatchRunner: how the engine drives a model over B sequences at once (#23).

Each row (sequence) has its own cache length. One ``forward`` runs any subset of the rows
together (a ragged batch: row b appends m_b tokens that see the whole of row b's cache and,
among themselves, what ``tree_mask`` allows -- never another row's keys) and returns each
row's logits. ``commit`` then keeps a row's accepted path, as ``Runner.commit`` does for one
sequence. A finished row is ``release``d and costs nothing afterwards.

Backends: ``compact_batch.CompactBatchRunner`` (the compact runtime; one flat static cache,
packed tokens) and ``generic_batch.HFBatchRunner`` (any transformers causal LM, a 4D mask
per row; slower, for CPU and unsupported models).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch


@dataclass
class RowInput:
    """One row's share of a batched forward."""

    row: int
    input_ids: torch.Tensor  # [m] int64
    position_ids: torch.Tensor  # [m] int64
    tree_mask: torch.Tensor | None = None  # [m, m] bool over the row's new tokens (None: causal)


class BatchRunner:
    vocab_size: int
    max_length: int  # positions per row (the model's context, capped by the cache)
    device: torch.device
    rows: int = 0  # B, set by ``reset``
    captures: int = 0  # CUDA graphs captured so far

    @property
    def lock(self) -> threading.Lock:
        """Held by ``generate`` for a whole batch (the cache holds one batch at a time)."""
        if "_lock" not in self.__dict__:
            self.__dict__["_lock"] = threading.Lock()
        return self.__dict__["_lock"]

    def reset(self, rows: int) -> None:
        """Empty the cache and make room for ``rows`` sequences."""
        raise NotImplementedError

    def length(self, row: int) -> int:
        """Tokens whose K/V row ``row`` holds."""
        raise NotImplementedError

    def forward(self, inputs: list[RowInput]) -> list[torch.Tensor]:
        """Append each input's tokens to its row (distinct rows, any subset, any order) in ONE
        forward; returns logits [m_b, vocab] fp32 per input, in the order given."""
        raise NotImplementedError

    def prefill(self, inputs: list[RowInput]) -> None:
        """Append causal runs (the prompts) whose logits are not needed."""
        self.forward(inputs)

    def commit(self, row: int, start: int, keep_idx: torch.Tensor) -> None:
        """Keep row ``row``'s entries [0, start) plus start + keep_idx ([a] int64, increasing)."""
        raise NotImplementedError

    def release(self, row: int) -> None:
        """Row ``row`` is finished: later forwards do not include it."""

    def check_rows(self, inputs: list[RowInput]) -> None:
        """Shared validation: known, distinct, unreleased rows with [m] ids and positions."""
        seen = set()
        for inp in inputs:
            if not 0 <= inp.row < self.rows or inp.row in seen:
                raise ValueError(f"row {inp.row} is not a distinct row of this batch of {self.rows}")
            seen.add(inp.row)
            m = inp.input_ids.shape[0]
            if inp.input_ids.dim() != 1 or inp.position_ids.shape != inp.input_ids.shape or m == 0:
                raise ValueError(f"row {inp.row}: input_ids and position_ids must both be [m], m > 0; got "
                                 f"{tuple(inp.input_ids.shape)} and {tuple(inp.position_ids.shape)}")
            if inp.tree_mask is not None and tuple(inp.tree_mask.shape) != (m, m):
                raise ValueError(f"row {inp.row}: tree_mask must be [{m}, {m}], got {tuple(inp.tree_mask.shape)}")
            if self.length(inp.row) + m > self.max_length:
                raise ValueError(f"row {inp.row}: {self.length(inp.row)} cached + {m} new tokens exceed the "
                                 f"cache's {self.max_length} positions per row")
