"""The real SmolLM2-135M-Instruct on CUDA (marked ``gpu``; skipped without CUDA or the model).

fp32: the fast path ("auto": compact runtime + CUDA graphs + Triton tree attention +
device acceptance) is token-identical to the generic transformers backend and to
transformers' own greedy decoding, for the model-free drafters on code, math and chat
prompts. bf16 agreement is a measurement, not a test: see benchmarks/README.md.
"""
from __future__ import annotations

import pytest
import torch

import specdec
from specdec import drafters
from specdec.backends.cuda_graphs import GraphedCompactRunner
from specdec.backends.select import KEPT_RUNNERS as _RUNNERS
from conftest import hf_greedy, skip_without_smollm2

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def smollm2_cuda():
    skip_without_smollm2()  # (no CPU copy loaded just to find out)
    from specdec.assets import load_smollm2

    return load_smollm2("float32", "cuda")


def _prompts(tok) -> list[torch.Tensor]:
    from test_lossless import _real_prompts

    chat = tok.apply_chat_template([{"role": "user", "content": "Summarize in two sentences why the sky is blue."}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    return [ids.cuda() for ids in _real_prompts(tok, n=2) + [chat]]


@pytest.mark.parametrize("name", ["none", "ngram", "recycling", "ngram+recycling"])
def test_fast_path_equals_generic_and_transformers_fp32(smollm2_cuda, name):
    model, tok = smollm2_cuda
    for ids in _prompts(tok):
        ref = hf_greedy(model, ids, 64, eos_token_id=tok.eos_token_id)
        generic = specdec.generate(model, ids, drafter=drafters.make(name, target=model), max_new_tokens=64,
                                   eos_token_id=tok.eos_token_id, backend="generic")
        fast = specdec.generate(model, ids, drafter=drafters.make(name, target=model), max_new_tokens=64,
                                eos_token_id=tok.eos_token_id)
        assert generic.sequences.tolist() == ref.tolist()
        assert fast.sequences.tolist() == ref.tolist()
    runner = _RUNNERS[model][("graphs", next(model.parameters()).device, torch.float32, "off")]
    assert isinstance(runner, GraphedCompactRunner) and runner.mode == "graph", runner.describe()
