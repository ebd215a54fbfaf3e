"""Tree shaping for model drafters: calibrated confidences, SpecDec++ chain stopping and
EAGLE-2 / DySpec-style dynamic trees, priced by an adaptive controller's costs.

- ``AcceptanceCalibrator``: a drafter's confidence (its conditional draft probability of a
  node, or the node's depth) -> P(accepted | parent accepted), from decayed binned counts.
- ``ChainStopper``: stop a chain once P(the chain so far is accepted) falls below the
  break-even of its marginal draft + verify cost at the best achievable rate.
- ``DynamicTreeBuilder``: grow a tree best-first by calibrated acceptance under a budget.
Only what is drafted changes; verification, and so losslessness, is untouched.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..adaptive.controller import pav
from ..tree import ROOT, TokenTree

PROB_EDGES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class AcceptanceCalibrator:
    """P(node accepted | parent accepted) as a function of one confidence feature.

    kind="prob": the feature is the draft's conditional probability of the node in
    [0, 1]; the prior of each bin is its centre (a calibrated drafter) and the estimate
    is kept non-decreasing. kind="depth": the feature is the node's depth (model-free
    drafters); prior 0.5. Counts decay by ``decay`` per sample, so the estimate tracks
    drift with a memory of about 1 / (1 - decay) samples."""

    def __init__(self, kind: str = "prob", *, edges: Sequence[float] | None = None, prior_strength: float = 2.0,
                 decay: float = 0.9998, max_depth: int = 16):
        if kind not in ("prob", "depth"):
            raise ValueError(f"kind must be 'prob' or 'depth', got {kind!r}")
        self.kind = kind
        if edges is None:
            edges = PROB_EDGES if kind == "prob" else [d + 0.5 for d in range(max_depth + 1)]
        self.edges = np.asarray(edges, dtype=np.float64)
        self.centers = (self.edges[:-1] + self.edges[1:]) / 2
        self.prior_mean = self.centers.copy() if kind == "prob" else np.full(len(self.centers), 0.5)
        self.prior_strength = float(prior_strength)
        self.decay = float(decay)
        self.n = np.zeros(len(self.centers))  # decayed samples per bin
        self.a = np.zeros(len(self.centers))  # decayed accepted samples per bin
        self._means: np.ndarray | None = None

    def _bins(self, f: np.ndarray) -> np.ndarray:
        return np.clip(np.searchsorted(self.edges, f, side="right") - 1, 0, len(self.centers) - 1)

    def update(self, features, labels) -> None:
        """features [k] float, labels [k] bool (accepted)."""
        f = np.asarray(features, dtype=np.float64).reshape(-1)
        y = np.asarray(labels, dtype=np.float64).reshape(-1)
        if f.size == 0:
            return
        d = self.decay ** f.size
        self.n *= d
        self.a *= d
        b = self._bins(f)
        np.add.at(self.n, b, 1.0)
        np.add.at(self.a, b, y)
        self._means = None

    def bin_means(self) -> np.ndarray:
        if self._means is None:
            s = self.prior_strength
            m = (self.a + s * self.prior_mean) / (self.n + s)
            self._means = pav(m, self.n + s) if self.kind == "prob" else m
        return self._means

    def __call__(self, feature):
        """Calibrated acceptance probability; a float for a float, else an array."""
        out = np.interp(np.asarray(feature, dtype=np.float64), self.centers, self.bin_means())
        return float(out) if np.ndim(out) == 0 else out

    def observe(self, tree: TokenTree, accepted_nodes: Sequence[int], feats: list[float] | None = None) -> None:
        """Label every node whose parent was accepted (or is the root): accepted or not.
        ``feats``: the tree's ``node_features`` of this kind, when already computed."""
        feats = node_features(tree, self.kind) if feats is None else feats
        if feats is None:
            return
        acc = set(int(i) for i in accepted_nodes)
        plist = tree.parents.tolist()
        rows = [i for i, p in enumerate(plist) if p == ROOT or p in acc]
        self.update([feats[i] for i in rows], [i in acc for i in rows])


def node_features(tree: TokenTree, kind: str) -> list[float] | None:
    """Per-node confidence: conditional draft probability (scores[i] / scores[parent]) for
    kind="prob" (None when the tree has no probability scores), depth for kind="depth"."""
    if kind == "depth":
        return [float(d) for d in tree.depth_list]
    if tree.scores is None or len(tree) == 0:
        return None
    s = tree.scores.detach().to("cpu", torch.float64).numpy()
    if (s < 0).any() or (s > 1 + 1e-6).any():
        return None  # not probabilities
    parents = np.asarray(tree._parents_list())
    parent = np.where(parents >= 0, s[np.maximum(parents, 0)], 1.0)
    return np.clip(s / np.maximum(parent, 1e-30), 0.0, 1.0).tolist()


def stop_threshold(controller, key: str, depth: int) -> float:
    """Drafting token ``depth`` pays when P(the chain up to it is accepted) >= this: its
    expected gain per second must beat the best achievable rate (optimal stopping for a
    ratio objective)."""
    t_draft, t_verify = controller.marginal_costs(key, depth)
    return min(1.0, controller.best_rate(key) * (t_draft + t_verify))


class ChainStopper:
    """``should_continue(prob, depth)`` for one chain, keeping the path probability."""

    def __init__(self, controller, key: str, calibrate: Callable[[float], float], *, min_depth: int = 1):
        self.controller, self.key, self.calibrate, self.min_depth = controller, key, calibrate, int(min_depth)
        self.path = 1.0

    def should_continue(self, prob: float, depth: int) -> bool:
        p = self.path * self.calibrate(prob)
        if depth > self.min_depth and p < stop_threshold(self.controller, self.key, depth):
            return False
        self.path = p
        return True


def dynamic_tree_builder(controller, key: str, calibrate: Callable, *, max_nodes: int, max_depth: int,
                         topk: int = 4, width: int = 8) -> "DynamicTreeBuilder":
    """A DynamicTreeBuilder whose thresholds come from the controller's costs and best rate."""
    t_draft, t_verify = controller.marginal_costs(key, max_nodes // 2)
    rate = controller.best_rate(key)
    return DynamicTreeBuilder(max_nodes=max_nodes, max_depth=max_depth, topk=topk, width=width,
                              calibrate=calibrate, node_threshold=min(1.0, rate * t_verify),
                              expand_threshold=rate * t_draft)


class DynamicTreeBuilder:
    """Grows a draft tree level by level (one draft forward per level, at most ``width``
    nodes expanded, each offering its ``topk`` children), then keeps the ``max_nodes``
    nodes of highest estimated acceptance: value(node) = value(parent) *
    calibrate(draft prob of the node | parent). Values never grow along a path, so the
    best-first order is ancestor-closed and the tree's node order is best-first (any
    prefix is the best tree of that size). Node ``scores`` are the raw cumulative draft
    probabilities (what calibration learns from).

    node_threshold:   a node enters only with value >= this (its verify cost in tokens);
    expand_threshold: a level is drafted only if its expanded nodes' values sum >= this.
    """

    def __init__(self, *, max_nodes: int, max_depth: int, topk: int = 4, width: int = 8,
                 calibrate: Callable | None = None, node_threshold: float = 0.0, expand_threshold: float = 0.0):
        self.max_nodes, self.max_depth = int(max_nodes), int(max_depth)
        self.topk, self.width = max(1, int(topk)), max(1, int(width))
        self.calibrate = calibrate
        self.node_threshold, self.expand_threshold = float(node_threshold), float(expand_threshold)
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.depths: list[int] = []
        self.raw: list[float] = []  # cumulative draft probability
        self.value: list[float] = []  # estimated probability the node is accepted

    def _add_children(self, parent: int, probs: torch.Tensor) -> list[int]:
        p, ids = probs.float().topk(min(self.topk, probs.numel()))
        p = p.clamp(0, 1).double().numpy()
        cal = np.asarray(self.calibrate(p) if self.calibrate is not None else p, dtype=np.float64).clip(0, 1)
        base_raw = 1.0 if parent == ROOT else self.raw[parent]
        base_val = 1.0 if parent == ROOT else self.value[parent]
        depth = 1 if parent == ROOT else self.depths[parent] + 1
        new = []
        for pi, ci, ti in zip(p.tolist(), cal.tolist(), ids.tolist()):
            self.tokens.append(int(ti))
            self.parents.append(parent)
            self.depths.append(depth)
            self.raw.append(base_raw * pi)
            self.value.append(base_val * ci)
            new.append(len(self.tokens) - 1)
        return new

    def ancestor_mask(self, rows: Sequence[int], cols: Sequence[int]) -> torch.Tensor:
        """[len(rows), len(cols)] bool: cols[j] is rows[i] or one of its ancestors."""
        where = {c: j for j, c in enumerate(cols)}
        m = torch.zeros(len(rows), len(cols), dtype=torch.bool)
        for i, v in enumerate(rows):
            while v != ROOT:
                if v in where:
                    m[i, where[v]] = True
                v = self.parents[v]
        return m

    def build(self, root_probs: torch.Tensor, expand: Callable[["DynamicTreeBuilder", list[int]], torch.Tensor]
              ) -> TokenTree:
        """root_probs [vocab]; expand(builder, nodes) -> [len(nodes), vocab] next-token
        probabilities after each node (a draft forward of those nodes)."""
        if self.max_nodes <= 0 or self.max_depth <= 0:
            return TokenTree.empty()
        level = self._add_children(ROOT, root_probs.cpu())
        for _ in range(self.max_depth - 1):
            ranked = sorted(level, key=lambda i: -self.value[i])
            kth = sorted(self.value, reverse=True)[self.max_nodes - 1] if len(self.value) >= self.max_nodes else -1.0
            chosen = [i for i in ranked[:self.width] if self.value[i] > kth and self.value[i] >= self.node_threshold]
            if not chosen or sum(self.value[i] for i in chosen) < self.expand_threshold:
                break  # no deeper node could enter the best max_nodes, or the level is not worth a forward
            probs = expand(self, chosen).cpu()
            level = [c for k, i in enumerate(chosen) for c in self._add_children(i, probs[k])]
        order = sorted(range(len(self.tokens)), key=lambda i: (-self.value[i], i))
        order = [i for i in order if self.value[i] >= self.node_threshold][:self.max_nodes]
        if not order:
            order = sorted(range(len(self.tokens)), key=lambda i: (-self.value[i], i))[:1]
        new_index = {old: k for k, old in enumerate(order)}
        parents = [ROOT if self.parents[i] == ROOT else new_index[self.parents[i]] for i in order]
        return TokenTree(torch.tensor([self.tokens[i] for i in order], dtype=torch.long),
                         torch.tensor(parents, dtype=torch.long),
                         scores=torch.tensor([self.raw[i] for i in order]))
