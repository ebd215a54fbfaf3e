"""Triton GEMV for one-row linear layers: ``y[N] = W[N, K] @ x[K] (+ b)``.

Plain decoding multiplies one hidden state by every weight matrix, so a step is a
stream of weight bytes; cuBLAS's kernels for m = 1 reach 2.4-3.1 TB/s on some of a
Llama-3-8B layer's shapes on an H200 (o_proj, qkv) where a copy reaches 4.2. Each
program owns ``BLOCK_N`` output rows and walks K in ``BLOCK_K`` slices, accumulating
``w * x`` in an fp32 [BLOCK_N, BLOCK_K] tile that is summed once at the end (no
split-K: no atomics, the result is deterministic). ``specdec.ops.linear`` measures it
against cuBLAS per weight shape and uses it only where it wins.

``norm_gemv`` folds the RMSNorm before a projection (and the residual add before that
norm) into the GEMV: ``y = W @ rms_norm(x + delta) (+ b)``. A Llama-3-8B decode step
has 65 such norms (two per layer and the final one), each a launch of its own that
moves a few KB (~146 us a step in all on an H200); inside the GEMV a norm costs each
program a read of delta and of the norm weight (K each, from L2). It is one pass: each K
slice of ``t = x + delta`` (rounded to the dtype, as PyTorch's add) feeds both the sum
of squares and ``acc += W * (t * g)`` (g = norm weight, or 1 + it for Gemma's offset
norm), and the row scale ``rsqrt(mean(t^2) + eps)`` multiplies the row sums at the end,
so the weight stream starts at once. Every program recomputes the (tiny) sum of
squares; program 0 also stores ``t``, the new residual stream. Unlike norm-then-GEMV
the normalised row is never rounded to the dtype: close, not bit-identical.
"""
import triton
import triton.language as tl

# (BLOCK_N, BLOCK_K, num_warps, num_stages): what the dispatcher measures. The first
# won on every Llama-3-8B layer shape on an H200 (tools/tune_layer_kernels.py:
# 3-12% ahead of cuBLAS except qkv, a tie); the others won on SmolLM2's small ones.
CONFIGS = [(8, 2048, 4, 3), (4, 1024, 8, 3), (8, 1024, 8, 4), (8, 2048, 4, 4), (4, 1024, 4, 3), (16, 512, 4, 3)]


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, s_wn,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * s_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def gemv(x,       # [K], contiguous
         weight,  # [N, K], last dim contiguous
         bias,    # [N] or None
         out,     # [N], written
         config=CONFIGS[0]):
    n, k = weight.shape
    block_n, block_k, warps, stages = config
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else x, out, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out


@triton.jit
def _norm_gemv_kernel(x_ptr, d_ptr, g_ptr, w_ptr, b_ptr, y_ptr, t_ptr, N, K, s_wn, eps,
                      HAS_DELTA: tl.constexpr, OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * s_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        t = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
        if HAS_DELTA:  # the residual add, rounded to the dtype as PyTorch's; program 0 stores it
            t = (t.to(tl.float32) + tl.load(d_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)).to(t.dtype)
            if pid == 0:
                tl.store(t_ptr + cols, t, mask=col_ok)
        t = t.to(tl.float32)
        sumsq += t * t
        g = tl.load(g_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if OFFSET:
            g = 1.0 + g
        w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * (t * g)[None, :]
    y = tl.sum(acc, axis=1) * tl.math.rsqrt(tl.sum(sumsq, 0) / K + eps)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def norm_gemv(x,            # [K], contiguous: the residual stream
              delta,        # [K] or None: what the last sub-block adds to it
              norm_weight,  # [K]
              eps: float, offset: bool,
              weight,       # [N, K], last dim contiguous
              bias,         # [N] or None
              out,          # [N], written: weight @ rms_norm(x + delta) (+ bias)
              total,        # [K], written when delta is given: x + delta in x's dtype
              config=CONFIGS[0]):
    n, k = weight.shape
    block_n, block_k, warps, stages = config
    _norm_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, delta if delta is not None else x, norm_weight, weight, bias if bias is not None else x, out,
        total if delta is not None else x, n, k, weight.stride(0), eps,
        HAS_DELTA=delta is not None, OFFSET=offset, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out
