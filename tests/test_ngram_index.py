"""NgramIndex: the native index must return exactly what the reference returns;
both must follow the documented semantics (csrc/ngram_index.h)."""
import random

import pytest

from specdec.ops import backend
from specdec.ops.ngram import NgramIndexRef, has_native_ngram_index, make_ngram_index


def _native(**kw):
    if not has_native_ngram_index():
        pytest.skip("specdec._C.NgramIndex is not built")
    return make_ngram_index(native=True, **kw)


IMPLS = {"ref": lambda **kw: NgramIndexRef(**kw), "native": _native}


@pytest.fixture(params=list(IMPLS))
def make(request):
    return IMPLS[request.param]


# ----------------------------------------------------------- exact semantics
def test_insert_and_lookup_by_hand(make):
    idx = make(max_order=2, max_continuation=3, capacity=100, max_per_key=8)
    idx.insert([1, 2, 3, 1, 2, 4, 1, 2])
    # key (1, 2): after position 2 -> [3, 1, 2]; after position 5 -> [4, 1, 2] (more recent)
    assert idx.continuations([1, 2]) == [[4, 1, 2], [3, 1, 2]]
    assert idx.continuations([2]) == [[4, 1, 2], [3, 1, 2]]
    # key (1,): after 0 -> [2,3,1], after 3 -> [2,4,1], after 6 -> [2] (a prefix: touches [2,4,1])
    assert idx.continuations([1]) == [[2, 4, 1], [2, 3, 1]]
    # longest key (9, 2)? absent -> order 1 key (2,): already-returned duplicates skipped
    assert idx.lookup([9, 1, 2], 5) == [[4, 1, 2], [3, 1, 2]]
    assert idx.lookup([9, 2], 5) == [[4, 1, 2], [3, 1, 2]]
    assert idx.lookup([3], 5) == [[1, 2, 4]]
    assert idx.lookup([9, 1], 1) == [[2, 4, 1]]
    assert idx.lookup([7], 5) == []


def test_longest_key_first_then_shorter(make):
    idx = make(max_order=3, max_continuation=2, capacity=100, max_per_key=8)
    idx.insert([5, 1, 2, 8, 8])   # (5,1,2) -> [8, 8]
    idx.insert([6, 1, 2, 9, 9])   # (6,1,2) -> [9, 9]; (1,2) and (2,) now prefer [9, 9]
    assert idx.lookup([5, 1, 2], 4) == [[8, 8], [9, 9]]
    assert idx.lookup([6, 1, 2], 4) == [[9, 9], [8, 8]]
    assert idx.lookup([7, 1, 2], 4) == [[9, 9], [8, 8]]


def test_continuation_grows_and_prefixes_touch(make):
    idx = make(max_order=1, max_continuation=3, capacity=100, max_per_key=8)
    idx.insert([1, 2])
    assert idx.continuations([1]) == [[2]]
    idx.insert([1, 2, 3], start=1)   # the cut-short continuation grows (replaced, not added)
    assert idx.continuations([1]) == [[2, 3]]
    assert len(idx) == 2              # (1)->[2,3], (2)->[3]
    idx.insert([1, 5, 6])
    assert idx.continuations([1]) == [[5, 6], [2, 3]]
    idx.insert([1, 2])                # prefix of [2, 3]: touches it, adds nothing
    assert idx.continuations([1]) == [[2, 3], [5, 6]]
    assert len(idx) == 4


def test_insert_start_skips_earlier_positions(make):
    idx = make(max_order=2, max_continuation=2, capacity=100, max_per_key=8)
    idx.insert([1, 2, 3, 4], start=3)  # only continuations starting at position 3
    assert idx.continuations([2, 3]) == [[4]] and idx.continuations([3]) == [[4]]
    assert idx.continuations([1]) == [] and idx.continuations([1, 2]) == []
    assert len(idx) == 2


def test_insert_next_best_first(make):
    idx = make(max_order=2, max_continuation=4, capacity=100, max_per_key=8)
    idx.insert([1, 2, 3, 4])
    idx.insert_next([9, 1, 2], [3, 7, 8])   # 3 touches the text continuation [3, 4]
    assert idx.continuations([1, 2]) == [[3, 4], [7], [8]]
    assert idx.continuations([2]) == [[3, 4], [7], [8]]
    assert idx.continuations([9, 1]) == []  # only suffixes of the context
    assert idx.lookup([5, 1, 2], 10) == [[3, 4], [7], [8]]
    idx.insert_next([], [1, 2])             # no context, no keys
    # (1)->[2,3,4]  (2)->[3,4],[7],[8]  (3)->[4]  (1,2)->[3,4],[7],[8]  (2,3)->[4]
    assert len(idx) == 9 and idx.num_keys() == 5


# ----------------------------------------------------------------- memory cap
def test_global_cap_evicts_least_recent(make):
    idx = make(max_order=1, max_continuation=1, capacity=3, max_per_key=8)
    idx.insert([1, 2, 3, 4, 5])  # (1)->2, (2)->3, (3)->4, (4)->5 in that order
    assert len(idx) == 3 and idx.num_keys() == 3
    assert idx.continuations([1]) == [] and idx.continuations([2]) == [[3]]
    idx.insert([2, 3])           # touches (2)->3: now (3)->4 is the least recent
    idx.insert([6, 7])
    assert idx.continuations([3]) == [] and idx.continuations([2]) == [[3]]
    assert idx.lookup([4], 5) == [[5]] and idx.lookup([6], 5) == [[7]]


def test_cap_holds_under_random_load(make):
    rng = random.Random(0)
    idx = make(max_order=3, max_continuation=4, capacity=37, max_per_key=3)
    for _ in range(30):
        idx.insert([rng.randrange(6) for _ in range(rng.randrange(1, 25))])
        idx.insert_next([rng.randrange(6) for _ in range(3)], [rng.randrange(6) for _ in range(4)])
        assert len(idx) <= 37
        assert all(len(idx.continuations([a])) <= 3 for a in range(6))
    assert len(idx) == 37


def test_per_key_cap(make):
    idx = make(max_order=1, max_continuation=1, capacity=100, max_per_key=2)
    idx.insert([0, 1, 0, 2, 0, 3])
    assert idx.continuations([0]) == [[3], [2]]


# ------------------------------------------------------------------ edge cases
def test_edge_cases(make):
    idx = make(max_order=4, max_continuation=3, capacity=100, max_per_key=8)
    assert idx.lookup([], 5) == [] and idx.lookup([1], 5) == []  # empty index
    idx.insert([])
    idx.insert([7])  # a single token has nothing after it
    assert len(idx) == 0
    idx.insert([1, 2, 3])
    assert idx.lookup([], 5) == []            # empty context
    assert idx.lookup([1, 2, 3, 9], 0) == []  # max_candidates = 0
    assert idx.lookup([2], 5) == [[3]]        # context shorter than max_order
    assert idx.lookup([1], 5) == [[2, 3]]
    with pytest.raises(ValueError):
        idx.lookup([1], -1)
    with pytest.raises(ValueError):
        idx.insert([1, 2], -1)
    with pytest.raises(ValueError):
        make(max_order=0)
    with pytest.raises(ValueError):
        make(capacity=0)
    assert (idx.max_order, idx.max_continuation, idx.capacity, idx.max_per_key) == (4, 3, 100, 8)
    idx.clear()
    assert len(idx) == 0 and idx.num_keys() == 0 and idx.lookup([1], 5) == []


# ----------------------------------------------------- native == reference
@pytest.mark.parametrize("seed", range(6))
def test_native_matches_reference(seed):
    rng = random.Random(seed)
    cfg = dict(max_order=rng.randint(1, 4), max_continuation=rng.randint(1, 5),
               capacity=rng.choice([5, 40, 10_000]), max_per_key=rng.randint(1, 5))
    ref, nat = NgramIndexRef(**cfg), _native(**cfg)
    vocab = rng.randint(2, 6)  # small: keys repeat, prefixes collide, caps bite
    seq: list[int] = []
    for _ in range(200):
        op = rng.random()
        if op < 0.35:  # generation grows by a few tokens, inserted incrementally
            old = len(seq)
            seq += [rng.randrange(vocab) for _ in range(rng.randint(1, 5))]
            start = max(0, old - cfg["max_continuation"] + 1)
            for idx in (ref, nat):
                idx.insert(seq, start)
        elif op < 0.45:
            toks = [rng.randrange(vocab) for _ in range(rng.randint(0, 12))]
            start = rng.randint(0, 3)
            for idx in (ref, nat):
                idx.insert(toks, start)
        elif op < 0.65:
            ctx = [rng.randrange(vocab) for _ in range(rng.randint(0, 6))]
            nxt = [rng.randrange(vocab + 2) for _ in range(rng.randint(0, 4))]
            for idx in (ref, nat):
                idx.insert_next(ctx, nxt)
        else:
            ctx = seq[-rng.randint(0, 6):] if rng.random() < 0.7 else \
                [rng.randrange(vocab) for _ in range(rng.randint(0, 6))]
            m = rng.randint(0, 10)
            assert nat.lookup(ctx, m) == ref.lookup(ctx, m)
        assert len(nat) == len(ref) and nat.num_keys() == ref.num_keys()
    for a in range(vocab):
        for b in range(vocab):
            assert nat.continuations([a, b]) == ref.continuations([a, b])
        assert nat.continuations([a]) == ref.continuations([a])


def test_factory_picks_backend():
    with backend.override(native=False):
        assert isinstance(make_ngram_index(2, 3, 10, 2), NgramIndexRef)
        with pytest.raises(RuntimeError):
            make_ngram_index(native=True)
    assert isinstance(make_ngram_index(native=False), NgramIndexRef)
    if has_native_ngram_index():
        assert not isinstance(make_ngram_index(), NgramIndexRef)
