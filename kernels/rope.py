"""Triton rotary embedding (rotate-half convention) for q and k in one launch, in place.

Matches ``specdec.ops.rope.apply_rope_ref``: ``x * cos + rotate_half(x) * sin`` with each
product and the sum rounded to the tensor's dtype as PyTorch's elementwise ops do.
One program per (token, head) over the q heads then the k heads; cos / sin are
[m, D] (the two halves equal, as transformers builds them).
"""
import triton
import triton.language as tl


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
    ty = x1.dtype
    # first half: x1 * cos - x2 * sin; second half: x2 * cos + x1 * sin (rounded per op)
    a1 = (x1.to(tl.float32) * c1.to(tl.float32)).to(ty)
    b1 = (-x2.to(tl.float32) * s1.to(tl.float32)).to(ty)
    a2 = (x2.to(tl.float32) * c2.to(tl.float32)).to(ty)
    b2 = (x1.to(tl.float32) * s2.to(tl.float32)).to(ty)
    tl.store(base + d, (a1.to(tl.float32) + b1.to(tl.float32)).to(ty), mask=live)
    tl.store(base + HALF + d, (a2.to(tl.float32) + b2.to(tl.float32)).to(ty), mask=live)


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
