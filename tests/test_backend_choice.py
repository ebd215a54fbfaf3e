"""generate's ``backend`` argument: which runner runs the target, and that every choice
gives the same tokens (fp32). On CPU "auto" is the generic backend; "compact" and
"graphs" run the compact runtime (graphs fall back to eager there, with one line)."""
from __future__ import annotations

import pytest
import torch

import specdec
from specdec import drafters
from specdec.backends.compact import CompactRunner
from specdec.backends.cuda_graphs import GraphedCompactRunner
from specdec.backends.generic import HFRunner
from specdec.backends.select import KEPT_RUNNERS as _RUNNERS
from specdec.backends.select import as_runner as _as_runner
from conftest import hf_greedy, tiny_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _prompt(vocab: int, n: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_auto_on_cpu_is_generic():
    model = tiny_model("llama")
    assert isinstance(_as_runner(model, "auto", 64), HFRunner)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        specdec.generate(tiny_model("llama"), _prompt(96), max_new_tokens=2, backend="fast")


def test_compact_backend_refuses_an_unsupported_model():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="use backend='generic'"):
        specdec.generate(model, _prompt(96), max_new_tokens=2, backend="compact")


@pytest.mark.parametrize("backend", ["compact", "graphs"])
def test_every_backend_gives_the_same_tokens(backend):
    model = tiny_model("llama")
    ids = _prompt(model.config.vocab_size)
    ref = hf_greedy(model, ids, 24)
    out = specdec.generate(model, ids, drafter=drafters.make("recycling", target=model), max_new_tokens=24,
                           eos_token_id=[], backend=backend)
    assert out.sequences.tolist() == ref.tolist()
    runner = _RUNNERS[model][(backend, torch.device("cpu"), torch.float32, "off")]
    assert isinstance(runner, GraphedCompactRunner if backend == "graphs" else CompactRunner)
    if backend == "graphs":
        assert runner.mode == "eager" and "cpu" in runner.disabled_reason  # no CUDA graphs on CPU


def test_compact_runner_is_kept_between_calls_and_grows_when_needed():
    model = tiny_model("llama")
    ids = _prompt(model.config.vocab_size)
    specdec.generate(model, ids, max_new_tokens=4, backend="compact", eos_token_id=[])
    first = _RUNNERS[model][("compact", torch.device("cpu"), torch.float32, "off")]
    out = specdec.generate(model, ids, max_new_tokens=6, backend="compact", eos_token_id=[])
    assert _RUNNERS[model][("compact", torch.device("cpu"), torch.float32, "off")] is first  # reused
    assert out.sequences.tolist() == hf_greedy(model, ids, 6).tolist()


@pytest.mark.gpu
@needs_cuda
def test_auto_on_cuda_replays_graphs_and_matches_generic():
    model = tiny_model("llama", head_dim=16).cuda()  # head dim 16: the Triton kernel's smallest
    ids = _prompt(model.config.vocab_size).cuda()
    generic = specdec.generate(model, ids, drafter=drafters.make("ngram+recycling", target=model),
                               max_new_tokens=40, eos_token_id=[], backend="generic")
    auto = specdec.generate(model, ids, drafter=drafters.make("ngram+recycling", target=model),
                            max_new_tokens=40, eos_token_id=[])
    runner = _RUNNERS[model][("graphs", next(model.parameters()).device, torch.float32, "off")]
    assert isinstance(runner, GraphedCompactRunner) and runner.mode == "graph", runner.describe()
    assert auto.sequences.tolist() == generic.sequences.tolist()
