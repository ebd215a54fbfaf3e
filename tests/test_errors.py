"""Bad input gets a clear error, never a crash deep inside a model or wrong tokens."""
import pytest
import torch

import specdec

from conftest import tiny_model


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama")


def test_vocab_mismatch(target):
    draft = tiny_model("llama", vocab=80, layers=1)
    with pytest.raises(ValueError, match="vocabularies differ"):
        specdec.generate(target, torch.tensor([[1, 2, 3]]), drafter=specdec.ModelDrafter(draft))


def test_prompt_longer_than_context(target):
    ids = torch.zeros(1, target.config.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="context"):
        specdec.generate(target, ids, max_new_tokens=1)


def test_empty_prompt(target):
    with pytest.raises(ValueError, match="empty prompt"):
        specdec.generate(target, torch.zeros(1, 0, dtype=torch.long))


def test_negative_max_new_tokens(target):
    with pytest.raises(ValueError, match="max_new_tokens"):
        specdec.generate(target, torch.tensor([[1, 2]]), max_new_tokens=-1)


def test_models_on_different_devices(target):
    draft = tiny_model("llama", layers=1).to("meta")
    with pytest.raises(ValueError, match="same device"):
        specdec.generate(target, torch.tensor([[1, 2]]), drafter=specdec.ModelDrafter(draft))


def test_a_batch_goes_to_the_batched_loop(target):
    out = specdec.generate(target, torch.tensor([[1, 2], [3, 4]]), max_new_tokens=3, eos_token_id=None)
    assert out.sequences.shape == (2, 5) and out.stats.loop == "batch"
    with pytest.raises(ValueError, match="streamer"):
        specdec.generate(target, torch.tensor([[1, 2], [3, 4]]), streamer=object())


def test_token_ids_outside_vocab(target):
    with pytest.raises(ValueError, match="vocabulary"):
        specdec.generate(target, torch.tensor([[1, 500]]))


def test_nan_logits():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN"):
        specdec.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=3)


def test_bad_sampling_params(target):
    with pytest.raises(ValueError, match="temperature"):
        specdec.generate(target, torch.tensor([[1, 2]]), do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        specdec.generate(target, torch.tensor([[1, 2]]), do_sample=True, top_p=1.5)


def test_unknown_drafter_name():
    with pytest.raises(ValueError, match="unknown drafter"):
        specdec.drafters.make("nope")


def test_encoder_decoder_rejected():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                num_heads=2))
    with pytest.raises(ValueError, match="decoder-only"):
        specdec.generate(model, torch.tensor([[1, 2]]))


def test_a_single_nan_anywhere_is_caught():
    """accept_greedy finds a NaN from the argmax's pick (no second pass over the logits)."""
    from specdec.sampling import accept_greedy
    from specdec.tree import chain

    tree = chain([3, 4, 5])
    for row, col in [(0, 0), (1, 7), (3, 95), (2, 50)]:
        logits = torch.randn(4, 96, generator=torch.Generator().manual_seed(row * 100 + col))
        logits[row, col] = float("nan")
        with pytest.raises(FloatingPointError, match="NaN"):
            accept_greedy(tree, logits)
    clean = torch.randn(4, 96, generator=torch.Generator().manual_seed(1))
    assert accept_greedy(tree, clean).bonus_token == int(clean[0].argmax())


def test_device_check_is_about_draft_models_only():
    """A drafter's host-side table (the recycling matrix) may live elsewhere than the
    target; a draft model may not."""
    from types import SimpleNamespace

    from specdec.drafters.merged import MergedDrafter
    from specdec.drafters.ngram import NgramDrafter
    from specdec.drafters.recycling import RecyclingDrafter
    from specdec.generate import _check_drafter

    runner = SimpleNamespace(vocab_size=64, device=torch.device("meta"))  # "the GPU"
    _check_drafter(RecyclingDrafter(vocab_size=64), runner)  # matrix in host memory: fine
    _check_drafter(MergedDrafter([NgramDrafter(), RecyclingDrafter(vocab_size=64)]), runner)
    model_like = SimpleNamespace(vocab_size=64, device=torch.device("cpu"), draft_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="same device"):
        _check_drafter(model_like, runner)
    with pytest.raises(ValueError, match="same device"):
        _check_drafter(MergedDrafter([NgramDrafter(), model_like]), runner)


def test_merged_drafter_options_go_to_their_part():
    """``ngram+recycling`` options are per part; a flat option is an error, never dropped."""
    from specdec import drafters

    d = drafters.make("ngram+recycling", ngram={"max_continuation": 16, "num_candidates": 3},
                      recycling={"vocab_size": 64})
    ngram, recycling = d.drafters
    assert ngram.num_candidates == 3 and ngram.index.max_continuation == 16
    assert recycling.vocab_size == 64
    with pytest.raises(ValueError, match="options go per part"):
        drafters.make("ngram+recycling", max_continuation=16)
    with pytest.raises(ValueError, match="takes a dict"):
        drafters.make("ngram+recycling", ngram=16)


# ----------------------------------------------------------------------------- custom drafters (issue 25)
class _ProbsDrafter:
    """Proposes one sampled-looking node whose draft_probs the test sets."""

    def __init__(self, probs):
        self.probs = probs

    def reset(self, prompt):
        pass

    def propose(self, request):
        from specdec.tree import TokenTree

        return TokenTree(torch.tensor([5]), torch.tensor([-1]), draft_probs=self.probs[None].clone())

    def update(self, result):
        pass


@pytest.mark.parametrize("case", ["zero_at_token", "nan", "negative", "narrow"])
def test_bad_draft_probs_are_refused_when_sampling(case):
    model = tiny_model("llama")
    probs = torch.full((96,), 1 / 95)
    if case == "zero_at_token":
        probs[5] = 0.0  # q = 0 would accept token 5 unconditionally
    elif case == "nan":
        probs[7] = float("nan")
    elif case == "negative":
        probs[7] = -0.1
    else:
        probs = probs[:10]
    with pytest.raises(ValueError, match="draft_probs"):
        specdec.generate(model, torch.tensor([[1, 2, 3]]), drafter=_ProbsDrafter(probs), max_new_tokens=3,
                         do_sample=True, seed=0)
    ok = torch.full((96,), 1 / 96)
    specdec.generate(model, torch.tensor([[1, 2, 3]]), drafter=_ProbsDrafter(ok), max_new_tokens=3,
                     do_sample=True, seed=0)  # a proper distribution passes


def test_drafter_mistakes_get_clear_errors():
    model = tiny_model("llama")
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(TypeError, match=r"drafters.make\('ngram'"):
        specdec.generate(model, ids, drafter="ngram", max_new_tokens=2)

    class NoUpdate:
        def reset(self, prompt):
            pass

        def propose(self, request):
            return specdec.TokenTree.empty()

    with pytest.raises(TypeError, match="lacks update"):
        specdec.generate(model, ids, drafter=NoUpdate(), max_new_tokens=2)

    class ListDrafter(NoUpdate):
        def propose(self, request):
            return [5, 6]

        def update(self, result):
            pass

    with pytest.raises(TypeError, match="must return a specdec.TokenTree"):
        specdec.generate(model, ids, drafter=ListDrafter(), max_new_tokens=2)


def test_meta_device_target_and_nan_penalties_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="repetition_penalty must be a finite number"):
        specdec.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=2, repetition_penalty=float("nan"))
    meta = tiny_model("llama").to("meta")
    with pytest.raises(ValueError, match="meta device"):
        specdec.generate(meta, torch.tensor([[1, 2, 3]]), max_new_tokens=2)
