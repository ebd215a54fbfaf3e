"""Greedy speculative output must be token-identical to transformers' greedy output (fp32)."""
import json
import os
from pathlib import Path

import pytest
import torch

import specdec
from specdec.drafters.base import DraftRequest
from specdec.tree import TokenTree, from_paths

from conftest import FAMILIES, hf_greedy, tiny_model


class FixedTreeDrafter:
    """Proposes a fixed-shape tree of random tokens plus the true continuation on one branch.

    ``oracle`` holds the reference output so some branches are right (long accepts) and
    others wrong (rejections at every depth)."""

    def __init__(self, oracle: list[int], branches: int, depth: int, vocab: int, seed: int = 0, hit_rate=0.7):
        self.oracle, self.branches, self.depth, self.vocab = oracle, branches, depth, vocab
        self.g = torch.Generator().manual_seed(seed)
        self.hit_rate = hit_rate

    def reset(self, prompt):
        pass

    def propose(self, request: DraftRequest) -> TokenTree:
        pos = request.tokens.numel()
        paths = []
        true = self.oracle[pos:pos + self.depth]
        if float(torch.rand((), generator=self.g)) < self.hit_rate and true:
            cut = int(torch.randint(1, len(true) + 1, (1,), generator=self.g))
            wrong = int(torch.randint(0, self.vocab, (1,), generator=self.g))
            paths.append(true[:cut] + [wrong])
        for _ in range(self.branches):
            paths.append(torch.randint(0, self.vocab, (self.depth,), generator=self.g).tolist())
        return from_paths(paths)

    def update(self, result):
        pass


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_decoding_matches_hf(family):
    model = tiny_model(family)
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(3))
    ref = hf_greedy(model, ids, 24)
    out = specdec.generate(model, ids, max_new_tokens=24, eos_token_id=None)
    assert out.sequences.tolist() == ref.tolist()
    assert out.stats.steps == 24


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("branches,depth", [(0, 1), (0, 5), (2, 3), (4, 6)])
def test_tree_verification_matches_hf(family, branches, depth):
    model = tiny_model(family)
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(4))
    ref = hf_greedy(model, ids, 30)
    drafter = FixedTreeDrafter(ref[0].tolist(), branches, depth, 96, seed=branches * 10 + depth)
    out = specdec.generate(model, ids, drafter=drafter, max_new_tokens=30, eos_token_id=None)
    assert out.sequences.tolist() == ref.tolist()
    assert out.stats.steps < 30  # the oracle branch was accepted at least sometimes


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gamma,topk", [(1, 1), (4, 1), (3, 3)])
def test_model_drafter_matches_hf(family, gamma, topk):
    model = tiny_model(family, seed=0)
    draft = tiny_model(family, layers=1, seed=1)
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(5))
    ref = hf_greedy(model, ids, 20)
    out = specdec.generate(model, ids, drafter=specdec.ModelDrafter(draft, gamma=gamma, topk=topk),
                           max_new_tokens=20, eos_token_id=None)
    assert out.sequences.tolist() == ref.tolist()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_draft_equal_target_accepts_everything(family):
    model = tiny_model(family)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(6))
    out = specdec.generate(model, ids, drafter=specdec.ModelDrafter(model, gamma=4), max_new_tokens=25,
                           eos_token_id=None)
    assert out.sequences.tolist() == hf_greedy(model, ids, 25).tolist()
    # every step accepts all 4 drafts, except where the budget (max_new_tokens) cuts the tree
    assert out.stats.accepted_per_step[:-1] == [4] * (len(out.stats.accepted_per_step) - 1)
    assert out.stats.mean_accepted_length > 4.0


def test_eos_inside_accepted_path_and_max_new_mid_step():
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(7))
    free = hf_greedy(model, ids, 30)[0, 6:].tolist()
    eos = free[10]  # a token that appears mid-way: generation must stop right after it
    ref = hf_greedy(model, ids, 30, eos_token_id=eos)
    drafter = specdec.ModelDrafter(model, gamma=6)  # accepts everything: EOS lands inside a path
    out = specdec.generate(model, ids, drafter=drafter, max_new_tokens=30, eos_token_id=[eos, 95])
    assert out.sequences.tolist() == ref.tolist()
    assert out.sequences[0, -1].item() == eos
    for n in [1, 2, 5, 13]:  # max_new_tokens landing in the middle of a 7-token step
        out = specdec.generate(model, ids, drafter=specdec.ModelDrafter(model, gamma=6), max_new_tokens=n,
                               eos_token_id=None)
        assert out.sequences.tolist() == hf_greedy(model, ids, n).tolist()
    assert specdec.generate(model, ids, max_new_tokens=0).sequences.tolist() == ids.tolist()


def test_repetition_penalty_greedy_matches_hf():
    model = tiny_model("qwen2")
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(8))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                         repetition_penalty=1.3, pad_token_id=0, eos_token_id=None)
    out = specdec.generate(model, ids, drafter=specdec.ModelDrafter(tiny_model("qwen2", layers=1, seed=2), gamma=3),
                           max_new_tokens=20, repetition_penalty=1.3, eos_token_id=None)
    assert out.sequences.tolist() == ref.tolist()


DATA = Path(os.environ.get("SPECDEC_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")


def _real_prompts(tok, n=2):
    prompts = []
    he = DATA / "humaneval.jsonl"
    gs = DATA / "gsm8k_test.jsonl"
    if he.exists() and gs.exists():
        for line in he.read_text().splitlines()[:n]:
            prompts.append(json.loads(line)["prompt"])
        for line in gs.read_text().splitlines()[:n]:
            prompts.append("Question: " + json.loads(line)["question"] + "\nAnswer:")
    else:  # CI without the data folder: same kind of prompts, written here
        prompts = ['def add(a, b):\n    """Return the sum of a and b."""\n',
                   "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:"]
    return [tok(p, return_tensors="pt").input_ids for p in prompts]


def test_real_smollm2_lossless(smollm2):
    model, tok = smollm2

    for ids in _real_prompts(tok):
        ref = hf_greedy(model, ids, 32, eos_token_id=tok.eos_token_id)
        # a self-drafter with a shifted oracle gives partial accepts on real text
        drafter = FixedTreeDrafter(ref[0].tolist(), branches=2, depth=4, vocab=model.config.vocab_size)
        out = specdec.generate(model, ids, drafter=drafter, max_new_tokens=32, eos_token_id=tok.eos_token_id)
        assert out.sequences.tolist() == ref.tolist()
