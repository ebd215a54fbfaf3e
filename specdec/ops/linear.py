"""``y = x W^T + b`` for the compact models: cuBLAS (``F.linear``), or for one-row
inputs (plain decoding, one-node trees) the Triton GEMV of ``kernels/gemv.py`` where
it measured faster for that weight shape on this GPU.

The choice is made once per (N, K, dtype, device): the first one-row call outside a
CUDA-graph capture times cuBLAS and each GEMV config with ``triton.testing.do_bench``
(L2 cleared between repetitions, as the weights arrive from HBM inside a model) and
keeps the fastest; calls made while a graph is being captured before that use cuBLAS.
SPECDEC_GEMV=0 turns the GEMV off, =1 forces it (tests, interpreted on CPU tensors).
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from . import backend

log = logging.getLogger("specdec")

_choice: dict[tuple, tuple | None] = {}  # (N, K, dtype, device) -> GEMV config, or None for cuBLAS


def _mode() -> str:
    return os.environ.get("SPECDEC_GEMV", "auto")


def _eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype and weight.stride(-1) == 1 and x.stride(-1) == 1
            and (bias is None or bias.is_contiguous()) and backend.use_fused(x.device))


def _measure(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple | None:
    from triton.testing import do_bench

    from ..kernels import gemv as kernel

    out = torch.empty(weight.shape[0], dtype=x.dtype, device=x.device)
    xv = x.reshape(-1)
    times = {None: do_bench(lambda: F.linear(x, weight, bias), warmup=5, rep=20, return_mode="median")}
    for cfg in kernel.CONFIGS:
        try:
            times[cfg] = do_bench(lambda: kernel.gemv(xv, weight, bias, out, cfg), warmup=5, rep=20,
                                  return_mode="median")
        except Exception as e:  # noqa: BLE001 -- a config that does not compile here is just not chosen
            log.debug("specdec: GEMV config %s failed for %s: %s", cfg, tuple(weight.shape), e)
    best = min(times, key=times.get)
    log.info("specdec: one-row linear %s (%s): %s (%.1f us; cuBLAS %.1f us)", tuple(weight.shape),
             str(x.dtype).replace("torch.", ""), "cuBLAS" if best is None else f"GEMV {best}",
             1e3 * times[best], 1e3 * times[None])
    return best


def _config_for(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple | None:
    if x.dim() != 2 or x.shape[0] != 1:  # (every verify forward: decided before any other lookup)
        return None
    mode = _mode()
    if mode == "0" or not _eligible(x, weight, bias):
        return None
    if mode == "1":
        from ..kernels import gemv as kernel

        return kernel.CONFIGS[0]
    if x.device.type != "cuda":
        return None
    key = (*weight.shape, x.dtype, x.device)
    if key not in _choice:
        if torch.cuda.is_current_stream_capturing():
            return None  # cannot time inside a capture: cuBLAS for this graph
        _choice[key] = _measure(x, weight, bias)
    return _choice[key]


def choices() -> dict[str, str]:
    """What the one-row dispatch chose so far: "NxK dtype" -> "cuBLAS" or the GEMV config."""
    return {f"{n}x{k} {str(dt).replace('torch.', '')}": "cuBLAS" if cfg is None else f"GEMV {cfg}"
            for (n, k, dt, _dev), cfg in _choice.items()}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """[m, K] x [N, K] (+ [N]) -> [m, N], as ``F.linear``."""
    cfg = _config_for(x, weight, bias)
    if cfg is None:
        return F.linear(x, weight, bias)
    from ..kernels import gemv as kernel

    out = torch.empty((1, weight.shape[0]), dtype=x.dtype, device=x.device)  # [1, N]
    kernel.gemv(x.reshape(-1), weight, bias, out.view(-1), cfg)
    return out
