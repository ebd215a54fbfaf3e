"""DualDrafter: a small draft model plus an n-gram pool, with dualdec's parameters."""
from __future__ import annotations

from .merged import MergedDrafter
from .model import ModelDrafter
from .ngram import NgramDrafter


def make_dual_drafter(approx_model, *, ngram_cache=None, gamma=4, window_size=20, guess_set_size=20,
                      lookahead_level=7, topk=3):
    """The drafter ``specdec.dualdec`` uses.

    gamma           -> the draft model's chain length;
    guess_set_size  -> n-gram continuations proposed per step;
    lookahead_level -> n-gram size N: continuations of up to N - 1 tokens;
    window_size     -> continuations remembered per key (recent first);
    topk            -> the target's top-k next tokens recorded at verified nodes;
    ngram_cache     -> an NgramDrafter to reuse across calls (warm start), or None.
    """
    if ngram_cache is None:
        ngram_cache = NgramDrafter(num_candidates=guess_set_size, max_continuation=max(1, lookahead_level - 1),
                                   max_per_key=window_size, topk=topk)
    elif not isinstance(ngram_cache, NgramDrafter):
        raise TypeError("ngram_cache must be a specdec.NgramDrafter (or None); create one with "
                        "specdec.NgramDrafter(keep_across_prompts=True) and pass it to every call")
    return MergedDrafter([ModelDrafter(approx_model, gamma=gamma), ngram_cache])


DualDrafter = make_dual_drafter
