"""Triton tree attention for the verify step (flash-decoding style split-K).

One sequence, one layer. The queries are the ``n`` nodes of a draft tree; the keys
and values are a cached prefix of length ``L`` (visible to every query) followed by
the tree nodes' own K/V at cache slots ``[L, L + n)`` (node ``j`` is visible to node
``i`` iff ``j`` is ``i`` or one of its ancestors). Grouped-query attention is handled
by packing the ``G = Hq // Hkv`` query heads of one KV head into the rows of a block
(row ``r`` = node ``r // G``, query head ``kv_head * G + r % G``), so a single node
with G = 4 still fills a 16-row ``tl.dot``.

Split-K: grid axis 2 splits the (window-clipped) prefix into ``NUM_SPLITS`` chunks;
the last split also runs the tree part. Each split writes a normalised partial
output and its log2-sum-exp; ``_tree_attn_combine_kernel`` merges them. With one
split the forward kernel writes the final output directly.

The split ranges and the window's lower bound are computed inside the kernel from
``prefix_len`` (or ``prefix_len_ptr``) and the query positions, so the launch
depends only on shapes: with ``prefix_len`` as a device tensor the launch can be
captured in a CUDA graph.

Only torch and triton are imported here; the wrapper with validation, mask packing
and the pure-PyTorch reference lives in ``specdec/ops/attention.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MASK_WORD_BITS = 32  # the packed tree mask: int32 words, bit j % 32 of word j // 32


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """One flash-attention update with scores ``s`` (log2 domain, -inf = hidden)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen only hidden keys keeps m = -inf; subtract 0 there so that
    # exp2(-inf - -inf) never makes a NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _tree_attn_fwd_kernel(
    q_ptr,  # [n, Hq, D]
    k_ptr,  # [Hkv, S_max, D]
    v_ptr,  # [Hkv, S_max, D]
    mask_ptr,  # [n, W] int32, packed ancestor-or-self mask
    qpos_ptr,  # [n] int32 or int64, absolute position of each node
    len_ptr,  # [1] int prefix length (read only when LEN_FROM_PTR)
    o_ptr,  # [n, Hq, D] final output (when not SPLIT)
    po_ptr,  # [NUM_SPLITS, n, Hq, D] fp32 partial outputs (when SPLIT)
    plse_ptr,  # [NUM_SPLITS, n, Hq] fp32 partial log2-sum-exp (when SPLIT)
    prefix_len, n_nodes, window, qk_scale,  # qk_scale = softmax scale * log2(e)
    stride_qn, stride_qh,
    stride_kh, stride_ks,
    stride_vh, stride_vs,
    stride_on, stride_oh,
    stride_mn,
    stride_ps, stride_pn, stride_ph,
    stride_ls, stride_ln,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    QPOS_BLOCK: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    LEN_FROM_PTR: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must cover the head dim")
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs K and N of at least 16: pad small head dims")
    pid_m = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    if LEN_FROM_PTR:
        seq_len = tl.load(len_ptr).to(tl.int32)
    else:
        seq_len = prefix_len

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_nodes * G
    node = rows // G
    q_head = kv_head * G + rows % G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + node[:, None] * stride_qn + q_head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qpos = tl.load(qpos_ptr + node, mask=row_ok, other=0).to(tl.int32)
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # ---- this split's share of the prefix [lo, seq_len), lo clipped by the window
    lo = seq_len * 0
    if HAS_WINDOW:
        offs_q = tl.arange(0, QPOS_BLOCK)
        all_pos = tl.load(qpos_ptr + offs_q, mask=offs_q < n_nodes, other=2147483647).to(tl.int32)
        lo = tl.minimum(tl.maximum(tl.min(all_pos, 0) - window + 1, 0), seq_len)
    chunk = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, seq_len)
    if HAS_WINDOW:  # skip tiles that no query of this block can see
        block_min_pos = tl.min(tl.where(row_ok, qpos, 2147483647), 0)
        start = tl.maximum(start, block_min_pos - window + 1)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < end
        k = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None],
                    mask=kv_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        visible = kv_ok[None, :]
        if HAS_WINDOW:
            visible = visible & (offs_n[None, :] > qpos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :],
                    mask=kv_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)

    # ---- the tree nodes (last split only): keys at cache slots seq_len + j
    if split == num_splits - 1:
        last_node = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, n_nodes - 1)
        for start_j in range(0, last_node + 1, BLOCK_N):  # ancestors precede their nodes
            offs_j = start_j + tl.arange(0, BLOCK_N)
            j_ok = offs_j < n_nodes
            k = tl.load(k_base + (seq_len + offs_j[None, :]) * stride_ks + offs_d[:, None],
                        mask=j_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
            word = tl.load(mask_ptr + node[:, None] * stride_mn + offs_j[None, :] // 32,
                           mask=row_ok[:, None] & j_ok[None, :], other=0)
            visible = ((word >> (offs_j[None, :] % 32)) & 1) != 0
            if HAS_WINDOW:
                kpos = tl.load(qpos_ptr + offs_j, mask=j_ok, other=0).to(tl.int32)
                visible = visible & (kpos[None, :] > qpos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
            v = tl.load(v_base + (seq_len + offs_j[:, None]) * stride_vs + offs_d[None, :],
                        mask=j_ok[:, None] & d_ok[None, :], other=0.0)
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    io_mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        tl.store(po_ptr + split * stride_ps + node[:, None] * stride_pn + q_head[:, None] * stride_ph
                 + offs_d[None, :], out, mask=io_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(plse_ptr + split * stride_ls + node * stride_ln + q_head, lse, mask=row_ok)
    else:
        tl.store(o_ptr + node[:, None] * stride_on + q_head[:, None] * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _tree_attn_combine_kernel(
    po_ptr,  # [NUM_SPLITS, n, Hq, D] fp32
    plse_ptr,  # [NUM_SPLITS, n, Hq] fp32 (log2 domain)
    o_ptr,  # [n, Hq, D]
    num_splits, n_heads_q,
    stride_ps, stride_pn, stride_ph,
    stride_ls, stride_ln,
    stride_on, stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must cover the head dim")
    row = tl.program_id(0)
    node = row // n_heads_q
    q_head = row % n_heads_q
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(plse_ptr + offs_s * stride_ls + node * stride_ln + q_head, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    w = w / tl.sum(w, 0)
    po = tl.load(po_ptr + offs_s[:, None] * stride_ps + node * stride_pn + q_head * stride_ph + offs_d[None, :],
                 mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(po * w[:, None], 0)
    tl.store(o_ptr + node * stride_on + q_head * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty), mask=d_ok)


# ------------------------------------------------------------------ launcher
_DEVICE_INFO: dict[int, tuple[int, int]] = {}


def _device_info(device: torch.device) -> tuple[int, int]:
    """(SM count, shared memory per block in bytes) of a CUDA device."""
    if device.type != "cuda":
        return 4, 1 << 30  # the interpreter: a few splits, so CPU tests exercise split-K
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _DEVICE_INFO:
        props = torch.cuda.get_device_properties(idx)
        smem = getattr(props, "shared_memory_per_block_optin", 0) or 160 * 1024
        _DEVICE_INFO[idx] = (props.multi_processor_count, int(smem))
    return _DEVICE_INFO[idx]


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, int(x)).bit_length() - 1)


def block_config(n_rows: int, head_dim: int, elem_size: int = 2, device: torch.device | None = None,
                 prefix_bound: int | None = None, num_splits: int | None = None) -> dict:
    """Launch config for ``n_rows = n * G`` packed query rows over a prefix of at most
    ``prefix_bound`` keys (tuned on an H200 in bf16 with tools/tune_layer_kernels.py,
    each call timed inside a graph of back-to-back calls on K/V the L2 does not hold).

    16-row blocks almost everywhere: a verify step's prefix is short next to the tree,
    so many small programs (times split-K, see ``default_num_splits``) beat a few big
    ones; 128-row blocks with 8 warps only for big trees over long prefixes at D >= 128.
    Two pipeline stages when the prefix is split (one or two key blocks per program),
    three otherwise. Then shrunk (stages, BLOCK_N, BLOCK_M) until the tiles fit shared
    memory."""
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K, N >= 16 (masked past HEAD_DIM)
    long_prefix = prefix_bound is not None and prefix_bound >= 2048
    if n_rows <= 64 or (n_rows <= 512 and (block_d < 128 or not long_prefix)):
        cfg = {"BLOCK_M": 16, "BLOCK_N": 64 if block_d <= 128 else 32, "num_warps": 4}
    elif block_d <= 128:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8}
    else:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4}
    cfg["num_stages"] = 3 if num_splits is None or num_splits <= 1 else 2
    smem_limit = _device_info(device)[1] if device is not None else 227 * 1024

    def smem(c):  # Q tile + (stages + 1) K and V tiles: close to what Triton reports
        return (c["BLOCK_M"] + (c["num_stages"] + 1) * 2 * c["BLOCK_N"]) * block_d * elem_size

    while smem(cfg) > smem_limit:
        if cfg["num_stages"] > 2:
            cfg["num_stages"] -= 1
        elif cfg["BLOCK_N"] > 16:
            cfg["BLOCK_N"] //= 2
        elif cfg["BLOCK_M"] > 16:
            cfg["BLOCK_M"] //= 2
            cfg["num_warps"] = 4
        else:
            break
    return cfg


SPLIT_KEYS = 64  # prefix keys per split that the split count aims at
PARTIAL_BYTES_SMALL_BLOCKS = 2 << 20  # caps on the fp32 partial outputs that split-K writes
PARTIAL_BYTES_BIG_BLOCKS = 8 << 20


def default_num_splits(n_rows: int, n_kv_heads: int, prefix_bound: int, head_dim: int,
                       device: torch.device, elem_size: int = 2, max_splits: int = 64) -> int:
    """Split-K count: one split per ``SPLIT_KEYS`` prefix keys plus one (the last split
    also runs the tree part, which then has a program of its own), at most four waves
    of programs, and a cap on the partial outputs' bytes (they cost more than they save
    once the tree is big). A power of two. Tuned with the block configs above."""
    block_m = block_config(n_rows, head_dim, elem_size, device, prefix_bound)["BLOCK_M"]
    programs = triton.cdiv(n_rows, block_m) * n_kv_heads
    want = triton.next_power_of_2(max(0, prefix_bound) // SPLIT_KEYS + 1)
    partial_bytes = PARTIAL_BYTES_SMALL_BLOCKS if block_m == 16 else PARTIAL_BYTES_BIG_BLOCKS
    partial_cap = partial_bytes // max(1, n_rows * n_kv_heads * head_dim * 4)
    cap = min(4 * _device_info(device)[0] // programs, partial_cap, max_splits)
    return min(want, _pow2_floor(cap))


def tree_attention_fwd(
    q: torch.Tensor,  # [n, Hq, D]
    k_cache: torch.Tensor,  # [Hkv, S_max, D], tree K at [L, L + n)
    v_cache: torch.Tensor,  # [Hkv, S_max, D]
    mask_words: torch.Tensor,  # [n, W] int32 packed tree mask
    query_pos: torch.Tensor,  # [n] int32 or int64
    prefix_len: int | torch.Tensor,  # int, or a one-element int tensor on q's device
    *,
    scale: float,
    window: int | None = None,
    num_splits: int | None = None,
    prefix_bound: int | None = None,  # upper bound on the visible prefix (for the split heuristic)
    config: dict | None = None,  # override block_config() (tuning)
) -> torch.Tensor:
    """Launch the kernels; inputs must already be validated (see ``specdec.ops.attention``)."""
    n, n_heads_q, head_dim = q.shape
    n_kv_heads = k_cache.shape[0]
    group = n_heads_q // n_kv_heads
    out = torch.empty_like(q)
    if n == 0:
        return out
    n_rows = n * group
    if prefix_bound is None:
        prefix_bound = prefix_len if isinstance(prefix_len, int) else k_cache.shape[1] - n
    if num_splits is None:
        num_splits = default_num_splits(n_rows, n_kv_heads, prefix_bound, head_dim, q.device, q.element_size())
    num_splits = max(1, int(num_splits))
    cfg = {**block_config(n_rows, head_dim, q.element_size(), q.device, prefix_bound, num_splits), **(config or {})}
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    from_ptr = isinstance(prefix_len, torch.Tensor)
    len_arg = prefix_len if from_ptr else query_pos  # any pointer when unused
    len_int = 0 if from_ptr else int(prefix_len)
    split = num_splits > 1
    if split:
        part_o = torch.empty((num_splits, n, n_heads_q, head_dim), device=q.device, dtype=torch.float32)
        part_lse = torch.empty((num_splits, n, n_heads_q), device=q.device, dtype=torch.float32)
    else:
        part_o, part_lse = out, out  # unused
    block_d = max(16, triton.next_power_of_2(head_dim))
    grid = (triton.cdiv(n_rows, block_m), n_kv_heads, num_splits)
    _tree_attn_fwd_kernel[grid](
        q, k_cache, v_cache, mask_words, query_pos, len_arg,
        out, part_o, part_lse,
        len_int, n, 0 if window is None else int(window), float(scale) * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1),
        mask_words.stride(0),
        part_o.stride(0) if split else 0, part_o.stride(1) if split else 0, part_o.stride(2) if split else 0,
        part_lse.stride(0) if split else 0, part_lse.stride(1) if split else 0,
        G=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        QPOS_BLOCK=max(16, triton.next_power_of_2(n)) if window is not None else 16,  # only read with a window
        HAS_WINDOW=window is not None, LEN_FROM_PTR=from_ptr, SPLIT=split,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split:
        _tree_attn_combine_kernel[(n * n_heads_q,)](
            part_o, part_lse, out, num_splits, n_heads_q,
            part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
            num_warps=4 if head_dim >= 128 else 2,
        )
    return out


__all__ = ["tree_attention_fwd", "default_num_splits", "block_config", "MASK_WORD_BITS", "LOG2E"]
