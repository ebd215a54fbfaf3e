"""``y = x W^T + b`` for the compact models: cuBLAS (``F.linear``), or for one-row
inputs (plain decoding, one-node trees) the Triton GEMV of ``kernels/gemv.py`` where
it measured faster for that weight shape on this GPU.

The choice is made once per (N, K, dtype, device): the first one-row call outside a
CUDA-graph capture times cuBLAS and each GEMV config with ``triton.testing.do_bench``
(L2 cleared between repetitions, as the weights arrive from HBM inside a model) and
keeps the fastest; calls made while a graph is being captured before that use cuBLAS.
SPECDEC_GEMV=0 turns the GEMV off, =1 forces it (tests, interpreted on CPU tensors).

``norm_linear`` is ``linear(rms_norm(x + delta))`` for a norm followed by a projection
(Llama: input_layernorm -> qkv, post_attention_layernorm -> gate_up, final norm ->
lm_head). For one row it may run ``kernels.gemv.norm_gemv``, the norm (and the residual
add) folded into the GEMV: 65 fewer launches per Llama-3-8B decode step, which is about
the gap to the memory-bound floor. Chosen the same way, once per (N, K, dtype, device,
"norm"): the unfused pair (norm kernel, then ``linear``'s own choice) against each
config of the fused kernel; =1 forces the fused kernel. Not bit-identical to the pair
(the normalised row is not rounded to the dtype before the multiply).
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from . import backend, exact
from . import norm as norm_ops

log = logging.getLogger("specdec")

_choice: dict[tuple, tuple | None] = {}  # (N, K, dtype, device) -> GEMV config, or None for cuBLAS
# (N, K, dtype, device, "norm") -> norm_gemv config, or None for norm kernel + linear
_norm_choice: dict[tuple, tuple | None] = {}


def _mode() -> str:
    return os.environ.get("SPECDEC_GEMV", "auto")


def _eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype and weight.stride(-1) == 1 and x.stride(-1) == 1
            and (bias is None or bias.is_contiguous()) and backend.use_fused(x.device))


def _fastest(what: str, baseline: str, run_baseline, run_config, weight: torch.Tensor, dtype: torch.dtype
             ) -> tuple | None:
    """Time ``run_baseline()`` and ``run_config(cfg)`` for every GEMV config (median of
    ``do_bench``, L2 cleared between repetitions); the fastest config, or None for the baseline."""
    from triton.testing import do_bench

    from ..kernels import gemv as kernel

    times = {None: do_bench(run_baseline, warmup=5, rep=20, return_mode="median")}
    for cfg in kernel.CONFIGS:
        try:
            times[cfg] = do_bench(lambda: run_config(cfg), warmup=5, rep=20, return_mode="median")
        except Exception as e:  # noqa: BLE001 -- a config that does not compile here is just not chosen
            log.debug("specdec: %s config %s failed for %s: %s", what, cfg, tuple(weight.shape), e)
    best = min(times, key=times.get)
    log.info("specdec: one-row %s %s (%s): %s (%.1f us; %s %.1f us)", what, tuple(weight.shape),
             str(dtype).replace("torch.", ""), baseline if best is None else f"{what} {best}",
             1e3 * times[best], baseline, 1e3 * times[None])
    return best


def _decide(x: torch.Tensor, eligible, table: dict, key: tuple, measure) -> tuple | None:
    """The GEMV config for a one-row call (None: the baseline): ``SPECDEC_GEMV`` first, then
    ``table[key]``, measured once (``measure()``) outside a CUDA-graph capture."""
    mode = _mode()
    if mode == "0" or not eligible():
        return None
    if mode == "1":
        from ..kernels import gemv as kernel

        return kernel.CONFIGS[0]
    if x.device.type != "cuda":
        return None
    if key not in table:
        if torch.cuda.is_current_stream_capturing():
            return None  # cannot time inside a capture: the baseline for this graph
        table[key] = measure()
    return table[key]


def _config_for(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple | None:
    def measure():
        from ..kernels import gemv as kernel

        out, xv = torch.empty(weight.shape[0], dtype=x.dtype, device=x.device), x.reshape(-1)
        return _fastest("GEMV", "cuBLAS", lambda: F.linear(x, weight, bias),
                        lambda cfg: kernel.gemv(xv, weight, bias, out, cfg), weight, x.dtype)

    return _decide(x, lambda: _eligible(x, weight, bias), _choice, (*weight.shape, x.dtype, x.device), measure)


def choices() -> dict[str, str]:
    """What the one-row dispatch chose so far: "NxK dtype" -> "cuBLAS" or the GEMV config,
    and "NxK dtype norm" -> "norm + linear" or the fused norm-GEMV config."""
    out = {f"{n}x{k} {str(dt).replace('torch.', '')}": "cuBLAS" if cfg is None else f"GEMV {cfg}"
           for (n, k, dt, _dev), cfg in _choice.items()}
    out.update({f"{n}x{k} {str(dt).replace('torch.', '')} norm": "norm + linear" if cfg is None
                else f"norm-GEMV {cfg}" for (n, k, dt, _dev, _), cfg in _norm_choice.items()})
    return out


def _one_row(x: torch.Tensor) -> bool:
    """Plain decoding's shape; every verify forward and prefill is decided here, before any lookup."""
    return x.dim() == 2 and x.shape[0] == 1


def _exact() -> bool:
    """The exact mode ("on", or "linear": the linear layers alone; ``ops.exact``): every
    linear (and norm + linear) runs ``linear_exact``."""
    return exact.mode() != "off"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """[m, K] x [N, K] (+ [N]) -> [m, N], as ``F.linear``."""
    if _exact() and x.dim() == 2:
        return linear_exact(x, weight, bias)
    cfg = _config_for(x, weight, bias) if _one_row(x) else None
    if cfg is None:
        return F.linear(x, weight, bias)
    from ..kernels import gemv as kernel

    out = torch.empty((1, weight.shape[0]), dtype=x.dtype, device=x.device)  # [1, N]
    kernel.gemv(x.reshape(-1), weight, bias, out.view(-1), cfg)
    return out


def _unfused(x: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, offset: bool,
             weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if delta is None:
        return linear(norm_ops.rms_norm(x, norm_weight, eps, offset), weight, bias), x
    h, total = norm_ops.add_rms_norm(x, delta, norm_weight, eps, offset)
    return linear(h, weight, bias), total


def _fused(x, delta, norm_weight, eps, offset, weight, bias, config) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import gemv as kernel

    out = torch.empty((1, weight.shape[0]), dtype=x.dtype, device=x.device)  # [1, N]
    total = x if delta is None else torch.empty_like(x)  # [1, K]
    kernel.norm_gemv(x.view(-1), None if delta is None else delta.view(-1), norm_weight, float(eps), bool(offset),
                     weight, bias, out.view(-1), total.view(-1), config)
    return out, total


def _norm_config_for(x, delta, norm_weight, eps, offset, weight, bias) -> tuple | None:
    args = (x, delta, norm_weight, eps, offset, weight, bias)

    def measure():
        _unfused(*args)  # lets linear make (and log) its own choice first, outside the timing
        return _fastest("norm-GEMV", "norm + linear", lambda: _unfused(*args), lambda cfg: _fused(*args, cfg),
                        weight, x.dtype)

    return _decide(x, lambda: _norm_eligible(x, delta, norm_weight, weight, bias), _norm_choice,
                   (*weight.shape, x.dtype, x.device, "norm"), measure)


def _norm_eligible(x, delta, norm_weight, weight, bias) -> bool:
    """The GEMV's conditions, plus a contiguous row, norm weight and delta of x's dtype and shape."""
    return (_eligible(x, weight, bias) and x.is_contiguous() and weight.shape[1] == x.shape[1]
            and norm_weight.dtype == x.dtype and norm_weight.is_contiguous()
            and (delta is None or (delta.dtype == x.dtype and delta.shape == x.shape and delta.is_contiguous())))


def norm_linear(x: torch.Tensor,                # [m, K] the residual stream
                delta: torch.Tensor | None,     # [m, K] still to be added to it, or None
                norm_weight: torch.Tensor,      # [K]
                eps: float, offset: bool,
                weight: torch.Tensor,           # [N, K]
                bias: torch.Tensor | None = None,  # [N]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(rms_norm(x + delta)) [m, N], x + delta [m, K] (x when delta is None)): for
    one row possibly one fused kernel, otherwise ``ops.norm`` then ``linear`` as before."""
    cfg = _norm_config_for(x, delta, norm_weight, eps, offset, weight, bias) if _one_row(x) and not _exact() \
        else None
    if cfg is None:
        return _unfused(x, delta, norm_weight, eps, offset, weight, bias)
    return _fused(x, delta, norm_weight, eps, offset, weight, bias, cfg)


# ----------------------------------------------------------------------------- exact mode (#22)
def linear_exact(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ weight[N, K]^T (+ bias)`` computed row by row in an order that does not
    depend on M (``kernels/linear_rows.py``, where ``backend.use_triton``; else
    ``linear_exact_ref``): a row's result is bitwise the same alone or among many rows
    (the exact mode, ``ops.exact``)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_exact: need x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if backend.use_triton(x.device):
        from ..kernels.linear_rows import linear_rows

        out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        return linear_rows(x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), out)
    return linear_exact_ref(x, weight, bias)


def linear_exact_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: each row by its own identical call (fp32 products summed over K), so
    its result cannot depend on the others. Slow; for tests and CPU."""
    w = weight.float()
    rows = [(w * x[i].float()).sum(-1) for i in range(x.shape[0])]  # [N] each
    y = torch.stack(rows) if rows else x.new_zeros(0, weight.shape[0], dtype=torch.float32)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
