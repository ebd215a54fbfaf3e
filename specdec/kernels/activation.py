"""Triton ``silu(gate) * up`` (SwiGLU) over one [m, 2 * inter] row-major tensor.

Matches ``specdec.ops.activation.silu_mul_ref``: silu computed in fp32 and rounded to
the dtype (as PyTorch's silu), then the product rounded once. One program per
(row, column block).
"""
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, s_x, s_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < inter
    gate = tl.load(x_ptr + row * s_x + cols, mask=live, other=0.0)
    up = tl.load(x_ptr + row * s_x + inter + cols, mask=live, other=0.0)
    ty = gate.dtype
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(ty)
    tl.store(out_ptr + row * s_out + cols, (act.to(tl.float32) * up.to(tl.float32)).to(ty), mask=live)


def silu_mul(x,    # [m, 2 * inter], last dim contiguous
             out):  # [m, inter], written
    m, inter = out.shape
    if m == 0 or inter == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    _silu_mul_kernel[(m, triton.cdiv(inter, block))](x, out, inter, x.stride(0), out.stride(0), BLOCK=block)
    return out
