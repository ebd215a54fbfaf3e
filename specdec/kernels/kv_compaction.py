"""Triton KV-cache compaction: move the accepted tree nodes' K/V to the front of the tree slot.

Layout (the static cache of the fast runtime): ``k_cache`` and ``v_cache`` are
``[num_layers, num_kv_heads, max_seq_len, head_dim]`` with a unit stride on
``head_dim``. A verify step wrote ``n`` tree nodes at positions ``[start, start + n)``;
node ``accepted_idx[j]`` moves to ``start + j`` for ``j < num_accepted``, in every layer
and head, K and V, in one launch.

Why in place is safe: ``accepted_idx`` is strictly increasing, so ``accepted_idx[j] >= j``
and row ``j`` is read from ``start + accepted_idx[j]``, a position no earlier row
``j' < j`` writes (those write ``start + j' < start + j``). Each program owns one
(layer, head, head_dim block, K or V) column slab and walks ``j`` in increasing order,
always loading row ``j`` before storing it, so every element sees the pre-compaction
value of its source. Loads may be hoisted earlier without harm; only moving a store
before an earlier load could break it, and both touch the same element in the same
thread. Programs never share an element, so no inter-program ordering is needed.
Rows with ``accepted_idx[j] == j`` are already in place and skipped; an index outside
``[0, max_seq_len - start)`` is skipped rather than read out of bounds.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _move_rows(base_ptr, stride_s, stride_d, idx_ptr, num, pos0, s_max, head_dim, pid_d,
               BLOCK_D: tl.constexpr):
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    col = offs_d.to(tl.int64) * stride_d
    for j in range(0, num):
        src = tl.load(idx_ptr + j).to(tl.int64)
        if (src != j) & (src >= 0) & (pos0 + src < s_max):
            row = tl.load(base_ptr + (pos0 + src) * stride_s + col, mask=d_mask)
            tl.store(base_ptr + (pos0 + j) * stride_s + col, row, mask=d_mask)


@triton.jit
def _compact_kv_kernel(k_ptr, v_ptr, idx_ptr, num_ptr, start_ptr, start,
                       num_heads, max_accepted, s_max, head_dim,
                       sk_l, sk_h, sk_s, sk_d, sv_l, sv_h, sv_s, sv_d,
                       HAS_NUM: tl.constexpr, HAS_START_PTR: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_lh = tl.program_id(0)  # layer * num_heads + head
    pid_d = tl.program_id(1)   # head_dim block
    which = tl.program_id(2)   # 0 = K, 1 = V
    layer = (pid_lh // num_heads).to(tl.int64)
    head = (pid_lh % num_heads).to(tl.int64)
    num = max_accepted
    if HAS_NUM:
        num = tl.minimum(tl.maximum(tl.load(num_ptr).to(tl.int32), 0), max_accepted)
    pos0 = tl.zeros((), tl.int64) + start  # `start` may arrive as a constexpr (== 1)
    if HAS_START_PTR:
        pos0 += tl.load(start_ptr).to(tl.int64)
    if which == 0:
        _move_rows(k_ptr + layer * sk_l + head * sk_h, sk_s, sk_d, idx_ptr, num, pos0, s_max,
                   head_dim, pid_d, BLOCK_D)
    else:
        _move_rows(v_ptr + layer * sv_l + head * sv_h, sv_s, sv_d, idx_ptr, num, pos0, s_max,
                   head_dim, pid_d, BLOCK_D)


def compact_kv(k_cache: torch.Tensor,          # [num_layers, Hkv, S_max, D]
               v_cache: torch.Tensor,          # [num_layers, Hkv, S_max, D]
               accepted_idx: torch.Tensor,     # [max_accepted] int, increasing
               num_accepted: torch.Tensor | None,  # [] or [1] int (device), None = all
               start: int | torch.Tensor) -> None:  # int, or [] / [1] int tensor (device)
    """Launch the compaction kernel (inputs already validated by specdec.ops.kv)."""
    num_layers, num_heads, s_max, head_dim = k_cache.shape
    max_accepted = accepted_idx.numel()
    if max_accepted == 0 or num_layers * num_heads == 0 or head_dim == 0:
        return
    block_d = min(triton.next_power_of_2(head_dim), 256)
    start_is_ptr = isinstance(start, torch.Tensor)
    grid = (num_layers * num_heads, triton.cdiv(head_dim, block_d), 2)
    _compact_kv_kernel[grid](
        k_cache, v_cache, accepted_idx,
        num_accepted if num_accepted is not None else accepted_idx,
        start if start_is_ptr else accepted_idx,
        0 if start_is_ptr else int(start),
        num_heads, max_accepted, s_max, head_dim,
        *k_cache.stride(), *v_cache.stride(),
        HAS_NUM=num_accepted is not None, HAS_START_PTR=start_is_ptr, BLOCK_D=block_d)
