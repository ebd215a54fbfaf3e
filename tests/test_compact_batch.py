"""CompactBatchRunner (compact_batch.py): every row of a packed ragged batch gives, step by
step, the logits a batch-1 CompactRunner gives for that row alone (bitwise in the exact
mode, bf16 included) -- through prefills, forwards of any subset of rows with random trees,
commits of random paths and a release."""
from __future__ import annotations

import random

import pytest
import torch
from conftest import random_tree, tiny_model

from specdec.backends.batch import RowInput
from specdec.backends.compact import CompactRunner
from specdec.backends.compact_batch import CompactBatchRunner


@pytest.mark.parametrize("family,dtype,exact,mode", [
    ("llama", torch.float32, False, "eager"), ("qwen2", torch.float32, False, "eager"),
    ("gemma3", torch.float32, False, "eager"), ("llama", torch.bfloat16, True, "eager"),
    ("gemma3", torch.bfloat16, True, "eager"), ("llama", torch.bfloat16, True, "static"),
    ("gemma3", torch.float32, False, "static")])
def test_rows_match_batch1_runners(family, dtype, exact, mode):
    """mode "static": the padded forward a CUDA graph captures (token buckets, scratch rows)."""
    _check_rows(family, dtype, exact, mode, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_rows_match_batch1_runners_gpu(mode):
    """bf16, exact mode, CUDA graphs per token bucket: still bitwise the rows alone."""
    _check_rows("llama", torch.bfloat16, True, mode, "cuda")


def _check_rows(family, dtype, exact, mode, dev):
    model = tiny_model(family, layers=2).to(dev, dtype)
    rng = random.Random(family)
    prompts = [torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 11, 8)]
    batch = CompactBatchRunner.from_hf(model, max_rows=4, max_length=64, exact=exact, mode=mode)
    assert batch.mode == mode
    refs = [CompactRunner.from_hf(model, max_length=64, exact=exact) for _ in prompts]
    batch.reset(len(prompts))
    batch.prefill([RowInput(b, p, torch.arange(len(p))) for b, p in enumerate(prompts)])
    for ref, p in zip(refs, prompts):
        ref.prefill(p, torch.arange(len(p)))
    roots = [int(p[-1]) for p in prompts]
    live = [0, 1, 2]
    for step in range(7):
        if step == 4:
            batch.release(1)
            live.remove(1)
        rows = rng.sample(live, rng.randint(1, len(live)))  # any subset, any order
        inputs, trees = [], {}
        for b in rows:
            ids, depth, mask = random_tree(rng, roots[b], rng.randint(1, 5))
            causal = rng.random() < 0.2
            trees[b] = (ids, mask.tril() if causal else mask)
            start = refs[b].length
            inputs.append(RowInput(b, ids, start + (torch.arange(len(ids)) if causal else depth),
                                   None if causal else mask))
        outs = batch.forward(inputs)
        for inp, out in zip(inputs, outs):
            want = refs[inp.row].forward(inp.input_ids, inp.position_ids, tree_mask=inp.tree_mask)
            if exact:
                assert torch.equal(out, want.to(out.device)), (step, inp.row, (out - want).abs().max())
            else:
                torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        for b in rows:  # keep a random root-to-node path (sometimes none: a rollback)
            ids, mask = trees[b]
            start = refs[b].length - len(ids)
            node = rng.randrange(-1, len(ids))
            keep = torch.zeros(0, dtype=torch.long) if node < 0 else mask[node].nonzero().reshape(-1)
            batch.commit(b, start, keep)
            refs[b].commit(start, keep)
            roots[b] = int(ids[keep[-1]]) if node >= 0 else roots[b]
        assert [batch.length(b) for b in live] == [refs[b].length for b in live]


def test_errors():
    model = tiny_model("llama", layers=1)
    batch = CompactBatchRunner.from_hf(model, max_rows=2, max_length=8)
    with pytest.raises(ValueError, match="max_rows >= 3"):
        batch.reset(3)
    batch.reset(2)
    one = torch.tensor([1])
    with pytest.raises(ValueError, match="row 2"):
        batch.forward([RowInput(2, one, one)])
    with pytest.raises(ValueError, match="distinct"):
        batch.forward([RowInput(0, one, one), RowInput(0, one, one)])
    with pytest.raises(ValueError, match="exceed"):
        batch.forward([RowInput(0, torch.arange(9), torch.arange(9))])
    batch.forward([RowInput(0, torch.tensor([1, 2]), torch.tensor([0, 1]))])
    with pytest.raises(ValueError, match="exceed"):
        batch.commit(0, 1, torch.tensor([0, 1]))
    batch.release(1)
    with pytest.raises(ValueError, match="released"):
        batch.forward([RowInput(1, one, one)])
    with pytest.raises(ValueError, match="live row"):
        batch.release(1)


def test_a_failed_capture_falls_back_to_eager(monkeypatch, capsys):
    from specdec.backends import compact_batch

    monkeypatch.setattr(compact_batch, "graph_issue", lambda runner: None)

    def broken(*args, **kwargs):
        raise RuntimeError("no graphs today")

    monkeypatch.setattr(compact_batch, "capture", broken)
    model = tiny_model("llama", layers=1)
    batch = CompactBatchRunner.from_hf(model, max_rows=2, max_length=32)
    eager = CompactBatchRunner.from_hf(model, max_rows=2, max_length=32, mode="eager")
    assert batch.mode == "graph"
    for runner in (batch, eager):
        runner.reset(2)
        runner.prefill([RowInput(0, torch.tensor([1, 2, 3]), torch.arange(3)),
                        RowInput(1, torch.tensor([4]), torch.arange(1))])
    step = [RowInput(0, torch.tensor([5]), torch.tensor([3])), RowInput(1, torch.tensor([6]), torch.tensor([1]))]
    got, want = batch.forward(step), eager.forward(step)
    assert batch.mode == "eager" and "CUDA graphs off for batches" in capsys.readouterr().err
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
