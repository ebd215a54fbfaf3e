"""Verify latency as a function of draft-tree size, per (model, dtype, device, backend).

``LatencyModel`` is piecewise-linear between measured tree sizes, measured once by a
short sweep (``LatencyModel.for_runner``: one verify forward per size of a small grid),
cached as JSON under ``~/.cache/specdec/latency/<key>.json`` (``SPECDEC_CACHE_DIR``
overrides the root) and refined online from observed step times. Used by
``specdec.adaptive.BudgetController``; ``from_function`` injects a synthetic curve.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

log = logging.getLogger("specdec")

LATENCY_GRID = (0, 1, 2, 4, 8, 16, 32, 64, 128)
MEASURE_PREFIX = 64  # cached tokens before each timed tree


def default_cache_dir() -> Path:
    root = os.environ.get("SPECDEC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "specdec")
    return Path(root) / "latency"


def _device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{torch.get_num_threads()}"
    except OSError:
        pass
    return f"{device.type} x{torch.get_num_threads()}"


# Bumped when the runtimes' cost per tree size changes (a curve measured before would
# mislead the controller until online refinement caught up): 2 = CPU padding measured.
CURVE_VERSION = 2


def latency_key(model, runner=None) -> str:
    """A file-name-safe key: model name + config hash, dtype, device name, backend, curve version."""
    hf = model if isinstance(model, torch.nn.Module) else getattr(model, "model", None)
    cfg = getattr(hf, "config", None)
    name, digest = type(hf or model).__name__, "noconfig"
    if cfg is not None:
        name = getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "") or name
        try:
            blob = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
        except Exception:  # noqa: BLE001 -- a config without to_dict
            blob = repr(vars(cfg))
        digest = hashlib.sha1(blob.encode()).hexdigest()[:10]
    params = next(hf.parameters(), None) if isinstance(hf, torch.nn.Module) else None
    dtype = str(params.dtype if params is not None else getattr(runner or model, "dtype", "na")).replace("torch.", "")
    device = params.device if params is not None else getattr(runner or model, "device", "cpu")
    backend = type(runner).__name__ if runner is not None else "runner"
    raw = f"{Path(str(name)).name}-{digest}-{dtype}-{_device_name(device)}-{backend}-v{CURVE_VERSION}"
    return re.sub(r"[^A-Za-z0-9.]+", "-", raw).strip("-")


OUTLIER_CAP = 4.0  # an observation counts as at most this many times the predicted time


class LatencyModel:
    """Verify latency (seconds) of a tree of ``n`` drafted nodes (the forward runs n + 1
    tokens): ``scale * shape(n)``, the shape piecewise-linear between grid sizes with
    linear extrapolation past the ends; with ``buckets`` (a runner that pads every tree to
    the next CUDA-graph bucket, whose largest trees are the grid sizes) a step function: a
    size between two grid sizes costs what the one above costs. ``observe(n, t)`` moves ``scale`` (the machine's
    current load: it multiplies every size alike, so comparisons between tree sizes stay
    sound while it swings) fast and the two grid points around ``n`` slowly, so a
    measured curve tracks drift and an empty one is learned online."""

    def __init__(self, sizes: Sequence[int] = LATENCY_GRID, times: Sequence[float] | None = None, *,
                 key: str | None = None, lr: float = 0.05, scale_lr: float = 0.2, meta: dict | None = None,
                 buckets: bool = False):
        self.sizes = [int(s) for s in sizes]
        if self.sizes != sorted(set(self.sizes)):
            raise ValueError("LatencyModel: sizes must be increasing")
        self.times = [float("nan")] * len(self.sizes) if times is None else [float(t) for t in times]
        if len(self.times) != len(self.sizes):
            raise ValueError("LatencyModel: one time per size")
        self.key, self.lr, self.scale_lr, self.meta = key, float(lr), float(scale_lr), dict(meta or {})
        self.scale = 1.0  # the load right now relative to the curve (outside load on a shared machine)
        # the runner pads a tree to the next bucket (CUDA graphs): the grid sizes are the buckets'
        # largest trees, and a size between two of them costs what the bucket above costs
        self.buckets = bool(buckets)
        self._known_xy: tuple[list[float], list[float]] | None = None  # cache of _known(); reset on change

    # -- construction
    @classmethod
    def from_function(cls, fn: Callable[[int], float], grid: Sequence[int] = LATENCY_GRID, **kw) -> "LatencyModel":
        """A synthetic curve (tests, simulations): t = fn(n) at every grid size."""
        return cls(grid, [fn(n) for n in grid], **kw)

    @classmethod
    def measure(cls, verify: Callable[[int], object], grid: Sequence[int] = LATENCY_GRID, *, repeats: int = 5,
                warmup: int = 2, **kw) -> "LatencyModel":
        """Time ``verify(n)`` (a verify forward of n nodes) over ``grid``: ``warmup`` then
        ``repeats`` rounds, each round over the whole grid (so a burst of outside load hits
        all sizes alike), and the fastest call per size (interference only adds time; the
        online updates restore the level seen in use). A callable that returns a number
        reports its own time (seconds) instead of being timed."""
        for _ in range(warmup):
            for n in grid:
                verify(n)
        sizes, times = [], []
        for _ in range(repeats):
            for n in grid:
                t0 = time.perf_counter()
                r = verify(n)
                sizes.append(int(n))
                times.append(float(r) if isinstance(r, (int, float)) and not isinstance(r, bool)
                             else time.perf_counter() - t0)
        return cls.fit(sizes, times, stat="min", **kw)

    @classmethod
    def fit(cls, sizes: Sequence[int], times: Sequence[float], *, stat: str = "median", **kw) -> "LatencyModel":
        """One time per distinct size (``stat``: "median" or "min"), made non-decreasing in n."""
        by: dict[int, list[float]] = {}
        for n, t in zip(sizes, times):
            by.setdefault(int(n), []).append(float(t))
        grid = sorted(by)
        reduce = {"median": np.median, "min": np.min}[stat]
        ys = np.maximum.accumulate([float(reduce(by[n])) for n in grid])
        return cls(grid, ys.tolist(), **kw)

    # -- use
    def _known(self) -> tuple[list[float], list[float]]:
        """(sizes, times) of the grid points measured so far (cached until the next change)."""
        if self._known_xy is None:
            pairs = [(float(n), t) for n, t in zip(self.sizes, self.times) if t == t]  # (t == t: not NaN)
            self._known_xy = ([n for n, _ in pairs], [t for _, t in pairs])
        return self._known_xy

    @property
    def empty(self) -> bool:
        return not any(t == t for t in self.times)

    def predict(self, n: float) -> float:
        """Seconds for a verify of ``n`` nodes under the current load (0.0 while nothing is known)."""
        return self.scale * self.shape(n)

    def predict_many(self, ns) -> np.ndarray:
        """``predict`` of every size in ``ns`` (what the controller asks each step)."""
        return np.array([self.scale * self.shape(n) for n in np.asarray(ns, dtype=np.float64).tolist()])

    def shape(self, n: float) -> float:
        """The curve itself (seconds at load scale 1): piecewise-linear between measured sizes,
        linear past the largest; below the smallest optimistic, never below proportional to
        n + 1. Plain Python: the controller asks it every step, for a handful of sizes, where
        numpy's per-call cost would dominate."""
        x, y = self._known()
        if not x:
            return 0.0
        n = float(n)
        if n < x[0]:
            floor = y[0] * (n + 1) / (x[0] + 1)
            if len(x) == 1:
                return floor
            slope = max((y[1] - y[0]) / (x[1] - x[0]), 0.0)
            return max(y[0] - slope * (x[0] - n), floor)
        if n >= x[-1]:
            if len(x) == 1:
                return y[0]
            return y[-1] + max((y[-1] - y[-2]) / (x[-1] - x[-2]), 0.0) * (n - x[-1])
        i = bisect.bisect_right(x, n)  # x[i - 1] <= n < x[i]
        if self.buckets and n - x[i - 1] > 1e-6 * n:  # (a mean of sizes carries rounding)
            return y[i]  # padded to the bucket above
        w = (n - x[i - 1]) / (x[i] - x[i - 1])
        return y[i - 1] + w * (y[i] - y[i - 1])

    def observe(self, n: int, t: float) -> None:
        """Online refinement from one observed verify of ``n`` nodes that took ``t`` s:
        the load ``scale`` follows t / shape(n) quickly (``scale_lr``, in log space), the
        curve's grid points around ``n`` follow t / scale slowly (``lr``, never more than
        halving one); a grid point seen for the first time takes t / scale, capped by
        ``_growth_cap`` (and leaves the scale alone)."""
        n, t = int(n), float(t)
        if n > self.sizes[-1] or n < self.sizes[0]:  # outside the grid: a new grid point
            at = 0 if n < self.sizes[0] else len(self.sizes)
            self.sizes.insert(at, n)
            self.times.insert(at, float("nan"))
        i = bisect.bisect_left(self.sizes, n)
        if self.sizes[i] == n or self.buckets:
            brackets = [(i, 1.0)]  # (a bucketed runner ran it as the bucket above)
        else:
            w = (n - self.sizes[i - 1]) / (self.sizes[i] - self.sizes[i - 1])
            brackets = [(j, wj) for j, wj in ((i - 1, 1.0 - w), (i, w)) if wj > 0]
        known = all(self.times[j] == self.times[j] for j, _ in brackets)
        t_first = min(t / self.scale, self._growth_cap(n)) if not known else None
        shape = self.shape(n) if known else 0.0  # (the scale does not change the shape)
        if known and shape > 0:  # one observation moves the curve a bounded amount: a step that
            t = min(t, OUTLIER_CAP * self.scale * shape)  # compiled or captured something is no sample
        if known and t > 0:
            self.scale *= math.exp(self.scale_lr * (math.log(t / shape) - math.log(self.scale)))
        t = t / self.scale
        r = t - shape if known else 0.0
        for j, w in brackets:
            if self.times[j] != self.times[j]:  # NaN: first sight of this grid point
                self.times[j] = t_first
            else:  # at most halved per observation: an outlier at a neighbour (a CUDA graph
                # captured during the step) must not drive a grid time to zero or below
                self.times[j] = max(self.times[j] + self.lr * w * r, 0.5 * self.times[j])
        self._known_xy = None  # (a new grid point enters as NaN: _known was valid until here)

    def _growth_cap(self, n: int) -> float:
        """The most a first sight of size ``n`` may start at: proportional growth in n + 1
        from the nearest known smaller size (a verify step is never worse than linear in
        tree size), so one slow step (a CUDA graph captured in it) cannot set the curve."""
        x, y = self._known()
        i = bisect.bisect_right(x, n) - 1  # the largest known size <= n
        if i < 0:
            return math.inf
        return y[i] * (n + 1) / (x[i] + 1)

    # -- persistence
    def to_json(self) -> dict:
        """The curve at the current load (scale folded in)."""
        return {"version": 1, "key": self.key, "sizes": self.sizes,
                "times": [None if t != t else t * self.scale for t in self.times], "meta": self.meta,
                "buckets": self.buckets}

    @classmethod
    def from_json(cls, d: dict) -> "LatencyModel":
        times = [float("nan") if t is None else t for t in d["times"]]
        return cls(d["sizes"], times, key=d.get("key"), meta=d.get("meta"), buckets=bool(d.get("buckets", False)))

    def copy(self) -> "LatencyModel":
        """An independent curve with the same points (online refinement does not leak back)."""
        out = LatencyModel.from_json(self.to_json())
        out.lr, out.scale_lr = self.lr, self.scale_lr
        return out

    @staticmethod
    def cache_path(key: str, cache_dir: str | Path | None = None) -> Path:
        """``<cache_dir or ~/.cache/specdec/latency>/<key>.json``."""
        return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / f"{key}.json"

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LatencyModel":
        return cls.from_json(json.loads(Path(path).read_text()))

    @classmethod
    def cached(cls, key: str, cache_dir: str | Path | None = None) -> "LatencyModel | None":
        path = cls.cache_path(key, cache_dir)
        try:
            return cls.load(path)
        except (OSError, ValueError, KeyError):
            return None

    @classmethod
    def for_runner(cls, runner, *, model=None, key: str | None = None, cache_dir=None,
                   grid: Sequence[int] = LATENCY_GRID, refresh: bool = False, **measure_kw) -> "LatencyModel":
        """The cached curve for this (model, dtype, device, backend), measured and saved
        on first use. ``runner`` is a specdec Runner (its cache is reset)."""
        key = key or latency_key(model if model is not None else runner, runner)
        grid = runner_grid(runner, grid)
        if not refresh:
            hit = cls.cached(key, cache_dir)
            if hit is not None:
                hit.buckets = pads_trees(runner)  # (files written before the flag)
                return hit
        # a small cache (a runner made for short generations) holds the prefix and the trees
        # that fit; such a partial curve is used but not cached for bigger runners
        capacity = getattr(runner, "max_length", None)
        prefix = MEASURE_PREFIX if capacity is None else max(1, min(MEASURE_PREFIX, capacity // 4))
        fits = [n for n in grid if capacity is None or prefix + n + 1 <= capacity]
        lm = cls.measure(runner_verify_fn(runner, prefix_len=prefix), fits, key=key,
                         meta={"device": _device_name(runner.device), "measured": time.strftime("%Y-%m-%d %H:%M:%S")},
                         buckets=pads_trees(runner), **measure_kw)
        runner.reset()
        if len(fits) == len(grid):
            lm.save(cls.cache_path(key, cache_dir))
        else:
            log.debug("specdec: latency curve of %s measured on %s nodes only (cache capacity %s); not cached",
                      key, fits, capacity)
        return lm


def pads_trees(runner) -> bool:
    """Whether ``runner`` pads every tree to a CUDA-graph bucket (its verify cost steps)."""
    return bool(getattr(runner, "pads_trees", False))


def runner_grid(runner, grid: Sequence[int] = LATENCY_GRID) -> list[int]:
    """The tree sizes of ``grid`` that ``runner`` really runs (a bucketed runner trims every
    budget to fill its bucket: ``fit_nodes``)."""
    fit = getattr(runner, "fit_nodes", None)
    return sorted({fit(int(n)) if fit else int(n) for n in grid})


def runner_verify_fn(runner, prefix_len: int = MEASURE_PREFIX, seed: int = 0) -> Callable[[int], None]:
    """verify(n): one tree forward of n + 1 tokens after a ``prefix_len`` prefix, then crop."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, runner.vocab_size, (prefix_len + 1024,), generator=g).to(runner.device)
    runner.reset()
    runner.forward(ids[:prefix_len], torch.arange(prefix_len, device=runner.device))
    cuda = torch.device(runner.device).type == "cuda"

    def verify(n: int) -> None:
        m = n + 1
        mask = torch.ones(m, m, dtype=torch.bool, device=runner.device).tril()
        runner.forward(ids[prefix_len:prefix_len + m], torch.arange(prefix_len, prefix_len + m, device=runner.device),
                       tree_mask=mask)
        if cuda:
            torch.cuda.synchronize(runner.device)
        runner.crop(prefix_len)

    return verify
