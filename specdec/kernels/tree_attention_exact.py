"""Row-invariant tree attention for the exact mode (#22) and the ragged batch (#23).

Each program is one query row and one KV head. The row reads its keys in position order --
its sequence's cached prefix (``plen[r]`` keys from slot ``pbase[r]``), then its tree
ancestors by depth (``anc[r]``: indices of query rows, whose K/V this forward wrote at
``slots``), then itself -- in fixed blocks of BLOCK_N keys counted from position 0, with one
online softmax and no split. A one-token step at the same position reads the same keys in
the same blocks, so the two outputs are bitwise equal whenever the keys and values are; and
a row's result does not depend on which other rows (trees, or other sequences of a batch
packed into one forward) share the launch. Dot products are elementwise products summed
over the head dim (the GQA group shares the key loads); no tensor cores: this path trades
speed for exactness. The reference is ``ops.attention.packed_attention_exact_ref``.
"""
import triton
import triton.language as tl

BLOCK_N = 32  # keys per block, counted from position 0: fixed, whatever the tree


@triton.jit
def _exact_attn_kernel(q_ptr, k_ptr, v_ptr, out_ptr, pbase_ptr, plen_ptr, anc_ptr, cnt_ptr, slot_ptr, qpos_ptr,
                       s_qm, s_qh, s_kh, s_ks, s_om, s_oh, s_am, s_pb, s_pl, scale, window,
                       G: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    r = tl.program_id(0)  # query row
    h = tl.program_id(1)  # KV head
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok, d_ok = offs_g < G, offs_d < HEAD_DIM
    q = tl.load(q_ptr + r * s_qm + (h * G + offs_g)[:, None] * s_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [BG, BD]
    base = tl.load(pbase_ptr + r * s_pb)  # first slot of this row's prefix
    L = tl.load(plen_ptr + r * s_pl)  # its length
    n_keys = L + tl.load(cnt_ptr + r)
    qpos = tl.load(qpos_ptr + r)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    k_base = k_ptr + h * s_kh
    v_base = v_ptr + h * s_kh
    for t0 in range(0, n_keys, BLOCK_N):
        t = t0 + offs_n  # key index in position order
        ok = t < n_keys
        in_tree = t >= L
        row = tl.load(anc_ptr + r * s_am + (t - L), mask=ok & in_tree, other=0)  # the ancestor's query row
        slot = tl.where(in_tree, tl.load(slot_ptr + row, mask=ok & in_tree, other=0), base + t)
        if HAS_WINDOW:
            kpos = tl.where(in_tree, tl.load(qpos_ptr + row, mask=ok & in_tree, other=0), t)
            ok = ok & (qpos - kpos < window)
        k = tl.load(k_base + slot.to(tl.int64)[:, None] * s_ks + offs_d[None, :],
                    mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [BN, BD]
        v = tl.load(v_base + slot.to(tl.int64)[:, None] * s_ks + offs_d[None, :],
                    mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [BG, BN]
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    o = acc / l_i[:, None]
    tl.store(out_ptr + r * s_om + (h * G + offs_g)[:, None] * s_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


def packed_attention_exact(q, k_cache, v_cache, pre_base, pre_len, anc, cnt, slots, query_pos, out,
                           scale: float, window):
    """q [m, Hq, D], k/v_cache [Hkv, S, D] (unit stride on D); per query row: pre_base and
    pre_len [m] or [1] int64 (one value for every row: stride 0), anc [m, A] int32 (query
    rows of its tree ancestors and itself, in depth order; padding past cnt), cnt [m] int32;
    slots [m] int64 (where each query row's K/V was written), query_pos [m] int64; out like q."""
    m, hq, d = q.shape
    hkv = k_cache.shape[0]
    group = hq // hkv
    _exact_attn_kernel[(m, hkv)](
        q, k_cache, v_cache, out, pre_base, pre_len, anc, cnt, slots, query_pos,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1), anc.stride(0),
        0 if pre_base.numel() == 1 else pre_base.stride(0), 0 if pre_len.numel() == 1 else pre_len.stride(0),
        float(scale), int(window) if window is not None else 0,
        G=group, HEAD_DIM=d, HAS_WINDOW=window is not None, BLOCK_G=max(2, triton.next_power_of_2(group)),
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_N=BLOCK_N, num_warps=4)
    return out
