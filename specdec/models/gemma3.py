"""Compact Gemma3 text model (Gemma3ForCausalLM).

Differences from Llama: embeddings scaled by sqrt(hidden) (in the weight dtype),
(1 + w) RMSNorms, QK-norm, GeGLU-tanh MLP, post-attention and pre/post-feedforward
norms, local sliding-window layers with their own RoPE base, attention scale
query_pre_attn_scalar ** -0.5, optional attention/final logit soft-capping.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import CompactModel, GatedMLP, RMSNorm, rope_unsupported
from .llama import Attention

_LAYER_TYPES = ("sliding_attention", "full_attention")


class Gemma3Block(nn.Module):
    def __init__(self, config, head_dim: int, layer_type: str):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        window = config.sliding_window if layer_type == "sliding_attention" else None
        self.self_attn = Attention(config, head_dim, window=window, scale=config.query_pre_attn_scalar ** -0.5,
                                   qk_norm=True, norm_offset=True, softcap=config.attn_logit_softcapping,
                                   rope_key=layer_type)
        self.mlp = GatedMLP(hidden, config.intermediate_size, config.hidden_activation)
        self.input_layernorm = RMSNorm(hidden, eps, offset=True)
        self.post_attention_layernorm = RMSNorm(hidden, eps, offset=True)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps, offset=True)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps, offset=True)
        self.rope_key = layer_type

    def forward(self, x, cos_sin, cache, layer, meta, delta=None):  # x [m, hidden]; see llama.Block
        if delta is not None:
            x = x + delta
        h = self.self_attn(self.input_layernorm(x), cos_sin, cache, layer, meta)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h), None


class Gemma3Compact(CompactModel):
    model_types = ("gemma3_text",)

    def __init__(self, config):
        super().__init__(config)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(Gemma3Block(config, self.head_dim, t) for t in config.layer_types)
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=True)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope_keys = {t: t for t in sorted(set(config.layer_types))}
        self.embed_scale = config.hidden_size ** 0.5
        self._scale_cache: dict[torch.dtype, float] = {}
        self.final_softcap = config.final_logit_softcapping

    @classmethod
    def unsupported_reason(cls, config) -> str | None:
        if config.model_type not in cls.model_types:
            return f"model_type {config.model_type!r}"
        if getattr(config, "use_bidirectional_attention", False):
            return "bidirectional attention (embedding model)"
        types = getattr(config, "layer_types", None) or []
        if set(types) - set(_LAYER_TYPES):
            return f"layer types {sorted(set(types) - set(_LAYER_TYPES))}"
        for t in set(types):
            reason = rope_unsupported(config, t)
            if reason is not None:
                return reason
        return None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [m] -> [m, hidden]
        x = self.model.embed_tokens(input_ids)
        # transformers multiplies by sqrt(hidden) rounded to the weight dtype (sqrt(3072) -> 55.5 in bf16)
        scale = self._scale_cache.get(x.dtype)
        if scale is None:
            scale = self._scale_cache[x.dtype] = float(torch.tensor(self.embed_scale, dtype=x.dtype))
        return x * scale
