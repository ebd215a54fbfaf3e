"""Triton RMSNorm (and residual add + RMSNorm): one program per row, the whole row in registers.

Matches ``specdec.ops.norm.rms_norm_ref`` (transformers' Llama / Gemma RMSNorm):
x_hat = x * rsqrt(mean(x^2) + eps) in fp32, then
- Llama: ``weight * x_hat.to(dtype)`` (the product rounded once to the model dtype);
- Gemma (``offset``): ``(x_hat * (1 + weight)).to(dtype)``.
In fp32 only the order of the row sum differs from PyTorch's. ``add_rms_norm`` first
forms the residual sum ``x + delta`` rounded to the dtype (as PyTorch's add), stores it,
and normalises that rounded sum: one launch instead of an add and a norm.
"""
import triton
import triton.language as tl


@triton.jit
def _normalise(x, w_ptr, out_ptr, row, cols, live, n_cols, s_out, eps, OFFSET: tl.constexpr):
    """x [BLOCK] fp32 (zeros past n_cols) -> the normalised row stored at out_ptr's row."""
    x_hat = x * tl.math.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)
    if OFFSET:
        y = x_hat * (1.0 + w)
    else:  # x_hat is rounded to the model dtype before the weight multiplies it
        y = w * x_hat.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * s_out + cols, y.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_cols, s_x, s_out, eps,
                     OFFSET: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    live = cols < n_cols
    x = tl.load(x_ptr + row * s_x + cols, mask=live, other=0.0).to(tl.float32)
    _normalise(x, w_ptr, out_ptr, row, cols, live, n_cols, s_out, eps, OFFSET)


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, sum_ptr, out_ptr, n_cols, s_x, s_d, s_sum, s_out, eps,
                         OFFSET: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    live = cols < n_cols
    x = tl.load(x_ptr + row * s_x + cols, mask=live, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + row * s_d + cols, mask=live, other=0.0).to(tl.float32)
    total = (x + d).to(sum_ptr.dtype.element_ty)  # rounded as PyTorch's add
    tl.store(sum_ptr + row * s_sum + cols, total, mask=live)
    _normalise(total.to(tl.float32), w_ptr, out_ptr, row, cols, live, n_cols, s_out, eps, OFFSET)


def add_rms_norm(x,      # [rows, dim], last dim contiguous
                 delta,  # [rows, dim], the same
                 weight,  # [dim]
                 total,  # [rows, dim], written: x + delta
                 out,    # [rows, dim], written: rms_norm(x + delta)
                 eps: float, offset: bool):
    rows, dim = x.shape
    if rows == 0:
        return total, out
    _add_rms_norm_kernel[(rows,)](x, delta, weight, total, out, dim, x.stride(0), delta.stride(0), total.stride(0),
                                  out.stride(0), eps, OFFSET=offset, BLOCK=triton.next_power_of_2(dim))
    return total, out


def rms_norm(x,       # [rows, dim], last dim contiguous
             weight,  # [dim]
             out,     # [rows, dim], written
             eps: float, offset: bool):
    rows, dim = x.shape
    if rows == 0:
        return out
    _rms_norm_kernel[(rows,)](x, weight, out, dim, x.stride(0), out.stride(0), eps,
                              OFFSET=offset, BLOCK=triton.next_power_of_2(dim))
    return out
