"""KV-cache compaction after a verify step (static-cache runtime).

Cache layout: one tensor for K and one for V, each
``[num_layers, num_kv_heads, max_seq_len, head_dim]`` with unit stride on ``head_dim``
(a single layer ``[num_kv_heads, max_seq_len, head_dim]`` is accepted too; a list of
per-layer tensors works but costs one launch per layer).

A verify step wrote the ``n`` tree nodes' K/V at positions ``[start, start + n)``. After
acceptance the accepted nodes ``accepted_idx`` (node indices, strictly increasing) move
to ``[start, start + num_accepted)``; positions past that are garbage the next step
overwrites. ``num_accepted`` and ``start`` may live on the device, so the runtime never
syncs with the host (CUDA-graph friendly).

One device implementation, the Triton kernel (kernels/kv_compaction.py, which says why
moving in place is safe), beside ``compact_kv_ref``, the test oracle and CPU path. On an
H100, SmolLM2's bf16 cache: 8 to 10 us a call vs 22 to 23 us (``benchmarks/bench_ops.py``).
"""
from __future__ import annotations

import torch

from . import backend

def write_kv(k_cache: torch.Tensor,  # [Hkv, S_max, D] one layer
             v_cache: torch.Tensor,  # [Hkv, S_max, D]
             at: int | torch.Tensor,  # start slot, or [m] int64 slots on the cache's device
             k: torch.Tensor,        # [m, Hkv, D]
             v: torch.Tensor) -> None:
    """Store m tokens' K/V at slots [at, at + m), or at the slots of an index tensor
    (index_copy_: no host sync, so a CUDA graph replays it at other slots)."""
    if isinstance(at, torch.Tensor):
        k_cache.index_copy_(1, at, k.transpose(0, 1))
        v_cache.index_copy_(1, at, v.transpose(0, 1))
        return
    m = k.shape[0]
    k_cache[:, at:at + m] = k.transpose(0, 1)
    v_cache[:, at:at + m] = v.transpose(0, 1)


def compact_kv_ref(k_cache: torch.Tensor,            # [num_layers, Hkv, S_max, D]
                   v_cache: torch.Tensor,            # [num_layers, Hkv, S_max, D]
                   accepted_idx: torch.Tensor,       # [max_accepted] int64, increasing
                   num_accepted: torch.Tensor | int | None = None,  # [] int64; None = all
                   *, start: int | torch.Tensor) -> None:
    """Reference (and CPU fallback): gather the accepted rows, then write them. Syncs."""
    a = accepted_idx.numel() if num_accepted is None else int(num_accepted)
    a = max(0, min(a, accepted_idx.numel()))
    pos0 = int(start)
    src = pos0 + accepted_idx[:a].to(device=k_cache.device, dtype=torch.long)
    for cache in (k_cache, v_cache):
        cache[..., pos0:pos0 + a, :] = cache[..., src, :]  # RHS is a copy: no aliasing


def compact_kv(k_cache: torch.Tensor | list[torch.Tensor],  # [num_layers, Hkv, S_max, D]
               v_cache: torch.Tensor | list[torch.Tensor],  # same shape and dtype as k_cache
               accepted_idx: torch.Tensor,                  # [max_accepted] int, increasing
               num_accepted: torch.Tensor | None = None,    # [] / [1] int on device; None = all
               *, start: int | torch.Tensor) -> None:       # first tree position (int or device)
    """Move K/V of node ``accepted_idx[j]`` (at ``start + accepted_idx[j]``) to ``start + j``
    for ``j < num_accepted``, in every layer and head, in place (Triton: without a host sync).

    Preconditions the device cannot check cheaply: ``accepted_idx[:num_accepted]`` is
    strictly increasing and ``start + accepted_idx[j] < max_seq_len``. The kernel skips
    (rather than read out of bounds) an index that is negative or past the cache.
    """
    if isinstance(k_cache, (list, tuple)):
        if not isinstance(v_cache, (list, tuple)) or len(k_cache) != len(v_cache):
            raise ValueError("compact_kv: k_cache and v_cache must both be lists of equal length")
        for k, v in zip(k_cache, v_cache):
            compact_kv(k, v, accepted_idx, num_accepted, start=start)
        return
    if k_cache.dim() == 3:
        k_cache, v_cache = k_cache.unsqueeze(0), v_cache.unsqueeze(0)
    _check(k_cache, v_cache, accepted_idx, num_accepted, start)
    if backend.use_triton(k_cache.device):
        from ..kernels import kv_compaction

        kv_compaction.compact_kv(k_cache, v_cache, accepted_idx, num_accepted, start)
    else:
        compact_kv_ref(k_cache, v_cache, accepted_idx, num_accepted, start=start)


def _check(k, v, idx, num, start) -> None:
    if k.dim() != 4 or k.shape != v.shape or k.dtype != v.dtype or k.device != v.device:
        raise ValueError(f"compact_kv: k_cache and v_cache must both be [num_layers, Hkv, S_max, D] "
                         f"with one dtype/device; got {tuple(k.shape)} {k.dtype} {k.device} and "
                         f"{tuple(v.shape)} {v.dtype} {v.device}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("compact_kv: head_dim must have unit stride")
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64) or idx.device != k.device:
        raise ValueError(f"compact_kv: accepted_idx must be a 1-D int tensor on {k.device}")
    if num is not None and (num.numel() != 1 or num.device != k.device or num.is_floating_point()):
        raise ValueError(f"compact_kv: num_accepted must be one int on {k.device}")
    if isinstance(start, torch.Tensor):
        if start.numel() != 1 or start.device != k.device or start.is_floating_point():
            raise ValueError(f"compact_kv: a tensor start must be one int on {k.device}")
    elif not 0 <= int(start) <= k.shape[2]:
        raise ValueError(f"compact_kv: start={start} outside [0, {k.shape[2]}]")

