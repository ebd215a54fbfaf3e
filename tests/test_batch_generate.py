"""Batched decoding (#23): each row of a left-padded batch comes out as that row decoded
alone -- greedy token for token (generic backend in fp32; compact packed batch in bf16 with
the exact mode, bitwise), sampling from the target's distribution per row -- with per-row
EOS and lengths, speculation giving way to plain batched decoding when the batch fills the
token cap, and clear errors for bad batches."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import specdec
from specdec import drafters
from specdec.batch_generate import generate_batch

NAMES = ["ngram", "suffix", "recycling", "ngram+recycling"]


def _left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    return ids, mask


ROWS = [[5, 9, 3, 5, 9, 3, 5, 9], [7, 7, 2, 4, 7, 7, 2], [11, 3], [4, 8, 15, 16, 23, 42, 4, 8, 15, 16, 23]]


def _alone(model, rows, n, **kw):
    return [specdec.generate(model, torch.tensor(r), max_new_tokens=n, **kw).new_tokens.tolist() for r in rows]


@pytest.mark.parametrize("name", [None] + NAMES)
def test_greedy_rows_equal_each_row_alone_generic_fp32(name):
    model = tiny_model("llama", vocab=48)
    ids, mask = _left_padded(ROWS)
    drafter = None if name is None else drafters.make(name, target=model)
    out = generate_batch(model, ids, attention_mask=mask, drafter=drafter, max_new_tokens=14, eos_token_id=None,
                         max_batch_tokens=32)
    want = _alone(model, ROWS, 14, eos_token_id=None)
    assert out.new_token_lists == want
    assert out.sequences.shape == (4, ids.shape[1] + 14)
    assert torch.equal(out.sequences[:, :ids.shape[1]], ids)
    if name is not None:
        assert sum(r.steps for r in out.stats.rows) < 4 * 14  # drafts were accepted
    assert out.stats.forwards == max(r.steps for r in out.stats.rows)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("name", [None, "ngram+recycling", "suffix"])
def test_compact_batch_bf16_exact_rows_equal_each_row_alone(family, name):
    """bf16 on the compact packed batch with the exact mode: bitwise per row, so identical tokens."""
    model = tiny_model(family, vocab=48).to(torch.bfloat16)
    ids, mask = _left_padded(ROWS)
    drafter = None if name is None else drafters.make(name, target=model)
    out = generate_batch(model, ids, attention_mask=mask, drafter=drafter, max_new_tokens=16, eos_token_id=None,
                         backend="compact", exact=True, max_batch_tokens=40)
    assert out.new_token_lists == _alone(model, ROWS, 16, eos_token_id=None, backend="compact", exact=True)


def test_eos_and_lengths_per_row_and_padding_after_the_end():
    model = tiny_model("llama", vocab=48)
    ids, mask = _left_padded(ROWS)
    free = _alone(model, ROWS, 12, eos_token_id=None)
    eos = free[1][3]  # row 1 stops at its 4th token; other rows stop where they meet it
    out = generate_batch(model, ids, attention_mask=mask, drafter=drafters.make("ngram"), max_new_tokens=12,
                         eos_token_id=eos, pad_token_id=47, max_batch_tokens=32)
    want = _alone(model, ROWS, 12, eos_token_id=eos)
    assert out.new_token_lists == want and len(want[1]) <= 4
    width = max(map(len, want))
    for b, w in enumerate(want):
        row = out.sequences[b, ids.shape[1]:].tolist()
        assert row == w + [47] * (width - len(w))


def test_a_full_batch_turns_speculation_off():
    model = tiny_model("llama", vocab=48)
    ids, mask = _left_padded(ROWS)
    out = generate_batch(model, ids, attention_mask=mask, drafter=drafters.make("ngram"), max_new_tokens=6,
                         eos_token_id=None, max_batch_tokens=4)
    assert all(size == 0 for r in out.stats.rows for size in r.tree_sizes)
    assert out.new_token_lists == _alone(model, ROWS, 6, eos_token_id=None)


def test_mask_inferred_from_the_pad_id_as_transformers_does():
    model = tiny_model("llama", vocab=48)
    ids, _ = _left_padded(ROWS, pad=0)
    out = generate_batch(model, ids, max_new_tokens=5, eos_token_id=None, pad_token_id=0)
    assert out.new_token_lists == _alone(model, ROWS, 5, eos_token_id=None)


def test_sampling_follows_the_target_distribution_per_row():
    """First two sampled tokens of each row of a 2-row batch (ngram+recycling drafts, T=0.8)
    against that row's exact joint distribution."""
    from test_sampling import _exact_first_two
    from test_drafters_lossless import _tv

    from specdec.config import SamplingParams

    vocab = 5
    target = tiny_model("llama", vocab=vocab, seed=0)
    with torch.no_grad():
        target.lm_head.weight.mul_(8)
    rows = [[1, 3, 1, 3, 1], [2, 4, 2]]
    ids, mask = _left_padded(rows, pad=0)
    sp = SamplingParams(do_sample=True, temperature=0.8)
    exact = [_exact_first_two(target, torch.tensor([r]), sp) for r in rows]
    counts = [torch.zeros(vocab, vocab) for _ in rows]
    g = torch.Generator().manual_seed(0)
    for _ in range(900):
        out = generate_batch(target, ids, attention_mask=mask, drafter=drafters.make("ngram+recycling", target=target),
                             max_new_tokens=2, do_sample=True, temperature=0.8, generator=g, eos_token_id=None)
        for b, toks in enumerate(out.new_token_lists):
            counts[b][toks[0], toks[1]] += 1
    for b in range(2):
        assert _tv(counts[b], exact[b]) < 0.08, (b, _tv(counts[b], exact[b]))


def test_model_drafters_fall_back_to_one_row_at_a_time(capsys):
    model = tiny_model("llama", vocab=48)
    draft = tiny_model("llama", vocab=48, layers=1, seed=3)
    ids, mask = _left_padded(ROWS[:2])
    out = generate_batch(model, ids, attention_mask=mask, drafter=drafters.make("model", target=model,
                         draft_model=draft, gamma=3), max_new_tokens=8, eos_token_id=None)
    assert out.stats.loop == "row by row"
    assert out.new_token_lists == _alone(model, ROWS[:2], 8, eos_token_id=None)


def test_bad_batches_are_clear_errors():
    model = tiny_model("llama", vocab=48)
    with pytest.raises(ValueError, match="different lengths.*attention_mask"):
        generate_batch(model, [[1, 2, 3], [4, 5]], max_new_tokens=2)
    ids, mask = _left_padded(ROWS[:2])
    mask[1] = 0
    with pytest.raises(ValueError, match="row 1 .*no tokens"):
        generate_batch(model, ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask .* must match"):
        generate_batch(model, ids, attention_mask=mask[:, 1:], max_new_tokens=2)
    with pytest.raises(ValueError, match="0 \\(padding\\) and 1"):
        generate_batch(model, ids, attention_mask=mask * 2, max_new_tokens=2)
    from specdec.backends.compact_batch import CompactBatchRunner

    runner = CompactBatchRunner.from_hf(model, max_rows=1, max_length=32)
    with pytest.raises(ValueError, match="max_rows >= 2"):
        generate_batch(runner, ids, attention_mask=torch.ones_like(ids), max_new_tokens=2)
    with pytest.raises(ValueError, match="vocabulary"):
        generate_batch(model, torch.tensor([[1, 2], [3, 99]]), max_new_tokens=2)


def test_pays_check_turns_speculation_off_where_it_is_slower_and_retries():
    from specdec.batch_generate import _PaysCheck

    check = _PaysCheck(enabled=True, probe_every=4, off_steps=8, window=8)
    plan = []
    for _ in range(24):
        spec = check.speculate()
        plan.append(spec)
        check.record(spec, 10 if spec else 8, 1.0 if spec else 0.5)  # speculation: 10 tok/s, plain: 16 tok/s
    assert plan[:3] == [True] * 3 and plan[3] is False  # the probe
    off = [i for i, p in enumerate(plan) if not p]
    assert len(off) > 10  # mostly plain once measured slower ...
    assert any(plan[12:])  # ... and tried again after off_steps
    assert all(_PaysCheck(enabled=False).speculate() for _ in range(5))


def test_speculation_that_does_not_pay_turns_itself_off(monkeypatch):
    """A runner whose forward costs 3 ms per extra token: far more steps draft nothing than
    with the check off, and the output is still each row alone."""
    import time

    from specdec import batch_generate
    from specdec.backends.generic_batch import HFBatchRunner

    model = tiny_model("llama", vocab=48)
    ids, mask = _left_padded(ROWS)

    def run():
        runner = HFBatchRunner(model)
        real = runner.forward

        def slow(inputs):
            time.sleep(0.003 * sum(i.input_ids.numel() - 1 for i in inputs))
            return real(inputs)

        runner.forward = slow
        out = generate_batch(runner, ids, attention_mask=mask, drafter=drafters.make("recycling", target=model),
                             max_new_tokens=40, eos_token_id=None, max_batch_tokens=32)
        assert out.new_token_lists == _alone(model, ROWS, 40, eos_token_id=None)
        sizes = [s for r in out.stats.rows for s in r.tree_sizes]
        return sum(s == 0 for s in sizes) / len(sizes)

    checked = run()
    monkeypatch.setattr(batch_generate._PaysCheck, "speculate", lambda self: True)
    assert checked > run() + 0.25


def test_plain_steps_skip_the_drafters_and_rows_catch_up_when_drafting_resumes(monkeypatch):
    """While the pays check has speculation off, no row's drafter is updated (that host work
    cost more than the plain step itself); when drafting resumes each row's drafter is reset to
    the row's tokens. Output: still each row alone."""
    from specdec import batch_generate
    from specdec.drafters.ngram import NgramDrafter

    calls = {"update": 0, "reset": []}

    class Counting(NgramDrafter):
        def update(self, result):
            calls["update"] += 1
            return super().update(result)

        def reset(self, prompt):
            calls["reset"].append(int(prompt.numel()))
            return super().reset(prompt)

    plan = iter([True] * 3 + [False] * 6 + [True] * 100)
    monkeypatch.setattr(batch_generate._PaysCheck, "speculate", lambda self: next(plan))
    model = tiny_model("llama", vocab=48)
    ids, mask = _left_padded(ROWS)
    out = generate_batch(model, ids, attention_mask=mask, drafter=lambda: Counting(), max_new_tokens=24,
                         eos_token_id=None)
    assert out.new_token_lists == _alone(model, ROWS, 24, eos_token_id=None)
    rows = len(ROWS)
    resets = calls["reset"][rows:]  # after the first reset of each row (its prompt)
    assert len(resets) == rows and all(n > len(r) for n, r in zip(resets, ROWS))  # prompt + what was decoded
    steps = sum(r.steps for r in out.stats.rows)
    assert calls["update"] < steps - 6 * rows + rows  # no updates during the 6 plain steps


def test_real_smollm2_fp32_batch_rows_equal_transformers_one_by_one(smollm2):
    """The real model, fp32, generic batched backend: a left-padded batch of code, math and
    chat prompts with ngram + recycling drafts; each row equals transformers' greedy output
    for that prompt alone (EOS cuts included)."""
    from conftest import hf_greedy
    from test_lossless import _real_prompts

    model, tok = smollm2
    chat = tok.apply_chat_template([{"role": "user", "content": "Name three primary colours."}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    prompts = [p[0] for p in _real_prompts(tok, n=1)] + [chat[0]]
    ids, mask = _left_padded([p.tolist() for p in prompts], pad=tok.pad_token_id or 0)
    out = generate_batch(model, ids, attention_mask=mask, drafter=drafters.make("ngram+recycling", target=model),
                         max_new_tokens=24, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or 0)
    for b, p in enumerate(prompts):
        ref = hf_greedy(model, p[None], 24, eos_token_id=tok.eos_token_id)[0, p.numel():].tolist()
        assert out.new_token_lists[b] == ref, b
    assert out.stats.mean_accepted_length > 1.0
