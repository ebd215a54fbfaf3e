"""GraphedCompactRunner: CUDA-graph replays of the compact forward, padded to buckets.

On CPU: the default mode falls back to the eager CompactRunner (bit-identical), and the
padded graph-safe forward ("static" mode, what a graph captures) matches the eager
runner over prefill, trees, keep, crop and decode. On CUDA (marked ``gpu``): the
captured graphs match the eager runner across buckets and cache lengths.
"""
from __future__ import annotations

import os

import pytest
import torch

from specdec.backends.compact import CompactRunner
from specdec.backends.cuda_graphs import GraphedCompactRunner
from specdec.ops import backend
from test_compact_models import PARENTS, V, ancestor_mask, assert_close, make_hf, path_to

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
BUCKETS = (1, 4, 8, 16)
NAMES = ["llama", "qwen3-qknorm-sliding", "gemma3"]  # plain / sliding window + QK-norm / Gemma norms


def _depth(parents: list[int]) -> torch.Tensor:
    return torch.tensor([len(path_to(parents, i)) - 1 for i in range(len(parents))])


def _session(runner, dev, seed: int = 0) -> list[torch.Tensor]:
    """One sequence through every kind of call the engine makes; returns each call's logits.

    With BUCKETS: causal chunks of 7 and 5 (bucket 8, padded), an 8-node tree (bucket 8),
    3- and 2-node trees (bucket 4, padded; the second reuses a dirtier mask buffer),
    decode steps (bucket 1), keep, crop, a 20-token chunk (eager: past the last bucket)."""
    g = torch.Generator().manual_seed(seed)

    def tok(n):
        return torch.randint(0, V, (n,), generator=g).to(dev)

    def arange(n):
        return torch.arange(runner.length, runner.length + n, device=dev)

    def tree(parents):
        return runner.forward(tok(len(parents)), (runner.length + _depth(parents)).to(dev),
                              ancestor_mask(parents).to(dev))

    runner.reset()
    outs = [runner.forward(tok(7), arange(7))]
    L = runner.length
    outs.append(tree(PARENTS))
    runner.commit(L, torch.tensor(path_to(PARENTS, 6), device=dev))
    for _ in range(3):
        outs.append(runner.forward(tok(1), arange(1)))
    L = runner.length
    outs.append(tree([-1, 0, 0]))
    runner.commit(L, torch.tensor([0, 2], device=dev))
    outs.append(runner.forward(tok(5), arange(5)))
    runner.crop(runner.length - 2)
    L = runner.length
    outs.append(tree([-1, 0]))
    runner.commit(L, torch.tensor([0], device=dev))
    outs.append(runner.forward(tok(20), arange(20)))
    outs.append(tree(PARENTS))
    runner.commit(L, torch.tensor([0, 1], device=dev))
    outs.append(runner.forward(tok(1), arange(1)))
    return outs


def _pair(name: str, dev: str, mode: str | None, dtype=torch.float32, max_length: int = 96):
    hf = make_hf(name, dtype=dtype).to(dev)
    ref = CompactRunner.from_hf(hf, max_length=max_length)
    graphed = GraphedCompactRunner(CompactRunner.from_hf(hf, max_length=max_length), buckets=BUCKETS, mode=mode)
    return ref, graphed


def _compare_sessions(ref, graphed, dev, rtol: float, seed: int = 0):
    want, got = _session(ref, dev, seed), _session(graphed, dev, seed)
    assert len(want) == len(got)
    for i, (a, b) in enumerate(zip(want, got)):
        assert a.shape == b.shape and b.dtype == torch.float32, (i, a.shape, b.shape)
        assert_close(b.cpu(), a.cpu(), rtol)
    L = ref.length
    assert graphed.length == L
    # committed cache entries agree: padded writes never touched them
    assert_close(graphed.cache.k[:, :, :L].float().cpu(), ref.cache.k[:, :, :L].float().cpu(), rtol)
    assert_close(graphed.cache.v[:, :, :L].float().cpu(), ref.cache.v[:, :, :L].float().cpu(), rtol)
    assert torch.equal(graphed.cache.pos[:L].cpu(), ref.cache.pos[:L].cpu())


# ----------------------------------------------------------------------------- CPU


def test_cpu_default_falls_back_to_eager_exactly():
    ref, graphed = _pair("llama", "cpu", None)
    assert graphed.mode == "eager" and "cpu" in graphed.disabled_reason
    for a, b in zip(_session(ref, "cpu"), _session(graphed, "cpu")):
        assert torch.equal(a, b)
    assert graphed.length == ref.length


@pytest.mark.parametrize("name", NAMES)
def test_static_padded_forward_matches_eager(name):
    """The graph-safe forward padded to buckets (what the graphs capture), uncaptured."""
    ref, graphed = _pair(name, "cpu", "static")
    _compare_sessions(ref, graphed, "cpu", rtol=1e-5)
    assert graphed.eager_calls == {"more tokens than the largest bucket": 1}


@pytest.mark.skipif(HAS_CUDA or os.environ.get("TRITON_INTERPRET") != "1" or not backend.has_triton(),
                    reason="runs the Triton kernel on CPU through the interpreter")
def test_static_forward_through_triton_interpreter():
    """The GPU code path minus the capture: packed masks and the prefix length read from
    a device tensor by the Triton tree-attention kernel (interpreted), sliding window on."""
    with backend.override(triton=True):
        ref, graphed = _pair("qwen3-qknorm-sliding", "cpu", "static")
        assert graphed._pack
        _compare_sessions(ref, graphed, "cpu", rtol=1e-5)


def test_static_eager_fallbacks():
    ref, graphed = _pair("llama", "cpu", "static", max_length=12)
    for r in (ref, graphed):
        r.forward(torch.arange(8), torch.arange(8))  # bucket 8: fits
        r.forward(torch.tensor([8]), torch.tensor([8]))  # bucket 1
    assert not graphed.eager_calls
    # a 3-node tree pads to bucket 4: 9 + 4 > 12 slots, so it runs eagerly
    mask = ancestor_mask([-1, 0, 0])
    a = ref.forward(torch.tensor([5, 6, 7]), torch.tensor([9, 10, 10]), mask)
    b = graphed.forward(torch.tensor([5, 6, 7]), torch.tensor([9, 10, 10]), mask)
    assert_close(b, a, 1e-5)  # the prefix came from the padded forward: close, not equal
    assert graphed.eager_calls["padded bucket exceeds the cache capacity"] == 1
    # a mask over cached entries (mask_start < length) runs eagerly
    for r in (ref, graphed):
        r.crop(9)
    stale = torch.cat([torch.zeros(1, 2, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool)], 1)
    a = ref.forward(torch.tensor([3]), torch.tensor([7]), stale, mask_start=7)
    b = graphed.forward(torch.tensor([3]), torch.tensor([7]), stale, mask_start=7)
    assert_close(b, a, 1e-5)
    assert graphed.eager_calls["mask covers cached entries"] == 1
    # bad input still raises the eager runner's errors
    with pytest.raises(ValueError):
        graphed.forward(torch.tensor([1, 2]), torch.tensor([1]))


def test_capture_failure_falls_back_to_eager():
    """A capture that raises turns graphs off (reason kept) and the call runs eagerly."""
    ref, graphed = _pair("llama", "cpu", "eager")
    graphed.mode = "graph"  # force the capture path: on CPU it fails at torch.cuda
    ids, pos = torch.arange(5), torch.arange(5)
    assert torch.equal(graphed.forward(ids, pos), ref.forward(ids, pos))
    assert graphed.mode == "eager" and graphed.disabled_reason.startswith("capture of bucket 8 failed")
    assert graphed.length == ref.length == 5
    assert torch.equal(graphed.forward(ids[:1], pos[:1] + 5), ref.forward(ids[:1], pos[:1] + 5))


def test_softcap_model_cannot_run_static():
    hf = make_hf("gemma3")
    hf.config.attn_logit_softcapping = 20.0
    from specdec.models import load_compact

    runner = CompactRunner(load_compact(hf), max_length=16)
    assert "soft-caps" in runner.model.static_forward_issue()
    with pytest.raises(ValueError, match="soft-caps"):
        GraphedCompactRunner(runner, mode="static")
    assert GraphedCompactRunner(runner).mode == "eager"


def test_generate_with_static_runner_is_lossless():
    """The engine drives the padded runner (target and draft) to the target's own greedy output."""
    import specdec
    from conftest import hf_greedy

    target, draft = make_hf("llama"), make_hf("llama", seed=1)
    for m in (target, draft):
        m.generation_config.eos_token_id = None
    ids = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(3))
    want = hf_greedy(target, ids, 24)
    runner = GraphedCompactRunner(CompactRunner.from_hf(target, max_length=96), buckets=BUCKETS, mode="static")
    draft_runner = GraphedCompactRunner(CompactRunner.from_hf(draft, max_length=96), buckets=BUCKETS,
                                        mode="static")
    for drafter in (specdec.ModelDrafter(draft, gamma=3, topk=2), specdec.ModelDrafter(draft_runner, gamma=4),
                    specdec.ModelDrafter(target, gamma=5)):
        out = specdec.generate(runner, ids, drafter=drafter, max_new_tokens=24)
        assert torch.equal(out.sequences, want)


def test_budgets_fit_the_padded_buckets(monkeypatch):
    """A padded runner trims node budgets to fill buckets exactly (root + nodes = bucket):
    with buckets 1, 4, 8, 16 a 5-node budget drafts 3 nodes and a 40-node one 15, at no
    cost to losslessness."""
    import specdec
    from conftest import hf_greedy
    from specdec.config import TreeBudget
    from specdec.latency import LatencyModel

    _, static = _pair("llama", "cpu", "static")
    _, eager = _pair("llama", "cpu", "eager")
    assert [static.fit_nodes(n) for n in (0, 1, 2, 3, 4, 7, 8, 15, 16, 40)] == [0, 1, 2, 3, 3, 7, 7, 15, 15, 15]
    assert [eager.fit_nodes(n) for n in (3, 5, 9)] == [3, 5, 9]  # no padding, no trimming

    target = make_hf("llama")
    target.generation_config.eos_token_id = None
    ids = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(4))
    out = specdec.generate(static, ids, drafter=specdec.ModelDrafter(target, gamma=8, topk=2), max_new_tokens=20,
                           budget=TreeBudget(max_nodes=5, max_depth=5))
    assert torch.equal(out.sequences, hf_greedy(target, ids, 20))
    assert set(out.stats.budgets) == {3} and max(out.stats.tree_sizes) <= 3

    # the controller files each step under the arm it chose, not the trimmed budget
    from specdec.adaptive import BudgetController, ControllerConfig, drafter_key

    ctl = BudgetController(ControllerConfig(grid=(1, 4, 8), max_depth=8, warmup=3),
                           latency=LatencyModel.from_function(lambda n: 1.0))
    from test_lossless import FixedTreeDrafter

    want = hf_greedy(target, ids, 20)
    drafter = FixedTreeDrafter(want[0].tolist(), branches=3, depth=8, vocab=V)  # always fills the budget
    out = specdec.generate(static, ids, drafter=drafter, max_new_tokens=20, adaptive=ctl)
    assert torch.equal(out.sequences, want)
    assert out.stats.budgets[:3] == [7, 7, 7]  # warm-up plays the largest arm, 8 nodes -> 7 (bucket 8)
    assert (ctl._state(drafter_key(drafter)).S > 0).all()  # ... and that step counts for arm 8 too

    sizes = []
    monkeypatch.setattr(LatencyModel, "measure", classmethod(  # record the grid instead of timing
        lambda cls, fn, grid, **kw: sizes.extend(grid) or cls.from_function(lambda n: 1.0 + n)))
    monkeypatch.setattr(LatencyModel, "save", lambda self, path: None)
    LatencyModel.for_runner(static, grid=(0, 1, 2, 4, 8, 16, 32), refresh=True, key="t")
    assert sizes == [0, 1, 2, 3, 7, 15]


# ----------------------------------------------------------------------------- CUDA


@gpu
@needs_cuda
@pytest.mark.parametrize("name", NAMES)
def test_graphs_match_eager_cuda(name):
    ref, graphed = _pair(name, "cuda", None)
    assert graphed.mode == "graph", graphed.disabled_reason
    _compare_sessions(ref, graphed, "cuda", rtol=1e-4)
    assert graphed.mode == "graph", graphed.disabled_reason  # no capture failed on the way
    assert set(graphed.describe()["captured"]) == {1, 4, 8}
    _compare_sessions(ref, graphed, "cuda", rtol=1e-4, seed=1)  # replays only, new data


@gpu
@needs_cuda
@pytest.mark.parametrize("name", ["llama", "qwen3-qknorm-sliding"])
def test_graph_replays_at_other_prefix_lengths_cuda(name):
    """Captured at one cache length, replayed at others, every bucket, after keep and crop."""
    ref, graphed = _pair(name, "cuda", "graph", max_length=128)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, V, (60,), generator=g).cuda()
    for prefix in (0, 3, 41, 17, 60):
        for r in (ref, graphed):
            r.reset()
            if prefix:
                r.forward(prompt[:prefix], torch.arange(prefix, device="cuda"))
        for n in (1, 2, 3, 4, 5, 8, 9, 16):
            parents = [-1] + [int(torch.randint(max(0, i - 3), i, (), generator=g)) for i in range(1, n)]
            toks = torch.randint(0, V, (n,), generator=g).cuda()
            pos = (prefix + _depth(parents)).cuda()
            mask = ancestor_mask(parents).cuda()
            a, b = ref.forward(toks, pos, mask), graphed.forward(toks, pos, mask)
            assert_close(b.cpu(), a.cpu(), 1e-4)
            keep = torch.tensor(path_to(parents, n - 1), device="cuda")
            for r in (ref, graphed):
                r.commit(prefix, keep)
            step = torch.randint(0, V, (1,), generator=g).cuda()
            at = torch.tensor([prefix + len(keep)], device="cuda")
            assert_close(graphed.forward(step, at).cpu(), ref.forward(step, at).cpu(), 1e-4)
            for r in (ref, graphed):
                r.crop(prefix)
    assert graphed.mode == "graph", graphed.disabled_reason
    assert set(graphed.describe()["captured"]) == {1, 4, 8, 16}


@gpu
@needs_cuda
def test_graphs_bf16_close_cuda():
    ref, graphed = _pair("llama", "cuda", None, dtype=torch.bfloat16)
    _compare_sessions(ref, graphed, "cuda", rtol=5e-2)
    assert graphed.mode == "graph", graphed.disabled_reason


@gpu
@needs_cuda
def test_generate_graphed_equals_eager_cuda():
    import specdec

    target, draft = make_hf("llama").cuda(), make_hf("llama", seed=1).cuda()
    for m in (target, draft):
        m.generation_config.eos_token_id = None
    ids = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(3)).cuda()
    eager = specdec.generate(CompactRunner.from_hf(target, max_length=96), ids,
                             drafter=specdec.ModelDrafter(draft, gamma=3, topk=2), max_new_tokens=32)
    graphed_runner = GraphedCompactRunner(CompactRunner.from_hf(target, max_length=96))
    graphed = specdec.generate(graphed_runner, ids, drafter=specdec.ModelDrafter(draft, gamma=3, topk=2),
                               max_new_tokens=32)
    assert torch.equal(graphed.sequences.cpu(), eager.sequences.cpu())
    assert graphed_runner.mode == "graph", graphed_runner.disabled_reason


@gpu
@needs_cuda
def test_capture_of_a_host_sync_falls_back_cuda():
    """A forward that syncs cannot be captured: graphs turn off, results stay right."""
    ref, graphed = _pair("llama", "cuda", "graph")
    orig = graphed._static_forward

    def syncing(st):
        out = orig(st)
        out[0].sum().item()  # a host sync: illegal while capturing
        return out

    graphed._static_forward = syncing
    ids, pos = torch.arange(5, device="cuda"), torch.arange(5, device="cuda")
    assert_close(graphed.forward(ids, pos).cpu(), ref.forward(ids, pos).cpu(), 1e-4)
    assert graphed.mode == "eager" and "capture of bucket 8 failed" in graphed.disabled_reason
    step, at = torch.tensor([3], device="cuda"), torch.tensor([5], device="cuda")
    assert_close(graphed.forward(step, at).cpu(), ref.forward(step, at).cpu(), 1e-4)
    torch.randn(4, device="cuda")  # the sync was caught before capturing: the CUDA RNG still works


# ----------------------------------------------------------------------------- benchmark script


def test_bench_step_latency_cpu_smoke(tmp_path):
    """The step-latency benchmark's debug mode: tiny shape on CPU, JSON + Markdown written."""
    import json

    from benchmarks import bench_step_latency as bench

    if not HAS_CUDA:
        assert bench.main(["--out", str(tmp_path)]) == 2  # CUDA only unless asked for the CPU
    rc = bench.main(["--device", "cpu", "--shape", "tiny", "--prefix", "16", "--n", "1", "3", "--decode-tokens", "3",
                     "--eager-decode-tokens", "2", "--hf-tokens", "3", "--out", str(tmp_path), "--tag", "t"])
    assert rc == 0
    data = json.loads((tmp_path / "step_latency_t.json").read_text())
    (res,) = data["results"]
    assert [s["n"] for s in res["steps"]] == [1, 3] and res["graph"]["mode"] == "static"
    assert all(s["max_rel_err_graph_vs_eager"] < 1e-2 for s in res["steps"])
    assert res["params"] > 0 and res["decode"]["graph"]["tokens"] == 3
    assert "| 3 |" in (tmp_path / "step_latency_t.md").read_text()
