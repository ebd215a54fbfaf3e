"""Generic backend: any transformers causal LM, driven through a 4D attention mask.

The tree is scored in ONE forward: every new token sees the whole cached prefix and,
among the new/scratch tokens, only its ancestors (a float additive mask, which the
eager and SDPA attention paths both accept). Per-node position ids give each node
its depth. The KV cache is a plain ``DynamicCache`` (full layers, so sliding-window
models get their window from the mask we build), edited through its public
``layers[i].keys/values`` tensors.
"""
from __future__ import annotations

import inspect
import logging
import math
import time

import torch
from transformers import DynamicCache
from .base import Runner

log = logging.getLogger("specdec")

# On some CPUs torch's linear layers run 2- and 3-row inputs as one matrix-vector product
# per row (a 49152-row LM head on a 2-core AMD EPYC: 12 / 25 / 41 / 24 ms for 1 / 2 / 3 / 4
# rows), on others 2 rows cost what 1 does and 4 cost twice as much (a 2-core Intel Xeon:
# 13 / 13 / - / 27 ms). So whether a forward of 2 or 3 tokens is padded to 4 is measured
# once per LM-head shape (``_cpu_rows_to_pad``): the padding rows see only themselves, no
# real row sees them, and their cache entries are dropped before returning.
# CPU_PAD_TO: None = measure; an int pins it (1 = never pad, 4 = always pad 2 and 3 rows).
CPU_PAD_TO: int | None = None
_PAD_TARGET = 4
_MEASURED_PAD: dict[tuple, frozenset] = {}


def _cpu_rows_to_pad(weight: torch.Tensor) -> frozenset:
    """The row counts m in {2, 3} that run faster padded to 4 rows through this LM head
    (``weight`` [vocab, hidden]) on this CPU: timed once per shape, dtype and thread count."""
    if CPU_PAD_TO is not None:
        return frozenset(m for m in (2, 3) if m < CPU_PAD_TO)
    key = (tuple(weight.shape), weight.dtype, torch.get_num_threads())
    if key not in _MEASURED_PAD:
        x = torch.randn(_PAD_TARGET, weight.shape[1], dtype=weight.dtype)
        best = {}
        with torch.no_grad():
            for _ in range(3):  # interleaved, so a burst of outside load hits every size alike
                for m in (2, 3, _PAD_TARGET):
                    t0 = time.perf_counter()
                    torch.nn.functional.linear(x[:m], weight)
                    best[m] = min(best.get(m, math.inf), time.perf_counter() - t0)
        _MEASURED_PAD[key] = frozenset(m for m in (2, 3) if best[_PAD_TARGET] < 0.9 * best[m])
        log.info("specdec: CPU forwards of %s rows padded to %d (LM head %s: %s ms)",
                 sorted(_MEASURED_PAD[key]) or "no", _PAD_TARGET, tuple(weight.shape),
                 {m: round(t * 1e3, 1) for m, t in best.items()})
    return _MEASURED_PAD[key]

def _text_config(model):
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def context_length(model) -> int:
    cfg = _text_config(model)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return 1 << 30


def final_norm(model) -> torch.nn.Module | None:
    """The norm a transformers causal LM applies before its LM head (``model.model.norm`` in
    Llama, Qwen, Gemma, ...), or None."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    norm = getattr(base, "norm", None)
    return norm if isinstance(norm, torch.nn.Module) else None


class HFRunner(Runner):
    """A transformers model plus its own KV cache (batch 1). Implements ``Runner``."""

    def __init__(self, model):
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(f"{type(model).__name__} is an encoder-decoder model; specdec supports "
                             "decoder-only causal LMs (AutoModelForCausalLM).")
        impl = getattr(model.config, "_attn_implementation", None)
        if impl and "flash" in impl:
            raise ValueError(f"attn_implementation={impl!r} cannot take a tree attention mask; load the "
                             "model with attn_implementation='sdpa' or 'eager' for the generic backend.")
        self.model = model
        cfg = _text_config(model)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0]) \
            if model.get_output_embeddings() is not None else int(cfg.vocab_size)
        self.max_length = context_length(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        window = getattr(cfg, "sliding_window", None)
        layer_types = getattr(cfg, "layer_types", None)
        # Hybrid models (Gemma2/3, Qwen2 with sliding layers) take a {layer type: mask} dict;
        # all-sliding models without layer_types (Mistral v0.1) get the window in the one mask.
        self._mask_dict = bool(window) and layer_types is not None and "sliding_attention" in layer_types
        self.window = int(window) if self._mask_dict else None
        self._global_window = int(window) if window and layer_types is None and \
            getattr(cfg, "model_type", "") == "mistral" else None
        self.cache = DynamicCache()
        self.key_pos = torch.zeros(0, dtype=torch.long, device=self.device)  # [length] position of each entry
        # transformers renamed the forward's ``past_key_values`` to ``cache`` (the old name is
        # deprecated from 5.2x and goes in 5.40): pass whichever this model's forward takes.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._keep_kwarg = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self._norm_input: torch.Tensor | None = None
        self._norm_hook = None

    @property
    def keep_hidden(self) -> bool:
        return self._norm_hook is not None

    @keep_hidden.setter
    def keep_hidden(self, keep: bool) -> None:
        """Hidden states are the final norm's input, read by a hook present only while kept."""
        if keep and self._norm_hook is None:
            norm = final_norm(self.model)
            if norm is None:
                raise ValueError(f"{type(self.model).__name__} has no final norm module (model.model.norm) to "
                                 "read hidden states from; a drafter that reads them cannot run on it")
            self._norm_hook = norm.register_forward_pre_hook(self._keep_norm_input)
        elif not keep and self._norm_hook is not None:
            self._norm_hook.remove()
            self._norm_hook, self.last_hidden = None, None

    def _keep_norm_input(self, module, args) -> None:
        self._norm_input = args[0]

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def reset(self) -> None:
        self.cache = DynamicCache()
        self.key_pos = self.key_pos[:0]

    def _mask(self, m: int, position_ids: torch.Tensor, tree_mask, mask_start: int, window: int | None):
        """[1, 1, m, length + m] additive float mask."""
        length = self.length
        total = length + m
        visible = torch.zeros(m, total, dtype=torch.bool, device=self.device)
        visible[:, :mask_start] = True
        if tree_mask is None:
            tail = total - mask_start
            tree_mask = torch.ones(m, tail, dtype=torch.bool, device=self.device).tril(tail - m)
        visible[:, mask_start:] = tree_mask.to(self.device)
        if window is not None:
            key_pos = torch.cat([self.key_pos, position_ids])
            visible &= key_pos[None, :] > position_ids[:, None] - window
        mask = torch.zeros(m, total, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        return mask[None, None]

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                tree_mask: torch.Tensor | None = None, mask_start: int | None = None) -> torch.Tensor:
        m = input_ids.numel()
        length = self.length
        mask_start = length if mask_start is None else mask_start
        if self.device.type == "cpu" and m in (2, 3) and m in self._rows_to_pad():
            return self._padded_forward(input_ids, position_ids, tree_mask, mask_start)
        position_ids = position_ids.to(self.device)
        # A causal extension of the cache (prefill, one-token steps) gets no explicit mask, so
        # transformers' SDPA path can take its unmasked / is_causal kernels (SmolLM2 fp32 on a
        # 2-core Xeon: a one-token step after a 40-token prompt 67.8 -> 64.1 ms).
        attn = None
        if not self._plain_causal(m, tree_mask, mask_start, length):
            attn = self._mask(m, position_ids, tree_mask, mask_start, self._global_window)
            if self._mask_dict:
                sliding = attn if self.window is None else self._mask(m, position_ids, tree_mask, mask_start,
                                                                      self.window)
                attn = {"full_attention": attn, "sliding_attention": sliding}
        return self._run(input_ids, position_ids, attn).logits[0].float()  # [m, vocab]

    def _run(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attn, **kw):
        """The model over input_ids [m] at position_ids [m] (on the device), appended to the cache."""
        length, m = self.length, input_ids.numel()
        out = self.model(input_ids=input_ids.to(self.device)[None], position_ids=position_ids[None],
                         attention_mask=attn, **{self._cache_kwarg: self.cache}, use_cache=True,
                         cache_position=torch.arange(length, length + m, device=self.device), **kw)
        self.key_pos = torch.cat([self.key_pos, position_ids])
        if self.keep_hidden:
            self.last_hidden, self._norm_input = self._norm_input[0], None  # [m, hidden]
        return out

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> None:
        """Append a causal run of tokens to the cache without computing their logits (a
        prompt's logits go unused; SmolLM2 fp32 on a 2-core Xeon, 738-token prompt: 2.78 ->
        2.14 s with the causal path above)."""
        if not self._plain_causal(input_ids.numel(), None, self.length, self.length) or not self._keep_kwarg:
            self.forward(input_ids, position_ids)
        else:
            self._run(input_ids, position_ids.to(self.device), None, **{self._keep_kwarg: 1})

    def _plain_causal(self, m: int, tree_mask, mask_start: int, length: int) -> bool:
        """Whether this forward's mask is plain causal attention over the whole cache."""
        if self._mask_dict or self._global_window is not None or mask_start != length:
            return False
        if tree_mask is None:
            return True
        return m == 1 and bool(tree_mask.reshape(-1)[-1])  # one token that sees itself

    def _rows_to_pad(self) -> frozenset:
        head = self.model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if weight is None or weight.dim() != 2:
            return frozenset()
        return _cpu_rows_to_pad(weight)

    def _padded_forward(self, input_ids, position_ids, tree_mask, mask_start) -> torch.Tensor:
        """``forward`` of 2 or 3 tokens run as 4 (see CPU_PAD_TO); logits [m, vocab]."""
        m, pad, length = input_ids.numel(), _PAD_TARGET - input_ids.numel(), self.length
        tail = length - mask_start + m  # keys the tree mask covers
        if tree_mask is None:
            tree_mask = torch.ones(m, tail, dtype=torch.bool).tril(tail - m)
        mask = torch.zeros(m + pad, tail + pad, dtype=torch.bool)
        mask[:m, :tail] = tree_mask.cpu()
        mask[m:, :tail - m] = True  # padding rows: whatever the real rows may see before them ...
        mask[m:, tail:] = torch.eye(pad, dtype=torch.bool)  # ... and themselves, no real row
        ids = torch.cat([input_ids.reshape(-1), input_ids.reshape(-1)[-1:].expand(pad)])
        pos = torch.cat([position_ids.reshape(-1), position_ids.reshape(-1)[-1:].expand(pad)])
        logits = self.forward(ids, pos, tree_mask=mask, mask_start=mask_start)
        self.crop(length + m)
        if self.last_hidden is not None:
            self.last_hidden = self.last_hidden[:m]
        return logits[:m]

    def commit(self, start: int, keep_idx: torch.Tensor) -> None:
        """Keep the cache entries [0, start) and start + keep_idx (ascending), in place:
        only the kept tree rows move (rebuilding the whole cache would copy O(length)
        per step); a prefix (plain decoding, a fully accepted chain) is a crop."""
        idx = keep_idx.tolist()
        if idx != list(range(len(idx))):
            sel = start + keep_idx.to(self.device)
            self.key_pos = torch.cat([self.key_pos[:start], self.key_pos[sel]])
            for layer in self.cache.layers:
                if layer.keys is None or layer.keys.numel() == 0:
                    continue  # (index_select copies before the write: sel >= the target rows)
                layer.keys[:, :, start:start + len(idx)] = layer.keys.index_select(2, sel)
                layer.values[:, :, start:start + len(idx)] = layer.values.index_select(2, sel)
        self.crop(start + len(idx))

    def crop(self, length: int) -> None:
        if length >= self.length:
            return
        self.key_pos = self.key_pos[:length]
        for layer in self.cache.layers:  # plain slicing: crop()'s argument changed meaning across 5.x
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = layer.keys[:, :, :length]
                layer.values = layer.values[:, :, :length]
