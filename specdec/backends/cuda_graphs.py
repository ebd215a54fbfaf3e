"""CUDA graphs for the compact runner: one captured forward per tree-size bucket.

A verify step of the compact model is hundreds of small kernels (a 30-layer model at
m <= 128 tokens is launch-bound in eager mode). ``GraphedCompactRunner`` captures
``CompactModel.forward_static`` -- the graph-safe forward: no host syncs, shapes
fixed by the token count -- once per bucket size B (1, 2, 4, ..., 128) and replays it:

- the m tokens of a call are padded to the smallest bucket B >= m. The static inputs
  are ``ids`` [B], ``pos`` [B], ``mask`` [B, B] bool (packed inside the graph) and one
  shared ``start`` [1] int64 = the cache length; the graph reads them, so a replay is
  valid at any cache length. Padding rows keep earlier (valid) ids; with sliding-window
  layers they take the last real position, so the window kernel skips as many prefix
  tiles as it would unpadded;
- padding rows see only themselves and no real row sees them (the real tree mask sits
  in the top-left [m, m] block, identity elsewhere), so the real rows' logits are
  those of the unpadded forward. Padding K/V land in slots [length + m, length + B),
  past every committed entry; the cache length advances by m only, so the next
  forward overwrites them. A call whose padded slots would pass the cache's capacity
  runs eagerly;
- plain decode is bucket 1; causal chunks of up to 128 tokens use a lower-triangular
  mask. Prefill chunks longer than the largest bucket, masks that cover cached
  entries (``mask_start < length``) and anything else unusual run the wrapped
  ``CompactRunner`` eagerly -- the same answer, just slower.

Graphs are captured lazily, on a bucket's first use (warm-up on a side stream, then
capture, as the PyTorch docs require; all buckets share one memory pool). The first
replay of every bucket is checked against the warm-up's eager result. If capture or
that check fails, or the model/device cannot be captured (CPU; no Triton, whose tree
attention kernel reads the prefix length from device memory; attention soft-capping),
the runner prints the reason once and runs the eager ``CompactRunner`` from then on.
``SPECDEC_DISABLE_CUDA_GRAPHS=1`` turns graphs off.
"""
from __future__ import annotations

import os
import sys
from collections import Counter

import torch

from ..ops import backend
from ..ops.attention import pack_tree_mask
from .compact import CompactRunner
from .base import Runner

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
MODES = ("graph", "static", "eager")  # captured graphs / the padded static forward, uncaptured / plain runner


def graph_issue(runner: CompactRunner) -> str | None:
    """Why this runner's forward cannot be captured in a CUDA graph, or None."""
    device = torch.device(runner.device)
    if device.type != "cuda":
        return f"the model is on {device.type}, not CUDA"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if os.environ.get("SPECDEC_DISABLE_CUDA_GRAPHS") == "1":
        return "SPECDEC_DISABLE_CUDA_GRAPHS=1"
    if not backend.use_triton(device):
        return "Triton is unavailable or disabled (the PyTorch tree attention reads the prefix length on the host)"
    return runner.model.static_forward_issue()


def capture(forward, device: torch.device, *, warmup: int, pool, verify_tol: float | None
            ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture ``forward()`` (graph-safe, returns a tensor or a tuple of tensors) in a CUDA graph
    on ``pool``: warm-up on a side stream with host syncs made errors, capture, replay once, and
    (``verify_tol``) check the replay's (first) tensor against the warm-up's. Returns (graph,
    its output as ``forward`` returns it)."""
    torch.cuda.synchronize(device)  # surface earlier asynchronous errors here, not in the capture
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    # Warm-up (Triton compiles, cuBLAS picks its kernels) with host syncs made errors: a
    # forward that syncs must fail here, before capturing -- an aborted capture leaves
    # the CUDA RNG in capture state and breaks every later torch.randn in the process.
    previous = torch.cuda.get_sync_debug_mode()
    try:
        with torch.cuda.stream(side):
            for i in range(warmup + 1):  # the first call may initialise lazily (and sync)
                if i == 1:
                    torch.cuda.set_sync_debug_mode("error")
                ref = forward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward()
    graph.replay()  # the capture recorded the work; this runs it
    result = out
    if isinstance(out, tuple):
        out, ref = out[0], ref[0]
    if verify_tol is not None:
        torch.cuda.synchronize(device)
        scale = max(1.0, float(ref.abs().nan_to_num(0.0).max()))
        same_nans = bool(torch.equal(out.isnan(), ref.isnan()))
        diff = (out - ref).abs().masked_fill(out.isnan() & ref.isnan(), 0.0)
        err = float(diff.nan_to_num(float("inf")).max())
        # Same kernels on the same inputs: a replay should match to rounding (cuBLAS may
        # pick another algorithm inside a capture). This catches garbage, not ulps.
        if not same_nans or err > verify_tol * scale:
            raise RuntimeError(f"replay differs from the uncaptured forward (max abs err {err:.3g}, "
                               f"scale {scale:.3g}, NaNs {'agree' if same_nans else 'differ'})")
    return graph, result


class _Bucket:
    """Static inputs (and, once captured, the graph and its output) of one bucket size."""

    def __init__(self, size: int, device: torch.device):
        self.size = size
        self.ids = torch.zeros(size, dtype=torch.long, device=device)  # [B]
        self.pos = torch.zeros(size, dtype=torch.long, device=device)  # [B]
        self.eye = torch.eye(size, dtype=torch.bool, device=device)  # [B, B]
        self.tril = torch.ones(size, size, dtype=torch.bool, device=device).tril()  # [B, B]
        self.mask = self.eye.clone()  # [B, B] bool, True = visible
        self.mask_kind = "eye"  # what the mask buffer holds: "eye", "causal" or "tree"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: tuple[torch.Tensor, torch.Tensor] | None = None  # logits [B, vocab] fp32, residual [B, hidden]


class GraphedCompactRunner(Runner):
    """The Runner protocol on a ``CompactRunner``, with its forward replayed from CUDA
    graphs captured per tree-size bucket (see the module docstring).

    ``mode``: "graph" (the default: captured graphs; where ``graph_issue`` objects --
    e.g. on CPU -- the reason is printed once and the runner is "eager"), "static" (the
    padded graph-safe forward run uncaptured: any device, for tests and debugging) or
    "eager" (every call goes to the wrapped runner). ``clone_outputs``: return a copy of the
    logits (the graph's output buffer is overwritten by the next replay of that
    bucket); turn off only when the caller consumes the logits before the next forward.
    """

    def __init__(self, runner: CompactRunner, *, buckets=DEFAULT_BUCKETS, mode: str | None = None,
                 clone_outputs: bool = True, warmup: int = 2, verify_capture: bool = True):
        if not isinstance(runner, CompactRunner):
            raise TypeError(f"GraphedCompactRunner wraps a CompactRunner, got {type(runner).__name__}")
        sizes = sorted({int(b) for b in buckets})
        if not sizes or sizes[0] < 1:
            raise ValueError(f"buckets must be positive token counts, got {buckets!r}")
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
        self.runner = runner
        self.model = runner.model
        self.cache = runner.cache
        self.vocab_size = runner.vocab_size
        self.max_length = runner.max_length
        self.device = torch.device(runner.device)
        self.buckets = tuple(sizes)
        self.clone_outputs = clone_outputs
        self.warmup = max(1, int(warmup))
        self.verify_capture = verify_capture
        self.captures = 0  # graphs captured so far: a forward that captured took far longer than a replay
        self.disabled_reason: str | None = None
        self.eager_calls: Counter[str] = Counter()  # why calls went to the eager runner
        self._buckets: dict[int, _Bucket] = {}
        self._all_captured = False
        self._pool = None
        self._start = torch.zeros(1, dtype=torch.long, device=self.device)  # [1] cache length
        self._pack = backend.use_triton(self.device)  # the kernel takes packed masks; the reference unpacks
        self._windowed = any(getattr(layer.self_attn, "window", None) is not None for layer in self.model.model.layers)
        if mode in (None, "graph"):
            issue = graph_issue(runner)
            if issue is not None:
                mode = "eager"
                self._note_disabled(issue)
            else:
                mode = "graph"
        elif mode == "static":
            issue = runner.model.static_forward_issue()
            if issue is not None:
                raise ValueError(f"mode='static' cannot run this model: {issue}")
        self.mode = mode

    # ------------------------------------------------------------------ Runner protocol
    @property
    def length(self) -> int:
        return self.runner.length

    @property
    def exact(self) -> str:
        """The wrapped runner's exact mode (``CompactRunner.exact``)."""
        return self.runner.exact

    def reset(self) -> None:
        self.runner.reset()

    def commit(self, start: int, keep_idx: torch.Tensor) -> None:
        self.runner.commit(start, keep_idx)

    def crop(self, length: int) -> None:
        self.runner.crop(length)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                tree_mask: torch.Tensor | None = None, mask_start: int | None = None) -> torch.Tensor:
        """As ``CompactRunner.forward``: input_ids [m], position_ids [m], tree_mask
        [m, length - mask_start + m] bool (None = causal). Returns logits [m, vocab] fp32."""
        size = self._bucket_size(input_ids, position_ids, tree_mask, mask_start)
        if size is None:
            return self._eager(input_ids, position_ids, tree_mask, mask_start)
        m = input_ids.shape[0]
        st = self._bucket(size)
        st.ids[:m].copy_(input_ids)  # padding rows keep earlier (valid) ids and positions
        st.pos[:m].copy_(position_ids)
        if self._windowed and m < size:  # the window kernel skips prefix tiles by the least position
            st.pos[m:].copy_(st.pos[m - 1:m].expand(size - m))
        self._load_mask(st, m, tree_mask)
        self._start.fill_(self.cache.length)
        out = self._execute(st)
        if out is None:  # capture failed just now: graphs are off, run this call eagerly
            return self._eager(input_ids, position_ids, tree_mask, mask_start)
        self.cache.advance(m)
        logits, hidden = out[0][:m], out[1][:m]
        self.last_hidden = (hidden.clone() if self.clone_outputs else hidden) if self.keep_hidden else None
        return logits.clone() if self.clone_outputs else logits

    def _eager(self, input_ids, position_ids, tree_mask, mask_start) -> torch.Tensor:
        self.runner.keep_hidden = self.keep_hidden
        logits = self.runner.forward(input_ids, position_ids, tree_mask, mask_start)
        self.last_hidden = self.runner.last_hidden
        return logits

    def prefill(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> None:
        """The prompt, through the bucket graphs when it fits one. The first prefill captures
        every bucket, so a later prompt of a new length never pays a capture on its request
        (a capture costs ~0.1-1 s; the first call pays them all once)."""
        if self.mode == "graph" and not self._all_captured:
            self.capture()
            self._all_captured = True
        self.forward(input_ids, position_ids)

    # ------------------------------------------------------------------ extras
    def capture(self, buckets=None) -> list[int]:
        """Capture now (instead of on first use) the given buckets (default: all) at the
        current cache length; returns the sizes captured. Writes only past the cache
        length. Buckets that do not fit the remaining capacity are skipped."""
        if self.mode != "graph":
            return []
        done = []
        with torch.inference_mode():
            for size in sorted(self.buckets if buckets is None else {int(b) for b in buckets}):
                if size not in self.buckets or self.cache.length + size > self.cache.max_length:
                    continue
                st = self._bucket(size)
                if st.graph is None:
                    self._start.fill_(self.cache.length)
                    if self._execute(st) is None:
                        break
                done.append(size)
        return done

    @property
    def pads_trees(self) -> bool:
        """Whether a tree's forward is padded to its bucket (its cost steps between buckets)."""
        return self.mode != "eager"

    def fit_nodes(self, n: int) -> int:
        """The most tree nodes <= ``n`` whose forward (root + nodes) fills its padded bucket
        exactly: a 4-node tree pays for an 8-slot bucket, 3 nodes fit in 4 for less.
        ``generate`` trims every step's node budget with this; a budget past the largest
        bucket is cut to fit it (a replay costs a fraction of the eager forward a bigger
        tree would need). Without padding (eager mode) budgets are unchanged."""
        if self.mode == "eager" or n < 1:
            return n
        fit = max(b for b in self.buckets if b <= n + 1) - 1
        return fit if fit >= 1 else n  # never turn drafting off

    def describe(self) -> dict:
        return {"mode": self.mode, "buckets": list(self.buckets),
                "captured": sorted(s for s, b in self._buckets.items() if b.graph is not None),
                "disabled_reason": self.disabled_reason, "eager_calls": dict(self.eager_calls)}

    # ------------------------------------------------------------------ internals
    def _bucket_size(self, input_ids, position_ids, tree_mask, mask_start) -> int | None:
        """The bucket for this call, or None to run it eagerly (reason counted)."""
        if self.mode == "eager":
            return None
        m = input_ids.shape[0] if input_ids.dim() == 1 else -1
        reason = None
        if m < 1 or position_ids.shape != input_ids.shape:
            reason = "bad shapes"  # the eager runner raises the proper error
        elif input_ids.is_floating_point() or position_ids.is_floating_point():
            reason = "non-integer ids or positions"
        elif m > self.buckets[-1]:
            reason = "more tokens than the largest bucket"
        elif tree_mask is not None and (tuple(tree_mask.shape) != (m, m) or
                                        (mask_start is not None and mask_start != self.cache.length)):
            reason = "mask covers cached entries"
        if reason is None:
            size = next(b for b in self.buckets if b >= m)
            if self.cache.length + size > self.cache.max_length:
                reason = "padded bucket exceeds the cache capacity"
            else:
                return size
        self.eager_calls[reason] += 1
        return None

    def _bucket(self, size: int) -> _Bucket:
        if size not in self._buckets:
            self._buckets[size] = _Bucket(size, self.device)
        return self._buckets[size]

    @staticmethod
    def _load_mask(st: _Bucket, m: int, tree_mask: torch.Tensor | None) -> None:
        """Top-left [m, m] = the tree (or causal) mask; padding rows see only themselves."""
        if tree_mask is None:
            if st.mask_kind != "causal":  # a lower triangle: real rows never see the padding
                st.mask.copy_(st.tril)
                st.mask_kind = "causal"
            return
        if m < st.size:
            st.mask.copy_(st.eye)
        st.mask[:m, :m].copy_(tree_mask)
        st.mask_kind = "tree"

    def _static_forward(self, st: _Bucket) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded forward (what a graph captures): logits [B, vocab] fp32 and the residual
        stream into the final norm [B, hidden] (the hidden states, ``Runner.keep_hidden``)."""
        mask = pack_tree_mask(st.mask) if self._pack else st.mask
        logits = self.model.forward_static(st.ids, st.pos, self.cache, self._start, mask).float()
        return logits, self.model.last_residual

    def _execute(self, st: _Bucket) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.mode == "static":
            return self._static_forward(st)
        if st.graph is None:
            try:
                self._capture(st)
            except Exception as e:  # noqa: BLE001 -- any failure: say why once, run eagerly
                self._disable(f"capture of bucket {st.size} failed: {type(e).__name__}: {e}")
                return None
            return st.out  # _capture replayed it once
        st.graph.replay()
        return st.out

    def _capture(self, st: _Bucket) -> None:
        self.captures += 1
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        st.graph, st.out = capture(lambda: self._static_forward(st), self.device, warmup=self.warmup,
                                   pool=self._pool, verify_tol=(1e-3 if self.model.dtype == torch.float32 else 3e-2)
                                   if self.verify_capture else None)

    def _disable(self, reason: str) -> None:
        self.mode = "eager"
        for st in self._buckets.values():
            st.graph, st.out = None, None
        self._note_disabled(reason)

    def _note_disabled(self, reason: str) -> None:
        """Record why graphs are off; print each distinct reason once per process."""
        self.disabled_reason = reason
        if reason not in _REPORTED:
            _REPORTED.add(reason)
            print(f"specdec: CUDA graphs off ({reason}); GraphedCompactRunner runs the eager CompactRunner",
                  file=sys.stderr, flush=True)


_REPORTED: set[str] = set()


__all__ = ["DEFAULT_BUCKETS", "GraphedCompactRunner", "graph_issue"]
