"""TokenTree: the one shape every drafter proposes and the verifier scores.

A tree of ``n`` drafted nodes hangs below an implicit *root*, the last committed
token (which the target has not run yet). ``parents[i] == -1`` means node ``i`` is
a child of the root. Parents always precede children (topological order), so node
0 is always a child of the root. A chain is a tree where every node has one child.

Words (used everywhere in specdec):
- accepted tokens: drafted nodes the target keeps;
- bonus token: the token the target samples after the last accepted node;
- a step commits ``accepted + 1`` tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

ROOT = -1


@dataclass
class TokenTree:
    tokens: torch.Tensor  # [n] int64, drafted token ids
    parents: torch.Tensor  # [n] int64, parent node index, -1 = root
    # [n, vocab] float: the distribution each node's token was *sampled* from, or
    # None for a deterministic proposal (top-k, n-gram, ...: one-hot for acceptance).
    draft_probs: torch.Tensor | None = None
    # [n] float: the drafter's own score of each node (cumulative prob), optional.
    scores: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.tokens = torch.as_tensor(self.tokens, dtype=torch.long).reshape(-1)
        self.parents = torch.as_tensor(self.parents, dtype=torch.long, device=self.tokens.device).reshape(-1)
        self.validate()

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.tokens.numel())

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def validate(self, max_nodes: int | None = None) -> None:
        n = len(self)
        if self.parents.numel() != n:
            raise ValueError(f"TokenTree: {n} tokens but {self.parents.numel()} parents")
        if n:
            idx = torch.arange(n, device=self.parents.device)
            if bool((self.parents >= idx).any()) or bool((self.parents < ROOT).any()):
                raise ValueError("TokenTree: every parent must precede its child (parents[i] in [-1, i))")
        if max_nodes is not None and n > max_nodes:
            raise ValueError(f"TokenTree has {n} nodes, more than the budget {max_nodes}")
        if self.draft_probs is not None and self.draft_probs.shape[0] != n:
            raise ValueError("TokenTree.draft_probs must have one row per node")

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> "TokenTree":
        z = torch.zeros(0, dtype=torch.long, device=device)
        return TokenTree(z, z.clone())

    def to(self, device) -> "TokenTree":
        if self.tokens.device == torch.device(device):
            return self
        dp = None if self.draft_probs is None else self.draft_probs.to(device)
        sc = None if self.scores is None else self.scores.to(device)
        return TokenTree(self.tokens.to(device), self.parents.to(device), dp, sc)

    # ----------------------------------------------------------- derived views
    def _parents_list(self) -> list[int]:
        if "plist" not in self._cache:
            self._cache["plist"] = self.parents.tolist()
        return self._cache["plist"]

    @property
    def depth(self) -> torch.Tensor:
        """[n] depth of each node; children of the root have depth 1."""
        if "depth" not in self._cache:
            self._cache["depth"] = torch.tensor(self.depth_list, dtype=torch.long, device=self.device)
        return self._cache["depth"]

    @property
    def depth_list(self) -> list[int]:
        """``depth`` as a Python list (host code reads it without a device round trip)."""
        if "depth_list" not in self._cache:
            d: list[int] = []
            for p in self._parents_list():
                d.append(1 if p == ROOT else d[p] + 1)
            self._cache["depth_list"] = d
        return self._cache["depth_list"]

    def position_offsets(self) -> torch.Tensor:
        """[n] position of each node relative to the root's position."""
        return self.depth

    @property
    def ancestor_mask(self) -> torch.Tensor:
        """[n, n] bool, mask[i, j] = node j is node i or one of its ancestors."""
        if "anc" not in self._cache:
            n = len(self)
            m = np.zeros((n, n), dtype=bool)  # numpy: a row copy costs ~15x less than torch's here
            for i, p in enumerate(self._parents_list()):
                if p != ROOT:
                    m[i] = m[p]
                m[i, i] = True
            self._cache["anc"] = torch.from_numpy(m).to(self.device)
        return self._cache["anc"]

    def children(self) -> list[list[int]]:
        """children[i + 1] lists the children of node i; children[0] the root's."""
        if "children" not in self._cache:
            ch: list[list[int]] = [[] for _ in range(len(self) + 1)]
            for i, p in enumerate(self._parents_list()):
                ch[p + 1].append(i)
            self._cache["children"] = ch
        return self._cache["children"]

    def leaves(self) -> list[int]:
        ch = self.children()
        return [i for i in range(len(self)) if not ch[i + 1]]

    def paths(self) -> list[list[int]]:
        """Root-to-leaf paths as lists of node indices."""
        plist = self._parents_list()
        out = []
        for leaf in self.leaves():
            path, v = [], leaf
            while v != ROOT:
                path.append(v)
                v = plist[v]
            out.append(path[::-1])
        return out

    def path_to(self, node: int) -> list[int]:
        plist, path = self._parents_list(), []
        while node != ROOT:
            path.append(node)
            node = plist[node]
        return path[::-1]

    def with_root(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(parents, ancestor mask) of the tree with the root as node 0: [n+1], [n+1, n+1]."""
        n = len(self)
        parents = torch.cat([torch.tensor([ROOT], device=self.device), self.parents + 1])
        m = torch.zeros(n + 1, n + 1, dtype=torch.bool, device=self.device)
        m[:, 0] = True
        m[1:, 1:] = self.ancestor_mask
        m[0, 0] = True
        return parents, m

    def select(self, keep: torch.Tensor) -> "TokenTree":
        """The nodes ``keep`` ([k] int64, increasing, closed under ancestors), renumbered."""
        keep = keep.to(self.parents.device)
        remap = torch.full((len(self),), -1, dtype=torch.long, device=self.parents.device)
        remap[keep] = torch.arange(keep.numel(), device=keep.device)
        parents = self.parents[keep]
        parents = torch.where(parents >= 0, remap[parents.clamp(min=0)], parents)
        dp = None if self.draft_probs is None else self.draft_probs[keep.to(self.draft_probs.device)]
        sc = None if self.scores is None else self.scores[keep.to(self.scores.device)]
        return TokenTree(self.tokens[keep.to(self.tokens.device)], parents, dp, sc)

    def truncate(self, max_nodes: int) -> "TokenTree":
        """Keep the first ``max_nodes`` nodes (still a valid tree: parents precede children)."""
        if len(self) <= max_nodes:
            return self
        dp = None if self.draft_probs is None else self.draft_probs[:max_nodes]
        sc = None if self.scores is None else self.scores[:max_nodes]
        return TokenTree(self.tokens[:max_nodes], self.parents[:max_nodes], dp, sc)


# ---------------------------------------------------------------- builders
def chain(tokens: Sequence[int] | torch.Tensor, draft_probs: torch.Tensor | None = None) -> TokenTree:
    t = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    parents = torch.arange(t.numel(), device=t.device) - 1
    return TokenTree(t, parents, draft_probs)


def from_paths(paths: Iterable[Sequence[int]], scores: Iterable[float] | None = None,
               max_nodes: int | None = None) -> TokenTree:
    """A trie of token sequences (shared prefixes merged), nodes in insertion order.

    ``scores`` (one per path) rank paths: higher-scored paths are inserted first so
    a ``max_nodes`` cut keeps the best ones."""
    paths = [list(p) for p in paths]
    if scores is not None:
        order = sorted(range(len(paths)), key=lambda i: -list(scores)[i])
        paths = [paths[i] for i in order]
    index: dict[tuple[int, int], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    for p in paths:
        parent = ROOT
        for tok in p:
            key = (parent, int(tok))
            node = index.get(key)
            if node is None:
                if max_nodes is not None and len(tokens) >= max_nodes:
                    break
                node = len(tokens)
                index[key] = node
                tokens.append(int(tok))
                parents.append(parent)
            parent = node
    return TokenTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))


def merge(trees: Sequence[TokenTree], max_nodes: int | None = None) -> TokenTree:
    """Union of several trees with shared prefixes merged.

    With ``scores`` on every tree, nodes are kept best-first (a node's score must not
    exceed its parent's, e.g. cumulative probabilities); otherwise tree by tree."""
    trees = [t for t in trees if len(t)]
    if not trees:
        return TokenTree.empty()
    device = trees[0].device
    cand = []  # (score, tree index, node index)
    have_scores = all(t.scores is not None for t in trees)
    for ti, t in enumerate(trees):
        sc = t.scores.tolist() if have_scores else [0.0] * len(t)
        for i in range(len(t)):
            cand.append((-sc[i] if have_scores else ti, i, ti))
    cand.sort()
    tok_lists = [t.tokens.tolist() for t in trees]  # one transfer per tree, not one per node
    par_lists = [t._parents_list() for t in trees]
    new_index: dict[tuple[int, int], int] = {}
    node_of: dict[tuple[int, int], int] = {}
    tokens, parents, scores = [], [], []
    pending = list(cand)
    # Parents precede children within a tree and scores are monotone along paths, so
    # one pass in sorted order places every parent first; ties fall back to node index.
    for key_score, i, ti in pending:
        p = par_lists[ti][i]
        new_parent = ROOT if p == ROOT else node_of.get((ti, p))
        if new_parent is None:
            continue  # parent was cut by the budget
        tok = tok_lists[ti][i]
        k = (new_parent, tok)
        if k in new_index:
            node_of[(ti, i)] = new_index[k]
            if have_scores:
                scores[new_index[k]] = max(scores[new_index[k]], -key_score)
            continue
        if max_nodes is not None and len(tokens) >= max_nodes:
            continue
        node = len(tokens)
        new_index[k] = node
        node_of[(ti, i)] = node
        tokens.append(tok)
        parents.append(new_parent)
        scores.append(-key_score if have_scores else 0.0)
    return TokenTree(torch.tensor(tokens, dtype=torch.long, device=device),
                     torch.tensor(parents, dtype=torch.long, device=device),
                     scores=torch.tensor(scores, device=device) if have_scores else None)


def topk_expand(next_probs_fn, root_probs: torch.Tensor, *, depth: int, k: int) -> TokenTree:
    """Full top-k expansion: every node gets its k most probable children, to ``depth``.

    ``next_probs_fn(tokens_path) -> [vocab] probs`` gives the distribution after a path."""
    tokens, parents, scores = [], [], []
    frontier = [(ROOT, [], 1.0, root_probs)]
    for _ in range(depth):
        nxt = []
        for node, path, score, probs in frontier:
            p, ids = probs.topk(k)
            for pi, ti in zip(p.tolist(), ids.tolist()):
                tokens.append(ti)
                parents.append(node)
                scores.append(score * pi)
                nxt.append((len(tokens) - 1, path + [ti], score * pi, None))
        frontier = [(n, pa, s, next_probs_fn(pa)) for n, pa, s, _ in nxt] if _ < depth - 1 else []
    return TokenTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long),
                     scores=torch.tensor(scores))


def best_first(next_probs_fn, root_probs: torch.Tensor, *, max_nodes: int, k: int = 4,
               max_depth: int = 16) -> TokenTree:
    """Grow a tree best-first by cumulative draft probability under a node budget."""
    import heapq

    tokens, parents, scores = [], [], []
    heap: list[tuple[float, int, int, int, list[int]]] = []  # (-score, tiebreak, parent, token, path)
    counter = 0

    def push_children(parent: int, path: list[int], score: float, probs: torch.Tensor):
        nonlocal counter
        p, ids = probs.topk(min(k, probs.numel()))
        for pi, ti in zip(p.tolist(), ids.tolist()):
            heapq.heappush(heap, (-score * pi, counter, parent, ti, path))
            counter += 1

    push_children(ROOT, [], 1.0, root_probs)
    while heap and len(tokens) < max_nodes:
        neg, _, parent, tok, path = heapq.heappop(heap)
        tokens.append(tok)
        parents.append(parent)
        scores.append(-neg)
        new_path = path + [tok]
        if len(new_path) < max_depth and len(tokens) < max_nodes:
            push_children(len(tokens) - 1, new_path, -neg, next_probs_fn(new_path))
    return TokenTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long),
                     scores=torch.tensor(scores))
