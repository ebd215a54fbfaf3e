"""Compact model definitions for the fast runtime (static KV cache, batch 1).

``load_compact(hf_model)`` returns a CompactModel that references the HF model's
weights, or None -- with one log line naming the architecture -- when the model is
not covered, so the caller falls back to the generic HF backend.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .common import CompactModel, hf_model_issue, load_hf_gguf
from .gemma3 import Gemma3Compact
from .kv_cache import StaticKVCache
from .llama import LlamaCompact

log = logging.getLogger("specdec")

_CLASSES: tuple[type[CompactModel], ...] = (LlamaCompact, Gemma3Compact)
SUPPORTED_MODEL_TYPES = tuple(t for c in _CLASSES for t in c.model_types)


def compact_class(config) -> type[CompactModel] | None:
    model_type = getattr(config, "model_type", None)
    return next((c for c in _CLASSES if model_type in c.model_types), None)


def unsupported_reason(hf_model) -> str | None:
    """Why ``load_compact`` would return None for this model, or None if it would not."""
    config = getattr(hf_model, "config", None)
    cls = compact_class(config)
    if cls is None:
        return f"model_type {getattr(config, 'model_type', None)!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    return cls.unsupported_reason(config) or hf_model_issue(hf_model)


def load_compact(hf_model) -> CompactModel | None:
    """A compact model sharing ``hf_model``'s weights, or None (logged once) if unsupported."""
    if isinstance(hf_model, CompactModel):
        return hf_model
    reason = unsupported_reason(hf_model)
    if reason is not None:
        arch = getattr(getattr(hf_model, "config", None), "architectures", None) or [type(hf_model).__name__]
        log.warning("specdec: no compact runtime for %s (%s); using the generic Hugging Face backend",
                    arch[0], reason)
        return None
    return compact_class(hf_model.config).from_hf(hf_model)


def from_pretrained(path: str | Path, *, gguf_file: str | None = None, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> CompactModel:
    """Load a compact model from a safetensors checkpoint dir or a GGUF file (see
    CompactModel.from_pretrained); raises ValueError for unsupported architectures."""
    path = Path(path)
    if gguf_file is not None or path.suffix == ".gguf":
        hf_model = load_hf_gguf(path, gguf_file, dtype=dtype, device=device)
        reason = unsupported_reason(hf_model)
        if reason is not None:
            raise ValueError(f"no compact model for {path / (gguf_file or '')} ({reason})")
        return compact_class(hf_model.config).from_hf(hf_model)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    cls = compact_class(config)
    if cls is None:
        raise ValueError(f"no compact model for model_type {config.model_type!r} "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    return cls.from_pretrained(path, dtype=dtype, device=device)


__all__ = ["CompactModel", "Gemma3Compact", "LlamaCompact", "StaticKVCache", "SUPPORTED_MODEL_TYPES",
           "from_pretrained", "load_compact", "unsupported_reason"]
