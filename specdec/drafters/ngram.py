"""NgramDrafter: prompt lookup + a pool of n-grams from the generated text and from
the target's own verification outputs (its top-k at verified nodes, as in
Lookahead decoding / Ouroboros). Proposes a trie of several continuations.

No model runs here: ``propose`` is one index lookup of the context's last
``max_order`` tokens (longest matching n-gram first, most recent first) turned into
a trie; ``update`` records the newly committed tokens and, with target logits, the
target's top-k next tokens after the root and each accepted node. Proposals are
deterministic (``draft_probs=None``), so acceptance treats them as one-hot.
"""
from __future__ import annotations

import torch

from ..ops.ngram import make_ngram_index
from ..tree import TokenTree, from_paths
from .base import DraftRequest, VerifyResult


class NgramDrafter:
    """Drafter protocol (reset / propose / update) over an n-gram index.

    max_order:        longest n-gram key matched against the context suffix.
    num_candidates:   continuations looked up per step (trie paths before the budget cut).
    max_continuation: tokens stored after each key (caps the tree depth too; 16, so that an
                      adaptive budget can draft past depth 8 after a full accept: extend_depth).
    use_target_topk:  record the target's top-``topk`` next tokens at verified nodes.
    topk_all_nodes:   ... at every tree node, not only the root and accepted path.
    pool_cap:         most (key, continuation) entries kept (least recent evicted).
    max_per_key:      most continuations kept per key.
    native:           None = native index when built; True = require it; False = reference.
    keep_across_prompts: keep the pool across reset() (a warm start for the next prompt).
    """

    def __init__(self, *, max_order: int = 4, num_candidates: int = 8, max_continuation: int = 16,
                 use_target_topk: bool = True, topk: int = 4, pool_cap: int = 65536,
                 max_per_key: int = 8, topk_all_nodes: bool = False, native: bool | None = None,
                 keep_across_prompts: bool = False):
        if num_candidates < 0 or topk < 0:
            raise ValueError("NgramDrafter: num_candidates and topk must be >= 0")
        self.max_order = int(max_order)
        self.num_candidates = int(num_candidates)
        self.use_target_topk = bool(use_target_topk)
        self.topk = int(topk)
        self.topk_all_nodes = bool(topk_all_nodes)
        self.keep_across_prompts = bool(keep_across_prompts)
        self.index = make_ngram_index(max_order, max_continuation, pool_cap, max_per_key, native=native)
        self._seen = 0  # committed tokens already recorded in the index

    # ------------------------------------------------------------- protocol
    def reset(self, prompt: torch.Tensor) -> None:
        """prompt: [T] token ids; seeds the index with it (prompt lookup)."""
        if not self.keep_across_prompts:
            self.index.clear()
        self._seen = 0
        self._sync(prompt)

    def propose(self, request: DraftRequest) -> TokenTree:
        """Trie of the continuations of request.tokens' suffix (below tokens[-1])."""
        self._sync(request.tokens)  # catch up if update() was skipped
        device = request.tokens.device
        budget = request.budget
        if budget.max_nodes <= 0 or budget.max_depth <= 0 or self.num_candidates == 0:
            return TokenTree.empty(device)
        context = request.tokens[-self.max_order:].tolist()
        cands = self.index.lookup(context, self.num_candidates)
        if not cands:
            return TokenTree.empty(device)
        tree = from_paths([c[:budget.max_depth] for c in cands], max_nodes=budget.max_nodes)
        return tree if device.type == "cpu" else tree.to(device)

    def update(self, result: VerifyResult) -> None:
        """Record the committed tokens, then the target's top-k at verified nodes."""
        tokens = result.tokens  # [T'] every committed token
        old_len = tokens.numel() - result.committed.numel()  # the root is tokens[old_len - 1]
        self._sync(tokens)
        logits = result.target_logits  # [n + 1, vocab] or None
        if not (self.use_target_topk and self.topk > 0 and logits is not None and old_len > 0):
            return
        tree = result.tree
        nodes = range(len(tree)) if self.topk_all_nodes else result.accepted_nodes
        rows = [0] + [i + 1 for i in nodes]  # logits row of the root, then of each node
        top = result.target_topk_host(self.topk)[rows].tolist()  # [len(rows), k], best first
        base = tokens[max(0, old_len - self.max_order):old_len].tolist()
        drafted = tree.tokens.tolist()
        for row, nxt in zip(rows, top):
            path = [] if row == 0 else [drafted[j] for j in tree.path_to(row - 1)]
            self.index.insert_next((base + path)[-self.max_order:], nxt)

    @property
    def target_topk_wanted(self) -> int:
        """The k of the target's top-k that ``update`` reads (0: none)."""
        return self.topk if self.use_target_topk else 0

    # -------------------------------------------------------------- helpers
    def _sync(self, tokens: torch.Tensor) -> None:
        """Record tokens[self._seen:] (tokens: [T]); re-records the few n-grams whose
        continuation the old end had cut short, so they grow to full length."""
        n = tokens.numel()
        if n > self._seen:
            start = max(0, self._seen - self.index.max_continuation + 1)
            begin = max(0, start - self.max_order)  # keys of order <= max_order reach back this far
            self.index.insert(tokens[begin:n].tolist(), start - begin)
        self._seen = n  # a shorter sequence (rollback) keeps its stale n-grams: harmless
