"""Every drafter and combination: greedy output identical to the target's, and sampling
that follows the target's distribution, through the one generation loop."""
import pytest
import torch

import specdec
from specdec import drafters

from conftest import hf_greedy, tiny_model

# name -> options for drafters.make (draft model given where needed)
DRAFTERS = {
    "ngram": {},
    "suffix": {},
    "model": {"draft": True, "gamma": 3},
    "recycling": {},
    "early_exit": {"layers": 1, "gamma": 3},
    "ngram+recycling": {},
    "dual": {"draft": True, "gamma": 3, "guess_set_size": 4, "lookahead_level": 4},
}


def _make(name, target, family):
    if name not in drafters.NAMES:
        pytest.skip(f"drafter {name!r} not available")
    opts = dict(DRAFTERS[name])
    if opts.pop("draft", False):
        opts["draft_model"] = tiny_model(family, vocab=target.config.vocab_size, layers=1, seed=11)
    return drafters.make(name, target=target, **opts)


def _repetitive_prompt(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(3, vocab, (5,), generator=g)
    return torch.cat([motif, torch.randint(3, vocab, (3,), generator=g), motif, motif[:2]])[None]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("name", list(DRAFTERS))
def test_greedy_lossless(name, family):
    target = tiny_model(family)
    ids = _repetitive_prompt(96, 1)
    ref = hf_greedy(target, ids, 24)
    drafter = _make(name, target, family)
    out = specdec.generate(target, ids, drafter=drafter, max_new_tokens=24, eos_token_id=None)
    assert out.sequences.tolist() == ref.tolist()
    # the same drafter object is reusable for a second prompt
    ids2 = _repetitive_prompt(96, 2)
    out2 = specdec.generate(target, ids2, drafter=drafter, max_new_tokens=12, eos_token_id=None)
    assert out2.sequences.tolist() == hf_greedy(target, ids2, 12).tolist()


def _tv(counts, exact):
    return 0.5 * float((counts / counts.sum() - exact).abs().sum())


def peaky_target(vocab: int = 5):
    """A tiny llama with peaked distributions, so drafts are accepted and rejected."""
    target = tiny_model("llama", vocab=vocab, seed=0)
    with torch.no_grad():
        target.lm_head.weight.mul_(8)
    return target


def assert_first_two_follow_target(target, drafter, ids=None):
    """The first two tokens sampled through ``drafter`` (T=0.8, top-p 0.95) follow the target's
    exact joint distribution: TV shrinks with more draws and ends under 0.07."""
    from test_sampling import _exact_first_two, sample_first_two
    from specdec.config import SamplingParams

    ids = torch.tensor([[1, 3, 1, 3, 1]]) if ids is None else ids
    exact = _exact_first_two(target, ids, SamplingParams(do_sample=True, temperature=0.8, top_p=0.95))

    def run(n, seed):
        return sample_first_two(target, ids, drafter, n, seed, temperature=0.8, top_p=0.95)

    small, large = _tv(run(100, 1), exact), _tv(run(1200, 2), exact)
    assert large < small
    assert large < 0.07, f"TV {large:.3f}"


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_sampling_distribution(name):
    """First two sampled tokens follow the target's exact joint distribution (T=0.8, top-p 0.95)."""
    target = peaky_target()
    assert_first_two_follow_target(target, _make(name, target, "llama"))


@pytest.mark.parametrize("name", ["ngram", "suffix", "recycling", "early_exit", "ngram+recycling"])
def test_real_smollm2_greedy_lossless(smollm2, name):
    """The real model on code (HumanEval), math (GSM8K) and a Spec-Bench-style chat prompt."""
    from test_lossless import _real_prompts

    model, tok = smollm2
    chat = tok.apply_chat_template([{"role": "user", "content": "Summarize in two sentences why the sky is blue."}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    drafter = drafters.make(name, target=model)
    for ids in _real_prompts(tok, n=1) + [chat]:
        ref = hf_greedy(model, ids, 32, eos_token_id=tok.eos_token_id)
        out = specdec.generate(model, ids, drafter=drafter, max_new_tokens=32, eos_token_id=tok.eos_token_id)
        assert out.sequences.tolist() == ref.tolist()


def _first_layers_of(model, layers: int):
    """A small draft model with the target's tokenizer: its first ``layers`` layers,
    final norm and LM head (no installable package ships a smaller SmolLM2)."""
    import copy

    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:layers]
    small = type(model)(cfg).eval()
    missing, _unused = small.load_state_dict(model.state_dict(), strict=False)
    assert not [k for k in missing if "rotary" not in k], missing
    return small


@pytest.mark.parametrize("name", ["model", "dual"])
def test_real_smollm2_greedy_lossless_with_a_draft_model(smollm2, name):
    """The draft-model drafters on the real target (draft: its first 6 of 30 layers)."""
    from test_lossless import _real_prompts

    model, tok = smollm2
    drafter = drafters.make(name, target=model, draft_model=_first_layers_of(model, 6))
    accepted = 0
    for ids in _real_prompts(tok, n=1):
        ref = hf_greedy(model, ids, 32, eos_token_id=tok.eos_token_id)
        out = specdec.generate(model, ids, drafter=drafter, max_new_tokens=32, eos_token_id=tok.eos_token_id)
        assert out.sequences.tolist() == ref.tolist()
        accepted += sum(out.stats.accepted_per_step)
    assert accepted > 0  # the draft really drafted: some of its tokens were kept
