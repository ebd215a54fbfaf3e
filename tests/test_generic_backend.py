"""HFRunner's CPU padding of 2- and 3-token forwards (see generic.CPU_PAD_TO): the real
rows' logits and the cache are those of the unpadded forward; whether to pad is measured."""
from __future__ import annotations

import pytest
import torch

from specdec.backends import generic
from specdec.backends.generic import HFRunner
from conftest import tiny_model


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("m,masked", [(2, False), (3, False), (2, True), (3, True)])
def test_padded_forward_equals_unpadded(family, m, masked, monkeypatch):
    model = tiny_model(family, layers=3)
    ids = torch.randint(0, 96, (20,), generator=torch.Generator().manual_seed(m))

    def run(pad_to):
        monkeypatch.setattr(generic, "CPU_PAD_TO", pad_to)
        r = HFRunner(model)
        r.forward(ids[:12], torch.arange(12))
        mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)[:m, :m] if masked else None
        pos = torch.tensor([12, 13, 13])[:m] if masked else torch.arange(12, 12 + m)
        logits = r.forward(ids[12:12 + m], pos, tree_mask=mask)
        assert r.length == 12 + m and r.key_pos.tolist() == list(range(12)) + pos.tolist()
        r.commit(12, torch.tensor([0]))
        nxt = r.forward(ids[15:16], torch.tensor([13]))  # the cache after keep is the same too
        return logits, nxt, [layer.keys.clone() for layer in r.cache.layers]

    (l1, n1, k1), (l4, n4, k4) = run(1), run(4)
    torch.testing.assert_close(l4, l1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(n4, n1, rtol=1e-5, atol=1e-5)
    for a, b in zip(k1, k4):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_padding_choice_is_measured_once_and_can_be_pinned(monkeypatch):
    monkeypatch.setattr(generic, "CPU_PAD_TO", None)
    monkeypatch.setattr(generic, "_MEASURED_PAD", {})
    w = torch.randn(512, 32)
    rows = generic._cpu_rows_to_pad(w)
    assert rows <= {2, 3} and list(generic._MEASURED_PAD.values()) == [rows]
    assert generic._cpu_rows_to_pad(w) is rows  # cached per shape / dtype / threads
    monkeypatch.setattr(generic, "CPU_PAD_TO", 4)
    assert generic._cpu_rows_to_pad(w) == {2, 3}
    monkeypatch.setattr(generic, "CPU_PAD_TO", 1)
    assert generic._cpu_rows_to_pad(w) == frozenset()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2"])
def test_prefill_and_unmasked_causal_steps_equal_the_explicit_mask(family, monkeypatch):
    """``prefill`` (no logits, no explicit mask) and one-token steps without a mask leave
    the same cache and give the same logits as the explicit-mask forward."""
    model = tiny_model(family, layers=2)
    ids = torch.randint(0, 96, (16,), generator=torch.Generator().manual_seed(1))

    def run(explicit):
        if explicit:
            monkeypatch.setattr(HFRunner, "_plain_causal", lambda *a, **k: False)
        r = HFRunner(model)
        r.prefill(ids[:10], torch.arange(10))
        steps = [r.forward(ids[10 + i:11 + i], torch.tensor([10 + i]), tree_mask=torch.ones(1, 1, dtype=torch.bool))
                 for i in range(3)]
        tree = r.forward(ids[13:16], torch.tensor([13, 14, 14]),
                         tree_mask=torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool))
        monkeypatch.undo()
        return r, steps, tree

    (r1, s1, t1), (r2, s2, t2) = run(False), run(True)
    assert r1.length == r2.length == 16 and r1.key_pos.tolist() == r2.key_pos.tolist()
    for a, b in zip(s1 + [t1], s2 + [t2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for la, lb in zip(r1.cache.layers, r2.cache.layers):
        torch.testing.assert_close(la.keys, lb.keys, rtol=1e-5, atol=1e-5)
