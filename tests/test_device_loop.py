"""The device-resident loop (specdec.device_loop): its pieces against the host references,
and whole decodes against transformers' greedy output and the exact sampling distribution.

On CPU the loop runs as eager tensor work on a "static" runner (the padded graph-safe
forward); the CUDA-graph replay is covered by the GPU-marked tests."""
import os

import pytest
import torch
from conftest import hf_greedy, tiny_model

import specdec
from specdec.backends.compact import CompactRunner
from specdec.backends.cuda_graphs import GraphedCompactRunner
from specdec.config import SamplingParams
from specdec.device_loop import ancestor_rows, choose, suffix_slots, walk
from specdec.drafters.suffix import SuffixDrafter
from specdec.ops.accept import greedy_accept
from specdec.ops.suffix_match import candidates_to_tree, suffix_candidates
from specdec.tree import TokenTree


def tree_rows(tokens, parents, valid, depth):
    """The suffix trie as rows, root first, as the loop's step builds them."""
    ids, parent_row, d = suffix_slots(tokens, parents, valid, depth)
    return ids, parent_row, torch.cat([torch.zeros(1, dtype=torch.long), d]), ancestor_rows(parent_row, depth)


def _static(model, max_length=256):
    return GraphedCompactRunner(CompactRunner.from_hf(model, max_length=max_length), mode="static")


def _recycling(model, nodes: int, suffix: bool = False):
    from specdec.drafters import make
    from specdec.drafters.recycling import TreeTemplate

    opts = {"recycling": {"template": TreeTemplate.best_first(nodes, max_depth=4, k=4), "k": 4}}
    if suffix:
        return make("suffix+recycling", target=model, suffix={"num_candidates": 2, "depth": 4}, **opts)
    return make("recycling", target=model, **opts["recycling"])


@pytest.mark.parametrize("seed", range(12))
def test_walk_matches_the_host_greedy_acceptance(seed):
    """On random histories and target choices (biased to agree with the drafts), the device
    walk takes the same path and bonus as ops.greedy_accept on the compacted TokenTree."""
    g = torch.Generator().manual_seed(seed)
    vocab, depth, cands = 3 + seed % 4, 1 + seed % 6, 1 + seed % 5
    hist = torch.randint(0, vocab, (int(torch.randint(2, 60, (1,), generator=g)),), generator=g)
    c, lens = suffix_candidates(hist, hist.numel(), max_order=3, num_candidates=cands, depth=depth, max_scan=32)
    tokens, parents, valid = candidates_to_tree(c, lens)
    ids, parent_row, depth_row, anc = tree_rows(tokens, parents, valid, depth)
    for trial in range(8):
        choice = torch.randint(0, vocab, (ids.numel() + 1,), generator=g)
        agree = torch.rand(ids.numel(), generator=g) < 0.7  # make most drafts acceptable
        choice[parent_row[agree]] = torch.where(valid[agree], ids[agree], choice[parent_row[agree]])
        accepted, path_rows = walk(ids, parent_row, depth_row, anc, valid, choice, depth)
        keep = valid.nonzero().flatten()
        tree = TokenTree(tokens, torch.where(valid, parents, -1)).select(keep)
        rows = torch.cat([torch.zeros(1, dtype=torch.long), keep + 1])  # compacted row -> slot row
        host = greedy_accept(tree.parents.tolist(), tree.tokens.tolist(), choice[rows].tolist())
        a = int(accepted)
        assert a == len(host)
        assert path_rows[1:a + 1].tolist() == [int(keep[i]) + 1 for i in host]
        assert path_rows[0] == 0


def test_tree_rows_ancestors_match_the_token_tree():
    hist = torch.tensor([1, 2, 3, 1, 2, 4, 1, 2, 3, 5, 1, 2])
    c, lens = suffix_candidates(hist, hist.numel(), max_order=2, num_candidates=4, depth=4, max_scan=16)
    tokens, parents, valid = candidates_to_tree(c, lens)
    _, _, _, anc = tree_rows(tokens, parents, valid, 4)
    keep = valid.nonzero().flatten()
    tree = TokenTree(tokens, torch.where(valid, parents, -1)).select(keep)
    _, want = tree.with_root()  # [n + 1, n + 1]
    rows = torch.cat([torch.zeros(1, dtype=torch.long), keep + 1])
    assert torch.equal(anc[rows][:, rows], want)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_greedy_decode_on_the_device_loop_is_lossless(family):
    """Plain decoding and the suffix drafter through the loop equal transformers' greedy
    output, with an EOS cut mid-tree and a max_new_tokens cut."""
    model = tiny_model(family, vocab=64)
    ids = torch.tensor([[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2]])
    want = hf_greedy(model, ids, 40)
    runner = _static(model)
    for drafter in (None, SuffixDrafter(num_candidates=3, depth=5), SuffixDrafter(num_candidates=1, depth=1),
                    _recycling(model, 12), _recycling(model, 10, suffix=True)):
        out = specdec.generate(runner, ids, drafter=drafter, max_new_tokens=40)
        assert out.stats.loop == "device"
        assert torch.equal(out.sequences, want)
        assert out.stats.new_tokens == 40 <= out.stats.steps + sum(out.stats.accepted_per_step)  # (the last cut)
        for n in (1, 7):
            assert torch.equal(specdec.generate(runner, ids, drafter=drafter, max_new_tokens=n).sequences,
                               want[:, :ids.shape[1] + n])
        eos = int(want[0, ids.shape[1] + 17])
        cut = ids.shape[1] + (want[0, ids.shape[1]:] == eos).nonzero()[0, 0] + 1
        out = specdec.generate(runner, ids, drafter=drafter, max_new_tokens=40, eos_token_id=[99, eos])
        assert torch.equal(out.sequences, want[:, :cut])


def test_device_loop_streams_in_order_and_matches_the_host_loop(monkeypatch):
    model = tiny_model("llama", vocab=48)
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5]])
    runner = _static(model)

    class Sink:
        def __init__(self):
            self.parts = []

        def put(self, t):
            self.parts.append(t.flatten().tolist())

        def end(self):
            self.parts.append("end")

    sink = Sink()
    out = specdec.generate(runner, ids, drafter=SuffixDrafter(num_candidates=2, depth=4), max_new_tokens=30,
                           streamer=sink)
    assert sink.parts[0] == ids[0].tolist() and sink.parts[-1] == "end"
    assert sum(sink.parts[1:-1], []) == out.sequences[0, ids.shape[1]:].tolist()
    monkeypatch.setenv("SPECDEC_DEVICE_LOOP", "0")
    host = specdec.generate(runner, ids, drafter=SuffixDrafter(num_candidates=2, depth=4), max_new_tokens=30)
    assert host.stats.loop == "host" and torch.equal(host.sequences, out.sequences)


def test_host_rules_and_other_drafters_keep_the_host_loop():
    model = tiny_model("llama", vocab=48)
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5]])
    runner = _static(model)
    assert specdec.generate(runner, ids, max_new_tokens=4, repetition_penalty=1.2).stats.loop == "host"
    assert specdec.generate(runner, ids, drafter=specdec.drafters.make("ngram", target=model),
                            max_new_tokens=4).stats.loop == "host"
    assert specdec.generate(runner, ids, max_new_tokens=4, do_sample=True,
                            generator=torch.Generator().manual_seed(0)).stats.loop == "host"
    assert specdec.generate(model, ids, max_new_tokens=4).stats.loop == "host"  # generic backend
    out = specdec.generate(runner, ids, max_new_tokens=0)
    assert torch.equal(out.sequences, ids)


def test_a_failed_capture_hands_the_call_to_the_host_loop(capsys):
    from specdec.device_loop import LoopShape, loop_for

    model = tiny_model("llama", vocab=48)
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5]])
    runner = _static(model)
    want = hf_greedy(model, ids, 12)
    loop_for(runner, LoopShape(), SamplingParams()).graphed = True  # on CPU the capture must fail
    out = specdec.generate(runner, ids, max_new_tokens=12)
    assert out.stats.loop == "host" and torch.equal(out.sequences, want)
    assert "device loop off (capture failed" in capsys.readouterr().err
    assert specdec.generate(runner, ids, max_new_tokens=12).stats.loop == "host"  # not retried


def test_nan_logits_raise_and_stops_cut_at_once():
    """NaN logits raise the engine's error (never silent tokens); an EOS as the first token
    and max_new_tokens=1 commit exactly one token."""
    model = tiny_model("llama", vocab=48)
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5]])
    runner = _static(model)
    first = int(hf_greedy(model, ids, 1)[0, -1])
    for drafter in (None, SuffixDrafter(num_candidates=2, depth=3)):
        out = specdec.generate(runner, ids, drafter=drafter, max_new_tokens=20, eos_token_id=first)
        assert out.stats.loop == "device" and out.sequences[0, ids.shape[1]:].tolist() == [first]
        assert specdec.generate(runner, ids, drafter=drafter, max_new_tokens=1).new_tokens.tolist() == [first]
    broken = tiny_model("llama", vocab=48)
    with torch.no_grad():
        broken.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        specdec.generate(_static(broken), ids, drafter=SuffixDrafter(num_candidates=2, depth=3), max_new_tokens=8)


def test_drop_in_generate_runs_the_device_loop():
    """accelerate(model).generate reaches the loop (no processors on the fast path) and
    matches transformers: greedy exactly; sampling with the model's top_k default stays
    inside the top k."""
    import copy

    model = tiny_model("llama", vocab=64)
    ids = torch.tensor([[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2]])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    fast = specdec.accelerate(copy.deepcopy(model), drafter=lambda: SuffixDrafter(num_candidates=2, depth=4))
    fast._specdec_target = _static(fast)
    out = fast.generate(ids, max_new_tokens=16, do_sample=False, return_dict_in_generate=True)
    assert out.specdec_stats[0].loop == "device" and out.sequences.tolist() == ref.tolist()
    torch.manual_seed(0)
    sampled = fast.generate(ids, max_new_tokens=1, do_sample=True, top_k=3, return_dict_in_generate=True)
    assert sampled.specdec_stats[0].loop == "device"
    with torch.no_grad():
        top3 = model(ids).logits[0, -1].topk(3).indices.tolist()
    assert int(sampled.sequences[0, -1]) in top3


def test_choose_samples_the_warped_distribution():
    """Gumbel-max over warped logits draws each token with its processed probability."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(40000, 1)
    for sp in (SamplingParams(do_sample=True, temperature=0.7),
               SamplingParams(do_sample=True, temperature=1.3, top_k=3),
               SamplingParams(do_sample=True, temperature=1.0, top_p=0.8)):
        from specdec.sampling import warp

        exact = torch.softmax(warp(logits[:1], sp), -1)[0]
        draws = choose(logits, sp, torch.Generator().manual_seed(1))
        freq = torch.bincount(draws, minlength=6).float() / draws.numel()
        assert float((freq - exact).abs().max()) < 0.01, (sp, freq, exact)
        assert freq[exact == 0].sum() == 0
    assert torch.equal(choose(logits[:3], SamplingParams(), None), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("kind", ["suffix", "suffix+recycling"])
def test_device_loop_sampling_distribution(kind):
    """The first two sampled tokens through the loop with suffix (and recycled) drafts,
    accepted and rejected, follow the target's exact joint distribution."""
    from test_sampling import _exact_first_two

    vocab = 5
    target = tiny_model("llama", vocab=vocab, seed=0)
    with torch.no_grad():
        target.lm_head.weight.mul_(8)
    ids = torch.tensor([[1, 3, 1, 3, 1]])
    sp = SamplingParams(do_sample=True, temperature=0.8, top_p=0.95)
    exact = _exact_first_two(target, ids, sp)
    runner = _static(target, max_length=64)
    drafter = SuffixDrafter(num_candidates=2, depth=2) if kind == "suffix" else _recycling(target, 6, suffix=True)

    def counts(n, seed):
        c = torch.zeros(vocab, vocab)
        accepted = 0
        for i in range(n):
            out = specdec.generate(runner, ids, drafter=drafter, max_new_tokens=2, do_sample=True, temperature=0.8,
                                   top_p=0.95, seed=seed * 100000 + i)
            assert out.stats.loop == "device"
            a, b = out.new_tokens.tolist()
            c[a, b] += 1
            accepted += sum(out.stats.accepted_per_step)
        return c, accepted

    tv = lambda c: 0.5 * float((c / c.sum() - exact).abs().sum())  # noqa: E731
    (small, _), (large, accepted) = counts(100, 1), counts(1500, 2)
    assert accepted > 100  # drafts were accepted (and, the distribution says, rejected too)
    assert tv(large) < tv(small) and tv(large) < 0.06, tv(large)
    same = [specdec.generate(runner, ids, drafter=drafter, max_new_tokens=6, do_sample=True, seed=7).sequences
            for _ in range(2)]
    assert torch.equal(same[0], same[1])  # one seed, one output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_device_loop_matches_transformers_and_never_syncs():
    """On CUDA (fp32) the captured loop equals transformers' greedy output, for plain
    decoding and suffix drafts; a replay makes no host sync."""
    model = tiny_model("llama", vocab=64, hidden_size=64, intermediate_size=96).cuda()  # head_dim 16
    ids = torch.tensor([[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2]], device="cuda")
    want = hf_greedy(model, ids, 48)
    for drafter in (None, SuffixDrafter(num_candidates=4, depth=8)):
        out = specdec.generate(model, ids, drafter=drafter, max_new_tokens=48)
        assert out.stats.loop == "device"
        assert torch.equal(out.sequences, want)
    from specdec.backends.select import KEPT_RUNNERS

    runner = next(iter(KEPT_RUNNERS[model].values()))
    loop = next(iter(runner._device_loops.values()))
    torch.cuda.set_sync_debug_mode("error")
    try:
        loop.replay()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    out = specdec.generate(model, ids, drafter=SuffixDrafter(num_candidates=4, depth=8), max_new_tokens=48,
                           do_sample=True, temperature=0.7, seed=3)
    again = specdec.generate(model, ids, drafter=SuffixDrafter(num_candidates=4, depth=8), max_new_tokens=48,
                             do_sample=True, temperature=0.7, seed=3)
    assert out.stats.loop == "device" and torch.equal(out.sequences, again.sequences)


if os.environ.get("SPECDEC_DEVICE_LOOP") == "0":  # the suite run with the loop off checks the host path
    pytestmark = pytest.mark.skip("SPECDEC_DEVICE_LOOP=0")
