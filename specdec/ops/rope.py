"""Rotary position embedding (rotate-half): a fused Triton kernel for q and k together
(on by default on CUDA, see ``backend.use_fused``) or the PyTorch reference, transformers' arithmetic.
``apply_rope_and_write`` also stores k and v in the KV cache in the same launch."""
from __future__ import annotations

import torch

from . import backend
from .kv import write_kv


def apply_rope_ref(x: torch.Tensor,    # [m, H, D]
                   cos: torch.Tensor,  # [m, 1, D]
                   sin: torch.Tensor   # [m, 1, D]
                   ) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def apply_rope(q: torch.Tensor,    # [m, Hq, D]
               k: torch.Tensor,    # [m, Hkv, D]
               cos: torch.Tensor,  # [m, 1, D], q's dtype
               sin: torch.Tensor   # [m, 1, D]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) rotated; the fused path rotates them in place in one launch."""
    fused = (backend.use_fused(q.device) and q.dtype == k.dtype == cos.dtype == sin.dtype
             and q.shape[-1] % 2 == 0 and q.stride(-1) == 1 and k.stride(-1) == 1)
    if not fused:
        return apply_rope_ref(q, cos, sin), apply_rope_ref(k, cos, sin)
    from ..kernels import rope as kernel

    c, s = cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1)  # [m, D]
    if c.stride(-1) != 1 or s.stride(-1) != 1:
        c, s = c.contiguous(), s.contiguous()
    return kernel.rope_(q, k, c, s)


def apply_rope_and_write(q: torch.Tensor,        # [m, Hq, D]
                         k: torch.Tensor,        # [m, Hkv, D]
                         v: torch.Tensor,        # [m, Hkv, D]
                         cos: torch.Tensor,      # [m, 1, D], q's dtype
                         sin: torch.Tensor,      # [m, 1, D]
                         k_cache: torch.Tensor,  # [Hkv, S_max, D] one layer
                         v_cache: torch.Tensor,  # [Hkv, S_max, D]
                         at: int | torch.Tensor  # start slot, or [m] int64 slots on the cache's device
                         ) -> torch.Tensor:      # q rotated [m, Hq, D]
    """Rotate q and k, and write the rotated k and v at cache slots ``at`` (``kv.write_kv``):
    one launch on the fused path instead of a RoPE kernel and two cache copies."""
    fused = (backend.use_fused(q.device) and q.dtype == k.dtype == v.dtype == cos.dtype == sin.dtype
             == k_cache.dtype and q.shape[-1] % 2 == 0 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
             and k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1)
    if not fused:
        q, k = apply_rope(q, k, cos, sin)
        write_kv(k_cache, v_cache, at, k, v)
        return q
    from ..kernels import rope as kernel

    m = q.shape[0]
    slots = at if isinstance(at, torch.Tensor) else torch.arange(int(at), int(at) + m, device=q.device)
    c, s = cos.reshape(m, -1), sin.reshape(m, -1)  # [m, D]
    if c.stride(-1) != 1 or s.stride(-1) != 1:
        c, s = c.contiguous(), s.contiguous()
    return kernel.rope_write_(q, k, v, c, s, k_cache, v_cache, slots)
