"""Sampling must follow the target's distribution exactly (tree rejection sampling)."""
import pytest
import torch

import specdec
from specdec.config import SamplingParams
from specdec.sampling import accept_sampling, process
from specdec.tree import TokenTree

from conftest import tiny_model

V = 4


def _tables(seed=0):
    g = torch.Generator().manual_seed(seed)
    p0 = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)  # target at root
    p1 = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)  # target after token a
    q0 = torch.softmax(torch.randn(V, generator=g), -1)  # draft at root
    q1 = torch.softmax(torch.randn(V, V, generator=g), -1)  # draft after token a
    return p0, p1, q0, q1


def _tv(counts: torch.Tensor, exact: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - exact).abs().sum())


def _sample_pairs(n, mode, seed, p0, p1, q0, q1, rule=accept_sampling):
    """Empirical joint of the first two committed tokens: [V, V] counts."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V, V)
    for _ in range(n):
        if mode == "sampled":  # two i.i.d. draft children at the root, one child each below
            a = torch.multinomial(q0, 2, replacement=True, generator=g)
            b = torch.stack([torch.multinomial(q1[x], 1, generator=g)[0] for x in a])
            tree = TokenTree(torch.cat([a, b]), torch.tensor([-1, -1, 0, 1]),
                             draft_probs=torch.stack([q0, q0, q1[a[0]], q1[a[1]]]))
        else:  # deterministic proposals (n-gram / top-k style): one-hot acceptance
            tree = TokenTree(torch.tensor([2, 0, 1]), torch.tensor([-1, -1, 0]))
        rows = torch.stack([p0] + [p1[int(t)] for t in tree.tokens])
        # after node at depth 2, the target row isn't needed for the first two tokens
        acc = rule(tree, rows, g)
        toks = [int(tree.tokens[i]) for i in acc.accepted_nodes] + [acc.bonus_token]
        if len(toks) < 2:  # only the bonus: draw the 2nd token from the target itself
            toks.append(int(torch.multinomial(p1[toks[0]], 1, generator=g)))
        counts[toks[0], toks[1]] += 1
    return counts


@pytest.mark.parametrize("mode", ["sampled", "onehot"])
def test_tree_rejection_sampling_matches_target(mode):
    p0, p1, q0, q1 = _tables()
    exact = p0[:, None] * p1
    small = _tv(_sample_pairs(500, mode, 1, p0, p1, q0, q1), exact)
    large = _tv(_sample_pairs(8000, mode, 2, p0, p1, q0, q1), exact)
    assert large < small
    assert large < 0.03, f"TV distance {large:.4f} too large: acceptance is not lossless"


def _broken_accept(tree, probs, g):
    """Acceptance with one rule broken: the residual is not renormalised after a rejection
    (the bonus is then drawn from the target p instead of the residual)."""
    from specdec.sampling import Acceptance

    children = tree.children()
    node, path = -1, []
    while True:
        p = probs[node + 1]
        nxt = None
        for c in children[node + 1]:
            x = int(tree.tokens[c])
            q = tree.draft_probs[c]
            if float(torch.rand((), generator=g)) * float(q[x]) < float(p[x]):
                nxt = c
                break
        if nxt is None:
            return Acceptance(path, int(torch.multinomial(p, 1, generator=g)))
        path.append(nxt)
        node = nxt


def test_distribution_test_detects_a_broken_rule():
    p0, p1, q0, q1 = _tables()
    exact = p0[:, None] * p1
    assert _tv(_sample_pairs(8000, "sampled", 2, p0, p1, q0, q1, rule=_broken_accept), exact) > 0.05


def test_one_hot_certain_accept_and_reject():
    probs = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    tree = TokenTree(torch.tensor([1]), torch.tensor([-1]))
    acc = accept_sampling(tree, probs)
    assert acc.accepted_nodes == [0] and acc.bonus_token == 0
    tree = TokenTree(torch.tensor([2]), torch.tensor([-1]))
    acc = accept_sampling(tree, probs)
    assert acc.accepted_nodes == [] and acc.bonus_token == 1


def test_processing_matches_transformers_warpers():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    ctx = torch.randint(0, 50, (3, 12), generator=g)
    counts = torch.zeros(3, 50).scatter_add_(1, ctx, torch.ones(3, 12))
    sp = SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2)
    ours = process(logits, sp, counts)
    ref = RepetitionPenaltyLogitsProcessor(1.2)(ctx, logits.clone())
    for w in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.9)):
        ref = w(ctx, ref)
    assert torch.equal(torch.isinf(ref) | (ref < -1e30), ours < -1e30)
    keep = ours > -1e30
    torch.testing.assert_close(ours[keep], ref[keep])


# ------------------------------------------------------------ end to end, tiny models
def _exact_first_two(model, ids, sp):
    """Exact joint distribution [V, V] of the first two sampled tokens."""
    vocab = model.config.vocab_size
    with torch.no_grad():
        l0 = model(ids).logits[0, -1:]
        c0 = torch.bincount(ids[0], minlength=vocab)[None].float()
        p0 = torch.softmax(process(l0, sp, c0), -1)[0]
        seqs = torch.cat([ids.repeat(vocab, 1), torch.arange(vocab)[:, None]], 1)
        l1 = model(seqs).logits[:, -1]
        c1 = torch.stack([torch.bincount(s, minlength=vocab) for s in seqs]).float()
        p1 = torch.softmax(process(l1, sp, c1), -1)
    return p0[:, None] * p1


def sample_first_two(target, ids, drafter, n, seed, **sampling):
    """Counts [vocab, vocab] of the first two tokens over n seeded sampled generations."""
    vocab = target.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(vocab, vocab)
    for _ in range(n):
        out = specdec.generate(target, ids, drafter=drafter, max_new_tokens=2, do_sample=True,
                               generator=g, eos_token_id=None, **sampling)
        a, b = out.new_tokens.tolist()
        counts[a, b] += 1
    return counts


@pytest.mark.parametrize("temperature,top_p,drafter_kind", [(1.0, 1.0, "chain"), (0.7, 0.9, "chain"),
                                                             (0.7, 0.9, "tree")])
def test_end_to_end_sampling_distribution(temperature, top_p, drafter_kind):
    vocab = 6
    target = tiny_model("llama", vocab=vocab, seed=0)
    draft = tiny_model("llama", vocab=vocab, layers=1, seed=3)
    ids = torch.tensor([[1, 4, 2]])
    sp = SamplingParams(do_sample=True, temperature=temperature, top_p=top_p)
    exact = _exact_first_two(target, ids, sp)
    drafter = specdec.ModelDrafter(draft, gamma=3, topk=1 if drafter_kind == "chain" else 2)

    def run(n, seed):
        return sample_first_two(target, ids, drafter, n, seed, temperature=temperature, top_p=top_p)

    small, large = _tv(run(150, 1), exact), _tv(run(1500, 2), exact)
    assert large < small
    assert large < 0.08, f"TV {large:.3f}"


def test_same_seed_same_output():
    target = tiny_model("qwen2", seed=0)
    draft = tiny_model("qwen2", layers=1, seed=5)
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=20, do_sample=True, temperature=0.8, top_k=30, eos_token_id=None)
    a = specdec.generate(target, ids, drafter=specdec.ModelDrafter(draft, gamma=3), seed=123, **kw)
    b = specdec.generate(target, ids, drafter=specdec.ModelDrafter(draft, gamma=3), seed=123, **kw)
    c = specdec.generate(target, ids, drafter=specdec.ModelDrafter(draft, gamma=3), seed=124, **kw)
    assert a.sequences.tolist() == b.sequences.tolist()
    assert a.sequences.tolist() != c.sequences.tolist()
