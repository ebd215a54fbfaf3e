"""EarlyExitDrafter: the shallow view, losslessness, draft_probs, adapter training."""
from __future__ import annotations

import pytest
import torch

import specdec
from specdec import drafters
from specdec.config import SamplingParams, TreeBudget
from specdec.drafters.base import DraftRequest
from specdec.drafters.early_exit import EarlyExitDrafter, ResidualAdapter, shallow_view
from specdec.sampling import probs_from_logits
from specdec.train_adapter import bucket_kl, head_logits, train_adapter

from conftest import hf_greedy, tiny_model

FAMILIES = ["llama", "gemma3", "qwen2"]


def _ids(seed, n=8):
    return torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(seed))


def _layer_out(model, L, ids):
    """The target's own computation cut after layer L: norm + head of layer L's output."""
    grab = {}
    h = model.model.layers[L - 1].register_forward_hook(
        lambda m, i, o: grab.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    try:
        full = model(ids).logits
    finally:
        h.remove()
    return head_logits(model, None, grab["h"]), full


@pytest.mark.parametrize("family", FAMILIES)
def test_shallow_view_is_the_targets_first_layers(family):
    model = tiny_model(family, layers=3)
    ids = _ids(1, 12)
    for L in (1, 2, 3):
        view = shallow_view(model, L)
        want, full = _layer_out(model, L, ids)
        torch.testing.assert_close(view(ids).logits, want, rtol=1e-5, atol=1e-5)
        assert view.model.embed_tokens is model.model.embed_tokens and view.lm_head is model.lm_head
    torch.testing.assert_close(shallow_view(model, 3)(ids).logits, full)
    # the target is untouched
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    torch.testing.assert_close(model(ids).logits, full)
    # an untrained adapter is plain early exit
    ad = ResidualAdapter(32)
    torch.testing.assert_close(shallow_view(model, 2, adapter=ad)(ids).logits, shallow_view(model, 2)(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_lossless(family):
    model = tiny_model(family, layers=3)
    ids = _ids(5)
    ref = hf_greedy(model, ids, 30)
    for kw in ({"layers": 1, "gamma": 4}, {"layers": 2, "gamma": 5, "threshold": 0.3},
               {"layers": 1, "gamma": 3, "topk": 2}):
        out = specdec.generate(model, ids, drafter=EarlyExitDrafter(model, **kw), max_new_tokens=30,
                               eos_token_id=None)
        assert out.sequences.tolist() == ref.tolist(), kw


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_all_layers_accepts_everything(family):
    model = tiny_model(family)
    ids = _ids(6, 6)
    drafter = drafters.make("early_exit", target=model, layers=2, gamma=4)
    out = specdec.generate(model, ids, drafter=drafter, max_new_tokens=25, eos_token_id=None)
    assert out.sequences.tolist() == hf_greedy(model, ids, 25).tolist()
    assert out.stats.accepted_per_step[:-1] == [4] * (len(out.stats.accepted_per_step) - 1)


def test_threshold_stops_the_chain():
    model = tiny_model("llama")
    req = DraftRequest(_ids(2)[0], TreeBudget(), SamplingParams())
    assert len(EarlyExitDrafter(model, layers=1, gamma=4, threshold=1.01).propose(req)) == 0
    assert len(EarlyExitDrafter(model, layers=1, gamma=4, threshold=0.0).propose(req)) == 4


def test_sampling_draft_probs_are_the_sampling_distribution():
    model = tiny_model("qwen2", layers=3)
    sp = SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    d = EarlyExitDrafter(model, layers=2, gamma=5)
    ctx = _ids(3, 9)[0]
    tree = d.propose(DraftRequest(ctx, TreeBudget(), sp, torch.Generator().manual_seed(0)))
    assert len(tree) == 5 and tree.draft_probs is not None
    seq = torch.cat([ctx, tree.tokens])
    view_logits = shallow_view(model, 2)(seq[None]).logits[0]  # no cache: an independent recomputation
    want = probs_from_logits(view_logits[ctx.numel() - 1:-1], sp)  # [5, vocab]
    torch.testing.assert_close(tree.draft_probs, want, rtol=1e-4, atol=1e-6)
    assert all(float(tree.draft_probs[i, t]) > 0 for i, t in enumerate(tree.tokens.tolist()))


def test_sampling_same_seed_same_output():
    model = tiny_model("gemma3")
    ids = _ids(4)
    runs = [specdec.generate(model, ids, drafter=EarlyExitDrafter(model, layers=1, gamma=3), max_new_tokens=20,
                             do_sample=True, temperature=0.9, seed=7, eos_token_id=None) for _ in range(2)]
    assert runs[0].sequences.tolist() == runs[1].sequences.tolist()


def test_bucket_kl_is_exact_with_full_topk():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(3, 5, 20, generator=g), torch.randn(3, 5, 20, generator=g)
    p = torch.softmax(t, -1)
    exact = (p * (p.log() - torch.log_softmax(s, -1))).sum(-1).mean()
    top_p, top_i = p.topk(20, -1)
    torch.testing.assert_close(bucket_kl(s, top_p, top_i), exact)
    top_p, top_i = p.topk(4, -1)
    assert 0 <= float(bucket_kl(s, top_p, top_i)) <= float(exact) + 1e-6  # a lower bound


def test_train_adapter_save_load_and_lossless(tmp_path):
    model = tiny_model("llama", layers=3).requires_grad_(False)
    seqs = torch.randint(0, 96, (16, 16), generator=torch.Generator().manual_seed(0))
    adapter, losses = train_adapter(model, seqs, layers=1, steps=60, batch_size=4, lr=3e-3, log_every=0)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:3]) / 3
    assert all(not p.requires_grad for p in model.parameters())
    path = str(tmp_path / "adapter.safetensors")
    adapter.save(path, layers=1)
    d = EarlyExitDrafter(model, adapter=path, gamma=3)
    assert d.layers == 1
    ids = _ids(8)
    torch.testing.assert_close(d.view(ids).logits, shallow_view(model, 1, adapter=adapter)(ids).logits)
    out = specdec.generate(model, ids, drafter=d, max_new_tokens=20, eos_token_id=None)
    assert out.sequences.tolist() == hf_greedy(model, ids, 20).tolist()
