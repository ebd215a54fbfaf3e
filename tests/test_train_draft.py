"""specdec train-draft, kind "model" (#24): distilling lowers the KL, the saved draft
round-trips, loading it against another target is a clear error, and drafting with it is
lossless."""
from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy, tiny_model

import specdec
from specdec import drafters, train_draft


def _seqs(vocab: int, n: int = 6, length: int = 24) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    motif = torch.randint(0, vocab, (6,), generator=g)
    return [torch.cat([motif.roll(i), torch.randint(0, vocab, (length - 6,), generator=g)]) for i in range(n)]


def test_training_lowers_the_kl_and_leaves_the_target_alone():
    target = tiny_model("llama", vocab=64, layers=3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    student = train_draft.student_from_target(target, 1)
    losses = train_draft.train(student, target, _seqs(64), steps=40, lr=3e-3, batch_tokens=96, log_every=0)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
    assert not any(p.requires_grad for p in train_draft.own_parameters(student).values())


def test_saved_draft_round_trips_and_refuses_another_target(tmp_path):
    target = tiny_model("llama", vocab=64, layers=3)
    student = train_draft.student_from_target(target, 2)
    train_draft.train(student, target, _seqs(64), steps=3, batch_tokens=64, log_every=0)
    train_draft.save(student, target, tmp_path, {"steps": 3})
    back = train_draft.load(tmp_path, target)
    for name, p in train_draft.own_parameters(back).items():
        assert torch.equal(p, train_draft.own_parameters(student)[name].to(torch.float16).to(p.dtype)), name
    other = tiny_model("llama", vocab=64, layers=3, seed=7)
    with pytest.raises(ValueError, match="trained for target .* train a draft for this target"):
        train_draft.load(tmp_path, other)
    with pytest.raises(FileNotFoundError, match="specdec train-draft"):
        train_draft.load(tmp_path / "missing", target)


def test_distilled_drafter_is_lossless(tmp_path):
    target = tiny_model("llama", vocab=64, layers=3)
    student = train_draft.student_from_target(target, 1)
    train_draft.train(student, target, _seqs(64), steps=20, lr=3e-3, batch_tokens=96, log_every=0)
    train_draft.save(student, target, tmp_path, {})
    ids = torch.tensor([[5, 9, 3, 5, 9, 3, 5, 9]])
    for topk in (1, 2):
        drafter = drafters.make("distilled", target=target, path=tmp_path, gamma=3, topk=topk)
        out = specdec.generate(target, ids, drafter=drafter, max_new_tokens=20, eos_token_id=None)
        assert out.sequences.tolist() == hf_greedy(target, ids, 20).tolist()
    with pytest.raises(ValueError, match="needs target= .* and path="):
        drafters.make("distilled", target=target)


@pytest.mark.parametrize("kind", ["model", "head"])
def test_cli_trains_from_a_prompt_file(tmp_path, smollm2, kind):
    """The whole command on the real SmolLM2 (2 prompts, a few steps): the drafter and its
    record are written and it loads; --resume reuses the generated data."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a prime number.\nWhat is 2 + 3?\n")
    out = tmp_path / "draft"
    from specdec.cli import main

    args = ["train-draft", "--kind", kind, "--out", str(out), "--prompts", str(prompts), "--answer-tokens", "8",
            "--steps", "2", "--batch-tokens", "64"]
    assert main(args) == 0
    import json

    meta = json.loads((out / f"{'draft' if kind == 'model' else 'head'}.json").read_text())
    assert meta["kind"] == kind and meta["prompts"] == 2 and meta["steps"] == 2
    assert meta["prompt_source"] == "file prompts.txt"
    assert len(json.loads((out / "loss.json").read_text())) == 2
    model, _ = smollm2
    drafters.make("distilled" if kind == "model" else "head", target=model, path=out)
    assert main(args[:-4] + ["--steps", "3", "--resume", "--prompts", "7"]) == 0  # data from seqs.pt
    meta = json.loads((out / f"{'draft' if kind == 'model' else 'head'}.json").read_text())
    assert meta["prompts"] == 2 and meta["prompt_source"] == "file prompts.txt" and meta["steps"] == 3
