"""BudgetController: pick each step's tree budget to maximise committed tokens per second.

Arms are node budgets (``ControllerConfig.grid``, depth min(n, max_depth)). An arm is
valued (E[accepted] + 1) / (draft + verify seconds), with a discounted UCB bonus, from
per-drafter statistics. One verified tree reveals every *smaller* arm too (a budget-n tree
is the first n nodes of a bigger one, and greedy acceptance of a prefix is the prefix of
the accepted path), so only bigger arms need exploring: probes one arm up (and of the
largest arm on a GPU) spaced so that they cost at most ``probe_cost`` of the time. The
verify cost comes from a ``LatencyModel`` (measured once per model/dtype/device and
cached); the draft cost from a regression on depth and size. Evidence: docs/adaptive.md.
"""
from __future__ import annotations

import itertools
import math
import threading
from typing import Callable, Sequence

import numpy as np
import torch

from ..config import TreeBudget
from ..latency import OUTLIER_CAP, LatencyModel, latency_key, pads_trees, runner_grid
from ..tree import TokenTree
from .config import ControllerConfig

SHIFT_Z, SHIFT_KEEP = 1.0, 0.05  # change detection: EMA of the played arm's z-score; weight kept
PROBE_EVERY = 8  # the fewest steps between two probes
DRAFT_BURN_IN = 3  # first timed steps that do not teach the draft-cost regression (first uses)
RIDGE = 1e-3  # on the regression's slopes only
_SLOPES = np.diag([0.0, 1.0, 1.0])
_JITTER3 = 1e-9 * np.eye(3)


def drafter_key(drafter) -> str:
    """The name a controller files a drafter's statistics under."""
    return getattr(drafter, "adaptive_key", None) or type(drafter).__name__


def pav(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted isotonic (non-decreasing) regression by pool-adjacent-violators."""
    if (y[1:] >= y[:-1]).all():
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


def solve3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x with a @ x = b for a 3 x 3 ``a`` by Cramer's rule (np.linalg.solve costs ~20 us)."""
    (a00, a01, a02), (a10, a11, a12), (a20, a21, a22) = a.tolist()
    b0, b1, b2 = b.tolist()
    c0, c1, c2 = a11 * a22 - a12 * a21, a12 * a20 - a10 * a22, a10 * a21 - a11 * a20
    det = a00 * c0 + a01 * c1 + a02 * c2
    if abs(det) < 1e-300:
        return np.linalg.lstsq(a, b, rcond=None)[0]
    x0 = (b0 * c0 + a01 * (a12 * b2 - b1 * a22) + a02 * (b1 * a21 - a11 * b2)) / det
    x1 = (a00 * (b1 * a22 - a12 * b2) + b0 * c1 + a02 * (a10 * b2 - b1 * a20)) / det
    x2 = (a00 * (a11 * b2 - b1 * a21) + a01 * (b1 * a20 - a10 * b2) + b0 * c2) / det
    return np.array([x0, x1, x2])


def size_bin(n: int) -> int:
    """Histogram bin of an n-node tree: 0, 1, 2, 3, 4, 5-7, 8, 9-15, 16, ... Each bin lies in
    one linear piece of both latency grids (CPU: 0, 1, 2, 4, ...; CUDA graphs: 0, 1, 3, 7, ...)."""
    n = int(n)
    if n <= 0:
        return 0
    k = n.bit_length()
    return 2 * (k - 1) + (0 if n > 1 and n & (n - 1) == 0 else 1)


class _ArmStats:
    """One drafter's discounted statistics per arm."""

    def __init__(self, n_arms: int, n_bins: int):
        self.M = np.zeros((6, n_arms))  # rows: count, accepted, accepted^2, size, depth, empty
        self.S, self.A, self.Q, self.Z, self.D, self.E = self.M
        self.H = np.zeros((2, n_bins, n_arms))  # per size bin: trees, their summed sizes
        self.R = np.zeros((3, n_arms))  # this request's count, accepted, empty
        self.N = 0.0  # discounted steps
        self.steps = 0
        self.XtX, self.Xty = np.zeros((3, 3)), np.zeros(3)  # draft seconds ~ [1, depth, size / 16]
        self.drift = 0.0
        self.last: TreeBudget | None = None
        self.last_probe = 0  # the step of the last probe
        self.top_seen = 0  # the step that last revealed the largest arm
        self.top_reveals = 0  # steps that revealed the largest arm (warm-up)
        self.timed_steps = 0
        self.draft_cost: float | None = None  # EMA of the capped draft-side seconds
        self.est = None  # (index, mean, cost) without bonus, until the next observation
        self.w = None  # the draft regression's solution, until the next observation

    def decay(self, g: float) -> None:
        for v in (self.M, self.H, self.R, self.XtX, self.Xty):
            v *= g
        self.N = self.N * g + 1.0

    def forget(self, keep: float) -> None:
        for v in (self.M, self.H, self.R):
            v *= keep
        self.N *= keep

    def add(self, arms: list[int], acc: list[float], size: list[float], depth: list[float]) -> None:
        """One step's outcome for the arms it revealed (distinct, ascending)."""
        if not arms:
            return
        acc_, size_ = np.asarray(acc, float), np.asarray(size, float)
        rows = np.stack([np.ones(len(arms)), acc_, acc_ * acc_, size_, np.asarray(depth, float),
                         (size_ == 0).astype(float)])
        self.M[:, arms] += rows
        self.R[:, arms] += rows[[0, 1, 5]]
        if arms[-1] == self.M.shape[1] - 1:
            self.top_seen = self.steps
            self.top_reveals += 1
        bins = [min(size_bin(x), self.H.shape[1] - 1) for x in size]
        self.H[0, bins, arms] += 1.0
        self.H[1, bins, arms] += size_


class BudgetController:
    """``choose(key) -> TreeBudget`` each step, ``observe(...)`` after it.

    ``generate`` drives it through a ``BudgetPlan``; ``attach`` gives it the runner's latency
    curve. ``latency``: a LatencyModel to use instead (tests, simulations). ``trace``: set to
    a list to record every decision (arm, probe, per-arm mean accepted, cost, index)."""

    def __init__(self, config: ControllerConfig | None = None, *, latency: LatencyModel | None = None):
        self.config = cfg = config or ControllerConfig()
        self.arms = sorted({TreeBudget(int(n), min(int(n), cfg.max_depth)) for n in cfg.grid},
                           key=lambda b: (b.max_nodes, b.max_depth))
        self._arm_depths = np.array([float(b.max_depth) for b in self.arms])
        self._n_bins = size_bin(self.arms[-1].max_nodes) + 1
        self.latency = latency
        self.probe_far = bool(cfg.probe_far)  # (None: settled by ``attach``)
        self.request_prior = 8.0 if cfg.request_prior is None else float(cfg.request_prior)
        self.trace: list | None = None
        self.lock = threading.Lock()  # held by BudgetPlan around each call: one controller, many threads
        self._stats: dict[str, _ArmStats] = {}
        self.use_fit(None)

    @property
    def max_budget(self) -> TreeBudget:
        """The most any step may draft (the largest arm, deepened by ``extend_depth``)."""
        return TreeBudget(self.arms[-1].max_nodes, max([a.max_depth for a in self.arms] + [self.config.extend_depth]))

    def step_depth(self, arm_depth: int, last_accepted: int | None, last_depth: int | None) -> int:
        """The next step's depth cap: the arm's, or twice the last step's (up to
        ``extend_depth``) after a step that accepted every level it was allowed."""
        if last_depth and last_accepted is not None and last_accepted >= last_depth:
            return max(arm_depth, min(2 * last_depth, self.config.extend_depth))
        return arm_depth

    def attach(self, runner, model=None) -> None:
        """Settle the device-dependent defaults and get a latency curve for ``runner``: the
        cached one, else measured now (where ``measure_latency`` says so) and cached, else
        one learned online."""
        cuda = torch.device(getattr(runner, "device", "cpu")).type == "cuda"
        if self.config.request_prior is None:
            self.request_prior = 0.0 if cuda else 8.0
        if self.config.probe_far is None:
            self.probe_far = cuda
        if self.latency is None:
            key = latency_key(model if model is not None else runner, runner)
            lm = LatencyModel.cached(key)
            if lm is None and (self.config.measure_latency == "always"
                               or (self.config.measure_latency == "cuda" and cuda)):
                lm = LatencyModel.for_runner(runner, model=model, key=key)
            if lm is None:
                lm = LatencyModel(runner_grid(runner), key=key)
            lm.buckets = pads_trees(runner)
            self.latency = lm
        self.use_fit(getattr(runner, "fit_nodes", None))

    def use_fit(self, fit_nodes: Callable[[int], int] | None) -> None:
        """The runner's cut of a node budget (a CUDA-graph runner drafts 63 nodes for a
        64-node budget): smaller arms read off a bigger tree are cut where they are drafted."""
        self._drafted = [int(fit_nodes(b.max_nodes)) if fit_nodes else b.max_nodes for b in self.arms]
        self._arm_nodes = np.array([float(n) for n in self._drafted])
        for st in self._stats.values():
            st.est = None

    def begin_request(self, key: str = "default") -> None:
        """A new prompt: its own statistics (``request_prior``) start from nothing."""
        st = self._stats.get(key)
        if st is not None:
            st.R[:] = 0.0
            st.est = None

    def _state(self, key: str) -> _ArmStats:
        if key not in self._stats:
            self._stats[key] = _ArmStats(len(self.arms), self._n_bins)
        return self._stats[key]

    # -- the decision
    def choose(self, key: str = "default") -> TreeBudget:
        st, cfg = self._state(key), self.config
        if st.steps < cfg.warmup or not st.S[-1] > 0 or (st.top_reveals < cfg.warmup and st.steps < 4 * cfg.warmup):
            st.last = self.arms[-1]  # warm-up: the largest arm reveals every arm
            return st.last
        idx, mean, cost = self._estimates(st, bonus=True)
        vals = idx.tolist()
        best = max(vals)
        i = max(j for j, v in enumerate(vals) if v >= best * (1 - 1e-9))
        probe, top = False, len(self.arms) - 1

        def due(a: int, since: float) -> bool:  # spaced by the arm's extra cost
            return since >= max(PROBE_EVERY, (cost[a] / cost[i] - 1.0) / max(cfg.probe_cost, 1e-9))

        if i < top and self.probe_far and top > i + 1 and due(top, st.steps - st.top_seen):
            i, probe = top, True  # the largest arm: one step of it re-measures every arm
        elif i < top and due(i + 1, st.steps - st.last_probe):
            i, probe = i + 1, True  # one arm up
        if probe:
            st.last_probe = st.steps
        if self.trace is not None:
            self.trace.append({"step": st.steps, "arm": i, "probe": probe, "mean": mean.round(4).tolist(),
                               "cost_ms": (cost * 1e3).round(4).tolist(), "index": [round(v, 2) for v in vals]})
        st.last = self.arms[i]
        return st.last

    def observe(self, key: str, tree_size: int, accepted: int, draft_time: float, verify_time: float, *,
                tree: TokenTree | None = None, accepted_nodes: Sequence[int] | None = None,
                budget: TreeBudget | None = None, depth: int | None = None, timed: bool = True) -> None:
        """Record one step. ``budget``: the arm it was played under (default: the last
        choice). With ``tree`` and ``accepted_nodes`` every smaller arm learns what it would
        have accepted. ``timed=False``: the times are no sample (a CUDA graph was captured)."""
        st = self._state(key)
        st.steps += 1
        eff = budget or st.last or TreeBudget(max(tree_size, 1), max(depth or tree_size, 1))
        self._detect_shift(st, eff, accepted)
        st.decay(self.config.discount)
        st.est = st.w = None
        if tree is not None and accepted_nodes is not None:
            self._observe_tree(st, tree, list(accepted_nodes), eff)
            depth = max(tree.depth_list, default=0)
        else:  # the played arm, and smaller ones that would have drafted this very tree
            depth = tree_size if depth is None else depth
            arms = [a for a, arm in enumerate(self.arms) if arm == eff or (
                tree_size <= self._drafted[a] and depth <= arm.max_depth
                and arm.max_nodes <= eff.max_nodes and arm.max_depth <= eff.max_depth)]
            acc = min(accepted, eff.max_depth)  # (a step drafted deeper: extend_depth)
            st.add(arms, [acc] * len(arms), [tree_size] * len(arms), [depth] * len(arms))
        if self.latency is None:
            self.latency = LatencyModel()
        if timed:
            self.latency.observe(tree_size, verify_time)
            t_draft = self._draft_sample(st, float(draft_time))
            if t_draft is not None:
                x = np.array([1.0, depth, tree_size / 16.0])
                st.XtX += np.outer(x, x)
                st.Xty += x * t_draft / self._load()  # load-free seconds, like the curve

    def _draft_sample(self, st: _ArmStats, t: float) -> float | None:
        """The draft time a step teaches (None during the burn-in; capped at OUTLIER_CAP times
        the running mean): first uses compile and allocate, and would read as a steep slope."""
        st.timed_steps += 1
        if st.timed_steps <= DRAFT_BURN_IN:
            return None
        if st.draft_cost is not None:
            t = min(t, OUTLIER_CAP * st.draft_cost)
        st.draft_cost = t if st.draft_cost is None else 0.9 * st.draft_cost + 0.1 * t
        return t

    def _detect_shift(self, st: _ArmStats, eff: TreeBudget, accepted: int) -> None:
        """When the played arm keeps surprising, the stream shifted: keep SHIFT_KEEP of the weight."""
        inside = [a for a, arm in enumerate(self.arms) if arm.max_nodes <= eff.max_nodes
                  and arm.max_depth <= eff.max_depth]
        if not inside or st.S[inside[-1]] < 5:
            return
        a = inside[-1]
        mean = st.A[a] / st.S[a]
        sd = math.sqrt(max(st.Q[a] / st.S[a] - mean * mean, 0.0) + 0.25)
        st.drift = 0.9 * st.drift + 0.1 * (min(accepted, eff.max_depth) - mean) / sd
        if abs(st.drift) > SHIFT_Z:
            st.forget(SHIFT_KEEP)
            st.drift = 0.0

    def _observe_tree(self, st: _ArmStats, tree: TokenTree, path: list[int], eff: TreeBudget) -> None:
        """Every arm up to the played one: its tree is the first ``drafted`` nodes (minus those
        too deep), its accepted count the path's prefix inside it. Bigger arms learn only from
        their own steps (the small and empty trees that would reveal them bias them)."""
        depths = tree.depth_list
        n = len(depths)
        prefix_max = list(itertools.accumulate(depths, max))
        rows: tuple[list, list, list, list] = ([], [], [], [])  # arm, accepted, size, depth
        for a, arm in enumerate(self.arms):
            if arm.max_nodes > eff.max_nodes or arm.max_depth > eff.max_depth:
                continue
            m = min(n, self._drafted[a])
            if m == 0 or prefix_max[m - 1] <= arm.max_depth:
                size, depth = m, (prefix_max[m - 1] if m else 0)
            else:
                keep = [d for d in depths[:m] if d <= arm.max_depth]
                size, depth = len(keep), max(keep, default=0)
            acc = 0
            for v in path:
                if v >= self._drafted[a] or depths[v] > arm.max_depth:
                    break
                acc += 1
            for col, x in zip(rows, (a, acc, size, depth)):
                col.append(x)
        st.add(*rows)

    # -- estimates
    def _load(self) -> float:
        return self.latency.scale if self.latency is not None else 1.0

    def _draft_weights(self, st: _ArmStats) -> np.ndarray:
        if st.w is None:
            st.w = solve3(st.XtX + RIDGE * _SLOPES + _JITTER3, st.Xty)
        return st.w * self._load()

    def _estimates(self, st: _ArmStats, bonus: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(index, mean accepted, seconds per step) per arm; index = (mean + 1 [+ bonus]) / cost."""
        if st.est is not None and not bonus:
            return st.est
        S = st.S
        seen = S > 1e-6
        mean, _, sizes, depths, empty = st.M[1:6] / np.maximum(S, 1e-12)
        var = np.maximum(st.Q - st.A * mean, 0.0)
        if not seen.all():  # unseen arms: what the nearest seen arm below gets
            below = np.maximum.accumulate(np.where(seen, np.arange(len(S)), -1))
            mean = np.where(below >= 0, np.where(seen, mean, 0.0)[np.maximum(below, 0)], 0.0)
            sizes = np.where(seen, sizes, self._arm_nodes)
            depths = np.where(seen, depths, self._arm_depths)
            var, empty = np.where(seen, var, 0.0), np.where(seen, empty, 0.0)
        mean = pav(mean, S + 1e-6)
        if self.request_prior > 0:
            mean, empty = self._request_level(st, mean, empty)
        w = self._draft_weights(st)
        draft = np.maximum(w[0] + w[1] * depths + w[2] / 16.0 * sizes, 0.0)
        lat = self.latency or LatencyModel()
        # an empty tree skips the tree's rows (on a CPU t(0) -> t(1) is the curve's biggest jump),
        # and a non-empty one costs the mean of t over the sizes drafted, not t(mean size)
        full = 1.0 - empty
        t = lat.predict_many(np.concatenate([[0.0], sizes / np.maximum(full, 1e-9)]))
        cost = np.maximum(draft + empty * t[0] + full * self._mixed_verify(st, lat, t[1:]), 1e-9)
        value = mean + 1.0
        if bonus:
            sd = np.sqrt((var + 1.0) / (S + 1.0))
            value = value + self.config.explore * sd * np.sqrt(2 * math.log(max(st.N, math.e)) / np.maximum(S, 1e-3))
            return value / cost, mean, cost
        st.est = (value / cost, mean, cost)
        return st.est

    def _mixed_verify(self, st: _ArmStats, lat: LatencyModel, at_mean: np.ndarray) -> np.ndarray:
        """E[verify seconds | non-empty tree] per arm over its size histogram (CUDA-graph
        buckets make t a step function: the cost at the mean size is not the mean cost)."""
        count, total = st.H[0, 1:], st.H[1, 1:]  # [bins - 1, arms]
        b, a = np.nonzero(count > 1e-3)
        if b.size == 0:
            return at_mean
        w = count[b, a]
        t = lat.predict_many(total[b, a] / w)
        num = np.bincount(a, weights=w * t, minlength=len(self.arms))
        den = np.bincount(a, weights=w, minlength=len(self.arms))
        return np.where(den > 0, num / np.maximum(den, 1e-12), at_mean)

    def _request_level(self, st: _ArmStats, mean: np.ndarray, empty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """This request's (mean accepted, P(empty)) per arm: its own steps with the pooled
        estimates as a prior of ``request_prior`` steps, scaled to how this request does on
        its best-observed arm (so a big arm is priced at this request's level)."""
        m = self.request_prior
        count, acc, emp = st.R
        if not count.any():
            return mean, empty
        i = int(np.argmax(count))
        level = ((acc[i] + m * mean[i]) / (count[i] + m)) / max(mean[i], 1e-3)
        prior = mean * min(level, 1e3)
        return pav((acc + m * prior) / (count + m), count + m), (emp + m * empty) / (count + m)

    # -- what drafters ask (chain stopping, dynamic trees: specdec.drafters.shaping)
    def expected_rates(self, key: str) -> dict[TreeBudget, float]:
        """Estimated committed tokens per second of every arm (no exploration bonus)."""
        st = self._state(key)
        return dict(zip(self.arms, self._estimates(st, bonus=False)[0].tolist())) if st.steps else {}

    def best_rate(self, key: str) -> float:
        return max(self.expected_rates(key).values(), default=0.0)

    def marginal_costs(self, key: str, size: int) -> tuple[float, float]:
        """(draft seconds per extra level, verify seconds per extra node at ``size``)."""
        st = self._state(key)
        w = self._draft_weights(st) if st.steps else np.zeros(3)
        lat = self.latency or LatencyModel()
        return max(float(w[1]), 0.0) + max(float(w[2]), 0.0) / 16.0, max(lat.predict(size + 1) - lat.predict(size), 0.0)
