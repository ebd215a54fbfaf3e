"""Compact Llama-family model: Llama 2/3, SmolLM2, Mistral, Qwen2/2.5 (QKV bias), Qwen3 (QK-norm).

One definition covers them: biases come from the weights, QK-norm from the model
type, the sliding window (Mistral; Qwen with use_sliding_window) per layer from the
config, RoPE scaling (linear, llama3, yarn) from transformers' own rope functions.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import linear as linear_ops
from ..ops.rope import apply_rope_and_write
from .common import AttnMeta, CompactModel, GatedMLP, RMSNorm, _attend, fuse_linears, rope_unsupported
from .kv_cache import StaticKVCache


def layer_windows(config) -> list[int | None]:
    """Sliding window per layer (None = full attention), as transformers applies it."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * config.num_hidden_layers


class Attention(nn.Module):
    def __init__(self, config, head_dim: int, *, window: int | None, scale: float, qk_norm: bool,
                 norm_offset: bool = False, softcap: float | None = None, rope_key: str = "default"):
        super().__init__()
        hidden, hq = config.hidden_size, config.num_attention_heads
        hkv = getattr(config, "num_key_value_heads", None) or hq
        self.head_dim, self.window, self.scale, self.softcap = head_dim, window, scale, softcap
        self.q_proj = nn.Linear(hidden, hq * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, hkv * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, hkv * head_dim, bias=False)
        self.o_proj = nn.Linear(hq * head_dim, hidden, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps, offset=norm_offset)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps, offset=norm_offset)
        else:
            self.q_norm = self.k_norm = None
        self.rope_key = rope_key
        self.qkv_sizes = [hq * head_dim, hkv * head_dim, hkv * head_dim]
        self.register_buffer("qkv_weight", None, persistent=False)  # [sum(qkv_sizes), hidden] once fused
        self.register_buffer("qkv_bias", None, persistent=False)

    def fuse_projections(self) -> None:
        """q, k and v as one GEMM (``common.fuse_linears``)."""
        self.qkv_weight, self.qkv_bias = fuse_linears([self.q_proj, self.k_proj, self.v_proj])

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [m, hidden] -> q [m, Hq*D], k [m, Hkv*D], v [m, Hkv*D] (views of one GEMM once fused)."""
        if self.qkv_weight is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return linear_ops.linear(x, self.qkv_weight, self.qkv_bias).split(self.qkv_sizes, dim=-1)

    def forward(self, x: torch.Tensor | None, cos_sin: tuple[torch.Tensor, torch.Tensor], cache: StaticKVCache,
                layer: int, meta: AttnMeta, qkv: torch.Tensor | None = None) -> torch.Tensor:
        """x [m, hidden] (normed), or qkv [m, sum(qkv_sizes)] already projected -> [m, hidden]."""
        q, k, v = self.project_qkv(x) if qkv is None else qkv.split(self.qkv_sizes, dim=-1)
        m, d = q.shape[0], self.head_dim
        q, k, v = q.view(m, -1, d), k.view(m, -1, d), v.view(m, -1, d)  # [m, Hq | Hkv | Hkv, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # q rotated; rotated k and v stored at a start slot, or at [m] slots (graph-safe)
        q = apply_rope_and_write(q, k, v, *cos_sin, cache.k[layer], cache.v[layer], meta.write_at)
        o = _attend(q, cache.k[layer], cache.v[layer], meta,  # cache.k[layer]: [Hkv, S_max, D]
                    window=self.window, scale=self.scale, softcap=self.softcap)  # [m, Hq, D]
        return linear_ops.linear(o.reshape(m, -1), self.o_proj.weight, self.o_proj.bias)  # [m, hidden]


class Block(nn.Module):
    def __init__(self, config, head_dim: int, window: int | None, qk_norm: bool):
        super().__init__()
        self.self_attn = Attention(config, head_dim, window=window, scale=head_dim ** -0.5, qk_norm=qk_norm)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope_key = "default"

    def forward(self, x, cos_sin, cache, layer, meta, delta=None):
        """x [m, hidden] the residual stream, delta the previous block's MLP output still to
        be added (None for the first block) -> (x, this block's MLP output, not yet added):
        each residual add runs inside the next norm (``RMSNorm.add_forward``). Once q/k/v and
        gate/up are fused, each norm is handed to the projection after it (``RMSNorm.linear``):
        for one row (plain decoding) that may be one kernel; more rows run as before."""
        attn, mlp = self.self_attn, self.mlp
        if attn.qkv_weight is not None and mlp.gate_up_weight is not None:
            # each norm (and residual add) handed to the projection after it: one kernel for one row
            qkv, x = self.input_layernorm.linear(x, delta, attn.qkv_weight, attn.qkv_bias)
            gate_up, x = self.post_attention_layernorm.linear(x, attn(None, cos_sin, cache, layer, meta, qkv=qkv),
                                                              mlp.gate_up_weight, mlp.gate_up_bias)
            return x, mlp.from_gate_up(gate_up)
        h, x = (self.input_layernorm(x), x) if delta is None else self.input_layernorm.add_forward(x, delta)
        h, x = self.post_attention_layernorm.add_forward(x, attn(h, cos_sin, cache, layer, meta))
        return x, mlp(h)


class LlamaCompact(CompactModel):
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def __init__(self, config):
        super().__init__(config)
        qk_norm = config.model_type == "qwen3"
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(
            Block(config, self.head_dim, w, qk_norm) for w in layer_windows(config))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @classmethod
    def unsupported_reason(cls, config) -> str | None:
        if config.model_type not in cls.model_types:
            return f"model_type {config.model_type!r}"
        return rope_unsupported(config)
