"""Tree attention (verify step) and prefill attention.

Without CUDA the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set by
this module's fixture for its own tests only, then restored); sizes stay small so the
whole file runs in well under a minute on a CPU. Tests marked ``gpu`` need CUDA.
"""
from __future__ import annotations

import math

import pytest
import torch

from specdec.ops import attention as attn
from specdec.ops import backend
from specdec.tree import TokenTree
from conftest import triton_kernels_on_cpu

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


@pytest.fixture(scope="module", autouse=True)
def _triton_interpreter():
    """Run the kernels under the Triton interpreter when there is no GPU (this module only)."""
    with triton_kernels_on_cpu():
        yield


def _triton_or_skip(device=DEVICE):
    if not backend.use_triton(torch.device(device)):
        pytest.skip("Triton not available")


def random_tree(n: int, seed: int, branchy: float = 0.5) -> TokenTree:
    """A random tree in topological order: each node hangs below a recent node or a random one."""
    g = torch.Generator().manual_seed(seed)
    parents = []
    for i in range(n):
        if i == 0:
            parents.append(-1)
        elif torch.rand((), generator=g) < branchy:
            parents.append(int(torch.randint(-1, i, (), generator=g)))
        else:
            parents.append(i - 1)
    return TokenTree(torch.zeros(n, dtype=torch.long), torch.tensor(parents))


def make_inputs(n, prefix, n_kv, group, dim, *, dtype=torch.float32, device=DEVICE, seed=0, spare=5):
    g = torch.Generator(device="cpu").manual_seed(seed)
    s_max = prefix + n + spare
    q = torch.randn(n, n_kv * group, dim, generator=g)
    k = torch.randn(n_kv, s_max, dim, generator=g)
    v = torch.randn(n_kv, s_max, dim, generator=g)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def causal_path_attention(q, k_cache, v_cache, prefix, path, qpos, window, scale):
    """Plain causal attention (fp64, no tree) of the path's nodes over prefix + path."""
    group = q.shape[1] // k_cache.shape[0]
    idx = torch.tensor(list(range(prefix)) + [prefix + j for j in path])
    keys = k_cache[:, idx].double().repeat_interleave(group, 0)  # [Hq, T, D]
    vals = v_cache[:, idx].double().repeat_interleave(group, 0)
    qp = qpos[path].cpu()
    kpos = torch.cat([torch.arange(prefix), qp])
    visible = kpos[None, :] <= qp[:, None]
    if window is not None:
        visible &= kpos[None, :] > qp[:, None] - window
    s = torch.einsum("mhd,htd->hmt", q[path].double(), keys) * scale
    p = s.masked_fill(~visible.to(s.device), float("-inf")).softmax(-1)
    return torch.einsum("hmt,htd->mhd", p, vals)


# ----------------------------------------------------------------- helpers
@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 128])
def test_pack_tree_mask_roundtrip(n):
    mask = random_tree(n, seed=n).ancestor_mask
    packed = attn.pack_tree_mask(mask)
    assert packed.dtype == torch.int32 and packed.shape == (n, math.ceil(n / 32))
    assert torch.equal(attn.unpack_tree_mask(packed, n), mask)


def test_query_positions_are_prefix_plus_depth():
    tree = random_tree(9, seed=3)
    pos = attn.tree_query_positions(tree.ancestor_mask, 100)
    assert torch.equal(pos, 100 + tree.depth - 1)


def test_ref_rejects_bad_shapes():
    q, k, v = make_inputs(3, 4, 2, 2, 16, device="cpu")
    mask = random_tree(3, 0).ancestor_mask
    with pytest.raises(ValueError):
        attn.tree_attention_ref(q, k, v, 4, mask[:2, :2])
    with pytest.raises(ValueError):
        attn.tree_attention_ref(q[:, :3], k, v, 4, mask)  # 3 query heads over 2 KV heads
    with pytest.raises(ValueError):
        attn.tree_attention_ref(q, k, v, k.shape[1], mask)  # tree does not fit the cache


# ----------------------------------------------------------------- kernel vs reference
# (n, prefix, Hkv, G, D, window, num_splits): awkward sizes, kept small for the interpreter
CASES = [
    (1, 0, 2, 1, 64, None, None),
    (1, 1, 1, 4, 128, None, None),
    (3, 1, 2, 4, 64, None, None),
    (3, 1000, 1, 4, 16, None, None),  # split-K by the heuristic
    (17, 1000, 1, 4, 32, None, 3),
    (17, 1000, 1, 1, 16, 100, 4),  # window clips the prefix; split-K over what is left
    (17, 0, 2, 4, 24, 5, None),  # window shorter than the tree's depth; D not a power of 2
    (128, 1, 1, 4, 16, None, None),
    (128, 0, 2, 1, 64, 50, None),
    (5, 37, 1, 2, 80, 1, 2),  # window 1: each node sees only itself
    (40, 100, 2, 3, 32, None, 8),  # 16-row blocks x 8 splits: 2 with prefix keys, 5 empty, 1 tree-only
    (9, 30, 2, 2, 8, None, None),  # head dim 8: tl.dot's K and N padded to 16
]


@pytest.mark.parametrize("n,prefix,n_kv,group,dim,window,splits", CASES)
def test_kernel_matches_reference(n, prefix, n_kv, group, dim, window, splits):
    _triton_or_skip()
    q, k, v = make_inputs(n, prefix, n_kv, group, dim, seed=n + prefix)
    mask = random_tree(n, seed=n).ancestor_mask.to(DEVICE)
    out = attn.tree_attention(q, k, v, prefix, mask, window=window, num_splits=splits)
    ref = attn.tree_attention_ref(q, k, v, prefix, mask, window=window)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_split_heuristic_shapes():
    """Powers of two; a split per 64 prefix keys plus one for the tree part; none once
    the tree alone fills the GPU; the partial-output cap bounds big trees."""
    _triton_or_skip()
    from specdec.kernels import tree_attention as tk

    gpu = torch.device("cuda")
    real_info = tk._device_info
    tk._device_info = lambda device: (132, 227 * 1024)  # an H100/H200, without needing one
    try:
        for rows, hkv, bound, d in [(4, 8, 512, 128), (3, 3, 639, 64), (192, 3, 512, 64), (256, 8, 128, 128),
                                    (512, 8, 4096, 128), (1, 1, 0, 64)]:
            s = tk.default_num_splits(rows, hkv, bound, d, gpu)
            assert s >= 1 and s & (s - 1) == 0, (rows, hkv, bound, d, s)
        assert tk.default_num_splits(4, 8, 512, 128, gpu) == 16  # 8B decode: 8 prefix chunks + the tree
        assert tk.default_num_splits(1, 1, 0, 64, gpu) == 1  # no prefix: nothing to split
        assert tk.default_num_splits(512, 8, 512, 128, gpu) == 1  # 8B, 128 nodes: the partials would cost more
        assert tk.block_config(192, 64, 2, gpu, 512, 8) == {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4,
                                                            "num_stages": 2}
        assert tk.block_config(256, 128, 2, gpu, 4096, 1)["BLOCK_M"] == 128  # big tree, long prefix
    finally:
        tk._device_info = real_info


def test_kernel_packed_mask_tensor_prefix_and_positions():
    """Pre-packed mask, prefix length as a device tensor, explicit positions and scale."""
    _triton_or_skip()
    n, prefix = 9, 50
    q, k, v = make_inputs(n, prefix, 2, 2, 32, seed=1)
    mask = random_tree(n, seed=2).ancestor_mask.to(DEVICE)
    pos = attn.tree_query_positions(mask, prefix) + 3  # e.g. a root that sits 3 slots later
    kw = dict(query_pos=pos, window=20, scale=0.3)
    out = attn.tree_attention(q, k, v, torch.tensor([prefix], device=DEVICE), attn.pack_tree_mask(mask),
                              num_splits=2, **kw)
    ref = attn.tree_attention_ref(q, k, v, prefix, mask, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_dispatch_falls_back_to_reference():
    q, k, v = make_inputs(4, 10, 1, 2, 16, device="cpu")
    mask = random_tree(4, 0).ancestor_mask
    with backend.override(triton=False):
        out = attn.tree_attention(q, k, v, 10, mask)
    torch.testing.assert_close(out, attn.tree_attention_ref(q, k, v, 10, mask))


# ----------------------------------------------------------------- tree == causal along paths
@pytest.mark.parametrize("use_kernel", [False, True], ids=["ref", "triton"])
@pytest.mark.parametrize("window", [None, 6])
def test_tree_equals_causal_along_every_path(use_kernel, window):
    if use_kernel:
        _triton_or_skip()
    n, prefix, n_kv, group, dim = 23, 40, 2, 2, 32
    tree = random_tree(n, seed=7)
    assert len(tree.paths()) > 3  # really a tree
    q, k, v = make_inputs(n, prefix, n_kv, group, dim, seed=11)
    mask = tree.ancestor_mask.to(DEVICE)
    qpos = (prefix + tree.depth - 1).to(DEVICE)
    fn = attn.tree_attention if use_kernel else attn.tree_attention_ref
    out = fn(q, k, v, prefix, mask, window=window, num_splits=2 if use_kernel else None)
    for path in tree.paths():
        expected = causal_path_attention(q, k, v, prefix, path, qpos, window, 1 / math.sqrt(dim))
        torch.testing.assert_close(out[path].double(), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------- prefill
@pytest.mark.parametrize("tq,tk,window", [(7, 7, None), (7, 7, 3), (4, 9, None), (4, 9, 2)])
def test_prefill_attention(tq, tk, window):
    g = torch.Generator().manual_seed(tq * tk)
    q = torch.randn(2, tq, 4, 16, generator=g)
    k = torch.randn(2, tk, 2, 16, generator=g)
    v = torch.randn(2, tk, 2, 16, generator=g)
    out = attn.prefill_attention(q, k, v, window=window)
    qpos = torch.arange(tk - tq, tk)[:, None]
    kpos = torch.arange(tk)[None, :]
    vis = (kpos <= qpos) & (kpos > qpos - (window or tk + 1))
    kk, vv = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) / 4.0
    expected = torch.einsum("bhqk,bkhd->bqhd", s.masked_fill(~vis, float("-inf")).softmax(-1), vv)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn.prefill_attention(q[0], k[0], v[0], window=window), expected[0],
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- GPU only
LOW_PRECISION_ATOL = {torch.float16: 5e-4, torch.bfloat16: 2e-3}


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,prefix,n_kv,group,dim,window", [
    (1, 32768, 8, 4, 128, None), (16, 4096, 8, 4, 128, None), (128, 513, 8, 4, 128, None),
    (17, 1000, 4, 2, 256, None), (64, 4000, 8, 2, 256, 1024), (3, 0, 8, 4, 64, None), (128, 77, 2, 8, 64, 16),
])
def test_kernel_low_precision_gpu(dtype, n, prefix, n_kv, group, dim, window):
    q, k, v = make_inputs(n, prefix, n_kv, group, dim, dtype=dtype, device="cuda", seed=n)
    mask = random_tree(n, seed=n).ancestor_mask.cuda()
    out = attn.tree_attention(q, k, v, prefix, mask, window=window)
    ref32 = attn.tree_attention_ref(q.float(), k.float(), v.float(), prefix, mask, window=window)
    ref_lp = attn.tree_attention_ref(q, k, v, prefix, mask, window=window)  # plain torch, same dtype
    err = (out.float() - ref32).abs().max().item()
    err_torch = (ref_lp.float() - ref32).abs().max().item()
    assert err <= 2 * err_torch + LOW_PRECISION_ATOL[dtype], (err, err_torch)


@gpu
@needs_cuda
def test_kernel_fp32_gpu_long_prefix():
    q, k, v = make_inputs(33, 20000, 4, 4, 128, device="cuda", seed=5)
    mask = random_tree(33, seed=5).ancestor_mask.cuda()
    out = attn.tree_attention(q, k, v, 20000, mask)
    ref = attn.tree_attention_ref(q, k, v, 20000, mask)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@gpu
@needs_cuda
def test_kernel_cuda_graph_replay_with_device_prefix_len():
    """Captured once, replayed with a longer prefix: the kernel reads prefix_len from memory."""
    n, s_max = 12, 3000
    q, k, v = make_inputs(n, s_max - n - 5, 8, 4, 128, dtype=torch.bfloat16, device="cuda", seed=9)
    mask = random_tree(n, seed=9).ancestor_mask.cuda()
    packed = attn.pack_tree_mask(mask)
    depth = mask.sum(-1) - 1
    plen = torch.tensor([100], device="cuda")
    qpos = (depth + plen).to(torch.int32)
    kw = dict(num_splits=8)
    attn.tree_attention(q, k, v, plen, packed, query_pos=qpos, **kw)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attn.tree_attention(q, k, v, plen, packed, query_pos=qpos, **kw)
    for L in (100, 2500, 7):
        plen.fill_(L)
        qpos.copy_(depth + L)
        graph.replay()
        ref = attn.tree_attention_ref(q.float(), k.float(), v.float(), L, mask)
        assert (out.float() - ref).abs().max().item() < 2e-2
