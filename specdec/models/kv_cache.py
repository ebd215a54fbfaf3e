"""A static (preallocated) KV cache for one sequence (batch 1).

Layout follows gpt-fast: one tensor per K and V holding every layer, so the
storage never moves (CUDA-graph friendly) and compaction is one indexed copy.

    k, v : [num_layers, Hkv, S_max, D]   dtype of the model
    pos  : [S_max] int64                  absolute position of each entry

Entries [0, length) are valid. ``pos`` is kept because after tree verification
or draft reuse an entry's index need not equal its position; sliding-window
layers mask by absolute position.
"""
from __future__ import annotations

import torch

from ..ops import kv as kv_ops


class StaticKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_length: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        if max_length <= 0:
            raise ValueError(f"StaticKVCache: max_length must be > 0, got {max_length}")
        shape = (num_layers, num_kv_heads, max_length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, Hkv, S_max, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, Hkv, S_max, D]
        self.pos = torch.zeros(max_length, dtype=torch.long, device=device)  # [S_max]
        self.length = 0

    @property
    def max_length(self) -> int:
        return self.k.shape[2]

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def reset(self) -> None:
        self.length = 0

    def reserve(self, positions: torch.Tensor) -> int:
        """Claim slots [length, length + m) for m new tokens at ``positions`` [m].
        Returns the start slot; ``advance(m)`` sets ``length`` once every layer is written."""
        start, m = self.length, positions.shape[0]
        if start + m > self.max_length:
            raise RuntimeError(f"StaticKVCache is full: {start} cached + {m} new tokens > capacity "
                               f"{self.max_length}; create the runner with a larger max_length")
        self.pos[start:start + m] = positions
        return start

    def advance(self, m: int) -> None:
        self.length += m

    def write(self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [m, Hkv, D] -> slots [start, start + m) of ``layer``; or, with ``start`` an
        [m] int64 tensor of slot indices on the cache's device, -> those slots (index_copy_:
        no host sync, so a CUDA graph can replay it at other slots)."""
        kv_ops.write_kv(self.k[layer], self.v[layer], start, k, v)

    def commit(self, start: int, keep_idx: torch.Tensor) -> None:
        """Keep entries [0, start) plus start + keep_idx (increasing, [a] int64), compacted
        in order to [start, start + a); drop the rest. A host ``keep_idx`` that is a prefix
        (plain decoding, a fully accepted chain) moves nothing: no kernel is launched."""
        a = int(keep_idx.numel())
        if start + a > self.length or start < 0:
            raise ValueError(f"commit: start {start} + {a} kept entries exceed the cache length {self.length}")
        prefix = keep_idx.device.type == "cpu" and bool((keep_idx == torch.arange(a)).all())
        if a and not prefix:
            idx = keep_idx.to(device=self.device, dtype=torch.long)  # [a]
            kv_ops.compact_kv(self.k, self.v, idx, start=start)  # kernel or torch reference
            self.pos[start:start + a] = self.pos[idx + start]  # the gather copies before the write
        self.length = start + a

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"crop: length {length} not in [0, {self.length}]")
        self.length = length

