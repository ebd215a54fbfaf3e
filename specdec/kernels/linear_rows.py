"""Row-invariant linear for the exact mode (#22): ``y[M, N] = x[M, K] @ W[N, K]^T (+ b)``
where every row goes through the same operations whatever ``M`` is.

cuBLAS picks its algorithm (tile shape, split-K) from the problem size, and the one-row
path uses a GEMV that sums in yet another order, so a token's logits in a 64-node verify
and in a one-token step round differently in bf16 and near-ties flip. Here the blocks are
constants, not chosen from ``M``: each program computes a [BLOCK_M, BLOCK_N] tile, walking
K in BLOCK_K slices in order with one fp32 accumulator (``tl.dot`` accumulates into it: no
split-K, no atomics), so row r's result does not depend on how many rows share the call or
where r sits among them. One row costs a 16-row tile: the weights stream the same, the
extra FLOPs are free on a memory-bound step.
"""
import triton
import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 64  # fixed for every M: the point of the kernel
NUM_WARPS, NUM_STAGES = 4, 3


@triton.jit
def _linear_rows_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, s_xm, s_wn, s_ym,
                        HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * s_xm
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * s_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = tl.load(x_rows + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        w = tl.load(w_cols + rk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BK, BN]
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rm.to(tl.int64)[:, None] * s_ym + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def linear_rows(x, weight, bias, out):
    """x [M, K], weight [N, K], bias [N] or None, out [M, N] (x's dtype); unit stride on K and N."""
    M, K = x.shape
    N = weight.shape[0]
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _linear_rows_kernel[grid](
        x, weight, bias if bias is not None else x, out, M, N, K, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, DOT_PRECISION="ieee" if x.element_size() == 4 else "tf32",  # fp32: no TF32
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out
