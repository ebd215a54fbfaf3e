"""Pieces shared by the compact model definitions (gpt-fast style, batch 1).

Shapes: m = new tokens in this forward, n = keys visible (cache length + m),
Hq / Hkv = query / key-value heads, D = head dim. Activations carry no batch dim.

Parameter names mirror Hugging Face's (``model.layers.0.self_attn.q_proj.weight``)
so a transformers state dict loads with ``assign=True``: no copy, the compact model
references the HF model's tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import activation as act_ops
from ..ops import attention as attn_ops
from ..ops import exact
from ..ops import linear as linear_ops
from ..ops import norm as norm_ops
from .kv_cache import StaticKVCache

# RoPE variants whose frequencies do not depend on the sequence length.
_DYNAMIC_ROPE = frozenset({"dynamic", "longrope"})


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    """Llama RMSNorm (``w * x_hat.to(dtype)``) or, with ``offset``, Gemma's
    ``(x_hat * (1 + w)).to(dtype)`` computed in fp32 -- both bit-match transformers."""

    def __init__(self, dim: int, eps: float, *, offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        return norm_ops.rms_norm(x, self.weight, self.eps, self.offset)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + delta), x + delta): a residual add and this norm in one launch when fused."""
        return norm_ops.add_rms_norm(x, delta, self.weight, self.eps, self.offset)

    def linear(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [m, dim], delta [m, dim] or None, weight [N, dim] -> (linear(norm(x + delta)) [m, N],
        x + delta): for one row possibly one kernel (``ops.linear.norm_linear``)."""
        return linear_ops.norm_linear(x, delta, self.weight, self.eps, self.offset, weight, bias)


def fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of linears that read the same input into one
    [sum of out_features, in] tensor, and make each linear's weight a row-slice view of it.

    One GEMM then replaces len(linears) of them (on a GPU decoding from CUDA graphs every
    launch counts) and no memory is spent once the old tensors are dropped. A missing
    bias among present ones becomes zeros in the fused bias (x + 0 == x exactly)."""
    weight = torch.cat([lin.weight.detach() for lin in linears])  # [sum out, in]
    bias = None
    if any(lin.bias is not None for lin in linears):
        bias = torch.cat([lin.bias.detach() if lin.bias is not None else
                          lin.weight.new_zeros(lin.out_features) for lin in linears])
    row = 0
    for lin in linears:
        rows = slice(row, row + lin.out_features)
        row += lin.out_features
        lin.weight = nn.Parameter(weight[rows], requires_grad=False)
        if lin.bias is not None:
            lin.bias = nn.Parameter(bias[rows], requires_grad=False)
    return weight, bias


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU for Llama, GeGLU-tanh for Gemma.

    After ``fuse_projections`` gate and up are one GEMM over a [2 * inter, hidden] weight."""

    def __init__(self, hidden: int, inter: int, act: str):
        super().__init__()
        from transformers.activations import ACT2FN

        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = ACT2FN[act]
        self.silu = act in ("silu", "swish")  # SwiGLU: ops.activation.silu_mul
        self.register_buffer("gate_up_weight", None, persistent=False)  # [2 * inter, hidden] once fused
        self.register_buffer("gate_up_bias", None, persistent=False)

    def fuse_projections(self) -> None:
        self.gate_up_weight, self.gate_up_bias = fuse_linears([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [m, hidden]
        if self.gate_up_weight is None:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.from_gate_up(linear_ops.linear(x, self.gate_up_weight, self.gate_up_bias))

    def from_gate_up(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The rest of the MLP once fused: gate_up [m, 2 * inter] -> [m, hidden]."""
        if self.silu:
            h = act_ops.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)  # [m, inter] each
            h = self.act_fn(gate) * up
        return linear_ops.linear(h, self.down_proj.weight, self.down_proj.bias)


# ----------------------------------------------------------------------------- rope

def rope_parameters(config, layer_type: str | None = None) -> dict:
    rp = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(rp.get(layer_type), dict):
        rp = rp[layer_type]
    return rp


def rope_unsupported(config, layer_type: str | None = None) -> str | None:
    rp = rope_parameters(config, layer_type)
    rtype = rp.get("rope_type", "default")
    if rtype in _DYNAMIC_ROPE:
        return f"rope_type={rtype!r} (sequence-length dependent)"
    if rtype != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        if rtype not in ROPE_INIT_FUNCTIONS:
            return f"unknown rope_type={rtype!r}"
    if rp.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) not in (None, 1, 1.0):
        return "partial rotary embeddings"
    return None


def rope_inv_freq(config, head_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """inv_freq [D/2] fp32 and the cos/sin scale, exactly as transformers computes them."""
    rp = rope_parameters(config, layer_type)
    rtype = rp.get("rope_type", "default")
    if rtype == "default":
        base = rp.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    kw = {} if layer_type is None else {"layer_type": layer_type}
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rtype](config, None, **kw)
    return inv_freq.float().cpu(), float(scale)


def rope_cos_sin(inv_freq: torch.Tensor, scale: float, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """inv_freq [D/2], positions [m] -> cos, sin [m, 1, D] in ``dtype`` (broadcast over heads)."""
    freqs = positions[:, None].float() * inv_freq[None, :]  # [m, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [m, D]
    return (emb.cos() * scale).to(dtype)[:, None], (emb.sin() * scale).to(dtype)[:, None]


# ----------------------------------------------------------------------------- attention

class AttnMeta:
    """Masking facts for one forward, shared by every layer.

    Keys [0, prefix_len) are fully visible; keys [prefix_len, n) follow ``tree_mask``
    [m, n - prefix_len] (None = causal by cache slot). Sliding-window layers also
    require ``query_pos - key_pos < window`` (absolute positions, as transformers)."""

    def __init__(self, start: int | torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor | None,
                 tree_mask: torch.Tensor | None, mask_start: int | None, *, slots: torch.Tensor | None = None):
        self.start = start  # cache length before this forward (a [1] int64 device tensor when graph-safe)
        self.m = query_pos.shape[0]
        self.n = start + self.m if slots is None else None  # keys visible (host int; None when graph-safe)
        self.query_pos = query_pos  # [m]
        self.key_pos = key_pos  # [n] (None when graph-safe)
        self.tree_mask = tree_mask  # [m, n - prefix_len] bool or None; graph-safe: [m, m] bool or packed
        self.prefix_len = start if tree_mask is None or mask_start is None else mask_start
        # Graph-safe forwards (CompactModel.forward_static): the [m] int64 cache slots written,
        # start + arange(m), on the device. None for ordinary forwards.
        self.slots = slots
        # Packed forwards (CompactModel.forward_packed, a ragged batch in one flat cache): each
        # query row's (pre_base, pre_len, anc, cnt) for ``ops.attention.packed_attention_exact``.
        self.packed: tuple[torch.Tensor, ...] | None = None
        self._exact_lists: tuple[torch.Tensor, ...] | None = None
        self._masks: dict[int | None, torch.Tensor | None] = {}
        self._self_mask: torch.Tensor | None = None

    @property
    def write_at(self) -> int | torch.Tensor:
        """Where this forward's K/V go: the start slot, or the [m] slot tensor (graph-safe)."""
        return self.start if self.slots is None else self.slots

    def exact_lists(self) -> tuple[torch.Tensor, ...]:
        """(pre_base, pre_len, anc, cnt, slots) for ``ops.attention.packed_attention_exact``:
        a packed forward's own, or this sequence's tree turned into them once per forward
        (every layer reuses them)."""
        if self._exact_lists is None:
            if self.packed is not None:
                self._exact_lists = (*self.packed, self.slots)
            else:
                self._exact_lists = attn_ops.sequence_as_packed(self.start, self.tree_mask, self.m,
                                                                self.query_pos.device)
        return self._exact_lists

    def self_mask(self) -> torch.Tensor:
        """[1, 1] True: a one-token decode step as a one-node tree."""
        if self._self_mask is None:
            self._self_mask = torch.ones(1, 1, dtype=torch.bool, device=self.query_pos.device)
        return self._self_mask

    def mask(self, window: int | None) -> torch.Tensor | None:
        """Dense [m, n] bool (True = visible), or None when everything is visible."""
        if window not in self._masks:
            self._masks[window] = self._build(window)
        return self._masks[window]

    def _build(self, window: int | None) -> torch.Tensor | None:
        m, n, dev = self.m, self.n, self.key_pos.device
        if self.tree_mask is None:
            if window is None and m == 1:
                return None
            vis = torch.arange(n, device=dev)[None, :] <= torch.arange(self.start, n, device=dev)[:, None]
        else:
            vis = torch.ones(m, n, dtype=torch.bool, device=dev)
            vis[:, self.prefix_len:] = self.tree_mask
        if window is not None:
            vis &= (self.query_pos[:, None] - self.key_pos[None, :]) < window
        return vis


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMeta, *,
            window: int | None, scale: float, softcap: float | None = None) -> torch.Tensor:
    """q [m, Hq, D], k_cache/v_cache [Hkv, S_max, D] of one layer (this forward's K/V
    already at slots [start, n)) -> [m, Hq, D].

    The ops kernels (flash-attn prefill, Triton tree attention, each with a PyTorch
    fallback chosen in specdec.ops) take prefix key t to be at position t, which holds
    whenever the cache holds exactly the committed tokens. Forwards that mask cached
    entries (mask_start < length) or soft-cap logits use the dense path below, which
    reads every key's recorded position."""
    packed = meta.packed is not None  # a ragged batch: the only attention that reads per-row prefixes
    if packed or (exact.mode() == "on" and softcap is None and meta.prefix_len == meta.start):
        if softcap is not None:
            raise ValueError("packed (batched) forward: attention logit soft-capping is not supported")
        return attn_ops.packed_attention_exact(q, k_cache, v_cache, *meta.exact_lists(), meta.query_pos,
                                               window=window, scale=scale)
    if meta.slots is not None:  # graph-safe: the prefix length lives on the device
        if softcap is not None:
            raise ValueError("graph-safe forward: attention logit soft-capping needs the dense path, "
                             "which slices the cache by a host length")
        return attn_ops.tree_attention(q, k_cache, v_cache, meta.start, meta.tree_mask,
                                       query_pos=meta.query_pos, window=window, scale=scale)
    n = meta.n
    if softcap is None and meta.prefix_len == meta.start:
        if meta.tree_mask is not None:
            return attn_ops.tree_attention(q, k_cache, v_cache, meta.start, meta.tree_mask,
                                           query_pos=meta.query_pos, window=window, scale=scale)
        if meta.m == 1 and meta.start > 0:  # decode step: the split-K tree kernel
            return attn_ops.tree_attention(q, k_cache, v_cache, meta.start, meta.self_mask(),
                                           query_pos=meta.query_pos, window=window, scale=scale)
        return attn_ops.prefill_attention(q, k_cache[:, :n].transpose(0, 1), v_cache[:, :n].transpose(0, 1),
                                          window=window, scale=scale)
    return _attend_dense(q, k_cache[:, :n], v_cache[:, :n], meta, window=window, scale=scale, softcap=softcap)


def _attend_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta, *,
                  window: int | None, scale: float, softcap: float | None) -> torch.Tensor:
    """q [m, Hq, D], k/v [Hkv, n, D] -> [m, Hq, D] with the explicit [m, n] mask."""
    hq, hkv, m = q.shape[1], k.shape[0], meta.m
    g = hq // hkv
    qg = q.reshape(m, hkv, g, -1).permute(1, 2, 0, 3).reshape(hkv, g * m, -1)  # [Hkv, g*m, D]
    mask = meta.mask(window)  # [m, n] or None
    if softcap is None:
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=None if mask is None else mask.repeat(g, 1),
                                             scale=scale)  # [Hkv, g*m, D]
    else:  # logit soft-capping (Gemma 2 style)
        s = (qg @ k.transpose(1, 2)).float() * scale  # [Hkv, g*m, n]
        s = torch.tanh(s / softcap) * softcap
        if mask is not None:
            s = s.masked_fill(~mask.repeat(g, 1), float("-inf"))
        out = torch.softmax(s, dim=-1).to(v.dtype) @ v
    return out.reshape(hkv, g, m, -1).permute(2, 0, 1, 3).reshape(m, hq, -1)


# ----------------------------------------------------------------------------- model base

class CompactModel(nn.Module):
    """Base of the compact models: HF-named parameters, a static KV cache, batch 1.

    Subclasses build ``self.model.{embed_tokens, layers, norm}`` and ``self.lm_head`` and
    list the RoPE tables they need in ``rope_keys`` ({key: hf layer_type or None}), and set
    ``final_softcap`` where the logits are soft-capped (Gemma)."""

    model_types: ClassVar[tuple[str, ...]] = ()
    final_softcap: float | None = None
    exact: str | None = None  # the exact mode its forwards run in (``ops.exact``; its runner sets it)
    last_residual: torch.Tensor | None = None  # [m, hidden] what the last forward's rows fed the final norm

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.vocab_size = config.vocab_size
        self.max_position_embeddings = getattr(config, "max_position_embeddings", None) or 4096
        self.rope_keys: dict[str, str | None] = {"default": None}

    # --- subclass hooks
    @classmethod
    def unsupported_reason(cls, config) -> str | None:
        return None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [m] -> [m, hidden]
        return self.model.embed_tokens(input_ids)

    # --- properties
    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def new_cache(self, max_length: int) -> StaticKVCache:
        return StaticKVCache(self.num_layers, self.num_kv_heads, self.head_dim, max_length,
                             dtype=self.dtype, device=self.device)

    def _init_rope(self) -> None:
        for key, layer_type in self.rope_keys.items():
            inv_freq, scale = rope_inv_freq(self.config, self.head_dim, layer_type)
            self.register_buffer(f"inv_freq_{key}", inv_freq.to(self.device), persistent=False)
            setattr(self, f"rope_scale_{key}", scale)

    # --- forward
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache, *,
                tree_mask: torch.Tensor | None = None, mask_start: int | None = None) -> torch.Tensor:
        """input_ids [m], positions [m] -> logits [m, vocab] (model dtype). Appends the
        m tokens' K/V at cache slots [length, length + m); see AttnMeta for masking."""
        start = cache.reserve(positions)
        meta = AttnMeta(start, positions, cache.pos[:start + positions.shape[0]], tree_mask, mask_start)
        with exact.scope(self.exact):
            logits = self._run(input_ids, positions, cache, meta)
        cache.advance(positions.shape[0])
        return logits

    def forward_static(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache,
                       start: torch.Tensor, tree_mask: torch.Tensor) -> torch.Tensor:
        """The graph-safe forward: no host syncs, every shape fixed by m, so a CUDA graph
        captured once replays at any cache length.

        input_ids [m], positions [m] int64, start [1] int64 on the cache's device (the cache
        length: every cached key is visible), tree_mask [m, m] bool or packed int32
        (``ops.attention.pack_tree_mask``) over the m new tokens. Writes their K/V and
        positions at slots start + arange(m) with index_copy_ and leaves ``cache.length``
        to the caller (``cache.advance``); the caller also checks that the slots fit.
        Attention is ``ops.tree_attention`` with the device length (see
        ``static_forward_issue`` for what this path does not cover). Returns logits
        [m, vocab] (model dtype)."""
        slots = start + torch.arange(input_ids.shape[0], device=start.device)  # [m] int64
        cache.pos.index_copy_(0, slots, positions)
        meta = AttnMeta(start, positions, None, tree_mask, None, slots=slots)
        with exact.scope(self.exact):
            return self._run(input_ids, positions, cache, meta)

    def forward_packed(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache,
                       slots: torch.Tensor, pre_base: torch.Tensor, pre_len: torch.Tensor, anc: torch.Tensor,
                       cnt: torch.Tensor) -> torch.Tensor:
        """A ragged batch in one forward (#23): several sequences share one flat cache, each in
        its own slot range, and their new tokens are packed into m rows. Per row: input_ids,
        positions [m] int64; slots [m] int64 (where its K/V go); pre_base, pre_len [m] int64
        (its sequence's cached prefix: slots pre_base + [0, pre_len), positions [0, pre_len));
        anc [m, A] int32 (the query rows of its tree ancestors and itself, in depth order) and
        cnt [m] int32. Attention is ``ops.attention.packed_attention_exact``: a row attends to
        its own sequence only, and its result does not depend on the other rows. No host sync,
        cache.length untouched. Returns logits [m, vocab] (model dtype)."""
        cache.pos.index_copy_(0, slots, positions)
        meta = AttnMeta(pre_len, positions, None, None, None, slots=slots)
        meta.packed = (pre_base, pre_len, anc, cnt)
        with exact.scope(self.exact):
            return self._run(input_ids, positions, cache, meta)

    def fuse_projections(self, share_with: nn.Module | None = None) -> None:
        """Fuse each layer's q/k/v and gate/up projections into one GEMM each (see
        ``fuse_linears``). With ``share_with`` (the transformers model these weights came
        from) its parameters of the same names are pointed at the fused views, layer by
        layer, so the two models keep sharing one copy of the weights."""
        hf_params = dict(share_with.named_parameters()) if share_with is not None else {}
        for i, layer in enumerate(self.model.layers):
            for sub in (layer.self_attn, layer.mlp):
                sub.fuse_projections()
            prefix = f"model.layers.{i}."
            for name, p in layer.named_parameters():
                hp = hf_params.get(prefix + name)
                if hp is not None and hp.shape == p.shape and hp.data_ptr() != p.data_ptr():
                    hp.data = p.data

    def static_forward_issue(self) -> str | None:
        """Why ``forward_static`` cannot run this model, or None."""
        for i, layer in enumerate(self.model.layers):
            if getattr(layer.self_attn, "softcap", None) is not None:
                return f"layer {i} soft-caps attention logits (dense attention path, host-sliced)"
        return None

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache,
             meta: AttnMeta) -> torch.Tensor:
        x = self.embed(input_ids)  # [m, hidden]
        rope = {key: rope_cos_sin(getattr(self, f"inv_freq_{key}"), getattr(self, f"rope_scale_{key}"),
                                  positions, x.dtype) for key in self.rope_keys}
        delta = None  # a block's last residual add, left to the next norm (see llama.Block)
        for i, layer in enumerate(self.model.layers):
            x, delta = layer(x, rope[layer.rope_key], cache, i, meta, delta)
        return self.head(x, delta)  # [m, vocab]

    def head(self, x: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """The final norm of x (+ delta, the last residual add) and the logits, soft-capped where
        the model says so (Gemma): [m, hidden] -> [m, vocab]. For one row possibly one kernel
        (``RMSNorm.linear``). Keeps x + delta in ``last_residual`` (the runner's hidden states)."""
        logits, self.last_residual = self.model.norm.linear(x, delta, self.lm_head.weight, self.lm_head.bias)
        cap = self.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    # --- loading
    @classmethod
    def from_state_dict(cls, config, state: dict[str, torch.Tensor], *, fuse: bool = True) -> CompactModel:
        """Build from HF-named tensors; the model references them (``assign=True``), then
        (``fuse``) concatenates each layer's q/k/v and gate/up weights (``fuse_projections``)."""
        reason = cls.unsupported_reason(config)
        if reason is not None:
            raise ValueError(f"{cls.__name__}: unsupported model ({reason})")
        with torch.device("meta"):
            model = cls(config)
        state = dict(state)
        if "lm_head.weight" not in state:  # tied embeddings in a checkpoint
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        for key in state:  # biases (Qwen2 qkv, attention_bias, mlp_bias) come from the weights
            mod = model.get_submodule(key[:-5]) if key.endswith(".bias") else None
            if isinstance(mod, nn.Linear) and mod.bias is None:
                mod.bias = nn.Parameter(torch.empty(mod.out_features, device="meta"))
        model.load_state_dict(state, strict=True, assign=True)
        model.requires_grad_(False).eval()
        model._init_rope()
        if fuse:
            del state
            model.fuse_projections()
        return model

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> CompactModel:
        """Reference the weights of a loaded transformers model (any float dtype)."""
        reason = hf_model_issue(hf_model)
        if reason is not None:
            raise ValueError(f"{cls.__name__}: cannot run this model ({reason})")
        model = cls.from_state_dict(hf_model.config, hf_model.state_dict(), fuse=False)
        model.fuse_projections(share_with=hf_model)  # hf_model's q/k/v, gate/up become views too
        return model

    @classmethod
    def from_pretrained(cls, path: str | Path, *, gguf_file: str | None = None, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> CompactModel:
        """A safetensors checkpoint dir (config.json + *.safetensors), or a GGUF file
        (``path`` = dir + ``gguf_file``, or ``path`` = the .gguf file) loaded by transformers."""
        path = Path(path)
        if gguf_file is not None or path.suffix == ".gguf":
            return cls.from_hf(load_hf_gguf(path, gguf_file, dtype=dtype, device=device))
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path))
        state = load_safetensors(path, device=device, dtype=dtype)
        return cls.from_state_dict(config, state)


def load_hf_gguf(path: Path, gguf_file: str | None, *, dtype: torch.dtype | None = None, device=None) -> nn.Module:
    """transformers' GGUF loader (dequantizes to ``dtype``, default fp32)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if gguf_file is None:
        path, gguf_file = path.parent, path.name
    hf = AutoModelForCausalLM.from_pretrained(str(path), gguf_file=gguf_file, dtype=dtype or torch.float32)
    return hf.to(device) if device is not None else hf


def load_safetensors(path: Path, *, device=None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f), device=str(device) if device is not None else "cpu"))
    if dtype is not None:
        state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}
    return state


def hf_model_issue(hf_model: nn.Module) -> str | None:
    """Why a loaded transformers model cannot be referenced as plain tensors, or None."""
    config = hf_model.config
    quant = getattr(config, "quantization_config", None)
    if quant is not None:  # GGUF is dequantized to plain float tensors on load: fine
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        if str(getattr(method, "value", method)).lower() != "gguf":
            return f"quantized weights ({getattr(method, 'value', method)})"
    devices = {p.device for p in hf_model.parameters()}
    if len(devices) > 1 or any(d.type == "meta" for d in devices):
        return f"weights spread over devices {sorted(map(str, devices))}"
    for name, mod in hf_model.named_modules():
        if isinstance(mod, nn.Linear) and type(mod) is not nn.Linear:
            return f"custom linear layer {type(mod).__name__} at {name}"
    if not all(p.is_floating_point() for p in hf_model.parameters()):
        return "non-float (packed) weights"
    return None
