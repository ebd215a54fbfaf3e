"""Attention ops for the fast runtime: tree attention (verify) and causal prefill.

``tree_attention`` runs the Triton kernel (``specdec.kernels.tree_attention``) when
``backend.use_triton(q.device)``, else ``tree_attention_ref`` (pure PyTorch, the CPU
fallback and the test oracle; same signature). ``prefill_attention`` uses flash-attn
when ``backend.has_flash_attn()`` (CUDA, fp16/bf16), else PyTorch SDPA.

Shapes, for one layer and one sequence (the fast runtime's static KV cache):

- ``q``        [n, Hq, D]        the n tree nodes' queries (Hq = G * Hkv)
- ``k_cache``  [Hkv, S_max, D]   prefix K at [0, L), the tree's K already at [L, L + n)
- ``v_cache``  [Hkv, S_max, D]
- ``tree_mask`` [n, n] bool: ``tree_mask[i, j]`` = node j is node i or an ancestor
  (``TokenTree.ancestor_mask``), or that mask packed by ``pack_tree_mask``
  ([n, ceil(n / 32)] int32; pack once per tree template and reuse). Nodes must be in
  topological order (ancestors first, as ``TokenTree`` guarantees): the kernel scans
  tree keys only up to each query block's last node.
- ``query_pos`` [n] int absolute positions; default ``L + depth`` with depth 0 for the
  nodes without an ancestor in the tree. Prefix key ``t`` has position ``t``; tree key
  ``j`` has position ``query_pos[j]``.
- ``window``: sliding window (Gemma 3 local layers): a query at position p sees keys
  at positions > p - window.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import backend

MASK_WORD_BITS = 32
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)
_kernels = None


def _tree_kernels():
    global _kernels
    if _kernels is None:
        from ..kernels import tree_attention as mod  # only ops/ touches kernels/

        _kernels = mod
    return _kernels


# ------------------------------------------------------------------ tree masks
def pack_tree_mask(tree_mask: torch.Tensor) -> torch.Tensor:
    """[n, n] bool -> [n, ceil(n / 32)] int32; bit ``j % 32`` of word ``j // 32`` is mask[i, j]."""
    if tree_mask.dtype != torch.bool or tree_mask.dim() != 2 or tree_mask.shape[0] != tree_mask.shape[1]:
        raise ValueError(f"pack_tree_mask: need an [n, n] bool mask, got {tuple(tree_mask.shape)} {tree_mask.dtype}")
    n = tree_mask.shape[0]
    words = max(1, -(-n // MASK_WORD_BITS))
    bits = tree_mask.to(torch.int64)
    if words * MASK_WORD_BITS != n:
        bits = F.pad(bits, (0, words * MASK_WORD_BITS - n))
    # bit 31 weighs -2^31, so each word's sum is already its two's-complement int32 value
    return (bits.view(n, words, MASK_WORD_BITS) * _bit_weights(tree_mask.device)).sum(-1).to(torch.int32)


_BIT_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    if device not in _BIT_WEIGHTS:
        w = [1 << b for b in range(MASK_WORD_BITS - 1)] + [-(1 << (MASK_WORD_BITS - 1))]
        _BIT_WEIGHTS[device] = torch.tensor(w, dtype=torch.int64, device=device)
    return _BIT_WEIGHTS[device]


def unpack_tree_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack_tree_mask``: [n, W] int32 -> [n, n] bool."""
    shifts = torch.arange(MASK_WORD_BITS, device=packed.device, dtype=torch.int64)
    bits = (packed.to(torch.int64)[..., None] >> shifts) & 1  # [n, W, 32]
    return bits.reshape(packed.shape[0], -1)[:, :n].bool()


def _as_bool_mask(tree_mask: torch.Tensor, n: int) -> torch.Tensor:
    return tree_mask if tree_mask.dtype == torch.bool else unpack_tree_mask(tree_mask, n)


def tree_query_positions(tree_mask: torch.Tensor, prefix_len: int | torch.Tensor) -> torch.Tensor:
    """[n] int64 absolute positions ``prefix_len + depth`` (depth = number of ancestors in the tree)."""
    n = tree_mask.shape[0]
    depth = _as_bool_mask(tree_mask, n).sum(-1) - 1
    if isinstance(prefix_len, torch.Tensor):
        return depth + prefix_len.reshape(-1)[:1].to(depth.device, torch.int64)
    return depth + int(prefix_len)


def _check(q, k_cache, v_cache, prefix_len, tree_mask, window) -> None:
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.dim() != 3:
        raise ValueError("tree_attention: need q [n, Hq, D], k_cache/v_cache [Hkv, S_max, D]; got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    n, hq, d = q.shape
    hkv, s_max, dk = k_cache.shape
    if tuple(v_cache.shape) != (hkv, s_max, dk) or dk != d:
        raise ValueError(f"tree_attention: k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} "
                         f"do not match q's head dim {d}")
    if hq % hkv:
        raise ValueError(f"tree_attention: {hq} query heads is not a multiple of {hkv} KV heads")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"tree_attention: dtypes differ: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")
    if tree_mask.dtype == torch.bool:
        if tuple(tree_mask.shape) != (n, n):
            raise ValueError(f"tree_attention: tree_mask must be [{n}, {n}], got {tuple(tree_mask.shape)}")
    elif tree_mask.dtype == torch.int32:
        if tuple(tree_mask.shape) != (n, max(1, -(-n // MASK_WORD_BITS))):
            raise ValueError(f"tree_attention: packed tree_mask must be [{n}, ceil({n}/32)], "
                             f"got {tuple(tree_mask.shape)}")
    else:
        raise ValueError(f"tree_attention: tree_mask must be bool [n, n] or packed int32, got {tree_mask.dtype}")
    if not isinstance(prefix_len, torch.Tensor) and not 0 <= int(prefix_len) <= s_max - n:
        raise ValueError(f"tree_attention: prefix_len={prefix_len} with {n} nodes does not fit S_max={s_max}")
    if window is not None and int(window) < 1:
        raise ValueError(f"tree_attention: window must be >= 1, got {window}")


# ------------------------------------------------------------------ tree attention
def tree_attention_ref(
    q: torch.Tensor,  # [n, Hq, D]
    k_cache: torch.Tensor,  # [Hkv, S_max, D]
    v_cache: torch.Tensor,  # [Hkv, S_max, D]
    prefix_len: int | torch.Tensor,
    tree_mask: torch.Tensor,  # [n, n] bool or [n, W] int32 packed
    *,
    query_pos: torch.Tensor | None = None,  # [n] int
    window: int | None = None,
    scale: float | None = None,
    num_splits: int | None = None,  # kernel tuning knob; ignored here
) -> torch.Tensor:  # [n, Hq, D]
    """Pure-PyTorch tree attention: SDPA over [prefix | tree] with an explicit boolean mask."""
    _check(q, k_cache, v_cache, prefix_len, tree_mask, window)
    n, hq, d = q.shape
    hkv = k_cache.shape[0]
    group = hq // hkv
    if n == 0:
        return torch.empty_like(q)
    L = int(prefix_len)
    mask = _as_bool_mask(tree_mask, n).to(q.device)
    visible = torch.cat([torch.ones(n, L, dtype=torch.bool, device=q.device), mask], dim=1)  # [n, L + n]
    if window is not None:
        qpos = (tree_query_positions(mask, L) if query_pos is None else query_pos).to(q.device, torch.int64)
        kpos = torch.cat([torch.arange(L, device=q.device), qpos])
        visible &= kpos[None, :] > qpos[:, None] - int(window)
    # GQA without copying K/V: the G query heads of a KV head become G * n query rows.
    qg = q.reshape(n, hkv, group, d).permute(1, 2, 0, 3).reshape(hkv, group * n, d)
    out = F.scaled_dot_product_attention(qg, k_cache[:, :L + n], v_cache[:, :L + n],
                                         attn_mask=visible.repeat(group, 1), scale=scale)
    return out.reshape(hkv, group, n, d).permute(2, 0, 1, 3).reshape(n, hq, d)


def packed_attention_exact_ref(
    q: torch.Tensor,  # [m, Hq, D]
    k_cache: torch.Tensor,  # [Hkv, S, D]
    v_cache: torch.Tensor,  # [Hkv, S, D]
    pre_base: torch.Tensor,  # [m] or [1] int64: the slot where each row's cached prefix begins
    pre_len: torch.Tensor,  # [m] or [1] int64: its length
    anc: torch.Tensor,  # [m, A] int: query rows of each row's tree ancestors and itself, depth order
    cnt: torch.Tensor,  # [m] int: how many of anc[r] are real
    slots: torch.Tensor,  # [m] int64: where each query row's K/V was written
    query_pos: torch.Tensor,  # [m] int64
    *,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:  # [m, Hq, D]
    """Row-invariant attention (#22's exact mode, #23's ragged batch): every query row attends
    on its own, to its keys in position order -- its prefix (slots pre_base + [0, pre_len),
    positions [0, pre_len)), then its tree ancestors by depth, then itself -- by the same
    operations a one-token step at that position runs. So a node's output in an n-node
    verify (or among other sequences' rows) is bitwise its output as a one-token step once
    its ancestors are cached (given bitwise-equal K/V). One row at a time: the reference and
    CPU path; slow."""
    m, hq, d = q.shape
    hkv = k_cache.shape[0]
    dev = q.device
    base, plen = pre_base.expand(m).tolist(), pre_len.expand(m).tolist()
    anc, cnt = anc.to(dev, torch.long), cnt.tolist()
    slots, qpos = slots.to(dev, torch.long), query_pos.to(dev, torch.long)
    scale = d ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    for r in range(m):
        rows = anc[r, :cnt[r]]
        pre = torch.arange(plen[r], device=dev)
        keys = torch.cat([base[r] + pre, slots[rows]])  # [keys] in position order
        kpos = torch.cat([pre, qpos[rows]])
        if window is not None:
            keep = qpos[r] - kpos < window
            keys, kpos = keys[keep], kpos[keep]
        k, v = k_cache[:, keys].float(), v_cache[:, keys].float()  # [Hkv, keys, D]
        qr = q[r].float().view(hkv, hq // hkv, d)  # [Hkv, G, D]
        p = torch.softmax((qr @ k.transpose(1, 2)) * scale, dim=-1)  # [Hkv, G, keys]
        out[r] = (p @ v).reshape(hq, d).to(q.dtype)
    return out


def packed_attention_exact(q, k_cache, v_cache, pre_base, pre_len, anc, cnt, slots, query_pos, *,
                           window: int | None = None, scale: float | None = None) -> torch.Tensor:
    """``packed_attention_exact_ref``'s rule on the device: the Triton kernel
    (``kernels/tree_attention_exact.py``) where ``backend.use_triton``; no host sync (CUDA-graph
    safe). Shapes as the reference."""
    if not backend.use_triton(q.device):
        return packed_attention_exact_ref(q, k_cache, v_cache, pre_base, pre_len, anc, cnt, slots, query_pos,
                                          window=window, scale=scale)
    from ..kernels import tree_attention_exact as kernel

    d = q.shape[2]
    i64 = dict(device=q.device, dtype=torch.int64)
    return kernel.packed_attention_exact(
        q, k_cache, v_cache, pre_base.to(**i64).contiguous(), pre_len.to(**i64).contiguous(),
        anc.to(q.device, torch.int32).contiguous(), cnt.to(q.device, torch.int32).contiguous(),
        slots.to(**i64).contiguous(), query_pos.to(**i64).contiguous(), torch.empty_like(q),
        d ** -0.5 if scale is None else scale, window)


def ancestor_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, n] bool ancestor mask (topological order) -> (anc [n, n] int32: each row's
    ancestors and itself in depth order, padded with n; cnt [n] int32)."""
    n = mask.shape[0]
    cols = torch.arange(n, device=mask.device)
    anc = torch.where(mask, cols, n).sort(dim=1).values.to(torch.int32)
    return anc, mask.sum(1).to(torch.int32)


def tree_attention_exact(
    q: torch.Tensor,  # [n, Hq, D]
    k_cache: torch.Tensor,  # [Hkv, S_max, D]
    v_cache: torch.Tensor,  # [Hkv, S_max, D]
    prefix_len: int | torch.Tensor,
    tree_mask: torch.Tensor | None,  # [n, n] bool or packed; None = causal over the n new tokens
    *,
    query_pos: torch.Tensor | None = None,  # [n] int
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:  # [n, Hq, D]
    """One sequence's tree (``tree_attention``'s arguments) through ``packed_attention_exact``:
    the prefix is slots [0, prefix_len), the nodes were written at prefix_len + [0, n). No
    host sync when ``prefix_len`` is a device tensor."""
    n = q.shape[0]
    if tree_mask is None:
        tree_mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    _check(q, k_cache, v_cache, prefix_len, tree_mask, window)
    lists = sequence_as_packed(prefix_len, tree_mask, n, q.device)
    if query_pos is None:
        query_pos = lists[1] + lists[3].long() - 1  # prefix length + depth
    return packed_attention_exact(q, k_cache, v_cache, *lists, query_pos, window=window, scale=scale)


def sequence_as_packed(prefix_len: int | torch.Tensor, tree_mask: torch.Tensor | None, n: int,
                       device) -> tuple[torch.Tensor, ...]:
    """One sequence's n new tokens (prefix at slots [0, prefix_len), the tokens written right
    after it) as ``packed_attention_exact``'s per-row lists: (pre_base [1], pre_len [1],
    anc [n, n], cnt [n], slots [n]). ``tree_mask`` [n, n] bool or packed; None = causal. No
    host sync when ``prefix_len`` is a device tensor."""
    mask = (torch.ones(n, n, dtype=torch.bool, device=device).tril() if tree_mask is None
            else _as_bool_mask(tree_mask, n).to(device))
    if isinstance(prefix_len, torch.Tensor):
        start = prefix_len.reshape(-1)[:1].to(device, torch.int64)
    else:
        start = torch.full((1,), int(prefix_len), dtype=torch.int64, device=device)
    anc, cnt = ancestor_lists(mask)
    return torch.zeros_like(start), start, anc, cnt, start + torch.arange(n, device=device)


def tree_attention(
    q: torch.Tensor,  # [n, Hq, D]
    k_cache: torch.Tensor,  # [Hkv, S_max, D]
    v_cache: torch.Tensor,  # [Hkv, S_max, D]
    prefix_len: int | torch.Tensor,
    tree_mask: torch.Tensor,  # [n, n] bool or [n, W] int32 packed
    *,
    query_pos: torch.Tensor | None = None,  # [n] int
    window: int | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:  # [n, Hq, D] in q's dtype
    """Attention of the n tree nodes over [cached prefix | tree] (see the module docstring).

    ``prefix_len`` may be a one-element int tensor on q's device (CUDA-graph friendly:
    the kernel reads it). ``num_splits`` overrides the split-K heuristic (Triton only)."""
    if not backend.use_triton(q.device):
        return tree_attention_ref(q, k_cache, v_cache, prefix_len, tree_mask, query_pos=query_pos,
                                  window=window, scale=scale)
    _check(q, k_cache, v_cache, prefix_len, tree_mask, window)
    n, hq, d = q.shape
    words = tree_mask if tree_mask.dtype == torch.int32 else pack_tree_mask(tree_mask)
    if query_pos is None:
        query_pos = tree_query_positions(tree_mask, prefix_len)
    if query_pos.dtype not in (torch.int32, torch.int64) or query_pos.device != q.device:
        query_pos = query_pos.to(q.device, torch.int32)
    query_pos = query_pos.contiguous()  # the kernel reads int32 or int64
    if isinstance(prefix_len, torch.Tensor):
        prefix_len = prefix_len.reshape(-1)[:1].to(q.device)
    else:
        prefix_len = int(prefix_len)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    return _tree_kernels().tree_attention_fwd(
        q, k_cache, v_cache, words.to(q.device).contiguous(), query_pos, prefix_len,
        scale=1.0 / math.sqrt(d) if scale is None else float(scale), window=window,
        num_splits=num_splits, prefix_bound=_visible_prefix_bound(k_cache, prefix_len, n, window))


def _visible_prefix_bound(k_cache, prefix_len, n, window) -> int:
    """An upper bound on the prefix keys a query sees, known on the host without a sync."""
    bound = k_cache.shape[1] - n if isinstance(prefix_len, torch.Tensor) else int(prefix_len)
    return bound if window is None else min(bound, int(window))


def tree_attention_num_splits(q: torch.Tensor, k_cache: torch.Tensor, prefix_len: int | torch.Tensor, *,
                              window: int | None = None) -> int:
    """The split-K count ``tree_attention`` picks for these shapes (1 on the PyTorch path)."""
    if not backend.use_triton(q.device):
        return 1
    n, hq, d = q.shape
    hkv = k_cache.shape[0]
    return _tree_kernels().default_num_splits(n * (hq // hkv), hkv, _visible_prefix_bound(k_cache, prefix_len, n, window),
                                              d, q.device, q.element_size())


# ------------------------------------------------------------------ prefill
def prefill_attention(
    q: torch.Tensor,  # [B, Tq, Hq, D] or [Tq, Hq, D]
    k: torch.Tensor,  # [B, Tk, Hkv, D] or [Tk, Hkv, D], Tk >= Tq
    v: torch.Tensor,  # like k
    *,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:  # like q
    """Causal attention (flash-attn layout). With Tk > Tq the queries are the last Tq
    positions (bottom-right aligned, as flash-attn does); ``window`` as in tree attention."""
    squeeze = q.dim() == 3
    if squeeze:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    tq, hq, tk, hkv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    if q.dim() != 4 or k.shape != v.shape or hq % hkv or tk < tq or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"prefill_attention: need q [B, Tq, Hq, D], k/v [B, Tk >= Tq, Hkv, D]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if window is not None and int(window) < 1:
        raise ValueError(f"prefill_attention: window must be >= 1, got {window}")
    if backend.has_flash_attn() and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from flash_attn import flash_attn_func  # guarded by backend.has_flash_attn()

        out = flash_attn_func(q, k, v, softmax_scale=scale, causal=True,
                              window_size=(-1, -1) if window is None else (int(window) - 1, 0))
    else:
        out = _prefill_sdpa(q, k, v, window=window, scale=scale)
    return out.squeeze(0) if squeeze else out


def _prefill_sdpa(q, k, v, *, window, scale):
    tq, hq, tk, hkv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
    kwargs = {}
    if hq != hkv:
        if _SDPA_HAS_GQA:
            kwargs["enable_gqa"] = True
        else:
            kt, vt = kt.repeat_interleave(hq // hkv, dim=1), vt.repeat_interleave(hq // hkv, dim=1)
    if window is None and tq == tk:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, **kwargs)
    else:
        qpos = torch.arange(tk - tq, tk, device=q.device)[:, None]
        kpos = torch.arange(tk, device=q.device)[None, :]
        visible = kpos <= qpos
        if window is not None:
            visible &= kpos > qpos - int(window)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=visible, scale=scale, **kwargs)
    return out.transpose(1, 2).contiguous()


__all__ = ["tree_attention", "tree_attention_ref", "prefill_attention", "pack_tree_mask",
           "unpack_tree_mask", "tree_query_positions", "tree_attention_num_splits"]
