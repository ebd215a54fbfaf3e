"""The one-row GEMV (specdec/kernels/gemv.py) against ``F.linear``, and ``ops.linear``'s choice
between it and cuBLAS (interpreter on CPU tensors; CUDA when present)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specdec.ops import linear as linear_ops

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.mark.parametrize("n,k", [(1, 1), (7, 33), (33, 600), (130, 1030)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_kernel_matches_reference_every_config(fused, n, k, with_bias):
    from specdec.kernels import gemv as kernel

    g = torch.Generator().manual_seed(n * k)
    x = torch.randn(k, generator=g).to(DEVICE)
    w = torch.randn(n, k, generator=g).to(DEVICE)
    b = torch.randn(n, generator=g).to(DEVICE) if with_bias else None
    want = F.linear(x[None].double(), w.double(), None if b is None else b.double())[0]
    for cfg in kernel.CONFIGS:
        out = torch.full((n,), float("nan"), device=DEVICE)
        kernel.gemv(x, w, b, out, cfg)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4, msg=lambda m: f"{cfg}: {m}")


def test_gemv_reads_a_strided_weight_view(fused):
    """Rows of a bigger matrix (the fused qkv weight's slices are such views)."""
    from specdec.kernels import gemv as kernel

    g = torch.Generator().manual_seed(3)
    big = torch.randn(40, 96, generator=g).to(DEVICE)
    w = big[5:25, :64]  # stride(0) = 96
    x = torch.randn(64, generator=g).to(DEVICE)
    out = torch.empty(20, device=DEVICE)
    kernel.gemv(x, w, None, out)
    torch.testing.assert_close(out, w @ x, rtol=1e-5, atol=1e-5)


def test_linear_uses_gemv_when_forced(fused, monkeypatch):
    monkeypatch.setenv("SPECDEC_GEMV", "1")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 80, generator=g).to(DEVICE, torch.float16)
    w = (torch.randn(50, 80, generator=g) * 0.1).to(DEVICE, torch.float16)
    b = torch.randn(50, generator=g).to(DEVICE, torch.float16)
    calls = []
    from specdec.kernels import gemv as kernel

    real = kernel.gemv
    monkeypatch.setattr(kernel, "gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = linear_ops.linear(x, w, b)
    assert calls and got.shape == (1, 50) and got.dtype == torch.float16
    torch.testing.assert_close(got.float(), F.linear(x.float(), w.float(), b.float()), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("case", ["two_rows", "fp32", "off", "cpu_auto"])
def test_linear_keeps_cublas_where_the_gemv_does_not_apply(fused, monkeypatch, case):
    monkeypatch.setenv("SPECDEC_GEMV", {"off": "0", "cpu_auto": "auto"}.get(case, "1"))
    if case == "cpu_auto" and HAS_CUDA:
        pytest.skip("auto mode on CPU tensors only matters without CUDA")
    rows = 2 if case == "two_rows" else 1
    dtype = torch.float32 if case == "fp32" else torch.float16
    x = torch.randn(rows, 32).to(DEVICE, dtype)
    w = torch.randn(16, 32).to(DEVICE, dtype)
    from specdec.kernels import gemv as kernel

    monkeypatch.setattr(kernel, "gemv", lambda *a, **kw: pytest.fail("GEMV used"))
    torch.testing.assert_close(linear_ops.linear(x, w), F.linear(x, w))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_linear_auto_measures_once_and_matches_cublas(monkeypatch):
    monkeypatch.setenv("SPECDEC_GEMV", "auto")
    monkeypatch.setattr(linear_ops, "_choice", {})
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    got = linear_ops.linear(x, w)
    assert len(linear_ops._choice) == 1
    torch.testing.assert_close(got.float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2)
    linear_ops.linear(x, w)
    assert len(linear_ops._choice) == 1  # measured once
    # inside a capture before any measurement: cuBLAS, no timing
    w2 = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        F.linear(x, w2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = linear_ops.linear(x, w2)
    graph.replay()
    torch.cuda.synchronize()
    assert len(linear_ops._choice) == 1
    torch.testing.assert_close(y, F.linear(x, w2))


# ----------------------------------------------------------------------------- exact mode (#22)
def _exact_inputs(m, k=96, n=70, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(t.to(DEVICE, dtype) for t in (torch.randn(m, k, generator=g), torch.randn(n, k, generator=g),
                                                torch.randn(n, generator=g)))


@pytest.mark.parametrize("m", [1, 5, 16, 17, 40])
def test_linear_rows_kernel_matches_torch(triton_kernels, m):
    from specdec.ops.linear import linear_exact

    x, w, b = _exact_inputs(m, seed=m)
    torch.testing.assert_close(linear_exact(x, w, b), torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(linear_exact(x, w), x @ w.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if HAS_CUDA else [torch.float32])
@pytest.mark.parametrize("use_kernel", [True, False], ids=["triton", "ref"])
def test_linear_exact_rows_do_not_depend_on_the_other_rows(use_kernel, dtype, request):
    """The exact-mode property: each row's output is bitwise the same whether it is computed
    alone, in a 40-row call, or in a slice starting elsewhere."""
    from specdec.ops.linear import linear_exact, linear_exact_ref

    if use_kernel:
        request.getfixturevalue("triton_kernels")
    fn = linear_exact if use_kernel else linear_exact_ref
    x, w, b = _exact_inputs(40, seed=3, dtype=dtype)
    full = fn(x, w, b)
    for i in (0, 1, 15, 16, 17, 39):
        assert torch.equal(fn(x[i:i + 1], w, b)[0], full[i]), i
    assert torch.equal(fn(x[3:20], w, b), full[3:20])


def test_exact_linear_switch_keeps_the_compact_model_right(monkeypatch):
    """SPECDEC_EXACT=linear routes every projection and the LM head through linear_exact;
    the compact model still matches transformers, in a prefill and a one-row step."""
    from conftest import tiny_model
    from specdec.backends.compact import CompactRunner

    hf = tiny_model("llama", vocab=64)
    ids = torch.tensor([3, 9, 4, 1, 7, 7, 2])
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
    monkeypatch.setenv("SPECDEC_EXACT", "linear")
    calls = []
    real = linear_ops.linear_exact
    monkeypatch.setattr(linear_ops, "linear_exact", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    runner = CompactRunner.from_hf(hf, max_length=32)
    got = runner.forward(ids[:-1], torch.arange(6))
    step = runner.forward(ids[-1:], torch.tensor([6]))
    torch.testing.assert_close(torch.cat([got, step]), want, rtol=1e-4, atol=1e-4)
    assert 6 in calls and 1 in calls  # both the prefill and the step went through it
