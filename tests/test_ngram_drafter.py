"""NgramDrafter: prompt lookup, tries of several candidates, budget, target top-k."""
import pytest
import torch

from specdec.config import SamplingParams, TreeBudget
from specdec.drafters.base import DraftRequest, Drafter, VerifyResult
from specdec.drafters.ngram import NgramDrafter
from specdec.ops.ngram import has_native_ngram_index
from specdec.ops import greedy_accept
from specdec.tree import TokenTree

T = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731


def request(tokens, max_nodes=64, max_depth=8):
    return DraftRequest(T(tokens), TreeBudget(max_nodes=max_nodes, max_depth=max_depth), SamplingParams())


def edges(tree: TokenTree):
    """{(parent token path, token)}: the trie independent of node numbering."""
    return {tuple(int(tree.tokens[j]) for j in tree.path_to(i)) for i in range(len(tree))}


NATIVE = [False] + ([True] if has_native_ngram_index() else [])


@pytest.fixture(params=NATIVE, ids=lambda n: "native" if n else "ref")
def native(request):
    return request.param


def test_is_a_drafter(native):
    assert isinstance(NgramDrafter(native=native), Drafter)


def test_prompt_lookup_repeated_pattern(native):
    d = NgramDrafter(max_order=3, max_continuation=6, native=native)
    prompt = [5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6, 7]
    d.reset(T(prompt))
    tree = d.propose(request(prompt, max_depth=4))
    assert tree.draft_probs is None
    assert tree.paths()[0] == [0, 1, 2, 3]  # the first path is the longest match, in order
    assert tree.tokens[:4].tolist() == [8, 9, 1, 2]


def test_candidates_form_a_trie(native):
    d = NgramDrafter(max_order=2, max_continuation=3, num_candidates=8, native=native)
    prompt = [1, 2, 3, 4, 0, 1, 2, 3, 5, 0, 1, 2, 6, 0, 1, 2]
    d.reset(T(prompt))
    tree = d.propose(request(prompt))
    # key (1, 2): [6, 0, 1] (most recent), [3, 5, 0], [3, 4, 0]; the two 3s share a node.
    assert tree.tokens.tolist()[:6] == [6, 0, 1, 3, 5, 0]
    assert tree.parents.tolist()[:6] == [-1, 0, 1, -1, 3, 4]
    assert edges(tree) >= {(6, 0, 1), (3, 5, 0), (3, 4, 0), (3, 4)}
    roots = [int(tree.tokens[i]) for i in tree.children()[0]]
    assert len(roots) == len(set(roots))  # shared prefixes merged: no repeated child
    for ch in tree.children():
        toks = [int(tree.tokens[i]) for i in ch]
        assert len(toks) == len(set(toks))


def test_respects_budget(native):
    d = NgramDrafter(max_order=2, max_continuation=8, num_candidates=8, native=native)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 9, 9, 8, 7, 6, 5, 0, 1, 2]
    d.reset(T(prompt))
    full = d.propose(request(prompt))
    assert len(full) > 8
    for max_nodes, max_depth in [(5, 8), (64, 3), (4, 2), (1, 1)]:
        tree = d.propose(request(prompt, max_nodes=max_nodes, max_depth=max_depth))
        assert 0 < len(tree) <= max_nodes
        assert int(tree.depth.max()) <= max_depth
        assert edges(tree) <= edges(full)  # a cut of the full trie, best paths kept
    assert len(d.propose(request(prompt, max_nodes=0))) == 0
    assert len(d.propose(request(prompt, max_depth=0))) == 0


def test_nothing_matches_gives_empty_tree(native):
    d = NgramDrafter(native=native)
    d.reset(T([1, 2, 3, 4]))
    tree = d.propose(request([1, 2, 3, 4, 99]))
    assert len(tree) == 0 and tree.tokens.dtype == torch.long
    d.reset(T([]))
    assert len(d.propose(request([7]))) == 0


def _verify(tree, accepted, logits, tokens_before):
    """A VerifyResult whose bonus token is the argmax after the last accepted node."""
    acc_tokens = [int(tree.tokens[i]) for i in accepted]
    bonus = int(logits[0 if not accepted else accepted[-1] + 1].argmax())
    committed = acc_tokens + [bonus]
    return VerifyResult(tree, accepted, T(committed), T(tokens_before + committed), logits)


def _logits(n_rows, vocab, tops):
    """[n_rows, vocab] logits whose ranking at row r starts with tops[r]."""
    lg = torch.zeros(n_rows, vocab)
    for r, top in tops.items():
        for rank, tok in enumerate(top):
            lg[r, tok] = 10.0 - rank
    return lg


@pytest.mark.parametrize("use_topk", [True, False])
def test_target_topk_at_root_is_proposed_later(native, use_topk):
    d = NgramDrafter(max_order=3, topk=3, use_target_topk=use_topk, native=native)
    prompt = [1, 2, 3]
    d.reset(T(prompt))
    tree = d.propose(request(prompt))
    assert len(tree) == 0  # nothing ever followed 3
    res = _verify(tree, [], _logits(1, 20, {0: [7, 8, 9]}), prompt)
    d.update(res)
    tokens = res.tokens.tolist() + [1, 2, 3]  # the context (.., 2, 3) comes back
    later = d.propose(request(tokens))
    roots = {int(later.tokens[i]) for i in later.children()[0]}
    assert roots == ({7, 8, 9} if use_topk else {7})
    assert later.paths()[0] and int(later.tokens[later.paths()[0][0]]) == 7  # text first


def test_target_topk_at_accepted_and_rejected_nodes(native):
    for all_nodes in (False, True):
        d = NgramDrafter(max_order=2, topk=2, max_continuation=2, topk_all_nodes=all_nodes, native=native)
        prompt = [1, 2, 3, 1, 2, 4, 1, 2]
        d.reset(T(prompt))
        tree = d.propose(request(prompt))
        assert tree.tokens.tolist() == [4, 1, 3, 1]  # paths [4, 1] and [3, 1]
        assert tree.parents.tolist() == [-1, 0, -1, 2]
        # target: accepts node 0 (4); after it prefers 11 then 12; after the rejected
        # node 2 (context .., 2, 3) it would say 13 then 14.
        logits = _logits(5, 20, {0: [4, 3], 1: [11, 12], 2: [5, 6], 3: [13, 14], 4: [15, 16]})
        res = _verify(tree, [0], logits, prompt)
        assert res.committed.tolist() == [4, 11]
        d.update(res)
        after_acc = d.propose(request(prompt + [4, 11, 9, 2, 4]))
        roots = {int(after_acc.tokens[i]) for i in after_acc.children()[0]}
        assert {11, 12} <= roots  # 11 from the text, 12 only from the target's top-k
        after_rej = d.propose(request(prompt + [4, 11, 9, 2, 3]))
        roots = {int(after_rej.tokens[i]) for i in after_rej.children()[0]}
        assert ({13, 14} <= roots) == all_nodes


def test_incremental_updates_match_one_shot_insert(native):
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 4, (120,), generator=g).tolist()
    inc = NgramDrafter(max_order=3, max_continuation=4, use_target_topk=False, max_per_key=10**4, native=native)
    inc.reset(T(seq[:10]))
    pos = 10
    while pos < len(seq):
        step = int(torch.randint(1, 6, (1,), generator=g))
        new = seq[pos:pos + step]
        pos += len(new)
        inc.update(VerifyResult(TokenTree.empty(), [], T(new), T(seq[:pos])))
    one = NgramDrafter(max_order=3, max_continuation=4, use_target_topk=False, max_per_key=10**4, native=native)
    one.reset(T(seq))
    for ctx in ([a, b, c] for a in range(4) for b in range(4) for c in range(4)):
        for n in (1, 2, 3):
            got = sorted(map(tuple, inc.index.continuations(ctx[-n:])))
            assert got == sorted(map(tuple, one.index.continuations(ctx[-n:])))


def test_toy_greedy_loop_is_lossless_and_accepts(native):
    """A toy target (next token = fixed function of the last two) in a greedy loop:
    the output equals the target's own greedy text and drafts get accepted."""
    vocab = 12
    table = torch.randn(vocab, vocab, vocab, generator=torch.Generator().manual_seed(1))

    def logits_after(ctx):  # [vocab]
        return table[ctx[-2], ctx[-1]]

    prompt = [3, 5, 7, 3, 5]
    ref = list(prompt)
    while len(ref) < len(prompt) + 60:
        ref.append(int(logits_after(ref).argmax()))

    d = NgramDrafter(max_order=3, native=native)
    d.reset(T(prompt))
    tokens, steps = list(prompt), 0
    while len(tokens) < len(prompt) + 60:
        tree = d.propose(request(tokens, max_nodes=16, max_depth=6))
        rows = [logits_after(tokens)] + [
            logits_after(tokens + [int(tree.tokens[j]) for j in tree.path_to(i)]) for i in range(len(tree))]
        logits = torch.stack(rows)  # [n + 1, vocab]
        accepted = greedy_accept(tree.parents.tolist(), tree.tokens.tolist(), logits.argmax(-1).tolist())
        res = _verify(tree, accepted, logits, tokens)
        d.update(res)
        tokens = res.tokens.tolist()
        steps += 1
    assert tokens[:len(ref)] == ref
    assert (len(tokens) - len(prompt)) / steps > 2.0  # the toy text cycles: lookup pays off


def test_verify_result_topk_is_computed_once_and_shared():
    """MergedDrafter asks for its drafters' largest k first; the others slice it."""
    from specdec.drafters.merged import MergedDrafter
    from specdec.drafters.recycling import RecyclingDrafter
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    tree = TokenTree(torch.tensor([3, 4, 5]), torch.tensor([-1, 0, 1]))
    res = VerifyResult(tree, [0], torch.tensor([3, 9]), torch.tensor([1, 2, 3, 9]), logits)
    full = res.target_topk(8)
    assert torch.equal(full, logits.topk(8, -1).indices)
    cached = res._topk
    assert torch.equal(res.target_topk(4), full[:, :4]) and res._topk is cached  # sliced, not recomputed
    assert torch.equal(res.target_topk_host(4), full[:, :4].cpu())
    merged = MergedDrafter([NgramDrafter(), RecyclingDrafter(vocab_size=50)])
    calls = []
    real_topk = torch.Tensor.topk
    res2 = VerifyResult(tree, [0], torch.tensor([3, 9]), torch.tensor([1, 2, 3, 9]), logits)
    merged.reset(torch.tensor([1, 2, 3]))
    try:
        torch.Tensor.topk = lambda self, *a, **kw: calls.append(a) or real_topk(self, *a, **kw)
        merged.update(res2)
    finally:
        torch.Tensor.topk = real_topk
    assert len(calls) == 1 and calls[0][0] == 8  # one topk, at recycling's k = 8 > ngram's 4
