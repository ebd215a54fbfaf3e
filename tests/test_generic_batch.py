"""HFBatchRunner (generic_batch.py): every row of a ragged batch gives, step by step, the
logits a batch-1 HFRunner gives for that row alone -- through prefills, forwards of any subset
of the rows with random trees, commits of random paths and a release."""
from __future__ import annotations

import random

import pytest
import torch

from specdec.backends import generic
from specdec.backends.batch import RowInput
from specdec.backends.generic import HFRunner
from specdec.backends.generic_batch import HFBatchRunner
from conftest import FAMILIES, random_tree, tiny_model

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_match_batch1_runners(family, monkeypatch):
    monkeypatch.setattr(generic, "CPU_PAD_TO", 1)  # the references run unpadded, no timing
    model = tiny_model(family, layers=2)
    rng = random.Random(family)
    prompts = [torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 11, 8)]
    batch, refs = HFBatchRunner(model), [HFRunner(model) for _ in prompts]
    batch.reset(len(prompts))
    batch.prefill([RowInput(b, p, torch.arange(len(p))) for b, p in enumerate(prompts)])
    for ref, p in zip(refs, prompts):
        ref.prefill(p, torch.arange(len(p)))
    roots = [int(p[-1]) for p in prompts]  # each row's last token (the engine's bonus token)
    live = [0, 1, 2]
    for step in range(7):
        if step == 4:
            batch.release(1)
            live.remove(1)
        rows = rng.sample(live, rng.randint(1, len(live)))  # any subset, any order
        inputs, trees = [], {}
        for b in rows:
            ids, depth, mask = random_tree(rng, roots[b], rng.randint(1, 5))
            causal = rng.random() < 0.2  # None = causal: the ids as a chain
            trees[b] = (ids, depth, mask.tril() if causal else mask)
            start = refs[b].length
            inputs.append(RowInput(b, ids, start + (torch.arange(len(ids)) if causal else depth),
                                   None if causal else mask))
        outs = batch.forward(inputs)
        for inp, out in zip(inputs, outs):
            want = refs[inp.row].forward(inp.input_ids, inp.position_ids, tree_mask=inp.tree_mask)
            assert out.dtype == torch.float32 and out.shape == want.shape
            torch.testing.assert_close(out, want, **TOL)
            assert batch.length(inp.row) == refs[inp.row].length
        for b in rows:  # keep a random root-to-node path (sometimes none, i.e. a rollback)
            ids, _, mask = trees[b]
            start = refs[b].length - len(ids)
            node = rng.randrange(-1, len(ids))
            keep = torch.zeros(0, dtype=torch.long) if node < 0 else mask[node].nonzero().reshape(-1)
            batch.commit(b, start, keep)
            refs[b].commit(start, keep)
            roots[b] = int(ids[keep[-1]]) if node >= 0 else roots[b]
        for b in live:
            assert batch.length(b) == refs[b].length
        assert batch.key_pos.shape[1] == max(batch.length(b) for b in live)  # the width follows the rows
        for layer in batch.cache.layers:
            assert layer.keys.shape[:3] == (len(live), layer.keys.shape[1], max(batch.length(b) for b in live))
    for b in live:  # the committed entries are the reference's
        slot = batch._slots[b]
        assert batch.key_pos[slot, :batch.length(b)].tolist() == refs[b].key_pos.tolist()
        for lb, lr in zip(batch.cache.layers, refs[b].cache.layers):
            torch.testing.assert_close(lb.keys[slot, :, :batch.length(b)], lr.keys[0], **TOL)
            torch.testing.assert_close(lb.values[slot, :, :batch.length(b)], lr.values[0], **TOL)


def test_released_row_leaves_the_forward_batch():
    model = tiny_model("llama", layers=1)
    batch = HFBatchRunner(model)
    batch.reset(3)
    sizes = []
    hook = model.register_forward_pre_hook(lambda mod, args, kw: sizes.append(kw["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        batch.prefill([RowInput(b, torch.arange(3 + b), torch.arange(3 + b)) for b in range(3)])
        batch.release(0)
        batch.forward([RowInput(2, torch.tensor([7]), torch.tensor([5]))])
        batch.release(2)
        batch.forward([RowInput(1, torch.tensor([7]), torch.tensor([4]))])
    finally:
        hook.remove()
    assert sizes == [3, 2, 1]
    assert [batch.length(b) for b in range(3)] == [3, 5, 6]  # a released row keeps its count
    assert batch.key_pos.shape == (1, 5)


def test_errors():
    model = tiny_model("llama", layers=1)
    batch = HFBatchRunner(model, max_rows=2)
    with pytest.raises(ValueError, match="max_rows"):
        batch.reset(3)
    batch.reset(2)
    one = torch.tensor([1])

    def run(*inputs):
        return batch.forward(list(inputs))

    with pytest.raises(ValueError, match="row 2"):
        run(RowInput(2, one, one))
    with pytest.raises(ValueError, match="row -1"):
        run(RowInput(-1, one, one))
    with pytest.raises(ValueError, match="distinct"):
        run(RowInput(0, one, one), RowInput(0, one, one))
    with pytest.raises(ValueError, match="tree_mask"):
        run(RowInput(0, torch.tensor([1, 2]), torch.tensor([0, 1]), torch.ones(2, 3, dtype=torch.bool)))
    with pytest.raises(ValueError, match="several devices"):
        run(RowInput(0, one, one), RowInput(1, one.to("meta"), one.to("meta")))
    with pytest.raises(ValueError, match="at least one"):
        run()
    assert [batch.length(b) for b in range(2)] == [0, 0]  # nothing ran
    run(RowInput(0, torch.tensor([1, 2]), torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="keep"):
        batch.commit(0, 0, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="keep"):
        batch.commit(0, 1, torch.tensor([1]))
    batch.release(1)
    with pytest.raises(ValueError, match="live row"):
        run(RowInput(1, one, one))
    with pytest.raises(ValueError, match="live row"):
        batch.commit(1, 0, torch.tensor([0]))
    with pytest.raises(ValueError, match="live row"):
        batch.release(1)
