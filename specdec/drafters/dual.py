"""DualDrafter: a small draft model plus an n-gram pool (dualdec's parameters)."""
from __future__ import annotations

from .model import ModelDrafter


def make_dual_drafter(approx_model, *, ngram_cache=None, gamma=4, window_size=20, guess_set_size=20,
                      lookahead_level=7, topk=3):
    """The drafter ``specdec.dualdec`` uses (model chain; n-gram pool once available)."""
    return ModelDrafter(approx_model, gamma=gamma)
