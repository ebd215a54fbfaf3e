import pytest
import torch

from specdec import tree as T
from specdec.ops import greedy_accept
from specdec.ops import backend


def test_chain_shapes():
    t = T.chain([5, 6, 7])
    assert t.parents.tolist() == [-1, 0, 1]
    assert t.depth.tolist() == [1, 2, 3]
    assert t.ancestor_mask.tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert t.paths() == [[0, 1, 2]]


def test_validation_rejects_bad_parents():
    with pytest.raises(ValueError):
        T.TokenTree([1, 2], [1, -1])  # parent after child
    with pytest.raises(ValueError):
        T.TokenTree([1, 2], [-1, 1])  # self loop
    with pytest.raises(ValueError):
        T.TokenTree([1, 2], [-1])


def test_from_paths_merges_prefixes_and_respects_budget():
    t = T.from_paths([[1, 2, 3], [1, 2, 4], [5]])
    assert t.tokens.tolist() == [1, 2, 3, 4, 5]
    assert t.parents.tolist() == [-1, 0, 1, 1, -1]
    assert sorted(map(tuple, t.paths())) == [(0, 1, 2), (0, 1, 3), (4,)]
    assert len(T.from_paths([[1, 2, 3], [1, 2, 4], [5]], max_nodes=3)) == 3


def test_merge_dedupes_and_keeps_best_under_budget():
    a = T.TokenTree([1, 2], [-1, 0], scores=torch.tensor([0.9, 0.5]))
    b = T.TokenTree([1, 3, 7], [-1, 0, -1], scores=torch.tensor([0.8, 0.6, 0.1]))
    m = T.merge([a, b])
    assert sorted(map(tuple, [[int(m.tokens[i]) for i in p] for p in m.paths()])) == [(1, 2), (1, 3), (7,)]
    m3 = T.merge([a, b], max_nodes=3)
    assert len(m3) == 3 and 7 not in m3.tokens.tolist()  # lowest score dropped


def test_best_first_and_topk_expand():
    vocab = 10
    g = torch.Generator().manual_seed(0)
    table = torch.softmax(torch.randn(vocab, vocab, generator=g), -1)
    nxt = lambda path: table[path[-1]]  # noqa: E731
    root = table[0]
    full = T.topk_expand(nxt, root, depth=3, k=2)
    assert len(full) == 2 + 4 + 8 and int(full.depth.max()) == 3
    bf = T.best_first(nxt, root, max_nodes=9, k=3)
    assert len(bf) == 9
    # best-first keeps the highest cumulative probabilities: every kept score >= any pruned sibling score
    assert torch.all(bf.scores[1:] <= bf.scores.max())
    assert abs(float(bf.scores[0]) - float(root.max())) < 1e-6


def test_with_root_mask():
    t = T.TokenTree([4, 5, 6], [-1, -1, 0])
    parents, m = t.with_root()
    assert parents.tolist() == [-1, 0, 0, 1]
    assert m.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]


def _random_tree(n, vocab, g):
    parents = [-1] + [int(torch.randint(-1, i, (1,), generator=g)) for i in range(1, n)]
    return torch.tensor(parents), torch.randint(0, vocab, (n,), generator=g)


def test_greedy_accept_paths_match():
    g = torch.Generator().manual_seed(1)
    for n in [0, 1, 3, 17, 64]:
        for _ in range(20):
            parents, tokens = _random_tree(n, 3, g) if n else (torch.zeros(0, dtype=torch.long),) * 2
            argmax = torch.randint(0, 3, (n + 1,), generator=g)
            ref = greedy_accept(parents.tolist(), tokens.tolist(), argmax.tolist())
            # the path really matches: each token equals argmax at its parent
            prev = -1
            for v in ref:
                assert int(parents[v]) == prev and int(tokens[v]) == int(argmax[prev + 1])
                prev = v


def test_native_extension_is_built():
    assert backend.native() is not None, "specdec._C missing: install with `pip install --no-build-isolation -e .`"
