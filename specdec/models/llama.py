"""Compact Llama-family model: Llama 2/3, SmolLM2, Mistral, Qwen2/2.5 (QKV bias), Qwen3 (QK-norm).

One definition covers them: biases come from the weights, QK-norm from the model
type, the sliding window (Mistral; Qwen with use_sliding_window) per layer from the
config, RoPE scaling (linear, llama3, yarn) from transformers' own rope functions.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.rope import apply_rope
from .common import AttnMeta, CompactModel, GatedMLP, RMSNorm, _attend, rope_unsupported
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

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], cache: StaticKVCache,
                layer: int, meta: AttnMeta) -> torch.Tensor:
        m, d = x.shape[0], self.head_dim
        q = self.q_proj(x).view(m, -1, d)  # [m, Hq, D]
        k = self.k_proj(x).view(m, -1, d)  # [m, Hkv, D]
        v = self.v_proj(x).view(m, -1, d)  # [m, Hkv, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, k, *cos_sin)
        cache.write(layer, meta.write_at, k, v)  # a start slot, or [m] slots (graph-safe)
        o = _attend(q, cache.k[layer], cache.v[layer], meta,  # cache.k[layer]: [Hkv, S_max, D]
                    window=self.window, scale=self.scale, softcap=self.softcap)  # [m, Hq, D]
        return self.o_proj(o.reshape(m, -1))  # [m, hidden]


class Block(nn.Module):
    def __init__(self, config, head_dim: int, window: int | None, qk_norm: bool):
        super().__init__()
        self.self_attn = Attention(config, head_dim, window=window, scale=head_dim ** -0.5, qk_norm=qk_norm)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope_key = "default"

    def forward(self, x, cos_sin, cache, layer, meta):  # x [m, hidden]
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, cache, layer, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


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
