"""CompactRunner: the Runner protocol on a compact model with a static KV cache.

The fast path for supported architectures (see specdec.models); everything else
runs on the generic Hugging Face backend. Batch 1.
"""
from __future__ import annotations

import torch

from ..models import CompactModel, load_compact
from ..ops import exact as exact_ops
from .base import Runner

DEFAULT_MAX_LENGTH = 4096  # cache capacity when the caller gives none (capped by the model)


class CompactRunner(Runner):
    def __init__(self, model: CompactModel, *, max_length: int | None = None, exact: bool | str | None = None):
        """``max_length``: cache capacity in tokens (prompt + generated + one draft tree);
        defaults to min(model context, DEFAULT_MAX_LENGTH). ``exact``: the exact mode of #22
        (``ops.exact.resolve``; None: its default, off for now): every row of a
        verify computes bitwise what a one-token step computes."""
        self.model = model
        model.exact = exact_ops.resolve(exact, model.dtype, model.device)
        cap = model.max_position_embeddings
        self.max_length = min(cap, max_length if max_length is not None else DEFAULT_MAX_LENGTH)
        self.vocab_size = model.vocab_size
        self.device = model.device
        self.cache = model.new_cache(self.max_length)

    @classmethod
    def from_hf(cls, hf_model, *, max_length: int | None = None, exact: bool | str | None = None
                ) -> CompactRunner | None:
        """A runner sharing ``hf_model``'s weights, or None if the architecture is not covered."""
        model = load_compact(hf_model)
        return None if model is None else cls(model, max_length=max_length, exact=exact)

    @property
    def exact(self) -> str:
        """The exact mode its forwards run in: "on", "off" or "linear"."""
        return self.model.exact

    @property
    def length(self) -> int:
        return self.cache.length

    def reset(self) -> None:
        self.cache.reset()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                tree_mask: torch.Tensor | None = None, mask_start: int | None = None) -> torch.Tensor:
        """input_ids [m], position_ids [m], tree_mask [m, length - mask_start + m] bool
        (None = causal; mask_start defaults to length). Returns logits [m, vocab] fp32."""
        m = input_ids.shape[0]
        if input_ids.dim() != 1 or position_ids.shape != input_ids.shape:
            raise ValueError(f"input_ids and position_ids must both be [m]; got {tuple(input_ids.shape)} "
                             f"and {tuple(position_ids.shape)}")
        if tree_mask is not None:
            mask_start = self.length if mask_start is None else mask_start
            if not 0 <= mask_start <= self.length:
                raise ValueError(f"mask_start {mask_start} not in [0, {self.length}]")
            want = (m, self.length - mask_start + m)
            if tuple(tree_mask.shape) != want:
                raise ValueError(f"tree_mask must be {want} (m, length - mask_start + m); got "
                                 f"{tuple(tree_mask.shape)}")
            tree_mask = tree_mask.to(device=self.device, dtype=torch.bool)
        ids = input_ids.to(self.device, torch.long)
        pos = position_ids.to(self.device, torch.long)
        logits = self.model(ids, pos, self.cache, tree_mask=tree_mask, mask_start=mask_start)
        self.last_hidden = self.model.last_residual if self.keep_hidden else None
        return logits.float()  # [m, vocab]

    def commit(self, start: int, keep_idx: torch.Tensor) -> None:
        """Keep cache entries [0, start) plus start + keep_idx ([a] int64, increasing)."""
        self.cache.commit(start, keep_idx)

    def crop(self, length: int) -> None:
        self.cache.crop(length)
