"""Gated activation ``silu(gate) * up`` over the fused gate/up GEMM's output: a Triton
kernel (on by default on CUDA, see ``backend.use_fused``) or the PyTorch reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:  # [m, 2 * inter] -> [m, inter]
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:  # [m, 2 * inter] -> [m, inter]
    """SwiGLU's ``silu(gate) * up`` with gate = the first half of the last dim, up = the second."""
    if not backend.use_fused(gate_up.device) or gate_up.dim() != 2 or gate_up.stride(-1) != 1:
        return silu_mul_ref(gate_up)
    from ..kernels import activation as kernel

    m, two_inter = gate_up.shape
    out = torch.empty((m, two_inter // 2), dtype=gate_up.dtype, device=gate_up.device)
    return kernel.silu_mul(gate_up, out)
