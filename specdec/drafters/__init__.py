"""Drafters: each proposes token trees to the same verifier (see base.Drafter)."""
from __future__ import annotations

from .base import DraftRequest, Drafter, NoDrafter, VerifyResult
from .model import ModelDrafter
from .ngram import NgramDrafter


def _load_draft_model(target, draft_model, name: str):
    """A draft model object from a model or a local path, on the target's device/dtype."""
    if draft_model is None:
        raise ValueError(f"drafter {name!r} needs draft_model= (a transformers model or a local path)")
    if isinstance(draft_model, str):
        from transformers import AutoModelForCausalLM

        dtype = next(target.parameters()).dtype if target is not None else None
        draft_model = AutoModelForCausalLM.from_pretrained(draft_model, dtype=dtype).eval()
        if target is not None:
            draft_model = draft_model.to(next(target.parameters()).device)
    return draft_model


def _model_drafter(target=None, draft_model=None, **kw):
    return ModelDrafter(_load_draft_model(target, draft_model, "model"), **kw)


# name -> factory(target=..., **options)
_FACTORIES = {
    "none": lambda target=None, **kw: NoDrafter(),
    "ngram": lambda target=None, **kw: NgramDrafter(**kw),
    "model": _model_drafter,
}
NAMES = tuple(_FACTORIES)


def register(name: str, factory) -> None:
    """Add a drafter factory ``factory(target=..., **options) -> Drafter`` under ``name``."""
    global NAMES
    _FACTORIES[name] = factory
    NAMES = tuple(_FACTORIES)


def make(name: str, *, target=None, **options) -> Drafter:
    """Build a drafter by name (``specdec.drafters.NAMES`` lists them). The drafter keeps
    how it was made (``recipe``), so a batch can build one per row (``fresh``)."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown drafter {name!r}; choose one of {sorted(_FACTORIES)}")
    drafter = _FACTORIES[name](target=target, **options)
    try:
        drafter.recipe = (name, target, dict(options))
    except AttributeError:  # (a drafter with __slots__)
        pass
    return drafter


def fresh(drafter) -> Drafter | None:
    """A new drafter built as ``drafter`` was by ``make`` (no state carried over), or None."""
    recipe = getattr(drafter, "recipe", None)
    if recipe is None:
        return None
    name, target, options = recipe
    return make(name, target=target, **options)


__all__ = ["Drafter", "DraftRequest", "VerifyResult", "NoDrafter", "ModelDrafter", "NgramDrafter",
           "make", "fresh", "register", "NAMES"]


# --- Token Recycling (drafters/recycling.py) and early-exit self-drafting (drafters/early_exit.py)
def _recycling_drafter(target=None, **kw):
    from .recycling import RecyclingDrafter

    return RecyclingDrafter(target, **kw)


def _early_exit_drafter(target=None, **kw):
    if target is None:
        raise ValueError("drafter 'early_exit' drafts with the target's own layers: pass target=")
    from .early_exit import EarlyExitDrafter

    return EarlyExitDrafter(target, **kw)


def _suffix_drafter(target=None, **kw):
    from .suffix import SuffixDrafter

    return SuffixDrafter(**kw)


register("recycling", _recycling_drafter)
register("early_exit", _early_exit_drafter)
register("suffix", _suffix_drafter)


# --- combinations (drafters/merged.py, drafters/dual.py)
def _merged_drafter(target=None, names=("ngram", "recycling"), **kw):
    """Options go to each part by its name: ``make("ngram+recycling", ngram={"max_continuation": 16})``."""
    from .merged import MergedDrafter

    unknown = sorted(set(kw) - set(names))
    if unknown:
        raise ValueError(f"drafter {'+'.join(names)!r}: options go per part, as {{name: {{option: value}}}} "
                         f"with name in {list(names)}; got {unknown}")
    for n in names:
        if not isinstance(kw.get(n, {}), dict):
            raise ValueError(f"drafter {'+'.join(names)!r}: {n}= takes a dict of {n} options, got {kw[n]!r}")
    return MergedDrafter([make(n, target=target, **kw.get(n, {})) for n in names])


def _dual_drafter(target=None, draft_model=None, **kw):
    from .dual import make_dual_drafter

    return make_dual_drafter(_load_draft_model(target, draft_model, "dual"), **kw)


register("ngram+recycling", _merged_drafter)
register("suffix+recycling", lambda target=None, **kw: _merged_drafter(target, names=("suffix", "recycling"), **kw))
register("dual", _dual_drafter)


# --- a draft model distilled for the target by ``specdec train-draft`` (specdec/train_draft.py)
def _distilled_drafter(target=None, path=None, gamma: int = 4, topk: int = 1, **kw):
    if target is None or path is None:
        raise ValueError("the distilled drafter needs target= (the model it was trained for) and path= "
                         "(the folder `specdec train-draft --out` wrote)")
    from ..train_draft import load

    return ModelDrafter(load(path, target), gamma=gamma, topk=topk, **kw)


register("distilled", _distilled_drafter)


# --- an EAGLE-style draft head trained by ``specdec train-draft --kind head`` (drafters/head.py)
def _head_drafter(target=None, path=None, **kw):
    if target is None:
        raise ValueError("the head drafter reads the target's hidden states and shares its embeddings and LM "
                         "head: pass target=")
    from .head import HeadDrafter, load_head, shipped_head

    path = path if path is not None else shipped_head(target)
    return HeadDrafter(target, load_head(path, target), **kw)


register("head", _head_drafter)
register("head+ngram", lambda target=None, **kw: _merged_drafter(target, names=("head", "ngram"), **kw))
