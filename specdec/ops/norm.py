"""RMSNorm: a fused Triton kernel (on by default on CUDA, see ``backend.use_fused``) or the PyTorch reference.

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

    rows = _rows(x)
    out = torch.empty(rows.shape, dtype=_out_dtype(x, weight, offset), device=x.device)
    kernel.rms_norm(rows, weight, out, float(eps), bool(offset))
    return out.view(x.shape)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., dim] -> [rows, dim] with a unit-stride last dim (what the kernels index)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, offset: bool) -> torch.dtype:
    """The reference's result dtype: x's for Gemma, ``weight * x_hat.to(x.dtype)``'s for Llama."""
    return x.dtype if offset else torch.promote_types(x.dtype, weight.dtype)


def add_rms_norm_ref(x: torch.Tensor,      # [..., dim] the residual stream
                     delta: torch.Tensor,  # [..., dim] what a sub-block adds to it
                     weight: torch.Tensor, eps: float, offset: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + delta
    return rms_norm_ref(total, weight, eps, offset), total


def add_rms_norm(x: torch.Tensor,      # [..., dim]
                 delta: torch.Tensor,  # [..., dim], x's dtype
                 weight: torch.Tensor, eps: float, offset: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + delta), x + delta): the residual add fused into the next norm."""
    if not backend.use_fused(x.device) or delta.dtype != x.dtype or delta.shape != x.shape:
        return add_rms_norm_ref(x, delta, weight, eps, offset)
    from ..kernels import rms_norm as kernel

    rows, drows = _rows(x), _rows(delta)
    total = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    out = torch.empty(rows.shape, dtype=_out_dtype(x, weight, offset), device=x.device)
    kernel.add_rms_norm(rows, drows, weight, total, out, float(eps), bool(offset))
    return out.view(x.shape), total.view(x.shape)
