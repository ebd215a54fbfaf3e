"""Drop-in APIs: accelerate(model).generate, dualdec, streaming and detokenization."""
import torch

import specdec
from specdec.streaming import IncrementalDetokenizer, TextStreamer

from conftest import hf_greedy, tiny_model


def test_accelerate_is_drop_in():
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    draft = tiny_model("llama", layers=1, seed=4)
    fast = specdec.accelerate(model, drafter=lambda: specdec.ModelDrafter(draft, gamma=3))
    out = fast.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert out.shape == ref.shape and out.tolist() == ref.tolist()
    d = fast.generate(input_ids=ids, max_new_tokens=12, return_dict_in_generate=True)
    assert d.sequences.tolist() == ref.tolist()
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert fast.generate(ids, generation_config=gc).shape == (1, 11)
    assert fast.specdec_stats[0].new_tokens == 5


def test_accelerate_batch_with_left_padding():
    model = tiny_model("llama")
    a = torch.randint(3, 96, (6,), generator=torch.Generator().manual_seed(1))
    b = torch.randint(3, 96, (4,), generator=torch.Generator().manual_seed(2))
    batch = torch.stack([a, torch.cat([torch.zeros(2, dtype=torch.long), b])])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    fast = specdec.accelerate(tiny_model("llama"), drafter=specdec.NgramDrafter())
    out = fast.generate(batch, attention_mask=mask, max_new_tokens=8)
    assert out.shape == (2, 14)
    assert out[0].tolist() == hf_greedy(model, a[None], 8)[0].tolist()
    assert out[1, 2:].tolist() == hf_greedy(model, b[None], 8)[0].tolist()


def test_accelerate_rejects_unsupported_options():
    import pytest

    fast = specdec.accelerate(tiny_model("llama"))
    with pytest.raises(NotImplementedError, match="num_beams"):
        fast.generate(torch.tensor([[1, 2]]), num_beams=4, max_new_tokens=2)


def test_dualdec_signature_and_losslessness():
    target = tiny_model("qwen2")
    draft = tiny_model("qwen2", layers=1, seed=9)
    ids = torch.randint(3, 96, (1, 7), generator=torch.Generator().manual_seed(3))
    ref = hf_greedy(target, ids, 20)
    out = specdec.dualdec(ids, draft, target, ngram_cache=None, max_len=20, gamma=4, window_size=20,
                          guess_set_size=20, lookahead_level=7, eos_token_id=None, topk=3)
    assert out.tolist() == ref.tolist()


class _ToyTokenizer:
    """Byte-level toy: each id is one byte; decode joins the bytes as UTF-8 (with U+FFFD)."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return bytes(ids).decode("utf-8", errors="replace")


def test_detokenizer_multibyte_split_across_tokens():
    text = "héllo wörld 日本語 🙂!"
    ids = list(text.encode("utf-8"))
    for chunk in (1, 2, 3, 5):
        d = IncrementalDetokenizer(_ToyTokenizer())
        pieces = [d.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)] + [d.flush()]
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)


def test_detokenizer_and_streamer_on_real_tokenizer(smollm2):
    _, tok = smollm2
    text = " hello world, naïve café 🙂 — ok\n    def f(x):\n        return x"
    ids = tok(text).input_ids
    for chunk in (1, 3):
        d = IncrementalDetokenizer(tok)
        pieces = [d.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)] + [d.flush()]
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    prompt = tok("Say hi", return_tensors="pt").input_ids
    got = []
    s = TextStreamer(tok, on_text=got.append)
    s.put(prompt)
    for i in range(0, len(ids), 2):
        s.put(torch.tensor(ids[i:i + 2]))
    s.end()
    assert "".join(got) == tok.decode(ids, skip_special_tokens=True) == s.text


def test_streamer_through_generate():
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(0))
    puts = []

    class Rec:
        def put(self, v):
            puts.append(v.reshape(-1).tolist())

        def end(self):
            puts.append("end")

    out = specdec.generate(model, ids, drafter=specdec.ModelDrafter(model, gamma=3), max_new_tokens=10,
                           streamer=Rec())
    assert puts[0] == ids[0].tolist() and puts[-1] == "end"
    assert sum(puts[1:-1], []) == out.new_tokens.tolist()
    assert len(puts) - 2 == out.stats.steps  # one put per step (multi-token)


def test_accelerated_model_stays_an_ordinary_module():
    """accelerate must not make the model its own submodule: state_dict, to, deepcopy and
    named_modules keep working (they recursed forever when the model referenced itself)."""
    import copy

    import specdec
    from conftest import tiny_model

    model = tiny_model("llama")
    before = set(model.state_dict())
    specdec.accelerate(model)
    assert set(model.state_dict()) == before
    assert model.to("cpu") is model
    assert len(list(model.named_modules())) == len(list(copy.deepcopy(model).named_modules()))
    ids = torch.tensor([[1, 2, 3, 1, 2]])
    assert model.generate(ids, max_new_tokens=3).shape == (1, 8)
