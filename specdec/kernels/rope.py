"""Triton rotary embedding (rotate-half convention) for q and k in one launch, in place;
or (``rope_write_``) q in place and k, with v, straight into the KV cache.

Matches ``specdec.ops.rope.apply_rope_ref``: ``x * cos + rotate_half(x) * sin`` with each
product and the sum rounded to the tensor's dtype as PyTorch's elementwise ops do.
One program per (token, head) over the q heads then the k heads; cos / sin are
[m, D] (the two halves equal, as transformers builds them).
"""
import triton
import triton.language as tl


@triton.jit
def _rotate(x1, x2, c1, c2, s1, s2):
    """(x1 * cos - x2 * sin, x2 * cos + x1 * sin) per half, each product and sum rounded
    to x's dtype as PyTorch's elementwise ops round them."""
    ty = x1.dtype
    a1 = (x1.to(tl.float32) * c1.to(tl.float32)).to(ty)
    b1 = (-x2.to(tl.float32) * s1.to(tl.float32)).to(ty)
    a2 = (x2.to(tl.float32) * c2.to(tl.float32)).to(ty)
    b2 = (x1.to(tl.float32) * s2.to(tl.float32)).to(ty)
    return (a1.to(tl.float32) + b1.to(tl.float32)).to(ty), (a2.to(tl.float32) + b2.to(tl.float32)).to(ty)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, hq, hkv,
                 s_qm, s_qh, s_km, s_kh, s_cm,
                 HALF: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    if h < hq:
        base = q_ptr + t * s_qm + h * s_qh
    else:
        base = k_ptr + t * s_km + (h - hq) * s_kh
    d = tl.arange(0, BLOCK)
    live = d < HALF
    x1 = tl.load(base + d, mask=live, other=0.0)
    x2 = tl.load(base + HALF + d, mask=live, other=0.0)
    c1 = tl.load(cos_ptr + t * s_cm + d, mask=live, other=0.0)
    c2 = tl.load(cos_ptr + t * s_cm + HALF + d, mask=live, other=0.0)
    s1 = tl.load(sin_ptr + t * s_cm + d, mask=live, other=0.0)
    s2 = tl.load(sin_ptr + t * s_cm + HALF + d, mask=live, other=0.0)
    y1, y2 = _rotate(x1, x2, c1, c2, s1, s2)
    tl.store(base + d, y1, mask=live)
    tl.store(base + HALF + d, y2, mask=live)


@triton.jit
def _rope_write_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, hq,
                       s_qm, s_qh, s_km, s_kh, s_vm, s_vh, s_cm, s_ch, s_cs,
                       HALF: tl.constexpr, BLOCK: tl.constexpr):
    """q heads: rotated in place. k heads: rotated k and the matching v head written to
    the cache row ``slot_ptr[t]`` (cache [Hkv, S_max, D], K and V with equal strides)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, BLOCK)
    live = d < HALF
    c1 = tl.load(cos_ptr + t * s_cm + d, mask=live, other=0.0)
    c2 = tl.load(cos_ptr + t * s_cm + HALF + d, mask=live, other=0.0)
    s1 = tl.load(sin_ptr + t * s_cm + d, mask=live, other=0.0)
    s2 = tl.load(sin_ptr + t * s_cm + HALF + d, mask=live, other=0.0)
    if h < hq:
        base = q_ptr + t * s_qm + h * s_qh
        y1, y2 = _rotate(tl.load(base + d, mask=live, other=0.0), tl.load(base + HALF + d, mask=live, other=0.0),
                         c1, c2, s1, s2)
        tl.store(base + d, y1, mask=live)
        tl.store(base + HALF + d, y2, mask=live)
    else:
        hk = h - hq
        src = k_ptr + t * s_km + hk * s_kh
        y1, y2 = _rotate(tl.load(src + d, mask=live, other=0.0), tl.load(src + HALF + d, mask=live, other=0.0),
                         c1, c2, s1, s2)
        row = hk * s_ch + tl.load(slot_ptr + t).to(tl.int64) * s_cs
        tl.store(kc_ptr + row + d, y1, mask=live)
        tl.store(kc_ptr + row + HALF + d, y2, mask=live)
        vsrc = v_ptr + t * s_vm + hk * s_vh
        tl.store(vc_ptr + row + d, tl.load(vsrc + d, mask=live, other=0.0), mask=live)
        tl.store(vc_ptr + row + HALF + d, tl.load(vsrc + HALF + d, mask=live, other=0.0), mask=live)


def rope_(q,    # [m, Hq, D], last dim contiguous; rotated in place
          k,    # [m, Hkv, D], the same
          cos,  # [m, D]
          sin):  # [m, D]
    m, hq, d = q.shape
    hkv = k.shape[1]
    if m == 0:
        return q, k
    half = d // 2
    _rope_kernel[(m, hq + hkv)](q, k, cos, sin, hq, hkv, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                cos.stride(0), HALF=half, BLOCK=triton.next_power_of_2(half))
    return q, k


def rope_write_(q,        # [m, Hq, D], last dim contiguous; rotated in place
                k,        # [m, Hkv, D], the same; read
                v,        # [m, Hkv, D], the same; read
                cos,      # [m, D]
                sin,      # [m, D]
                k_cache,  # [Hkv, S_max, D] one layer, last dim contiguous; rows slots[t] written
                v_cache,  # [Hkv, S_max, D], the same strides as k_cache
                slots):   # [m] int64 cache rows
    m, hq, d = q.shape
    hkv = k.shape[1]
    if m == 0:
        return q
    half = d // 2
    _rope_write_kernel[(m, hq + hkv)](q, k, v, cos, sin, k_cache, v_cache, slots, hq,
                                      q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                      cos.stride(0), k_cache.stride(0), k_cache.stride(1),
                                      HALF=half, BLOCK=triton.next_power_of_2(half))
    return q
