"""RMSNorm: a fused Triton kernel (opt-in, see ``backend.use_fused``) or the PyTorch reference.

The reference is transformers' own arithmetic (and so bit-matches it): x_hat = x *
rsqrt(mean(x^2) + eps) in fp32, then ``weight * x_hat.to(dtype)`` (Llama) or
``(x_hat * (1 + weight)).to(dtype)`` (Gemma, ``offset=True``). The reference launches
about seven kernels per call, the fused one launch: on a small model decoded from CUDA
graphs that count, not bandwidth, sets the step time.
"""
from __future__ import annotations

import torch

from . import backend


def rms_norm_ref(x: torch.Tensor,       # [..., dim]
                 weight: torch.Tensor,  # [dim]
                 eps: float, offset: bool = False) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (xf * (1.0 + weight.float())).type_as(x)
    return weight * xf.to(x.dtype)


def rms_norm(x: torch.Tensor,       # [..., dim]
             weight: torch.Tensor,  # [dim]
             eps: float, offset: bool = False) -> torch.Tensor:
    """RMSNorm of the last dim; [..., dim] in x's dtype (Llama: the weight's result dtype)."""
    if not backend.use_fused(x.device):
        return rms_norm_ref(x, weight, eps, offset)
    from ..kernels import rms_norm as kernel

    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    dtype = x.dtype if offset else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(rows.shape, dtype=dtype, device=x.device)
    kernel.rms_norm(rows, weight, out, float(eps), bool(offset))
    return out.view(x.shape)
