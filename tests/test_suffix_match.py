"""The device suffix matcher and its trie against their references (random histories)."""
import random

import pytest
import torch

from specdec.ops.suffix_match import (candidates_to_tree, candidates_to_tree_ref, suffix_candidates,
                                      suffix_candidates_ref)
from specdec.tree import TokenTree

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _history(rng, n, vocab):
    return [rng.randrange(vocab) for _ in range(n)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(40))
def test_candidates_match_the_reference(seed, device):
    rng = random.Random(seed)
    length = rng.choice([1, 2, 3, 7, 33, 129, 250])
    spare = rng.choice([0, 1, 5, 31])  # buffer beyond the history (a fixed-size device buffer)
    hist = _history(rng, length, rng.choice([2, 3, 5, 50]))
    opts = dict(max_order=rng.choice([1, 2, 4, 5]), num_candidates=rng.choice([1, 3, 8]),
                depth=rng.choice([1, 4, 7]), max_scan=rng.choice([1, 8, 32, 1000]))
    buf = torch.tensor(hist + [rng.randrange(50) for _ in range(spare)], dtype=torch.long, device=device)
    cands, lens = suffix_candidates(buf, torch.tensor(length, device=device), **opts)
    want = suffix_candidates_ref(hist, **opts)
    got = [cands[c, :lens[c]].tolist() for c in range(opts["num_candidates"]) if lens[c] > 0]
    assert got == want, (hist, opts)
    assert (cands[len(want):] == -1).all() and (lens[len(want):] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(30))
def test_tree_matches_the_reference_and_holds_every_candidate(seed, device):
    rng = random.Random(100 + seed)
    hist = _history(rng, rng.choice([20, 61, 200]), rng.choice([2, 3, 4]))
    C, L = rng.choice([2, 5, 8]), rng.choice([1, 3, 6])
    want = suffix_candidates_ref(hist, max_order=3, num_candidates=C, depth=L, max_scan=64)
    cands, lens = suffix_candidates(torch.tensor(hist, device=device), len(hist), max_order=3, num_candidates=C,
                                    depth=L, max_scan=64)
    tokens, parents, valid = candidates_to_tree(cands, lens)
    ref_tokens, ref_parents, ref_valid = candidates_to_tree_ref(want, C, L)
    assert tokens.tolist() == ref_tokens and valid.tolist() == ref_valid
    keep = [i for i, v in enumerate(ref_valid) if v]
    assert [parents.tolist()[i] for i in keep] == [ref_parents[i] for i in keep]
    # the valid nodes form a tree (parents valid and earlier) whose root paths spell the candidates
    remap = {old: new for new, old in enumerate(keep)}
    tree = TokenTree(torch.tensor([ref_tokens[i] for i in keep]),
                     torch.tensor([-1 if ref_parents[i] < 0 else remap[ref_parents[i]] for i in keep]))
    paths = {tuple(tree.tokens[tree.path_to(i)].tolist()) for i in range(len(tree))}
    for cand in want:
        assert all(tuple(cand[:j + 1]) in paths for j in range(len(cand)))
    assert len(tree) == len({tuple(c[:j + 1]) for c in want for j in range(len(c))})  # no duplicate nodes


def test_candidates_on_a_copying_history():
    """A history that repeats itself: the continuation of the longest, latest match first."""
    hist = [5, 6, 7, 8, 9, 1, 5, 6, 7, 2, 5, 6, 7]
    cands, lens = suffix_candidates(torch.tensor(hist), len(hist), max_order=3, num_candidates=3, depth=3,
                                    max_scan=16)
    assert [cands[c, :lens[c]].tolist() for c in range(3)] == [[2, 5, 6], [8, 9, 1], []]  # (two matches only)
    hist = [3, 4, 3, 4, 3, 4, 3]  # overlapping matches: the latest one is cut short by the end of the history
    cands, lens = suffix_candidates(torch.tensor(hist), len(hist), max_order=2, num_candidates=3, depth=4,
                                    max_scan=16)
    assert [cands[c, :lens[c]].tolist() for c in range(3)] == [[4, 3], [4, 3, 4, 3], []]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_the_device():
    """Both ops run with a device-side length and no synchronisation (CUDA-graph capturable)."""
    hist = torch.randint(0, 4, (300,), device="cuda")
    length = torch.tensor(250, device="cuda")
    suffix_candidates(hist, length, max_order=4, num_candidates=8, depth=6, max_scan=64)  # (warm-up)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cands, lens = suffix_candidates(hist, length, max_order=4, num_candidates=8, depth=6, max_scan=64)
        candidates_to_tree(cands, lens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
