"""Adaptive drafting: pick how much to draft each step from what verification costs on
this hardware and what the drafter has been getting accepted.

- ``AcceptanceCalibrator``: maps a drafter's confidence (the draft's conditional
  probability of a node, or its depth for model-free drafters) to P(accepted | parent
  accepted), from decayed binned counts with a prior (monotone in the probability).
- ``LatencyModel`` (``specdec/latency.py``, re-exported here): verify latency as a
  piecewise-linear function of the tree size, measured once per (model, dtype, device,
  backend) by a short sweep and cached as JSON under ``~/.cache/specdec/latency/``;
  refined online from observed step times.
- ``BudgetController``: each step ``choose(key) -> TreeBudget`` maximises expected
  committed tokens per second, (E[accepted(n)] + 1) / (draft(n) + verify(n)) (draft =
  everything in a step but the verify forward, as ``generate`` reports it), over a
  grid of node budgets (Sequoia's hardware-aware budget) with a discounted UCB over
  per-drafter statistics; ``observe(...)`` after each step. Given the verified tree,
  one step also tells what every *smaller* budget would have accepted (a budget-n tree
  is the first n nodes of a bigger one, and greedy acceptance of a prefix is the prefix
  of the accepted path), so only larger budgets ever need exploring.
  ``should_continue(prob, depth)`` / ``chain_stopper`` give chain drafters the
  SpecDec++ stopping rule: stop once the calibrated probability that the whole chain
  so far is accepted falls below a threshold set by the cost ratio.
- ``DynamicTreeBuilder``: EAGLE-2 / DySpec-style tree growth, best-first by the
  product of *calibrated* per-node acceptance estimates, under the chosen node budget.

Only what is drafted changes; verification, and so losslessness, is untouched.
"""
from __future__ import annotations

import itertools
import math
import time
import weakref
from typing import Callable, Sequence

import numpy as np
import torch

from .config import TreeBudget
from .latency import LATENCY_GRID, OUTLIER_CAP, LatencyModel, latency_key, pads_trees, runner_grid, runner_verify_fn
from .tree import ROOT, TokenTree

__all__ = ["AcceptanceCalibrator", "BudgetController", "ChainStopper", "DynamicTreeBuilder", "LatencyModel",
           "LATENCY_GRID", "DEFAULT_GRID", "drafter_key", "latency_key", "node_features", "resolve",
           "runner_verify_fn"]

DEFAULT_GRID = (1, 2, 4, 8, 16, 32, 64)
PROB_EDGES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


def drafter_key(drafter) -> str:
    """The name a controller files a drafter's statistics under."""
    return getattr(drafter, "adaptive_key", None) or type(drafter).__name__


def _pav(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted isotonic (non-decreasing) regression by pool-adjacent-violators."""
    if (y[1:] >= y[:-1]).all():  # already monotone (the usual case): nothing to pool
        return y
    blocks: list[list[float]] = []  # [sum w*y, sum w, count]
    for yi, wi in zip(y.tolist(), w.tolist()):
        blocks.append([yi * wi, wi, 1])
        while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] > blocks[-1][0] * blocks[-2][1]:
            s, ww, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += ww
            blocks[-1][2] += c
    return np.array([b[0] / b[1] for b in blocks for _ in range(b[2])])


_SLOPES = np.diag([0.0, 1.0, 1.0])  # the draft regression's ridge falls on its slopes only
_JITTER3 = 1e-9 * np.eye(3)  # (keeps the solve regular before any step was timed)


def _solve3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x with a @ x = b for a symmetric positive-definite 3 x 3 ``a`` (Cramer's rule:
    np.linalg.solve costs ~20 us per call, more than the rest of a controller step's math)."""
    (a00, a01, a02), (a10, a11, a12), (a20, a21, a22) = a.tolist()
    b0, b1, b2 = b.tolist()
    c0, c1, c2 = a11 * a22 - a12 * a21, a12 * a20 - a10 * a22, a10 * a21 - a11 * a20  # cofactors, row 0
    det = a00 * c0 + a01 * c1 + a02 * c2
    if abs(det) < 1e-300:
        return np.linalg.lstsq(a, b, rcond=None)[0]
    x0 = (b0 * c0 + a01 * (a12 * b2 - b1 * a22) + a02 * (b1 * a21 - a11 * b2)) / det
    x1 = (a00 * (b1 * a22 - a12 * b2) + b0 * c1 + a02 * (a10 * b2 - b1 * a20)) / det
    x2 = (a00 * (a11 * b2 - b1 * a21) + a01 * (b1 * a20 - a10 * b2) + b0 * c2) / det
    return np.array([x0, x1, x2])


def size_bin(n: int) -> int:
    """The histogram bin of a tree of ``n`` nodes: 0, 1, 2, 3, 4, 5-7, 8, 9-15, 16, 17-31,
    ... (each power of two and each run between two). Every bin lies inside one segment of
    both latency grids (0, 1, 2, 4, 8, ... on a CPU; 0, 1, 3, 7, 15, ... for CUDA-graph
    buckets), where the curve is linear (or flat): the cost of a bin's mean size is the
    bin's mean cost."""
    n = int(n)
    if n <= 0:
        return 0
    k = n.bit_length()
    return 2 * (k - 1) + (0 if n > 1 and n & (n - 1) == 0 else 1)


# ----------------------------------------------------------------------------- calibration
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
            self._means = _pav(m, self.n + s) if self.kind == "prob" else m
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


# ----------------------------------------------------------------------------- controller
class _Stats:
    """One drafter's discounted statistics per arm (a TreeBudget)."""

    def __init__(self, n_arms: int, n_bins: int = 1):
        self.M = np.zeros((8, n_arms))  # one array, so that decaying is one op; rows (views):
        self.S, self.A, self.Q, self.Z, self.D, self.E = self.M[:6]  # count, acc, acc^2, size, depth, empty
        # paired with the arm below, on the steps that revealed both: arm a's accepted, arm a - 1's
        self.PA, self.PB = self.M[6:]
        self.H = np.zeros((2, n_bins, n_arms))  # per arm and size bin (size_bin): trees, their summed sizes
        self.N = 0.0  # discounted played steps
        self.R = np.zeros((3, n_arms))  # count, acc, empty per arm since the request began (discounted)
        self.steps = 0
        self.XtX = np.zeros((3, 3))  # draft-time regression on [1, depth, size / 16]
        self.Xty = np.zeros(3)
        self.drift = 0.0  # EMA of the played arm's standardised surprise (change detection)
        self.calibrators: dict[str, AcceptanceCalibrator] = {}
        self.last: TreeBudget | None = None
        self.last_probe = 0  # the step of the last probe
        self.top_seen = 0  # the step (``steps``) that last revealed the largest arm (``probe_far``)
        self.top_reveals = 0  # steps that revealed the largest arm (``warmup``)
        self.contexts: dict[int, _Stats] = {}  # per context (the last step's accepted count), arms only
        self.ctx: int | None = None  # the context of the next step
        self.chosen_ctx: int | None = None  # the context the last choice was made in
        self.plan: list | None = None  # choose_ahead's decision per context, until take()
        self._est = None
        self._w = None  # the draft-time regression's solution, until the next observation
        # the controller's own cost: it decides and learns every ``stride``-th step only
        # when a decision plus an observation would cost more than its share of a step
        self.stride = 1
        self.since_choice = 0
        self.since_observe = 0
        self.choose_cost = 0.0  # seconds of the last full decision
        self.control_cost: float | None = None  # EMA of seconds per decision + observation
        self.step_cost: float | None = None  # EMA of seconds per step (draft side + verify)
        self.verify_cost: float | None = None  # EMA of seconds per verify
        self.draft_cost: float | None = None  # EMA of the (capped) draft-side seconds per step
        self.timed_steps = 0
        self.overlapped = False  # the caller runs the controller while the device verifies

    def decay(self, g: float) -> None:
        for v in (self.M, self.H, self.R, self.XtX, self.Xty):
            v *= g
        self.N = self.N * g + 1.0

    def forget(self, keep: float) -> None:
        self.M *= keep
        self.H *= keep
        self.R *= keep
        self.N *= keep
        for c in self.contexts.values():
            c.forget(keep)

    def add_many(self, arms: list[int], acc: list[float], size: list[float], depth: list[float],
                 weight: float = 1.0) -> None:
        """One step's outcome for the arms it revealed (distinct, ascending; the last one
        played, the others revealed, which count ``weight``)."""
        if arms:
            paired = [k > 0 and arms[k - 1] == a - 1 for k, a in enumerate(arms)]  # the arm below came too
            w = [weight] * (len(arms) - 1) + [1.0]
            rows = np.array([w, [x * v for x, v in zip(acc, w)], [x * x * v for x, v in zip(acc, w)],
                             [x * v for x, v in zip(size, w)], [x * v for x, v in zip(depth, w)],
                             [float(x == 0) * v for x, v in zip(size, w)],
                             [x if p else 0.0 for x, p in zip(acc, paired)],
                             [acc[k - 1] if p else 0.0 for k, p in enumerate(paired)]])
            self.M[:, arms] += rows
            self.R[:, arms] += rows[[0, 1, 5]]
            if arms[-1] == self.M.shape[1] - 1:  # the largest arm
                self.top_seen = self.steps
                self.top_reveals += 1
            last = self.H.shape[1] - 1
            bins = [min(size_bin(x), last) for x in size]
            self.H[0, bins, arms] += w  # (distinct arms: distinct cells)
            self.H[1, bins, arms] += rows[3]


class BudgetController:
    """Chooses each step's tree budget to maximise expected committed tokens per second.

    arms:       the budgets to choose from (default: max_nodes in ``grid``, depth
                min(n, max_depth)); ordered from small to large.
    latency:    a LatencyModel (measured or synthetic); None = learned online (or the
                cached curve, when ``generate`` attaches a runner).
    discount:   per-step forgetting of the arm statistics (memory ~ 1 / (1 - discount)).
    explore:    UCB bonus scale (0 = greedy on the estimates; probes still explore). 0.1:
                in a simulation of interleaved requests of two kinds on a CPU-like latency
                curve 0.3 kept playing the other kind's trees (worst kind 0.90x of its best
                fixed budget, 0.94x at 0.1). It costs on an H200, where 127-node trees are 6%
                slower per token than 63-node ones: the bonus of the less-sampled big arm
                lifts its index level with the 64-node arm's, and 127-node trees take ~30%
                of steps (one run without it: 0.96x the best fixed budget against 0.94x).
                But without it the controller climbs to big trees only one probe at a time
                after the stream improves (``test_controller_moves_when_the_stream_shifts``).
    warmup:     steps on the largest arm first: they reveal every smaller arm at once. Counted
                in steps that revealed the largest arm (up to ``4 * warmup`` steps in all): a
                request's last steps cap the depth, so a short first request reveals nothing
                of the depth-8 arms. An H100 sweep's 8-token warm-up request used up 8 plain
                steps, one step of the largest arm followed, it accepted nothing, and every
                arm's mean read 0.09: its first prompt (translation) was played in 1-node
                trees for 32 steps where fixed 64-node trees took 19 (translation row 0.80x the
                best fixed budget). Counted in reveals: 20 steps, and the row at 0.98x.
    shift_z:    change detection: when the EMA (rate 0.1) of the played arm's z-score
                exceeds this, all statistics but ``shift_keep`` of their weight are dropped.
    min_depth:  chain stopping never stops before this many tokens.
    probe_every: at most every this many steps play the arm just above the best
                estimate: one step of a bigger tree refreshes every arm up to it, so a
                budget that fell behind on stale statistics is re-measured (0 = never).
    probe_cost: probes are spaced so that their extra verify cost stays under this
                share of the time (a probe of an arm 2x as costly waits 1 / 0.01 = 100 steps).
    probe_far:  also probe the largest arm when no step has revealed it for as long as its
                cost allows (the same rule, so probes cost at most twice ``probe_cost``): one
                step of it re-measures every arm. Climbing one arm at a time, a controller
                that had priced every arm at a poor start's acceptance stayed in 3-node trees
                for two more translation prompts (H100 sweep), where 64-node trees accepted
                1.6-2.6x as much: the 4-node arm's probes showed no gain, so none went higher.
                None (the default): on a GPU, where a 127-node step costs ~1.4x a 1-node one
                (the largest arm is probed every ~40 steps when not played). In a simulation on
                such a curve, a poor start (40 steps) then a stream where 64-node trees are
                best, it realised 0.95x the best fixed budget over the next 100 steps against
                0.81x (6 seeds); an H100 sweep (fp32, 36 Spec-Bench prompts) measured 1.00x the best fixed budget
                with it and 0.98x without, and level on 18 code and math prompts (1.05x / 1.06x).
                Off on a CPU, where it costs: 64 nodes cost ~3x a 4-node tree there, and a CPU
                sweep (fixed 1 / 4 / 16 / 64 nodes, 18 Spec-Bench prompts) measured 0.93x the
                best fixed budget with it against 1.00x without (1.06x vs 1.04x on 15 code and
                math prompts); in the simulation of interleaved poor and good requests on a CPU
                curve (three request orders) it took the poor kind from 0.914x-0.919x to
                0.899x-0.913x of its best fixed budget.
    request_prior: each request (``generate`` call; ``begin_request``) is estimated on its own
                steps, with the pooled statistics as a prior worth this many steps whose
                level follows the request: the prior for every arm is scaled by how this
                request does against the pool on its best-observed (smallest) arm, so a big
                arm last played in a request of another kind is not priced at that request's
                acceptance. Acceptance differs far more between prompts (a summary copies its
                article, a chat answer does not) than along one; with one pool the previous
                request steered the next one's first ~50 steps (simulated, interleaved poor
                and good drafting requests, three request orders: worst kind 0.85-0.89x of its
                best fixed budget pooled, 0.92-0.94x per request). 0 = one pool. None (the
                default): 8 on a CPU, 0 on a GPU, where verifying 127 nodes costs at most ~2x one
                and the request level, learned on the small arms a poor stretch falls back to,
                prices the big ones too low: in three H200 sweeps (48 or 24 prompts, fp32 and
                bf16) per-request estimates sank GSM8K prompts to 3-node trees for the rest
                of the request (tau 1.6 against 2.8 for fixed 128-node trees) and one pool was
                ahead by 1-3% overall.
    size_mix:   price an arm's non-empty verify as the mean of t over the sizes it drafted
                (a decayed histogram per arm), not t(mean size): CUDA-graph buckets make t
                a step function, and a CPU's curve bends (see ``_mixed_verify``). CPU sweeps
                (fp32, 2 rounds): 1.00x vs 0.94x the best fixed budget on HumanEval + GSM8K +
                MBPP, 0.99x both on Spec-Bench; an H200 fp32 sweep: 0.91x vs 0.94x (rows both
                ways; ~2% is that run's noise). False = price at the mean size. Needs
                ``split_empty`` (the histogram prices the non-empty trees).
    split_empty: price an arm's verify as P(empty tree) t(0) + P(non-empty) t(mean
                non-empty size), not t(mean size), which overprices arms that often draft
                nothing where t jumps from 0 to 1 node, as on a CPU (simulated, half the
                drafts empty: 0.95x -> 0.97x of the best fixed budget).
    max_control_share: the controller's own time (a decision plus an observation, timed)
                stays under this share of a step: when it would not, it decides and learns
                only every k-th step (k <= ``max_stride``; steps picked by count, so the
                sample is unbiased) and keeps its last choice in between. On a CPU (steps of
                ~100 ms) k = 1; on an H200 (steps of 2-3 ms, ~0.3 ms of controller) k ~ 4 if
                it ran between steps, but ``generate`` runs it on a GPU while the verify forward
                is in flight (``observe(overlapped=True)``): there k = 1 while it takes under
                half a verify. 0 = every step.
    length_bands: keep the arm statistics per band of sequence lengths (< 256, < 1024,
                < 4096 tokens, ...; ``generate`` reports the length each step): a step over a
                700-token context costs and accepts differently from one over 100, and
                prompts of both kinds interleave (calibrators stay shared). Off by default:
                in a CPU sweep (GSM8K, summarization, QA, multi-turn, 3 prompts each) it
                went from 0.92x to 0.84x the best fixed budget (summarization 0.80x ->
                0.75x): each band learns from fewer steps and explores more.
    measure_latency: when no cached verify-latency curve exists for the model and device,
                "cuda" (default) measures one on a GPU before the first step (in an H200
                run that learned it online, where the first use of each CUDA-graph bucket
                is a capture, the controller kept trees at 0.8 nodes on average end to end;
                with a measured curve it chose 64-node trees in a sweep of the same code);
                "always" also on a CPU (seconds for a real model), "never" learns online.
    draft_burn_in: the first this many timed steps do not teach the draft-time regression
                (first uses: see ``_draft_sample``); later draft times count at most
                ``OUTLIER_CAP`` times their running mean. ``ridge`` falls on the regression's
                slopes only, so steps all of one size (the warm-up's) give a flat draft cost.
    reveal_weight: how much a smaller arm's outcome read off a bigger played tree counts
                against the played arm's own, for a drafter that learns from every verified
                node (``learns_from_tree``, told by ``begin_request``; 1 for the others). Its
                state follows the budgets played (token recycling refreshes one row per
                verified node, rejected ones too), so a 128-node run's trees cut to 16 nodes
                accept more than a 16-node run's own (CPU, 36 code + math prompts: tau 2.41 vs
                2.11; 64 nodes: 2.85 vs 2.74). 1 (off) by default: 0.35 helped in a simulated
                drafter of that kind (``CoupledSim`` in the tests) and in replays of recorded
                trees, but not in real runs (see ``paired``).
    paired:     price the arms above the anchor (the arm being played) by a ladder of paired
                ratios (``_ladder``) instead of their own, older, means. Off by default. With
                ``reveal_weight`` 0.35 it was ahead in replays of trees recorded at 16, 64 and
                128 nodes (each arm drafted from its own state; 8 seeds x 2 passes, H200 cost
                model: 0.978x / 0.996x of the best fixed budget against 0.975x / 0.978x on
                code + math / Spec-Bench), but behind in the real runs: H200 fp32, 48 prompts,
                0.97x against 0.98x; CPU (the s8 sweeps) 1.01x against 1.07x on code + math,
                0.96x against 0.97x on Spec-Bench.
    context_levels: condition each choice on the previous step's accepted count, capped at
                ``context_levels - 1`` (acceptance comes in runs: after a long accept a big
                tree pays more often than after a miss). Each context keeps its own arm
                statistics, shrunk towards the pooled ones with ``context_prior`` steps'
                weight. On a GPU ``generate`` decides for every context while the step in
                flight verifies (``choose_ahead``) and takes the one its outcome picks
                (``take``). 0 or 1 = off (one estimate for every step; the default): 3 was
                ahead in replays of recorded trees (H200 cost model: 0.987x / 0.998x the best
                fixed budget on code + math / Spec-Bench, against 0.958x / 0.974x) but not in
                real runs: H200 fp32, 48 prompts, three runs 0.99x / 0.95x / 0.97x against
                0.97x / 0.96x / 0.97x; CPU code + math 0.92x against 0.97x.
    extend_depth: after a step that accepted every level it was allowed, the next step may
                draft twice as deep, up to this (0 or <= the arms' depth: never deeper): acceptance
                comes in runs, and in copying stretches (code that repeats its prompt, answers
                that quote a passage) the n-gram drafter's chain is accepted to its end (CPU
                recordings, 128 nodes, depth 8: 21% / 30% / 14% of steps on HumanEval / MBPP /
                Spec-Bench RAG accepted all 8 levels, and 69-78% of the steps after one did
                too). Deeper trees on every step cost more than they gain (fixed 64 nodes,
                depth 16 vs 8: tau 2.35 vs 2.48 on Spec-Bench on a CPU; 0.97x-0.99x the
                tokens/s on an H100); only after a full accept they pay: H100 fp32, adaptive
                1.02x / 1.01x the best fixed budget in two runs of 48 prompts (code, math,
                Spec-Bench) with it against 0.98x / 0.95x without, 1.01x vs 0.96x on 18 code +
                math prompts, 0.96x vs 0.95x on 36 Spec-Bench ones; CPU (fixed 1 / 4 / 16 /
                64 nodes, 2 rounds) 1.04x / 0.96x on code + math / Spec-Bench against 0.97x /
                0.97x. The steps' statistics are kept as their arm's
                (read at the arm's depth). Needs a drafter whose chains reach that deep
                (``NgramDrafter``'s ``max_continuation``, 16).
    """

    def __init__(self, *, grid: Sequence[int] = DEFAULT_GRID, max_depth: int = 8,
                 arms: Sequence[TreeBudget] | None = None, latency: LatencyModel | None = None,
                 discount: float = 0.99, explore: float = 0.1, warmup: int = 8, ridge: float = 1e-3,
                 min_depth: int = 1, shift_z: float = 1.0, shift_keep: float = 0.05, probe_every: int = 8,
                 probe_cost: float = 0.01, probe_far: bool | None = None, context_levels: int = 0,
                 context_prior: float = 4.0,
                 split_empty: bool = True, size_mix: bool = True, max_control_share: float = 0.03, max_stride: int = 8,
                 measure_latency: str = "cuda", length_bands: bool = False, request_prior: float | None = None,
                 paired: bool = False, draft_burn_in: int = 3, reveal_weight: float = 1.0, extend_depth: int = 16):
        arms = list(arms) if arms is not None else [TreeBudget(n, min(n, max_depth)) for n in grid]
        if not arms:
            raise ValueError("BudgetController needs at least one arm")
        self.arms = sorted(set(arms), key=lambda b: (b.max_nodes, b.max_depth))
        self._arm_depths = np.array([float(b.max_depth) for b in self.arms])
        self._n_bins = size_bin(max(b.max_nodes for b in self.arms)) + 1
        self.latency = latency
        self.discount, self.explore, self.warmup = float(discount), float(explore), int(warmup)
        self.ridge, self.min_depth = float(ridge), int(min_depth)
        self.shift_z, self.shift_keep = float(shift_z), float(shift_keep)
        self.probe_every, self.probe_cost = int(probe_every), float(probe_cost)
        self._probe_far_auto = probe_far is None
        self.probe_far = bool(probe_far)  # (None: set by ``attach``)
        self.context_levels, self.context_prior = int(context_levels), float(context_prior)
        self.split_empty, self.size_mix = bool(split_empty), bool(size_mix)
        self.max_control_share, self.max_stride = float(max_control_share), max(1, int(max_stride))
        if measure_latency not in ("cuda", "always", "never"):
            raise ValueError(f"measure_latency must be 'cuda', 'always' or 'never', got {measure_latency!r}")
        self.measure_latency = measure_latency
        self.length_bands = bool(length_bands)
        self.paired = bool(paired)
        self.draft_burn_in = int(draft_burn_in)
        self.reveal_weight = float(reveal_weight)
        self.extend_depth = int(extend_depth)
        self._request_prior_auto = request_prior is None
        self.request_prior = 8.0 if request_prior is None else float(request_prior)  # (None: set by ``attach``)
        self._band: int | None = None
        self._reveal: dict[str, float] = {}  # per drafter key: the weight of revealed arms
        # a list to record every full decision in (step, arm index, probe, and per arm the
        # estimated mean accepted, seconds per step and index), or None (what a sweep's
        # --trace-controller keeps: why the controller chose what it chose)
        self.trace: list | None = None
        self._stats: dict[str, _Stats] = {}
        self.use_fit(None)  # the nodes each arm drafts: its budget, until a runner says otherwise

    @property
    def max_budget(self) -> TreeBudget:
        deepest = max([a.max_depth for a in self.arms] + [self.extend_depth])
        return TreeBudget(max(a.max_nodes for a in self.arms), deepest)

    def step_depth(self, arm_depth: int, last_accepted: int | None, last_depth: int | None) -> int:
        """The next step's depth cap (see ``extend_depth``): the arm's, or after a step that
        accepted every level it was allowed (``last_accepted >= last_depth``) twice that step's
        cap, up to ``extend_depth``."""
        if last_depth and last_accepted is not None and last_accepted >= last_depth:
            return max(arm_depth, min(2 * last_depth, self.extend_depth))
        return arm_depth

    def attach(self, runner, model=None) -> None:
        """Give the controller a latency curve for ``runner``: the cached one if any was
        measured; else, where ``measure_latency`` says so, measured now and cached (a few
        verify forwards per tree size: on a GPU about a second, graph captures included);
        else one learned online. ``request_prior=None`` and ``probe_far=None`` are settled here,
        by the runner's device."""
        device = torch.device(getattr(runner, "device", "cpu"))
        if self._request_prior_auto:
            self.request_prior = 0.0 if device.type == "cuda" else 8.0
        if self._probe_far_auto:
            self.probe_far = device.type == "cuda"
        if self.latency is None:
            key = latency_key(model if model is not None else runner, runner)
            lm = LatencyModel.cached(key)
            if lm is None and (self.measure_latency == "always"
                               or (self.measure_latency == "cuda" and device.type == "cuda")):
                lm = LatencyModel.for_runner(runner, model=model, key=key)
            if lm is None:  # learned online, on the sizes the runner really runs
                lm = LatencyModel(runner_grid(runner), key=key)
            lm.buckets = pads_trees(runner)
            self.latency = lm
        self.use_fit(getattr(runner, "fit_nodes", None))

    def use_fit(self, fit_nodes: Callable[[int], int] | None) -> None:
        """The runner's cut of a node budget (``GraphedCompactRunner.fit_nodes``: a 64-node
        budget drafts 63 nodes, so that root + tree fill a 64-row CUDA-graph bucket). A
        smaller arm read off a bigger tree is cut where it would have been drafted: read as
        64 nodes, a 64-node arm's trees cut from 127-node ones were priced as the 128-row
        bucket, as dear as the 128-node arm's (in an H200 sweep the estimated cost ratio of
        the two had a median of 1.05 against 1.12 measured, and 128-node trees were played
        in a third of the steps where 64 was the best fixed budget)."""
        self._drafted = [int(fit_nodes(b.max_nodes)) if fit_nodes else b.max_nodes for b in self.arms]
        self._arm_nodes = np.array([float(n) for n in self._drafted])
        for st in self._stats.values():
            st._est = None

    def set_sequence_length(self, n: int) -> None:
        """The sequence length of the steps to come: with ``length_bands`` the arm
        statistics are kept per band of lengths (< 256, < 1024, < 4096, ... tokens)."""
        self._band = max(0, (int(n).bit_length() - 7) // 2) if self.length_bands else None

    def _arms_key(self, key: str) -> str:
        return key if self._band is None else f"{key}|len{self._band}"

    def _state(self, key: str) -> _Stats:
        if key not in self._stats:
            self._stats[key] = _Stats(len(self.arms), self._n_bins)
        return self._stats[key]

    def calibrator(self, key: str, kind: str = "prob") -> AcceptanceCalibrator:
        cals = self._state(key).calibrators
        if kind not in cals:
            cals[kind] = AcceptanceCalibrator(kind)
        return cals[kind]

    def begin_request(self, key: str = "default", *, learns_from_tree: bool | None = None) -> None:
        """A new request (prompt) starts: its own statistics start from nothing (see
        ``request_prior``), in every band of lengths; the pooled ones carry on.
        ``learns_from_tree``: the drafter's ``learns_from_tree`` (see ``reveal_weight``)."""
        if learns_from_tree is not None:
            self._reveal[key] = self.reveal_weight if learns_from_tree else 1.0
        for name, st in self._stats.items():
            if name == key or name.startswith(f"{key}|len"):
                st.R[:] = 0.0
                st._est = None

    # -- the per-step decision
    def choose(self, key: str = "default") -> TreeBudget:
        st = self._state(self._arms_key(key))
        if st.last is not None and st.steps >= self.warmup and st.since_choice + 1 < st.stride:
            st.since_choice += 1
            return st.last
        t0 = time.perf_counter()
        st.since_choice = 0
        st.chosen_ctx = (st.ctx or 0) if self.context_levels > 1 else None  # (no step yet: context 0)
        choice = self._take(st, self._decide(st, st.chosen_ctx))
        st.choose_cost = time.perf_counter() - t0
        return choice

    def choose_ahead(self, key: str = "default") -> list[TreeBudget]:
        """The next step's budget in every context (index: the step in flight's accepted
        count, capped at ``context_levels - 1``), decided before that count is known:
        ``generate`` on a GPU decides while the device verifies the step in flight, then
        calls ``take(key, context)`` once acceptance has read the result. Without contexts,
        one entry (the plain ``choose``)."""
        if self.context_levels <= 1:
            return [self.choose(key)]
        st = self._state(self._arms_key(key))
        t0 = time.perf_counter()
        st.plan = [self._decide(st, c) for c in range(self.context_levels)]
        st.choose_cost = time.perf_counter() - t0
        return [d[0] for d in st.plan]

    def take(self, key: str, context: int) -> TreeBudget:
        """The next step's budget from the last ``choose_ahead``: its entry for ``context``
        (the accepted count of the step that just ended; capped), now committed."""
        st = self._state(self._arms_key(key))
        if self.context_levels <= 1:
            if st.last is None:
                raise RuntimeError("take() needs a choose_ahead() first")
            return st.last
        if st.plan is None:
            raise RuntimeError("take() needs a choose_ahead() first")
        c = st.chosen_ctx = self._context_of(context)
        choice, st.plan = self._take(st, st.plan[c]), None
        return choice

    def _context_of(self, accepted: int) -> int:
        """The context a step's accepted count sets for the next step (capped)."""
        return min(max(int(accepted), 0), self.context_levels - 1)

    def chosen_context(self, key: str = "default") -> int | None:
        """The context the last budget was chosen in (None without contexts)."""
        return self._state(self._arms_key(key)).chosen_ctx

    def _decide(self, st: _Stats, ctx: int | None) -> tuple[TreeBudget, _Stats | None, dict | None]:
        """(budget, the stats whose probe clock it resets or None, trace entry or None) in
        context ``ctx`` (None: pooled); no state changes (see ``_take``)."""
        if (st.steps < self.warmup or not st.S[-1] > 0
                or (st.top_reveals < self.warmup and st.steps < 4 * self.warmup)):
            return self.arms[-1], None, None
        cs = st.contexts.get(ctx) if ctx is not None else None
        idx, mean, cost = self._estimates(st, bonus=True, ctx=cs)
        vals = idx.tolist()
        best = max(vals)
        i = max(i for i, v in enumerate(vals) if v >= best * (1 - 1e-9))
        pst = cs or st  # probes are spaced per context
        probe = None
        if self.probe_every and i + 1 < len(self.arms):
            def due(a: int, since: float) -> bool:  # spaced by the arm's extra cost
                return since >= max(self.probe_every, (cost[a] / cost[i] - 1.0) / max(self.probe_cost, 1e-9))

            top = len(self.arms) - 1
            if self.probe_far and top > i + 1 and due(top, pst.steps - pst.top_seen):
                i, probe = top, pst  # the largest arm: one step of it re-measures every arm
            elif due(i + 1, pst.steps - pst.last_probe):
                i, probe = i + 1, pst  # probe one arm up
        entry = None
        if self.trace is not None:
            entry = {"step": st.steps, "arm": i, "probe": probe is not None, "mean": mean.round(4).tolist(),
                     "cost_ms": (cost * 1e3).round(4).tolist(), "index": [round(v, 2) for v in vals]}
            if ctx is not None:
                entry["context"] = ctx
        return self.arms[i], probe, entry

    def _take(self, st: _Stats, decision: tuple[TreeBudget, _Stats | None, dict | None]) -> TreeBudget:
        choice, probe, entry = decision
        if probe is not None:
            probe.last_probe = probe.steps
        if entry is not None:
            self.trace.append(entry)
        st.last = choice
        return choice

    def observe(self, key: str, tree_size: int, accepted: int, draft_time: float, verify_time: float, *,
                tree: TokenTree | None = None, accepted_nodes: Sequence[int] | None = None,
                budget: TreeBudget | None = None, depth: int | None = None, timed: bool = True,
                overlapped: bool = False, context: int | None = None) -> None:
        """Record one step. ``budget``: the arm the step was played under (default: the
        last choice; a step drafted deeper by ``extend_depth`` counts as its arm, each arm's
        outcome read off the tree at the arm's own depth); with ``tree`` and
        ``accepted_nodes`` every arm the step reveals is updated (smaller ones by
        truncation) and the calibrators learn. ``timed=False``:
        the step's times are not samples of a step's cost (it captured a CUDA graph, or
        measured a kernel choice): the acceptance is learned, the times are not.
        ``overlapped``: the caller runs the controller while the device verifies (``generate``
        on a GPU), so its time is hidden as long as it stays under the verify's. ``context``:
        the context the step's budget was taken in (``take``), when the caller decides
        ahead; default: the last choice's."""
        st = self._state(self._arms_key(key))
        st.steps += 1
        step = float(draft_time) + float(verify_time)
        if timed:
            st.step_cost = step if st.step_cost is None else 0.9 * st.step_cost + 0.1 * step
            v = float(verify_time)
            st.verify_cost = v if st.verify_cost is None else 0.9 * st.verify_cost + 0.1 * v
        st.overlapped = overlapped
        if st.steps > self.warmup and st.since_observe + 1 < st.stride:
            st.since_observe += 1
            return
        t0 = time.perf_counter()
        skipped, st.since_observe = st.since_observe, 0
        eff = budget or st.last or TreeBudget(max(tree_size, 1), max(depth or tree_size, 1))
        self._detect_shift(st, eff, accepted)
        st.decay(self.discount ** (1 + skipped))  # forgetting per step, observed or not
        st._est = st._w = None
        revealed = [st]
        ctx = st.chosen_ctx if context is None or self.context_levels <= 1 else self._context_of(context)
        if ctx is not None:  # the context's own statistics learn from the same step
            cs = st.contexts.setdefault(ctx, _Stats(len(self.arms), self._n_bins))
            cs.steps += 1
            cs.decay(self.discount)
            revealed.append(cs)
        if tree is not None and accepted_nodes is not None:
            for s in revealed:
                self._observe_tree(s, tree, list(accepted_nodes), eff, self._reveal.get(key, 1.0))
            depth = max(tree.depth_list, default=0)
            for kind, cal in self._state(key).calibrators.items():  # those a drafter asked for (they cost time)
                feats = node_features(tree, kind)
                if feats is not None:
                    cal.observe(tree, accepted_nodes, feats)
        else:  # only the played arm and smaller ones that would have drafted this very tree
            depth = tree_size if depth is None else depth
            arms = [a for a, arm in enumerate(self.arms) if arm == eff or (
                tree_size <= self._drafted[a] and depth <= arm.max_depth
                and arm.max_nodes <= eff.max_nodes and arm.max_depth <= eff.max_depth)]
            acc = min(accepted, eff.max_depth)  # (a step drafted deeper: extend_depth)
            for s in revealed:
                s.add_many(arms, [acc] * len(arms), [tree_size] * len(arms), [depth] * len(arms),
                           self._reveal.get(key, 1.0))
        if self.context_levels > 1:
            st.ctx = self._context_of(accepted)
        if self.latency is None:
            self.latency = LatencyModel()
        if timed:
            self.latency.observe(tree_size, verify_time)
            t_draft = self._draft_sample(st, float(draft_time))
            if t_draft is not None:
                x = np.array([1.0, depth, tree_size / 16.0])
                st.XtX += np.outer(x, x)
                st.Xty += x * t_draft / self._load()  # draft times in load-free seconds, like the curve
        self._update_stride(st, st.choose_cost + time.perf_counter() - t0)

    def _draft_sample(self, st: _Stats, t: float) -> float | None:
        """The draft-side time a step teaches the regression, or None. The first
        ``draft_burn_in`` timed steps teach nothing and later ones at most ``OUTLIER_CAP``
        times the typical one (an EMA of the capped samples): a step's draft side includes
        first uses (a kernel compiled, a buffer allocated on the drafter's first calls), and
        the first steps all play the largest arm (``warmup``), so their outliers read as a
        steep cost of big trees. In an H200 run the controller sat at 1- and 4-node trees
        for the first prompt's 80 steps; a replay with three 50 ms first steps reproduces it
        (the slope learned: ~10 ms per 16 nodes, for ~300 steps)."""
        st.timed_steps += 1
        if st.timed_steps <= self.draft_burn_in:
            return None
        if st.draft_cost is not None:
            t = min(t, OUTLIER_CAP * st.draft_cost)
        st.draft_cost = t if st.draft_cost is None else 0.9 * st.draft_cost + 0.1 * t
        return t

    def _update_stride(self, st: _Stats, cost: float) -> None:
        st.control_cost = cost if st.control_cost is None else 0.9 * st.control_cost + 0.1 * cost
        if self.max_control_share <= 0 or self.context_levels > 1 or not st.step_cost:
            st.stride = 1  # (contexts need every step's outcome)
            return
        if st.overlapped and st.verify_cost and st.control_cost <= 0.5 * st.verify_cost:
            st.stride = 1  # hidden behind the device's verify: free
            return
        want = math.ceil(st.control_cost / (self.max_control_share * st.step_cost))
        st.stride = int(min(self.max_stride, max(1, want)))

    def _detect_shift(self, st: _Stats, eff: TreeBudget, accepted: int) -> None:
        """When the played arm keeps surprising (EMA of its z-score beyond ``shift_z``),
        the stream has shifted: keep only ``shift_keep`` of every statistic."""
        inside = [a for a, arm in enumerate(self.arms) if arm.max_nodes <= eff.max_nodes
                  and arm.max_depth <= eff.max_depth]
        if not inside or st.S[inside[-1]] < 5:
            return
        a = inside[-1]
        mean = st.A[a] / st.S[a]
        sd = math.sqrt(max(st.Q[a] / st.S[a] - mean * mean, 0.0) + 0.25)
        st.drift = 0.9 * st.drift + 0.1 * (min(accepted, eff.max_depth) - mean) / sd
        if abs(st.drift) > self.shift_z:
            st.forget(self.shift_keep)
            st.drift = 0.0

    def _observe_tree(self, st: _Stats, tree: TokenTree, path: list[int], eff: TreeBudget,
                      reveal_weight: float = 1.0) -> None:
        depths = tree.depth_list
        n = len(depths)
        prefix_max = list(itertools.accumulate(depths, max))  # deepest node among the first i + 1
        rows: tuple[list, list, list, list] = ([], [], [], [])  # arm, accepted, size, depth
        for a, arm in enumerate(self.arms):
            if arm.max_nodes > eff.max_nodes or arm.max_depth > eff.max_depth:
                # A bigger arm is not updated even when the drafter ran out before this
                # budget (a bigger one would have drafted the same tree): only small and
                # empty trees would reveal it, so its statistics would be biased towards
                # them (in a simulation with 30% empty drafts, updating it held the
                # controller at 0.92x of the best fixed budget; without, 0.98x). Bigger
                # arms learn from their own steps and probes.
                continue
            cap = self._drafted[a]
            m = min(n, cap)  # the arm's tree: the first m nodes, minus those too deep
            if m == 0 or prefix_max[m - 1] <= arm.max_depth:
                size, depth = m, (prefix_max[m - 1] if m else 0)
            else:
                keep = [d for d in depths[:m] if d <= arm.max_depth]
                size, depth = len(keep), max(keep, default=0)
            acc = 0
            for v in path:
                if v >= cap or depths[v] > arm.max_depth:
                    break
                acc += 1
            for col, x in zip(rows, (a, acc, size, depth)):
                col.append(x)
        st.add_many(*rows, weight=reveal_weight)

    # -- estimates
    def _load(self) -> float:
        return self.latency.scale if self.latency is not None else 1.0

    def _draft_weights(self, st: _Stats) -> np.ndarray:
        """Draft seconds ~ w . [1, depth, size / 16] at the current load (solved once per step)."""
        if st._w is None:
            st._w = _solve3(st.XtX + self.ridge * _SLOPES + _JITTER3, st.Xty)
        return st._w * self._load()

    def _estimates(self, st: _Stats, bonus: bool, ctx: _Stats | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(index, mean accepted, cost) per arm; index = (mean + 1 [+ bonus]) / cost.
        ``ctx``: one context's statistics, shrunk towards the pooled ``st``."""
        if st._est is not None and not bonus and ctx is None:
            return st._est
        S = st.S
        seen = S > 1e-6
        per = np.maximum(S, 1e-12)
        ratios = st.M[1:6] / per  # mean accepted, accepted^2, size, depth, P(empty) per arm
        empty = ratios[4] if self.split_empty else np.zeros_like(S)
        if seen.all():  # (the usual case)
            mean, sizes, depths = ratios[0], ratios[2], ratios[3]
            var = np.maximum(st.Q - st.A * mean, 0.0)
        else:
            mean = np.where(seen, ratios[0], 0.0)
            # unseen arms: at least what the nearest seen arm below gets
            below = np.maximum.accumulate(np.where(seen, np.arange(len(S)), -1))
            mean = np.where(below >= 0, mean[np.maximum(below, 0)], 0.0)
            sizes = np.where(seen, ratios[2], self._arm_nodes)
            depths = np.where(seen, ratios[3], self._arm_depths)
            var = np.where(seen, np.maximum(st.Q - st.A * ratios[0], 0.0), 0.0)
            empty = np.where(seen, empty, 0.0)
        if self.paired:
            mean = self._ladder(st, mean)
        mean = _pav(mean, S + 1e-6)
        if self.request_prior > 0 and ctx is None:
            mean, empty = self._request_level(st, mean, empty)
        w = self._draft_weights(st)
        draft = np.maximum(w[0] + w[1] * depths + w[2] / 16.0 * sizes, 0.0)
        lat = self.latency or LatencyModel()
        # verify: empty trees priced apart (a step without a tree skips the tree's extra rows
        # and mask; on a CPU t(0) -> t(1) is the biggest jump of the curve, so t(mean size)
        # would overprice an arm that often drafts nothing)
        full = 1.0 - empty
        nonempty_size = sizes / np.maximum(full, 1e-9)
        t = lat.predict_many(np.concatenate([[0.0], nonempty_size]))
        verify_full = self._mixed_verify(st, lat, t[1:]) if self.size_mix and self.split_empty else t[1:]
        cost = np.maximum(draft + empty * t[0] + full * verify_full, 1e-9)
        N = st.N
        if ctx is not None:  # the context's means, with the pooled ones as a prior of weight m
            m = self.context_prior
            mean = _pav((ctx.A + m * mean) / (ctx.S + m), ctx.S + m)
            per_step = var / np.maximum(S, 1e-12)  # the pooled variance of one step's accepted count
            S, N = ctx.S + m, ctx.N + m  # the context's own count plus the prior's weight
            var = per_step * S
        value = mean + 1.0
        if bonus:
            sd = np.sqrt((var + 1.0) / (S + 1.0))  # a prior variance of 1 with weight 1
            value = value + self.explore * sd * np.sqrt(2 * math.log(max(N, math.e)) / np.maximum(S, 1e-3))
            return value / cost, mean, cost
        if ctx is not None:
            return value / cost, mean, cost
        st._est = (value / cost, mean, cost)
        return st._est

    def _ladder(self, st: _Stats, mean: np.ndarray, shrink: float = 2.0) -> np.ndarray:
        """Mean accepted per arm with the arms above the anchor (the largest arm revealed on at
        least half as many recent steps as the most revealed one: the one being played) priced
        by a ladder of ratios from it: arm a's mean = arm a - 1's times the ratio of their
        accepted counts on the steps that revealed both, shrunk by ``shrink`` steps towards
        the ratio of the two arms' own means. A big arm's own mean dates from the stretch it
        was last played in; the ratio is a paired comparison on the same trees, so it carries
        over to the current stretch. (Shrunk towards 1 instead, ratios learned in a poor
        stretch, where bigger trees add nothing, held a controller in small trees after the
        stream improved: ``test_controller_moves_when_the_stream_shifts``.)"""
        S = st.S
        top = S.max()
        if top <= 0:
            return mean
        anchor = int(np.flatnonzero(S >= 0.5 * top)[-1])
        if anchor + 1 >= len(S):
            return mean
        out = mean.copy()
        pa, pb, own = st.PA.tolist(), st.PB.tolist(), np.maximum.accumulate(mean).tolist()
        for a in range(anchor + 1, len(S)):
            base = max(out[a - 1], 0.25)
            prior = own[a] / max(own[a - 1], 1e-3)  # the arms' own means' ratio, however old
            out[a] = out[a - 1] * (pa[a] + shrink * base * prior) / (pb[a] + shrink * base)
        return out

    def _mixed_verify(self, st: _Stats, lat: LatencyModel, at_mean: np.ndarray) -> np.ndarray:
        """E[verify seconds | non-empty tree] per arm over the sizes it drafted (size
        histogram; ``at_mean``, the cost at the mean size, for an arm with none yet). The
        cost at the mean size is not the mean cost where the curve bends or steps: an arm
        whose trees are half 20 and half 100 nodes pays for half 127-node CUDA-graph
        buckets, which the 60-node mean prices as a 63-node bucket."""
        count, total = st.H[0, 1:], st.H[1, 1:]  # [bins - 1, arms] (bin 0: the empty trees)
        b, a = np.nonzero(count > 1e-3)
        if b.size == 0:
            return at_mean
        w = count[b, a]
        t = lat.predict_many(total[b, a] / w)
        num = np.bincount(a, weights=w * t, minlength=len(self.arms))
        den = np.bincount(a, weights=w, minlength=len(self.arms))
        return np.where(den > 0, num / np.maximum(den, 1e-12), at_mean)

    def _request_level(self, st: _Stats, mean: np.ndarray, empty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean accepted, P(empty)) per arm for the current request: its own steps, with the
        pooled estimates as a prior of ``request_prior`` steps, the prior's level moved by how
        this request does on its best-observed arm (every step reveals the arms up to the one
        played, so the small arms' request statistics come first; a big arm last played in an
        earlier request is priced at this request's level, not that request's)."""
        m = self.request_prior
        count, acc, emp = st.R
        if not count.any():
            return mean, empty
        i = int(np.argmax(count))  # (the smallest of the most observed)
        level = ((acc[i] + m * mean[i]) / (count[i] + m)) / max(mean[i], 1e-3)
        prior = mean * min(level, 1e3)
        req_mean = _pav((acc + m * prior) / (count + m), count + m)
        req_empty = (emp + m * empty) / (count + m) if self.split_empty else empty
        return req_mean, req_empty

    def expected_rates(self, key: str) -> dict[TreeBudget, float]:
        """Estimated committed tokens per second of every arm (no exploration bonus)."""
        st = self._state(self._arms_key(key))
        if st.steps == 0:
            return {}
        return dict(zip(self.arms, self._estimates(st, bonus=False)[0].tolist()))

    def best_rate(self, key: str) -> float:
        rates = self.expected_rates(key)
        return max(rates.values()) if rates else 0.0

    # -- stopping (SpecDec++) and dynamic trees
    def marginal_costs(self, key: str, size: int) -> tuple[float, float]:
        """(seconds of draft per extra level, seconds of verify per extra node at ``size``)."""
        st = self._state(self._arms_key(key))
        w = self._draft_weights(st) if st.steps else np.zeros(3)
        lat = self.latency or LatencyModel()
        return max(float(w[1]), 0.0) + max(float(w[2]), 0.0) / 16.0, max(lat.predict(size + 1) - lat.predict(size), 0.0)

    def stop_threshold(self, key: str = "default", depth: int = 1) -> float:
        """Drafting token ``depth`` pays when P(the chain up to it is accepted) >= this:
        its expected gain per second, P / (draft + verify marginal cost), must beat the
        best achievable rate (the optimal-stopping rule for a ratio objective)."""
        t_draft, t_verify = self.marginal_costs(key, depth)
        return min(1.0, self.best_rate(key) * (t_draft + t_verify))

    def should_continue(self, prob: float, depth: int, *, path_prob: float = 1.0, key: str = "ModelDrafter") -> bool:
        """Whether a chain drafter should propose a token of draft probability ``prob``
        at ``depth`` (1 = first), the chain before it being accepted with ``path_prob``."""
        if depth <= self.min_depth:
            return True
        return path_prob * self.calibrator(key)(prob) >= self.stop_threshold(key, depth)

    def chain_stopper(self, key: str = "ModelDrafter") -> "ChainStopper":
        return ChainStopper(self, key)

    def tree_builder(self, key: str, *, max_nodes: int, max_depth: int, topk: int = 4,
                     width: int = 8) -> "DynamicTreeBuilder":
        t_draft, t_verify = self.marginal_costs(key, max_nodes // 2)
        rate = self.best_rate(key)
        return DynamicTreeBuilder(max_nodes=max_nodes, max_depth=max_depth, topk=topk, width=width,
                                  calibrate=self.calibrator(key), node_threshold=min(1.0, rate * t_verify),
                                  expand_threshold=rate * t_draft)


class ChainStopper:
    """``should_continue(prob, depth)`` for one chain, keeping the path probability."""

    def __init__(self, controller: BudgetController, key: str):
        self.controller, self.key = controller, key
        self.cal = controller.calibrator(key)
        self.path = 1.0

    def should_continue(self, prob: float, depth: int) -> bool:
        p = self.path * self.cal(prob)
        if depth > self.controller.min_depth and p < self.controller.stop_threshold(self.key, depth):
            return False
        self.path = p
        return True


# ----------------------------------------------------------------------------- dynamic trees
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


# ----------------------------------------------------------------------------- generate's hook
_SHARED: "weakref.WeakKeyDictionary[object, BudgetController]" = weakref.WeakKeyDictionary()


def resolve(adaptive, budget: TreeBudget | None, model, drafter, *,
            sampling: bool = False) -> tuple[BudgetController | None, bool]:
    """(controller, whether it chooses each step's budget) for ``generate``.

    A BudgetController passed as ``adaptive`` chooses (``budget``, if given, caps it);
    ``adaptive=True`` without an explicit ``budget`` uses the drafter's own controller or
    one shared by every call on this target -- for greedy decoding only: when sampling,
    budgets that follow measured times would break "same seed, same output", so True
    keeps the fixed budget there (pass a controller to adapt anyway). Otherwise the
    budget is fixed, and only a controller the drafter carries keeps learning.
    ``drafter`` None: plain decoding."""
    if drafter is None:
        return None, False
    if isinstance(adaptive, BudgetController):
        return adaptive, True
    own = getattr(drafter, "controller", None)
    own = own if isinstance(own, BudgetController) else None
    if adaptive and budget is None and not sampling:
        if own is not None:
            return own, True
        try:
            ctl = _SHARED.get(model)
            if ctl is None:
                ctl = _SHARED[model] = BudgetController()
        except TypeError:  # not weak-referenceable
            ctl = BudgetController()
        return ctl, True
    return own, False
