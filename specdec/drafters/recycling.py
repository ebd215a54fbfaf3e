"""RecyclingDrafter: Token Recycling (Luo et al., 2024) -- a train-free drafter that
recycles the target's own top-k predictions.

State: an adjacency matrix ``adj`` [vocab, k] (int64, on the target's device); row
``t`` holds the top-k next tokens the target predicted after token ``t`` the most
recent time it was seen, ``-1`` where nothing is known yet.

- ``update``: after every verification, for the root and EVERY tree node (rejected
  ones too: that is the "recycling"), ``adj[token_of(node)] <- topk(logits at node)``.
  One device op (specdec.ops.recycling.recycling_update); when several nodes share a
  token, the last in node order wins (``accepted_last=True`` moves the root and the
  accepted path to the end, so the committed context wins instead).
- ``propose``: expand a static tree template from the last committed token,
  breadth-first: node token = ``adj[parent token, child rank]``. The template's
  (parent, rank) arrays are precomputed once; a proposal is one gather per depth
  level (numpy for a matrix in host memory, torch on a device, then one transfer).
  Nodes whose token (or an ancestor's) is -1 are pruned. The tree is a host tree, its
  nodes in the template's priority order (a prefix of it is a smaller budget's tree).
- Seeding: nothing is known at ``reset`` (unless ``keep_across_prompts``). With
  ``seed_prompt=True`` the prompt's bigrams fill rank 0 of rows not yet written
  (prompt lookup for free); ``seed_from_logits(tokens, logits)`` recycles a prefill's
  logits where a caller has them (``specdec.generate`` does not keep them). From the
  first verification on, every verified node fills its row.

Proposals are deterministic (``draft_probs=None``): acceptance treats them as one-hot,
so sampling stays lossless.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..ops.recycling import SENTINEL, recycling_update
from ..tree import TokenTree
from .base import DraftRequest, VerifyResult

# Expected acceptance of the child of each rank (a prior for shaping the default tree).
DEFAULT_RANK_WEIGHTS = (0.45, 0.15, 0.09, 0.06, 0.045, 0.035, 0.03, 0.025)


class TreeTemplate:
    """A static draft-tree shape given as Medusa-style paths of child ranks.

    ``(0,)`` is the root's best child, ``(0, 1)`` that node's second-best child, ...
    ``paths`` are in priority order (best first); missing prefixes are added just
    before the path needing them. Nodes are stored breadth-first (by depth, then
    lexicographically), so each depth level is a contiguous slice and parents precede
    children. ``select`` cuts to a budget by priority (always ancestor-closed).
    """

    def __init__(self, paths: Sequence[Sequence[int]]):
        prio: list[tuple[int, ...]] = []
        seen: set[tuple[int, ...]] = set()
        for p in paths:
            p = tuple(int(r) for r in p)
            if not p or min(p) < 0:
                raise ValueError(f"TreeTemplate: paths must be non-empty tuples of ranks >= 0, got {p}")
            for d in range(1, len(p) + 1):
                if p[:d] not in seen:
                    seen.add(p[:d])
                    prio.append(p[:d])
        self.priority = prio  # paths, best first
        self.paths = sorted(prio, key=lambda q: (len(q), q))  # breadth-first node order
        index = {q: i for i, q in enumerate(self.paths)}
        self.parents = torch.tensor([index[q[:-1]] if len(q) > 1 else -1 for q in self.paths], dtype=torch.long)
        self.ranks = torch.tensor([q[-1] for q in self.paths], dtype=torch.long)
        self.depth = torch.tensor([len(q) for q in self.paths], dtype=torch.long)
        self.k = 1 + int(self.ranks.max()) if self.paths else 0
        self.max_depth = int(self.depth.max()) if self.paths else 0
        bounds = torch.searchsorted(self.depth, torch.arange(1, self.max_depth + 2)).tolist()
        self.levels = [(bounds[d], bounds[d + 1]) for d in range(self.max_depth)]  # node slice per depth
        # Proposals are returned in priority order (ancestor-closed), so the first n nodes
        # of a tree are what ``select(n)`` would draft: the adaptive controller reads what a
        # smaller budget would have accepted off a bigger tree's prefix.
        prio_index = {q: i for i, q in enumerate(self.priority)}
        self.priority_perm = np.array([index[q] for q in self.priority], dtype=np.int64)  # BFS node of each
        self.priority_parents = np.array([prio_index[q[:-1]] if len(q) > 1 else -1 for q in self.priority],
                                         dtype=np.int64)
        self._device_cache: dict = {}
        self._select_cache: dict = {}

    def __len__(self) -> int:
        return len(self.paths)

    # ------------------------------------------------------------ builders
    @classmethod
    def best_first(cls, num_nodes: int = 80, *, max_depth: int = 8, k: int = 8,
                   rank_weights: Sequence[float] = DEFAULT_RANK_WEIGHTS) -> "TreeTemplate":
        """The ``num_nodes`` paths with the highest product of rank weights (Sequoia /
        Medusa-style imbalanced tree: the rank-0 spine is deepest)."""
        import heapq

        w = list(rank_weights)[:k]
        heap = [(-w[r], (r,)) for r in range(len(w))]
        heapq.heapify(heap)
        out = []
        while heap and len(out) < num_nodes:
            neg, p = heapq.heappop(heap)
            out.append(p)
            if len(p) < max_depth:
                for r in range(len(w)):
                    heapq.heappush(heap, (neg * w[r], p + (r,)))
        return cls(out)

    @classmethod
    def from_branching(cls, children_per_depth: Sequence[int]) -> "TreeTemplate":
        """Full expansion: every node at depth d has ``children_per_depth[d]`` children."""
        paths: list[tuple[int, ...]] = []
        frontier: list[tuple[int, ...]] = [()]
        for c in children_per_depth:
            frontier = [p + (r,) for p in frontier for r in range(int(c))]
            paths.extend(frontier)
        return cls(paths)

    @classmethod
    def coerce(cls, shape) -> "TreeTemplate":
        """A TreeTemplate, a list of rank paths, or a list of child counts per depth."""
        if isinstance(shape, TreeTemplate):
            return shape
        shape = list(shape)
        if shape and all(isinstance(s, int) for s in shape):
            return cls.from_branching(shape)
        return cls(shape)

    # --------------------------------------------------------------- views
    def select(self, max_nodes: int, max_depth: int) -> "TreeTemplate":
        """The best ``max_nodes`` nodes no deeper than ``max_depth`` (cached)."""
        if max_nodes >= len(self) and max_depth >= self.max_depth:
            return self
        key = (max_nodes, max_depth)
        if key not in self._select_cache:
            keep = [p for p in self.priority if len(p) <= max_depth][:max(0, max_nodes)]
            self._select_cache[key] = TreeTemplate(keep)
        return self._select_cache[key]

    def on_host(self):
        """``on`` as numpy arrays: [(parent idx [w], rank [w]), ...]."""
        if "numpy" not in self._device_cache:
            self._device_cache["numpy"] = [(self.parents[s:e].numpy(), self.ranks[s:e].numpy())
                                           for s, e in self.levels]
        return self._device_cache["numpy"]

    def on(self, device: torch.device):
        """(parents, ranks) per level on ``device``: [(parent idx [w], rank [w]), ...]."""
        if device not in self._device_cache:
            self._device_cache[device] = [(self.parents[s:e].to(device), self.ranks[s:e].to(device))
                                          for s, e in self.levels]
        return self._device_cache[device]


def _vocab_size(target) -> int:
    emb = target.get_output_embeddings()
    cfg = target.config.get_text_config(decoder=True) if hasattr(target.config, "get_text_config") \
        else target.config
    return int(emb.weight.shape[0]) if emb is not None else int(cfg.vocab_size)


class RecyclingDrafter:
    """Drafter protocol (reset / propose / update) over a recycled adjacency matrix.

    target:              the target HF model (gives the vocab size), or pass vocab_size.
    device:              where the matrix lives: the host by default, for a GPU target
                         too (a step's work on it is one gather per tree level and one
                         scatter of n + 1 rows, meant to be cheaper in numpy than as a
                         dozen GPU launches and a sync -- not yet timed on a GPU; the
                         target's top-k ids come over in one transfer, shared with the
                         n-gram pool). ``device="cuda"`` keeps it on the GPU (expansion by
                         torch gathers, update by the CUDA op; on an H200 that cost 0.64 ms
                         of drafting + update a step, benchmarks/results/2026-12-01-h200-s3).
    template:            TreeTemplate, list of rank paths (Medusa choices), or list of
                         child counts per depth; default ``TreeTemplate.best_first(80, k=k)``.
    k:                   candidates kept per token (>= the template's largest rank + 1).
    keep_across_prompts: keep the matrix across ``reset`` (the paper's setting).
    seed_prompt:         fill unknown rows' rank 0 from the prompt's bigrams at reset.
    accepted_last:       on duplicate tokens, the committed context's top-k wins
                         instead of the last node in node order.
    """

    def __init__(self, target=None, *, vocab_size: int | None = None, device=None, template=None,
                 k: int | None = None, keep_across_prompts: bool = False, seed_prompt: bool = True,
                 accepted_last: bool = False):
        if target is not None:
            vocab_size = vocab_size or _vocab_size(target)
        if vocab_size is None:
            raise ValueError("RecyclingDrafter needs target= or vocab_size=")
        self.template = TreeTemplate.best_first(k=k or 8) if template is None else TreeTemplate.coerce(template)
        self.k = int(k) if k is not None else max(8, self.template.k)
        if self.k < self.template.k:
            raise ValueError(f"RecyclingDrafter: k={self.k} but the template uses rank {self.template.k - 1}")
        device = torch.device(device if device is not None else "cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.vocab_size, self.device = int(vocab_size), device
        self.keep_across_prompts, self.seed_prompt = keep_across_prompts, seed_prompt
        self.accepted_last = accepted_last
        self.adj = torch.full((self.vocab_size, self.k), SENTINEL, dtype=torch.long, device=device)  # [vocab, k]

    # ------------------------------------------------------------- protocol
    def reset(self, prompt: torch.Tensor) -> None:
        """prompt: [T]. Clears the matrix (unless keep_across_prompts), seeds bigrams."""
        if not self.keep_across_prompts:
            self.adj.fill_(SENTINEL)
        if self.seed_prompt and prompt.numel() > 1:
            self.seed_bigrams(prompt)

    def propose(self, request: DraftRequest) -> TokenTree:
        budget = request.budget
        tpl = self.template.select(budget.max_nodes, budget.max_depth)
        if len(tpl) == 0:
            return TokenTree.empty(self.device)
        if self.device.type == "cpu":
            return self._propose_host(int(request.tokens[-1]), tpl)
        return self._propose_device(request.tokens[-1:].to(self.device), tpl)

    def _propose_device(self, root: torch.Tensor, tpl: TreeTemplate) -> TokenTree:
        """root [1]: the template expanded with torch ops on the matrix's device, one
        gather per depth level; then one transfer, and the pruning on the host (the
        tree goes there anyway: ``generate`` builds the verify inputs on the host)."""
        levels = tpl.on(self.device)
        tokens = torch.empty(len(tpl), dtype=torch.long, device=self.device)  # [N]
        for (s, e), (par, rank) in zip(tpl.levels, levels):
            parent_tok = root.expand(e - s) if s == 0 else tokens[par]  # level 1's parent is the root
            child = self.adj[parent_tok.clamp(min=0), rank]
            tokens[s:e] = torch.where(parent_tok >= 0, child, SENTINEL)  # -1 propagates down
        return _prune_host(tokens.cpu().numpy(), tpl)

    def update(self, result: VerifyResult) -> None:
        logits = result.target_logits  # [n + 1, vocab]: root, then each node
        if logits is None:
            return
        tree = result.tree
        root_at = result.tokens.numel() - result.committed.numel() - 1
        node_tokens = torch.cat([result.tokens[root_at:root_at + 1].to(self.device),
                                 tree.tokens.to(self.device)])  # [n + 1]
        if logits.shape[-1] > self.vocab_size:  # ids past the matrix's rows must not be recorded
            topk = self._topk(logits)  # [n + 1, k]
        elif self.device.type == "cpu":  # the step's shared top-k (one per step, one transfer)
            topk = self._pad(result.target_topk_host(self.k))
        else:
            topk = self._pad(result.target_topk(self.k).to(self.device))
        if self.accepted_last:
            rows = [0] + [i + 1 for i in result.accepted_nodes]
            rest = sorted(set(range(len(tree) + 1)) - set(rows))
            order = torch.tensor(rest + rows, device=self.device)
            node_tokens, topk = node_tokens[order], topk[order]
        recycling_update(self.adj, node_tokens, topk)

    def _propose_host(self, root: int, tpl: TreeTemplate) -> TokenTree:
        """``propose`` for a matrix in host memory: the same gathers in numpy, whose
        per-call cost is a fraction of torch's on tensors this small."""
        adj = self.adj.numpy()  # [vocab, k], shares memory with self.adj
        levels = tpl.on_host()
        tokens = np.empty(len(tpl), dtype=np.int64)  # [N]
        for (s, e), (par, rank) in zip(tpl.levels, levels):
            if s == 0:  # level 1's parent is the root
                tokens[s:e] = adj[root, rank]
                continue
            parent_tok = tokens[par]
            tokens[s:e] = np.where(parent_tok >= 0, adj[np.maximum(parent_tok, 0), rank], SENTINEL)
        return _prune_host(tokens, tpl)

    # -------------------------------------------------------------- seeding
    def seed_bigrams(self, tokens: torch.Tensor) -> None:
        """tokens [T]: rank 0 of each unknown row <- the token that followed it (last wins)."""
        tokens = tokens.to(self.device).long()
        prev, nxt = tokens[:-1], tokens[1:]
        unknown = self.adj[prev, 0] == SENTINEL
        rows = torch.full((prev.numel(), self.k), SENTINEL, dtype=torch.long, device=self.device)
        rows[:, 0] = nxt
        recycling_update(self.adj, torch.where(unknown, prev, SENTINEL), rows)

    def seed_from_logits(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """tokens [T], logits [T, vocab] (row t = the target after tokens[t]): recycle a prefill."""
        recycling_update(self.adj, tokens.to(self.device).long(), self._topk(logits))

    @property
    def target_topk_wanted(self) -> int:
        """The k of the target's top-k that ``update`` reads."""
        return self.k

    def _topk(self, logits: torch.Tensor) -> torch.Tensor:
        """[m, vocab] -> [m, k] top-k ids, padded with SENTINEL when vocab < k."""
        logits = logits[..., :self.vocab_size]
        return self._pad(logits.topk(min(self.k, logits.shape[-1]), dim=-1).indices.to(self.device))

    def _pad(self, ids: torch.Tensor) -> torch.Tensor:
        """[m, k'] ids -> [m, k], padded with SENTINEL when k' < k (a vocabulary smaller than k)."""
        k = ids.shape[-1]
        if k < self.k:
            pad = torch.full((ids.shape[0], self.k - k), SENTINEL, dtype=ids.dtype, device=ids.device)
            ids = torch.cat([ids, pad], dim=-1)
        return ids


def _prune_host(tokens: np.ndarray, tpl: TreeTemplate) -> TokenTree:
    """tokens [N] of an expanded template (breadth-first order) -> a host tree in the
    template's priority order, without the nodes of token -1 (their subtrees are -1 too)."""
    tokens, parents = tokens[tpl.priority_perm], tpl.priority_parents
    keep = tokens >= 0
    new_index = np.cumsum(keep) - 1
    new_parents = np.where(parents >= 0, new_index[np.maximum(parents, 0)], parents)
    return TokenTree(torch.from_numpy(tokens[keep]), torch.from_numpy(new_parents[keep]))
