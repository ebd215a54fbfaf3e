"""Rotary position embedding (rotate-half): a fused Triton kernel for q and k together
(opt-in, see ``backend.use_fused``) or the PyTorch reference, transformers' arithmetic."""
from __future__ import annotations

import torch

from . import backend


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
