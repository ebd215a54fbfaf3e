"""accelerate(model).generate resolves transformers' arguments exactly as transformers does,
honours logits-level options per tree node and stopping rules on committed tokens, and
refuses, naming it, every option it does not honour (#12 / issue 25)."""
import copy
import math
import warnings

import pytest
import torch
from transformers import (BatchEncoding, GenerationConfig, LogitsProcessorList, MaxLengthCriteria,
                          StoppingCriteriaList)

import specdec
from specdec.hf_generate import UnsupportedOption

from conftest import hf_greedy, tiny_model


def _pair(**config):
    """(transformers' model, the same weights accelerated by specdec with an n-gram drafter)."""
    model = tiny_model("llama")
    for k, v in config.items():
        setattr(model.generation_config, k, v)
    fast = specdec.accelerate(copy.deepcopy(model), drafter=specdec.NgramDrafter())
    return model, fast


def _ids(seed=0, n=6):
    return torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(seed))


def test_no_length_argument_generates_twenty_new_tokens_like_transformers():
    model, fast = _pair()
    ids = _ids(n=42)  # longer than the old default max_length of 20
    with pytest.warns(UserWarning, match="max_length"):
        ref = model.generate(ids, attention_mask=torch.ones_like(ids))
    with pytest.warns(UserWarning, match="max_length"):
        out = fast.generate(ids, attention_mask=torch.ones_like(ids))
    assert ref.shape == (1, 62) and out.tolist() == ref.tolist()


def test_batch_encoding_positional_and_keyword_dicts():
    model, fast = _pair()
    ids = _ids(1)
    enc = BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    ref = hf_greedy(model, ids, 7)
    assert fast.generate(enc, max_new_tokens=7).tolist() == ref.tolist()
    assert fast.generate(**enc, max_new_tokens=7).tolist() == ref.tolist()


@pytest.mark.parametrize("bad", [{"max_new_token": 64}, {"foo": 1}])
def test_unknown_keywords_raise_like_transformers(bad):
    model, fast = _pair()
    with pytest.raises(ValueError, match="model_kwargs` are not used"):
        model.generate(_ids(), max_new_tokens=3, **bad)
    with pytest.raises(ValueError, match="model_kwargs` are not used"):
        fast.generate(_ids(), max_new_tokens=3, **bad)


@pytest.mark.parametrize("lengths", [{"max_length": 4}, {"max_new_tokens": 0}])
def test_impossible_lengths_raise_like_transformers(lengths):
    model, fast = _pair()
    with pytest.raises(ValueError):
        model.generate(_ids(), **lengths)
    with pytest.raises(ValueError):
        fast.generate(_ids(), **lengths)


def test_max_length_counts_from_the_start():
    model, fast = _pair()
    ids = _ids(2)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_length=15)
    assert ref.shape == (1, 15) and fast.generate(ids, max_length=15).tolist() == ref.tolist()


def test_padded_batch_without_mask_infers_it_from_the_pad_token():
    model, fast = _pair(pad_token_id=0, eos_token_id=2)
    a, b = _ids(3)[0], _ids(4, 4)[0]
    batch = torch.stack([a, torch.cat([torch.zeros(2, dtype=torch.long), b])])
    out = fast.generate(batch, max_new_tokens=6)
    assert out[0].tolist() == hf_greedy(model, a[None], 6, eos_token_id=2)[0].tolist()[:out.shape[1]]
    assert out[1, 2:].tolist() == hf_greedy(model, b[None], 6, eos_token_id=2)[0].tolist()


def test_empty_processor_and_criteria_lists_are_accepted():
    model, fast = _pair()
    ids = _ids(5)
    out = fast.generate(ids, max_new_tokens=5, logits_processor=LogitsProcessorList(),
                        stopping_criteria=StoppingCriteriaList())
    assert out.tolist() == hf_greedy(model, ids, 5).tolist()


def test_sampling_uses_the_model_generation_config_top_k():
    """transformers applies generation_config.top_k when sampling: so must specdec (every
    draw inside the top k, and the draws spread over them as the target's renormalised top-k)."""
    model, fast = _pair(top_k=3)
    ids = _ids(6)
    logits = model(ids).logits[0, -1]
    top = set(logits.topk(3).indices.tolist())
    want = torch.softmax(logits.topk(3).values, -1)
    draws = [int(fast.generate(ids, do_sample=True, max_new_tokens=1, seed=s)[0, -1]) for s in range(300)]
    assert set(draws) <= top
    got = torch.tensor([draws.count(t) for t in logits.topk(3).indices.tolist()], dtype=torch.float) / len(draws)
    assert (got - want).abs().sum() / 2 < 0.08, (got, want)


def _repetitive(seed=7):
    """A prompt the n-gram drafter can copy from, so trees of several nodes get verified."""
    base = _ids(seed, 5)[0]
    return torch.cat([base, base, base])[None]


class _ParityBan:
    """A user processor that reads its input_ids: bans ``token`` after contexts of even
    length. Per-node application must hand each row its own context to match transformers."""

    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] % 2 == 0:
            scores = scores.clone()
            scores[:, self.token] = float("-inf")
        return scores


def _greedy_options(ref_tokens, eos):
    """Options for a tiny model whose unconstrained greedy continuation is ``ref_tokens``:
    each bites (bans or forces a token the model would otherwise pick)."""
    t0, t1 = ref_tokens[0], ref_tokens[1]
    return {
        "no_repeat_ngram_size": {"no_repeat_ngram_size": 2},
        "bad_words_ids": {"bad_words_ids": [[t1]]},
        "bad_words_multi": {"bad_words_ids": [[t0, t1]]},
        "suppress_tokens": {"suppress_tokens": [t0, t1]},
        "begin_suppress_tokens": {"begin_suppress_tokens": [t0]},
        "sequence_bias": {"sequence_bias": {(t1,): -100.0}},
        "forced_eos_token_id": {"forced_eos_token_id": eos, "eos_token_id": eos},
        "min_new_tokens": {"min_new_tokens": 6, "eos_token_id": t1},
        "min_length": {"min_length": 20, "eos_token_id": t1},
        "repetition_penalty": {"repetition_penalty": 1.5, "no_repeat_ngram_size": 3},
        "encoder_repetition_penalty": {"encoder_repetition_penalty": 1.5},
        "exponential_decay_length_penalty": {"exponential_decay_length_penalty": (2, 3.0), "eos_token_id": eos},
        "renormalize_logits": {"renormalize_logits": True, "suppress_tokens": [t0]},
        "user_logits_processor": {"logits_processor": LogitsProcessorList([_ParityBan(ref_tokens[2])])},
        "prefix_allowed_tokens_fn": {"prefix_allowed_tokens_fn": lambda b, ids: list(range(3, 40 + int(ids[-1]) % 20))},
        "max_time": {"max_time": 0.0},
        "stopping_criteria": {"stopping_criteria": StoppingCriteriaList([MaxLengthCriteria(19)])},
    }


GREEDY = list(_greedy_options([3, 4, 5], 5))


def _transformers_with(model, ids, option: str):
    """(the unconstrained greedy continuation, the option's keywords, transformers' output with them)."""
    free = hf_greedy(model, ids, 12)[0, ids.shape[1]:].tolist()
    kw = _greedy_options(free, eos=free[4])[option]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=0, **kw)
    return free, kw, ref
MAY_NOT_CHANGE = ("max_time", "stopping_criteria", "forced_eos_token_id", "encoder_repetition_penalty",
                  "renormalize_logits", "exponential_decay_length_penalty")


@pytest.mark.parametrize("drafter", ["ngram", "self"])
@pytest.mark.parametrize("option", GREEDY)
def test_logits_options_are_honoured_per_tree_node_greedy(option, drafter):
    """Each option through accelerate(model).generate and transformers' generate: the same
    tokens. ``self`` drafts with the target itself (every unconstrained draft is the
    target's own argmax, so only the per-node processing can reject them)."""
    model = tiny_model("llama")
    ids = _repetitive()
    free, kw, ref = _transformers_with(model, ids, option)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target = copy.deepcopy(model)
        make = specdec.NgramDrafter if drafter == "ngram" else (lambda: specdec.ModelDrafter(target, gamma=4))
        fast = specdec.accelerate(target, drafter=make)
        out = fast.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                            pad_token_id=0, **kw)
    assert out.tolist() == ref.tolist(), (option, free)
    if option not in MAY_NOT_CHANGE:  # (else the test shows nothing)
        assert ref[0, ids.shape[1]:].tolist() != free[:ref.shape[1] - ids.shape[1]], option


@pytest.mark.parametrize("option", [{"min_p": 0.2}, {"typical_p": 0.5}, {"epsilon_cutoff": 0.02},
                                    {"eta_cutoff": 0.02}, {"top_k": 4, "temperature": 0.5}],
                         ids=["min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_k+temperature"])
def test_sampling_warpers_follow_transformers_distribution(option):
    """The first new token's empirical distribution over seeds matches the target's
    distribution after transformers' own processors for that option."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)  # a peaked distribution: fewer tokens carry the mass
    fast = specdec.accelerate(copy.deepcopy(model), drafter=specdec.NgramDrafter())
    ids = _ids(8)
    option = {"top_k": 0, **option}
    config = GenerationConfig(do_sample=True, max_new_tokens=1, **option)
    procs = model._get_logits_processor(generation_config=config, input_ids_seq_length=ids.shape[1],
                                        encoder_input_ids=ids, device=ids.device)
    with torch.no_grad():
        want = torch.softmax(procs(ids, model(ids).logits[:, -1].float()), -1)[0]
    assert 1 < int((want > 0).sum()) < want.numel()  # the option removes tokens, and keeps several
    n = 500
    draws = [int(fast.generate(ids, max_new_tokens=1, do_sample=True, seed=s, **option)[0, -1]) for s in range(n)]
    got = torch.bincount(torch.tensor(draws), minlength=want.numel()).float() / n
    assert float(want[torch.tensor(draws)].min()) > 0  # never a token the option removes
    # total variation against what exact sampling of n draws would show: E[TV] ~ sum sqrt(2 p (1 - p) / (pi n)) / 2
    tv, expected = (got - want).abs().sum() / 2, (torch.sqrt(2 * want * (1 - want) / (math.pi * n))).sum() / 2
    assert tv < 1.6 * expected + 0.02, (option, float(tv), float(expected), int((want > 0).sum()))


def test_stop_strings_on_the_real_model(smollm2):
    model, tok = smollm2
    ids = tok("def fib(n):", return_tensors="pt").input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                             stop_strings=["return"], tokenizer=tok)
        fast = specdec.accelerate(model, drafter=specdec.NgramDrafter())
        try:
            out = fast.generate(ids, max_new_tokens=40, do_sample=False, stop_strings=["return"], tokenizer=tok)
        finally:
            model.generate = model.generate_original
    assert out.tolist() == ref.tolist() and "return" in tok.decode(out[0, ids.shape[1]:])


REFUSED = [("num_beams", {"num_beams": 2}), ("num_return_sequences", {"num_return_sequences": 2, "do_sample": True}),
           ("output_scores", {"output_scores": True}), ("output_logits", {"output_logits": True}),
           ("prompt_lookup_num_tokens", {"prompt_lookup_num_tokens": 3}),
           ("penalty_alpha", {"penalty_alpha": 0.6, "top_k": 4}), ("dola_layers", {"dola_layers": "low"})]


@pytest.mark.parametrize("name,options", REFUSED, ids=[n for n, _ in REFUSED])
@pytest.mark.parametrize("how", ["keyword", "generation_config", "model_config"])
def test_options_not_honoured_are_refused_by_name(name, options, how):
    _, fast = _pair(**(options if how == "model_config" else {}))
    kw = dict(options) if how == "keyword" else {}
    if how == "generation_config":
        kw["generation_config"] = GenerationConfig(**options, max_new_tokens=4)
    else:
        kw["max_new_tokens"] = 4
    with pytest.raises(UnsupportedOption, match=name):
        fast.generate(_ids(), **kw)


def test_assistant_model_is_refused_by_name():
    _, fast = _pair()
    with pytest.raises(UnsupportedOption, match="assistant_model"):
        fast.generate(_ids(), max_new_tokens=4, assistant_model=tiny_model("llama"))


def test_options_set_on_the_model_generation_config_are_honoured():
    """A ban set on model.generation_config is in force (it used to be ignored)."""
    model = tiny_model("llama")
    ids = _repetitive()
    free = hf_greedy(model, ids, 8)[0, ids.shape[1]:].tolist()
    model.generation_config.suppress_tokens = [free[0], free[1]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, pad_token_id=0)
        out = specdec.accelerate(copy.deepcopy(model), drafter=specdec.NgramDrafter()).generate(
            ids, max_new_tokens=8, pad_token_id=0)
    assert out.tolist() == ref.tolist() and free[0] not in out[0, ids.shape[1]:].tolist()


def test_chat_template_call_answers_on_the_real_model(smollm2):
    """``model.generate(**tok.apply_chat_template(..., return_dict=True))`` with no length
    argument: 20 new tokens, identical to transformers'."""
    model, tok = smollm2
    enc = tok.apply_chat_template([{"role": "user", "content": "Name three primary colours."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.generate(**enc)
        fast = specdec.accelerate(model, drafter=specdec.NgramDrafter())
        try:
            out = fast.generate(**enc)
        finally:
            model.generate = model.generate_original
    assert out.shape[1] - enc["input_ids"].shape[1] == ref.shape[1] - enc["input_ids"].shape[1] > 0
    assert out.tolist() == ref.tolist()


def test_concurrent_calls_on_one_model_and_per_call_stats():
    import threading

    model, fast = _pair()
    prompts = [_ids(s) for s in range(4)]
    refs = [hf_greedy(model, p, 10).tolist() for p in prompts]
    got, errors = {}, []

    def run(i):
        try:
            out = fast.generate(prompts[i], max_new_tokens=10, return_dict_in_generate=True)
            got[i] = (out.sequences.tolist(), out.specdec_stats[0].new_tokens)
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(got[i][0] == refs[i] and got[i][1] == 10 for i in range(4))


REAL = ["no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "sequence_bias", "min_new_tokens",
        "repetition_penalty", "user_logits_processor"]


def test_logits_options_on_the_real_model(smollm2):
    """The table on the real SmolLM2 (fp32, greedy, ngram + recycling): identical tokens."""
    model, tok = smollm2
    ids = tok("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n", return_tensors="pt").input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        free = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                              do_sample=False)[0, ids.shape[1]:].tolist()
        options = _greedy_options(free, eos=free[4])
        for name in REAL:
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                 **options[name])  # (transformers': restored after every accelerated call)
            fast = specdec.accelerate(model, drafter=lambda: specdec.drafters.make("ngram+recycling", target=model))
            try:
                out = fast.generate(ids, max_new_tokens=16, do_sample=False, **options[name])
            finally:
                model.generate = model.generate_original
            assert out.tolist() == ref.tolist(), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("option", GREEDY)
def test_logits_options_through_the_fast_runtime_gpu(option):
    """The greedy table on CUDA, where accelerate runs the compact runtime with CUDA graphs."""
    model = tiny_model("llama", hidden_size=64, intermediate_size=96).cuda()  # head_dim 16, as the kernels' GPU tests
    ids = _repetitive().cuda()
    _, kw, ref = _transformers_with(model, ids, option)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = specdec.accelerate(copy.deepcopy(model), drafter=specdec.NgramDrafter)
        out = fast.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, **kw)
    assert out.tolist() == ref.tolist(), option


def test_padded_batch_with_processors_matches_transformers_batch():
    """Left-padded rows: transformers' processors see each row's pads and count the padded
    width; so do specdec's (the pads are a prefix of every node's context)."""
    model = tiny_model("llama")
    a, b = _repetitive(1)[0], _ids(9, 9)[0]
    batch = torch.stack([a, torch.cat([torch.zeros(a.numel() - b.numel(), dtype=torch.long), b])])
    mask = (torch.arange(a.numel()) >= a.numel() - b.numel()).long()
    mask = torch.stack([torch.ones_like(mask), mask])
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, repetition_penalty=1.4, no_repeat_ngram_size=2,
              min_new_tokens=4, eos_token_id=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.generate(batch, attention_mask=mask, **kw)
        out = specdec.accelerate(copy.deepcopy(model), drafter=specdec.NgramDrafter).generate(
            batch, attention_mask=mask, **kw)
    assert out.tolist() == ref.tolist()


def test_sampling_through_trees_follows_the_processed_distribution():
    """Two sampled tokens per seed, with min_p and a repetition penalty applied per node, the
    target drafting for itself from its raw distribution (so the second token is often a
    verified tree node, accepted by rejection sampling against the processed one): the
    pairs' empirical distribution matches the exact one, computed with transformers'
    processors row by row."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    ids = _repetitive(3)
    option = dict(min_p=0.15, repetition_penalty=1.3, top_k=0)
    config = GenerationConfig(do_sample=True, max_new_tokens=2, **option)
    procs = model._get_logits_processor(generation_config=config, input_ids_seq_length=ids.shape[1],
                                        encoder_input_ids=ids, device=ids.device)

    def probs(ctx):
        with torch.no_grad():
            return torch.softmax(procs(ctx, model(ctx).logits[:, -1].float()), -1)[0]

    p1 = probs(ids)
    want = {}
    for t1 in p1.nonzero().flatten().tolist():
        p2 = probs(torch.cat([ids, torch.tensor([[t1]])], 1))
        for t2 in p2.nonzero().flatten().tolist():
            want[(t1, t2)] = float(p1[t1] * p2[t2])
    target = copy.deepcopy(model)
    fast = specdec.accelerate(target, drafter=lambda: specdec.ModelDrafter(target, gamma=2))
    n = 500
    pairs, accepted = [], 0
    for s in range(n):
        pairs.append(tuple(fast.generate(ids, max_new_tokens=2, do_sample=True, seed=s, **option)[0, -2:].tolist()))
        accepted += sum(fast.specdec_stats[0].accepted_per_step)
    assert accepted > n // 10  # the second token often came from a verified tree node
    assert all(p in want for p in pairs)  # never a pair the processors rule out
    keys = sorted(want)
    w = torch.tensor([want[k] for k in keys])
    got = torch.tensor([pairs.count(k) for k in keys], dtype=torch.float) / n
    tv, expected = (got - w).abs().sum() / 2, torch.sqrt(2 * w * (1 - w) / (math.pi * n)).sum() / 2
    assert tv < 1.6 * expected + 0.02, (float(tv), float(expected), len(keys))
