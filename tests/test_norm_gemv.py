"""The norm-folded one-row GEMV (specdec/kernels/gemv.py ``norm_gemv``) against a float64
reference of its math, ``ops.linear.norm_linear``'s dispatch, and a Llama compact
model decoding one token through it (interpreter on CPU tensors; CUDA when present)."""
from __future__ import annotations

import pytest
import torch

from specdec.ops import linear as linear_ops
from specdec.ops import norm as norm_ops

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
EPS = 1e-6


def reference(x, delta, norm_weight, offset, weight, bias):
    """float64 W @ rms_norm(x + delta) (+ b), the sum rounded to x's dtype first (as PyTorch's add)."""
    t = (x if delta is None else x + delta).double()
    x_hat = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + EPS)
    g = 1.0 + norm_weight.double() if offset else norm_weight.double()
    y = (x_hat * g) @ weight.double().T
    return y if bias is None else y + bias.double()


def _inputs(n, k, dtype=torch.float32, seed=0, rows=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    delta = torch.randn(rows, k, generator=g)
    norm_weight = 1.0 + 0.5 * torch.randn(k, generator=g)
    weight = torch.randn(n, k, generator=g) / k ** 0.5
    bias = torch.randn(n, generator=g)
    return [t.to(DEVICE, dtype) for t in (x, delta, norm_weight, weight, bias)]


@pytest.mark.parametrize("n,k", [(1, 33), (7, 600), (130, 1030), (7, 33), (130, 600), (1, 1030)])
@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("with_delta,with_bias", [(False, False), (True, True), (True, False), (False, True)])
def test_norm_gemv_matches_float64_every_config(fused, n, k, offset, with_delta, with_bias):
    from specdec.kernels import gemv as kernel

    x, delta, nw, w, b = _inputs(n, k, seed=n * k + offset)
    delta, b = (delta if with_delta else None), (b if with_bias else None)
    want = reference(x, delta, nw, offset, w, b)[0]
    for cfg in kernel.CONFIGS:
        out = torch.full((n,), float("nan"), device=DEVICE)
        total = torch.full((k,), float("nan"), device=DEVICE)
        kernel.norm_gemv(x[0], None if delta is None else delta[0], nw, EPS, offset, w, b, out, total, cfg)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{cfg}: {m}")
        if with_delta:  # program 0 wrote the whole sum
            assert torch.equal(total, (x + delta)[0]), cfg
        else:
            assert total.isnan().all(), cfg  # nothing written


def test_norm_gemv_normalises_the_rounded_sum(fused):
    """x + delta in fp16 is stored exactly as PyTorch's add rounds it, and that rounded sum
    is what gets normalised (an fp32 output makes the check tight)."""
    from specdec.kernels import gemv as kernel

    x, delta, nw, w, _ = _inputs(20, 300, torch.float16, seed=5)
    delta = delta * 1e-2  # each sum rounds visibly
    out = torch.empty(20, device=DEVICE, dtype=torch.float32)
    total = torch.empty(300, device=DEVICE, dtype=torch.float16)
    kernel.norm_gemv(x[0], delta[0], nw, EPS, False, w, None, out, total)
    assert torch.equal(total, (x + delta)[0])
    want = reference(x + delta, None, nw, False, w, None)[0]
    assert not torch.allclose(reference(x.double() + delta.double(), None, nw, False, w, None)[0], want,
                              rtol=1e-5, atol=1e-5)  # (the unrounded sum would fail this test)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def _unfused_error_and_fused(monkeypatch, x, delta, nw, offset, w, b):
    """(|unfused - float64| max, fused result, total): the unfused pair is the tolerance yardstick."""
    want = reference(x, delta, nw, offset, w, b)
    monkeypatch.setenv("SPECDEC_GEMV", "0")
    plain, plain_total = linear_ops.norm_linear(x, delta, nw, EPS, offset, w, b)
    monkeypatch.setenv("SPECDEC_GEMV", "1")
    got, total = linear_ops.norm_linear(x, delta, nw, EPS, offset, w, b)
    assert torch.equal(total, plain_total)
    return (plain.double() - want).abs().max().item(), got, want


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("offset,with_delta,with_bias", [(False, True, False), (True, False, True), (False, False, False)])
def test_norm_linear_forced_uses_the_fused_kernel(fused, monkeypatch, dtype, offset, with_delta, with_bias):
    from specdec.kernels import gemv as kernel

    calls = []
    real = kernel.norm_gemv
    monkeypatch.setattr(kernel, "norm_gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x, delta, nw, w, b = _inputs(70, 200, dtype, seed=7)
    delta, b = (delta if with_delta else None), (b if with_bias else None)
    plain_err, got, want = _unfused_error_and_fused(monkeypatch, x, delta, nw, offset, w, b)
    assert len(calls) == 1 and got.shape == (1, 70) and got.dtype == dtype
    err = (got.double() - want).abs().max().item()
    assert err <= 2 * plain_err + {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype], (err, plain_err)


@pytest.mark.parametrize("case", ["two_rows", "fp32", "off", "cpu_auto", "norm_weight_fp32"])
def test_norm_linear_stays_unfused_where_it_does_not_apply(fused, monkeypatch, case):
    monkeypatch.setenv("SPECDEC_GEMV", {"off": "0", "cpu_auto": "auto"}.get(case, "1"))
    if case == "cpu_auto" and HAS_CUDA:
        pytest.skip("auto mode on CPU tensors only matters without CUDA")
    dtype = torch.float32 if case == "fp32" else torch.float16
    x, delta, nw, w, _ = _inputs(16, 32, dtype, rows=2 if case == "two_rows" else 1)
    offset = case == "norm_weight_fp32"  # (Gemma's norm keeps x's dtype with an fp32 weight)
    if offset:
        nw = nw.float()
    from specdec.kernels import gemv as kernel

    monkeypatch.setattr(kernel, "norm_gemv", lambda *a, **kw: pytest.fail("norm-GEMV used"))
    got, total = linear_ops.norm_linear(x, delta, nw, EPS, offset, w)
    h, want_total = norm_ops.add_rms_norm(x, delta, nw, EPS, offset)
    assert torch.equal(total, want_total)
    torch.testing.assert_close(got, linear_ops.linear(h, w))


def test_choices_report_the_norm_choice(monkeypatch):
    monkeypatch.setattr(linear_ops, "_norm_choice", {(4096, 4096, torch.bfloat16, "cuda:0", "norm"): (8, 2048, 4, 3),
                                                     (128256, 4096, torch.bfloat16, "cuda:0", "norm"): None})
    got = linear_ops.choices()
    assert got["4096x4096 bfloat16 norm"] == "norm-GEMV (8, 2048, 4, 3)"
    assert got["128256x4096 bfloat16 norm"] == "norm + linear"


def test_llama_one_token_decode_fused_matches_unfused(fused, monkeypatch):
    """A tiny Llama (fp16) decoding one token with the norms inside the GEMVs: every norm
    of the step (2 per layer + the final one) runs fused, prefill never does, and the
    logits are as close to float32 transformers (same weights) as the unfused model's,
    with the same greedy token. (fp16: the interpreted tree-attention kernel is wrong in
    bf16 on CPU tensors, see the report of this change.)"""
    from test_compact_models import make_hf

    from specdec.backends.compact import CompactRunner
    from specdec.kernels import gemv as kernel

    calls = []
    real = kernel.norm_gemv
    monkeypatch.setattr(kernel, "norm_gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    hf = make_hf("qwen2-bias", dtype=torch.float16).to(DEVICE)  # Llama family, with a qkv bias
    ids = torch.randint(0, hf.config.vocab_size, (7,), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    want = make_hf("qwen2-bias", dtype=torch.float16).float().to(DEVICE)(ids[None]).logits[0, -1:]  # [1, vocab]
    outs = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("SPECDEC_GEMV", mode)
        runner = CompactRunner.from_hf(hf, max_length=16)
        runner.forward(ids[:6], torch.arange(6, device=DEVICE))  # prefill: never fused
        assert not calls
        outs[mode] = runner.forward(ids[6:], torch.tensor([6], device=DEVICE))  # [1, vocab]
        assert len(calls) == (2 * hf.config.num_hidden_layers + 1 if mode == "1" else 0)
    plain_err = (outs["0"] - want).abs().max().item()
    err = (outs["1"] - want).abs().max().item()
    assert err <= 2 * plain_err + 1e-3 * want.abs().max().item(), (err, plain_err)
    assert torch.equal(outs["1"].argmax(-1), outs["0"].argmax(-1))
    assert torch.equal(outs["1"].argmax(-1), want.argmax(-1))
