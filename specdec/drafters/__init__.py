"""Drafters: each proposes token trees to the same verifier (see base.Drafter)."""
from __future__ import annotations

from .base import DraftRequest, Drafter, NoDrafter, VerifyResult
from .model import ModelDrafter
from .ngram import NgramDrafter


def _model_drafter(target=None, draft_model=None, **kw):
    if draft_model is None:
        raise ValueError("drafter 'model' needs draft_model= (a transformers model or a local path)")
    if isinstance(draft_model, str):
        from transformers import AutoModelForCausalLM

        dtype = next(target.parameters()).dtype if target is not None else None
        draft_model = AutoModelForCausalLM.from_pretrained(draft_model, dtype=dtype).eval()
        if target is not None:
            draft_model = draft_model.to(next(target.parameters()).device)
    return ModelDrafter(draft_model, **kw)


# name -> factory(target=..., **options)
_FACTORIES = {
    "none": lambda target=None, **kw: NoDrafter(),
    "ngram": lambda target=None, **kw: NgramDrafter(**kw),
    "model": _model_drafter,
}
NAMES = tuple(_FACTORIES)


def register(name: str, factory) -> None:
    """Add a drafter factory ``factory(target=..., **options) -> Drafter`` under ``name``."""
    _FACTORIES[name] = factory


def make(name: str, *, target=None, **options) -> Drafter:
    """Build a drafter by name (``specdec.drafters.NAMES`` lists them)."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown drafter {name!r}; choose one of {sorted(_FACTORIES)}")
    return _FACTORIES[name](target=target, **options)


__all__ = ["Drafter", "DraftRequest", "VerifyResult", "NoDrafter", "ModelDrafter", "NgramDrafter",
           "make", "register", "NAMES"]
