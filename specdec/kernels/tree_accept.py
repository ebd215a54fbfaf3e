"""Triton tree rejection sampler: lossless multi-draft acceptance on the device.

One program per batch row; no host sync. The exact rule (which uniform is used where,
how the residual is kept) is defined in specdec/ops/accept.py, whose torch reference
this kernel must match bit for bit given the same uniforms.
"""
import torch
import triton
import triton.language as tl

MAX_BLOCK_V = 8192  # vocab block of the sampler's passes over V


# ---------------------------------------------------------------- rejection sampler
@triton.jit
def _residual_pass(src_ptr, q_ptr, dst_ptr, z, V, BLOCK_V: tl.constexpr):
    """dst = fp32(max(src - z * q, 0)) elementwise (in fp64); returns sum(dst) in fp64.
    src may equal dst: each element is read and written by the same thread."""
    total = tl.zeros((), tl.float64)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        m = offs < V
        r = tl.load(src_ptr + offs, mask=m, other=0.0).to(tl.float64)
        q = tl.load(q_ptr + offs, mask=m, other=0.0).to(tl.float64)
        rn = tl.maximum(r - z * q, 0.0).to(tl.float32)
        tl.store(dst_ptr + offs, rn, mask=m)
        total += tl.sum(rn.to(tl.float64), 0)
    tl.debug_barrier()  # later scalar reads may come from other threads
    return total


@triton.jit
def _copy_zero_pass(src_ptr, dst_ptr, x, V, BLOCK_V: tl.constexpr):
    """dst = src with element x set to 0."""
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        m = offs < V
        r = tl.load(src_ptr + offs, mask=m, other=0.0)
        tl.store(dst_ptr + offs, tl.where(offs == x, 0.0, r), mask=m)
    tl.debug_barrier()


@triton.jit
def _inverse_cdf(row_ptr, u, V, BLOCK_V: tl.constexpr):
    """min(#{k : cdf_k <= u * total}, last index with mass > 0), with cdf in fp64."""
    total = tl.zeros((), tl.float64)
    last = tl.full((), -1, tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        r = tl.load(row_ptr + offs, mask=offs < V, other=0.0).to(tl.float64)
        total += tl.sum(r, 0)
        last = tl.maximum(last, tl.max(tl.where(r > 0, offs, -1), 0))
    thr = u * total
    # The cdf is nondecreasing, so counting stops at the first block that crosses thr.
    count = tl.zeros((), tl.int32)
    run = tl.zeros((), tl.float64)
    start = tl.zeros((), tl.int32)
    crossed = tl.zeros((), tl.int32)
    while (start < V) & (crossed == 0):
        offs = start + tl.arange(0, BLOCK_V)
        m = offs < V
        r = tl.load(row_ptr + offs, mask=m, other=0.0).to(tl.float64)
        cdf = run + tl.cumsum(r, 0)
        below = tl.sum((m & (cdf <= thr)).to(tl.int32), 0)
        count += below
        crossed = (below < BLOCK_V).to(tl.int32)
        run += tl.sum(r, 0)
        start += BLOCK_V
    return tl.minimum(count, tl.maximum(last, 0))


@triton.jit
def _tree_rejection_kernel(tp_ptr, tok_ptr, par_ptr, dp_ptr, u_ptr, scr_ptr,
                           path_ptr, num_ptr, bonus_ptr,
                           n, V, max_depth,
                           s_tp_b, s_tp_n, s_tok, s_par, s_dp_b, s_dp_n, s_u, s_scr, s_path,
                           HAS_DRAFT: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    tp_b = tp_ptr + b * s_tp_b
    tok_b = tok_ptr + b * s_tok
    par_b = par_ptr + b * s_par
    u_b = u_ptr + b * s_u
    scr_b = scr_ptr + b * s_scr
    path_b = path_ptr + b * s_path
    offs_p = tl.arange(0, BLOCK_P)
    tl.store(path_b + offs_p, tl.full((BLOCK_P,), -1, tl.int64), mask=offs_p < max_depth)
    tl.debug_barrier()
    # State: the walk is at node `cur` (-1 = root) at `depth`; the residual there is
    # r / z, where r is the target row of cur ("fresh", z = 1) or lives in scratch.
    cur = tl.full((), -1, tl.int64)
    depth = tl.zeros((), tl.int32)
    fresh = tl.full((), 1, tl.int32)
    z = tl.full((), 1.0, tl.float64)
    for i in range(0, n):
        p = tl.load(par_b + i).to(tl.int64)
        if (p == cur) & (depth < max_depth):
            x = tl.load(tok_b + i).to(tl.int64)
            u = tl.load(u_b + i).to(tl.float64)
            row = tp_b + (cur + 1) * s_tp_n
            if fresh != 0:
                rx = tl.load(row + x).to(tl.float64)
            else:
                rx = tl.load(scr_b + x).to(tl.float64)
            if HAS_DRAFT:
                q_row = dp_ptr + b * s_dp_b + i * s_dp_n
                q = tl.load(q_row + x).to(tl.float64)
            else:
                q = tl.full((), 1.0, tl.float64)
            if u * q * z < rx:  # accept node i
                node = tl.zeros((), tl.int64) + i  # (a plain int under the interpreter)
                tl.store(path_b + depth, node)
                cur = node
                depth += 1
                fresh = 1
                z = tl.full((), 1.0, tl.float64)
            else:  # reject: residual <- max(p - q_i, 0), renormalized (kept as r / z)
                if HAS_DRAFT:
                    if fresh != 0:
                        z = _residual_pass(row, q_row, scr_b, z, V, BLOCK_V)
                    else:
                        z = _residual_pass(scr_b, q_row, scr_b, z, V, BLOCK_V)
                else:
                    if fresh != 0:
                        _copy_zero_pass(row, scr_b, x, V, BLOCK_V)
                    else:
                        _copy_zero_pass(scr_b, scr_b, x, V, BLOCK_V)
                    z = tl.maximum(z - rx, 0.0)
                fresh = 0
    ub = tl.load(u_b + n).to(tl.float64)
    if fresh != 0:
        token = _inverse_cdf(tp_b + (cur + 1) * s_tp_n, ub, V, BLOCK_V)
    else:
        token = _inverse_cdf(scr_b, ub, V, BLOCK_V)
    tl.store(num_ptr + b, depth.to(tl.int64))
    tl.store(bonus_ptr + b, token.to(tl.int64))


def tree_rejection_sample(parents: torch.Tensor,       # [B, n] int (stride 0 on B if shared)
                          tokens: torch.Tensor,        # [B, n] int
                          target_probs: torch.Tensor,  # [B, n + 1, V] fp32
                          uniforms: torch.Tensor,      # [B, n + 1] fp32/fp64
                          draft_probs: torch.Tensor | None,  # [B, n, V] fp32 or None (one-hot)
                          path: torch.Tensor,          # [B, max_depth] int64, out
                          num_accepted: torch.Tensor,  # [B] int64, out
                          bonus: torch.Tensor) -> None:  # [B] int64, out
    B, n = tokens.shape
    V = target_probs.shape[-1]
    if B == 0:
        return
    assert target_probs.stride(-1) == 1 and (draft_probs is None or draft_probs.stride(-1) == 1)
    scratch = torch.empty(B, V, device=target_probs.device, dtype=torch.float32)
    dp = draft_probs if draft_probs is not None else target_probs
    max_depth = path.shape[1]
    # One program walks a whole row, so the V passes are latency-bound: wide blocks and
    # many warps (H100, V = 128k: 8192 x 16 warps is ~3x faster than 1024 x 4).
    block_v = min(MAX_BLOCK_V, max(16, triton.next_power_of_2(V)))
    num_warps = 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4
    _tree_rejection_kernel[(B,)](
        target_probs, tokens, parents, dp, uniforms, scratch, path, num_accepted, bonus,
        n, V, max_depth,
        target_probs.stride(0), target_probs.stride(1), tokens.stride(0), parents.stride(0),
        dp.stride(0), dp.stride(1), uniforms.stride(0), scratch.stride(0), path.stride(0),
        HAS_DRAFT=draft_probs is not None, BLOCK_V=block_v, BLOCK_P=max(16, triton.next_power_of_2(max_depth)),
        num_warps=num_warps, enable_fp_fusion=False)  # no FMA contraction: elementwise math matches torch exactly
