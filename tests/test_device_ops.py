"""Verify-step ops: KV compaction, greedy acceptance, tree rejection sampling.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 on CPU tensors; with CUDA
they run compiled (and the graph-capture test, marked gpu, runs too). Every kernel is
checked against its reference; the sampler's reference against the target distribution.
"""
import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton.jit kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402

from specdec.ops import backend  # noqa: E402
from specdec.ops.accept import (greedy_accept, tree_rejection_sample, tree_rejection_sample_ref,  # noqa: E402
                                tree_uniforms)
from specdec.ops.kv import compact_kv, compact_kv_ref  # noqa: E402
from conftest import triton_kernels_on_cpu  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(
    not backend.has_triton() or not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton unavailable (needs CUDA or TRITON_INTERPRET=1)")


@pytest.fixture(scope="module", autouse=True)
def _triton_on_cpu():
    """Let the ops dispatch to Triton on CPU tensors (interpreter) in this module only."""
    with triton_kernels_on_cpu():
        yield


def _kernel():
    """Dispatch to the Triton kernel (CPU tensors included, through the interpreter)."""
    return backend.override(triton=True)


# ------------------------------------------------------------------ KV compaction
COMPACT_CASES = [
    # (num_layers, heads, S_max, D, start, n, accepted node indices)
    (2, 3, 37, 24, 5, 9, [1, 3, 4, 7]),          # overlapping moves: dest <= src, chains of moves
    (1, 2, 50, 5, 0, 6, [0, 1, 2, 5]),           # in-place prefix (skipped) then a move; D not pow2
    (3, 1, 40, 300, 11, 7, [2, 3, 4, 5, 6]),     # D > one Triton block; every row shifts by 2
    (2, 2, 30, 16, 4, 5, []),                    # a = 0
    (2, 2, 30, 16, 4, 5, [0, 1, 2, 3, 4]),       # a = n: nothing moves
    (1, 1, 9, 3, 3, 6, [5]),                     # tree ends at S_max
]


def _cache(L, H, S, D, dtype, device, gen):
    return (torch.randn(L, H, S, D, generator=gen) * 10).to(dtype).to(device)


@needs_triton
@pytest.mark.parametrize("case", COMPACT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("start_kind", ["int", "tensor"])
def test_compact_kv_matches_ref(case, dtype, start_kind):
    L, H, S, D, start, n, acc = case
    gen = torch.Generator().manual_seed(len(acc) * 7 + D)
    k, v = _cache(L, H, S, D, dtype, DEV, gen), _cache(L, H, S, D, dtype, DEV, gen)
    # accepted_idx is [max_accepted] padded with junk after num_accepted
    idx = torch.tensor(acc + [n + 3, -1], dtype=torch.long, device=DEV)
    num = torch.tensor(len(acc), device=DEV)
    k_ref, v_ref = k.clone(), v.clone()
    compact_kv_ref(k_ref, v_ref, idx, num, start=start)
    st = start if start_kind == "int" else torch.tensor(start, device=DEV)
    with _kernel():
        compact_kv(k, v, idx, num, start=st)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    # semantics, spelled out: row start + acc[j] moved to start + j; the rest untouched
    k0 = _cache(L, H, S, D, dtype, DEV, torch.Generator().manual_seed(len(acc) * 7 + D))
    for j, a in enumerate(acc):
        assert torch.equal(k[:, :, start + j], k0[:, :, start + a])
    assert torch.equal(k[:, :, start + len(acc):], k0[:, :, start + len(acc):])
    assert torch.equal(k[:, :, :start], k0[:, :, :start])


@needs_triton
def test_compact_kv_layouts():
    """Non-contiguous caches (a head-strided view), a single layer [H, S, D], lists of
    layers, and num_accepted=None (all of accepted_idx)."""
    gen = torch.Generator().manual_seed(0)
    big_k, big_v = _cache(2, 6, 33, 12, torch.float32, DEV, gen), _cache(2, 6, 33, 12, torch.float32, DEV, gen)
    k, v = big_k[:, ::2], big_v[:, 1::2]  # [2, 3, 33, 12], non-contiguous
    idx = torch.tensor([2, 3, 6], device=DEV)
    k_ref, v_ref = k.clone(), v.clone()
    compact_kv_ref(k_ref, v_ref, idx, start=10)
    with _kernel():
        compact_kv(k, v, idx, start=10)
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
        one_k, one_v = k_ref[0].clone(), v_ref[0].clone()
        compact_kv(one_k, one_v, idx, torch.tensor(2, device=DEV), start=3)
        compact_kv_ref(k_ref[0], v_ref[0], idx, 2, start=3)
        assert torch.equal(one_k, k_ref[0]) and torch.equal(one_v, v_ref[0])
        ks, vs = [t.clone() for t in k], [t.clone() for t in v]
        compact_kv(ks, vs, idx, start=0)
        compact_kv_ref(k, v, idx, start=0)
        assert all(torch.equal(a, b) for a, b in zip(ks, k)) and all(torch.equal(a, b) for a, b in zip(vs, v))


def test_compact_kv_rejects_bad_inputs():
    k = torch.zeros(2, 2, 8, 4)
    with pytest.raises(ValueError):
        compact_kv(k, torch.zeros(2, 2, 8, 5), torch.tensor([0]), start=0)
    with pytest.raises(ValueError):
        compact_kv(k, k.clone(), torch.tensor([0.0]), start=0)
    with pytest.raises(ValueError):
        compact_kv(k, k.clone(), torch.tensor([0]), start=9)


# ------------------------------------------------------------------- greedy accept
def _random_tree(rng: random.Random, n: int, vocab: int, branchy: bool = True):
    parents = [rng.randint(-1, i - 1) if branchy else i - 1 for i in range(n)]
    if not branchy and n:
        parents = [-1] + [rng.choice([i - 1, i - 1, rng.randint(-1, i - 1)]) for i in range(1, n)]
    tokens = [rng.randrange(vocab) for _ in range(n)]
    argmax = [rng.randrange(vocab) for _ in range(n + 1)]
    return parents, tokens, argmax


def _depths(parents):
    d = []
    for p in parents:
        d.append(1 if p < 0 else d[p] + 1)
    return d


def test_greedy_accept_semantics():
    """The deepest matching path; ties to the lower node index; max_depth prunes."""
    #         node: 0   1   2   3   4   5
    parents = [-1, -1, 0, 1, 2, 3]
    tokens = [7, 8, 1, 1, 2, 2]
    argmax = [8, 1, 1, 1, 2, 9, 0]  # row p + 1 is the argmax after node p: 8 (node 1), 1 (node 3), 2 (node 5)
    assert greedy_accept(parents, tokens, argmax) == [1, 3, 5]
    assert greedy_accept(parents, tokens, argmax, 2) == [1, 3]
    assert greedy_accept(parents, tokens, argmax, 0) == []
    assert greedy_accept([-1, -1], [4, 4], [4, 0, 0]) == [0]  # a tie: the lower index
    assert greedy_accept([], [], [3]) == []
    with pytest.raises(ValueError):
        greedy_accept([0], [1], [1, 1])  # a parent must precede its child
    with pytest.raises(ValueError):
        greedy_accept([-1], [1], [1])


@pytest.mark.parametrize("seed", range(4))
def test_greedy_accept_random_trees(seed):
    """Every accepted token equals the argmax at its parent, no matching path is deeper,
    and max_depth is the same as making the too-deep nodes unmatchable."""
    rng = random.Random(seed)
    for _ in range(40):
        n = rng.choice([0, 1, 2, 7, 19, 40, 129])
        parents, tokens, argmax = _random_tree(rng, n, vocab=rng.choice([2, 3]), branchy=rng.random() < 0.5)
        path = greedy_accept(parents, tokens, argmax)
        prev = -1
        for v in path:
            assert parents[v] == prev and tokens[v] == argmax[prev + 1]
            prev = v
        depths = _depths(parents)
        ok = []
        for i, p in enumerate(parents):
            ok.append(tokens[i] == argmax[p + 1] and (p < 0 or ok[p]))
        assert len(path) == max([d for d, good in zip(depths, ok) if good], default=0)
        md = rng.choice([0, 1, 3])
        pruned = [t if d <= md else -1 for t, d in zip(tokens, depths)]
        assert greedy_accept(parents, tokens, argmax, md) == greedy_accept(parents, pruned, argmax)


# -------------------------------------------------------------- rejection sampler
def _sampler_inputs(rng: random.Random, gen: torch.Generator, B: int, n: int, V: int, with_draft: bool,
                    shared_tree: bool, device=DEV):
    def tree():
        return [rng.randint(-1, i - 1) if rng.random() < 0.4 else i - 1 for i in range(n)]

    parents = torch.tensor(tree() if shared_tree else [tree() for _ in range(B)], dtype=torch.long)
    target = torch.softmax(torch.randn(B, n + 1, V, generator=gen) * 1.5, -1)
    target[..., V // 2] = 0.0  # a zero-probability token
    target = target / target.sum(-1, keepdim=True)
    draft = None
    if with_draft:
        draft = torch.softmax(torch.log(target[:, :n] + 1e-3) + torch.randn(B, n, V, generator=gen), -1)
        tokens = torch.multinomial(draft.reshape(-1, V), 1, generator=gen).reshape(B, n) if n else \
            torch.zeros(B, 0, dtype=torch.long)
    else:
        tokens = torch.randint(0, V, (B, n), generator=gen)
    uniforms = tree_uniforms(n, B, generator=gen)
    to = lambda x: None if x is None else x.to(device)  # noqa: E731
    return to(parents), to(tokens), to(target), to(uniforms), to(draft)


@needs_triton
@pytest.mark.parametrize("with_draft", [True, False])
@pytest.mark.parametrize("n,V", [(0, 7), (1, 5), (9, 37), (14, 9001)])
def test_tree_rejection_kernel_matches_ref(with_draft, n, V):
    rng = random.Random(n * 31 + V)
    gen = torch.Generator().manual_seed(n * 31 + V)
    for trial in range(3):
        B = 4 if V < 1000 else 2  # V > 8192: two vocab blocks
        inputs = _sampler_inputs(rng, gen, B, n, V, with_draft, shared_tree=trial == 0)
        max_depth = [None, 2, n + 3][trial]
        ref = tree_rejection_sample_ref(*inputs, max_depth=max_depth)
        with _kernel():
            got = tree_rejection_sample(*inputs, max_depth=max_depth)
        for a, b in zip(ref, got):
            assert torch.equal(a.cpu(), b.cpu()), (trial, ref, got)
        path, num, bonus = ref
        md = n if max_depth is None else max_depth
        assert path.shape == (B, md) and (num <= md).all()
        assert (inputs[2].cpu()[..., V // 2] == 0).all() and (bonus != V // 2).all()


@needs_triton
def test_tree_rejection_unbatched_and_deep_acceptance():
    """Unbatched shapes; draft == target on a chain accepts everything (min(1, p/q) = 1)."""
    gen = torch.Generator().manual_seed(3)
    n, V = 6, 11
    probs = torch.softmax(torch.randn(n + 1, V, generator=gen), -1)
    tokens = torch.multinomial(probs[:n], 1, generator=gen)[:, 0]
    parents = torch.arange(-1, n - 1)
    u = tree_uniforms(n, generator=gen)
    args = [x.to(DEV) for x in (parents, tokens, probs, u, probs[:n])]
    ref = tree_rejection_sample_ref(*args)
    with _kernel():
        got = tree_rejection_sample(*args)
    assert ref[1].item() == n and ref[0].tolist() == list(range(n))
    for a, b in zip(ref, got):
        assert a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("use_kernel", [False, pytest.param(True, marks=needs_triton)])
def test_tree_rejection_one_hot_target_is_greedy(use_kernel):
    """Temperature -> 0 (one-hot target rows), one-hot proposals with distinct sibling
    tokens: sampling must reproduce greedy acceptance exactly, whatever the uniforms."""
    rng = random.Random(11)
    V = 4
    for _ in range(10 if use_kernel else 40):
        n = rng.choice([1, 6, 15])
        parents, tokens = [], []
        for i in range(n):
            p = rng.randint(-1, i - 1)
            used = {t for q, t in zip(parents, tokens) if q == p}
            free = [t for t in range(V) if t not in used]
            if not free:
                p, free = i - 1, list(range(V))
            parents.append(p)
            tokens.append(rng.choice(free))
        argmax = [rng.randrange(V) for _ in range(n + 1)]
        target = torch.nn.functional.one_hot(torch.tensor(argmax), V).float()
        u = tree_uniforms(n, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
        args = [torch.tensor(parents, device=DEV), torch.tensor(tokens, device=DEV), target.to(DEV), u.to(DEV)]
        with backend.override(triton=use_kernel):
            path, num, bonus = (tree_rejection_sample if use_kernel else tree_rejection_sample_ref)(*args)
        expect = greedy_accept(parents, tokens, argmax)
        assert path[: num.item()].tolist() == expect and (path[num.item():] == -1).all()
        assert bonus.item() == argmax[expect[-1] + 1 if expect else 0]


def test_tree_rejection_same_seed_same_output():
    rng, gen = random.Random(5), torch.Generator().manual_seed(5)
    inputs = _sampler_inputs(rng, gen, 64, 8, 13, True, shared_tree=True, device="cpu")
    a = tree_rejection_sample_ref(*inputs)
    b = tree_rejection_sample_ref(*inputs)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    other = tree_uniforms(8, 64, generator=torch.Generator().manual_seed(6))
    c = tree_rejection_sample_ref(*inputs[:3], other, inputs[4])
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


# ------------------------------------------------- losslessness of the sampling rule
V_DIST = 5
# Fixed 2-level tree, node index order = examination order. "s" nodes are sampled from
# their draft row (i.i.d. siblings), "h" nodes are deterministic (one-hot) proposals.
#   node: 0    1    2    3        4      5        6
#   par : -1   -1   -1   0        0      1        2
#   kind: s    s    h=3  s|x0     h=1    s|x1     h=0
DIST_PARENTS = [-1, -1, -1, 0, 0, 1, 2]


def _dist_tables():
    g = torch.Generator().manual_seed(1234)
    dirichlet = lambda *s: -torch.log(torch.rand(*s, generator=g))  # Dirichlet(1) once normalized  # noqa: E731
    p0 = dirichlet(V_DIST)
    p0 = p0 / p0.sum()
    P1 = dirichlet(V_DIST, V_DIST)
    P1 = P1 / P1.sum(-1, keepdim=True)      # target: p(t2 | t1) = P1[t1]
    q0 = torch.softmax(torch.randn(V_DIST, generator=g) * 1.5, -1)  # draft differs from target
    Q1 = torch.softmax(torch.randn(V_DIST, V_DIST, generator=g) * 1.5, -1)
    return p0, P1, q0, Q1


def _committed_first_two(N: int, seed: int, sampler=tree_rejection_sample_ref):
    p0, P1, q0, Q1 = _dist_tables()
    g = torch.Generator().manual_seed(seed)
    draw = lambda probs: torch.multinomial(probs, 1, replacement=True, generator=g)[:, 0]  # noqa: E731
    oh = lambda t: torch.nn.functional.one_hot(torch.full((N,), t), V_DIST).float()  # noqa: E731
    x0, x1 = draw(q0.expand(N, V_DIST)), draw(q0.expand(N, V_DIST))
    x2 = torch.full((N,), 3)
    x3, x4, x5, x6 = draw(Q1[x0]), torch.full((N,), 1), draw(Q1[x1]), torch.full((N,), 0)
    tokens = torch.stack([x0, x1, x2, x3, x4, x5, x6], 1)
    target = torch.stack([p0.expand(N, V_DIST)] + [P1[tokens[:, i]] for i in range(7)], 1)
    draft = torch.stack([q0.expand(N, V_DIST), q0.expand(N, V_DIST), oh(3), Q1[x0], oh(1), Q1[x1], oh(0)], 1)
    u = tree_uniforms(7, N, generator=g)
    path, num, bonus = sampler(torch.tensor(DIST_PARENTS), tokens, target, u, draft)
    acc_tok = tokens.gather(1, path.clamp(min=0))
    t1 = torch.where(num >= 1, acc_tok[:, 0], bonus)
    nxt = draw(P1[t1])  # a step that commits only the bonus: the next step samples the target
    t2 = torch.where(num >= 2, acc_tok[:, 1], torch.where(num == 1, bonus, nxt))
    return t1, t2, num


def _tv(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * (counts / counts.sum() - probs).abs().sum().item()


def test_tree_rejection_ref_is_lossless():
    """The first committed token ~ p0 and the first two ~ p0(t1) P1[t1](t2); the
    total-variation distance shrinks as samples grow (vLLM's rejection-sampler test)."""
    p0, P1, _, _ = _dist_tables()
    joint = p0[:, None] * P1
    tv1, tv2 = [], []
    for i, N in enumerate([2_000, 20_000, 200_000]):
        t1, t2, num = _committed_first_two(N, seed=10 + i)
        tv1.append(_tv(torch.bincount(t1, minlength=V_DIST).double(), p0.double()))
        tv2.append(_tv(torch.bincount(t1 * V_DIST + t2, minlength=V_DIST ** 2).double(), joint.flatten().double()))
        if i == 2:  # the tree is exercised: some steps accept 0, 1 and 2 nodes
            assert {0, 1, 2} <= set(num.unique().tolist())
    assert tv1[2] < tv1[0] and tv2[2] < tv2[0], (tv1, tv2)
    assert tv1[2] < 0.006 and tv2[2] < 0.012, (tv1, tv2)


@pytest.mark.parametrize("with_draft", [True, False])
def test_tree_rejection_ref_one_hot_proposals_lossless(with_draft):
    """All-deterministic root children (draft_probs None, or explicit one-hot rows)."""
    p0, P1, _, _ = _dist_tables()
    N = 200_000
    g = torch.Generator().manual_seed(77)
    tokens = torch.tensor([2, 0, 2, 4]).expand(N, 4)  # a duplicate proposal (2) included
    target = torch.stack([p0.expand(N, V_DIST)] + [P1[tokens[:, i]] for i in range(4)], 1)
    draft = torch.nn.functional.one_hot(tokens, V_DIST).float() if with_draft else None
    path, num, bonus = tree_rejection_sample_ref(torch.tensor([-1, -1, -1, -1]), tokens, target,
                                                 tree_uniforms(4, N, generator=g), draft)
    t1 = torch.where(num >= 1, tokens.gather(1, path.clamp(min=0))[:, 0], bonus)
    assert _tv(torch.bincount(t1, minlength=V_DIST).double(), p0.double()) < 0.006
    assert not (path[:, 0] == 2).any()  # the duplicate is never accepted


# ------------------------------------------------------------------ GPU-only extras
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_compact_kv_in_a_cuda_graph():
    """Realistic cache (bf16, 32 layers x 8 heads x 128), captured in a CUDA graph with the
    accepted count and the start on the device (no host sync), replayed."""
    L, H, S, D = 32, 8, 1024, 128
    k = torch.randn(L, H, S, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    idx = torch.tensor([0, 3, 8, 9, 15, 15], device="cuda")  # padded past num
    num, start = torch.tensor(5, device="cuda"), torch.tensor(300, device="cuda")
    k_ref, v_ref = k.clone(), v.clone()
    compact_kv_ref(k_ref, v_ref, idx, 5, start=300)
    k_g, v_g = k.clone(), v.clone()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        compact_kv(k_g, v_g, idx, num, start=start)
    k_g.copy_(k)
    v_g.copy_(v)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(k_g, k_ref) and torch.equal(v_g, v_ref)
