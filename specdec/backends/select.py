"""Which Runner drives a model: chosen once per call, compact runners kept per model."""
from __future__ import annotations

import sys
import weakref

import torch

from ..ops import exact as exact_ops
from .base import Runner
from .batch import BatchRunner
from .generic import HFRunner

BACKENDS = ("auto", "generic", "compact", "graphs")
# compact runners kept per model, so CUDA graphs and the static cache outlive one call
KEPT_RUNNERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_FALLBACKS: set[str] = set()


def as_runner(model, backend: str, capacity: int, exact: bool | str | None = None) -> Runner:
    """A Runner for ``model`` with room for ``capacity`` positions, in the exact mode
    ``exact`` (``ops.exact.resolve``; only the compact runtime has one: an explicit request
    elsewhere is an error).

    "auto": on CUDA the compact static-cache runtime replayed from CUDA graphs ("graphs")
    when the architecture is supported, else the generic transformers backend (one log line
    says why); on CPU the generic backend. "compact": the compact runtime, eager. "graphs":
    the compact runtime from CUDA graphs. "generic": transformers' own forward."""
    if isinstance(model, Runner):
        _check_exact(model, exact)
        return model
    requested = backend
    backend, param, mode = _choose(model, backend, exact, "Runner")
    if backend == "generic":
        return _check_exact(HFRunner(model), exact)
    kept = KEPT_RUNNERS.setdefault(model, {})
    key = (backend, param.device, param.dtype, mode)
    runner = kept.get(key)
    if runner is None or runner.max_length < min(capacity, runner.model.max_position_embeddings):
        from ..models import unsupported_reason
        from .compact import DEFAULT_MAX_LENGTH, CompactRunner

        compact = CompactRunner.from_hf(model, max_length=max(capacity, DEFAULT_MAX_LENGTH), exact=mode)
        if compact is None:
            reason = unsupported_reason(model)
            if requested != "auto":
                raise ValueError(f"backend={backend!r} does not support this model: {reason}; "
                                 "use backend='generic'")
            _note_fallback(model, reason)
            return _check_exact(HFRunner(model), exact)
        if backend == "graphs":
            from .cuda_graphs import GraphedCompactRunner

            runner = GraphedCompactRunner(compact)
        else:
            runner = compact
        kept.clear()  # one static cache per model at a time
        kept[key] = runner
    return runner


KEPT_BATCH_RUNNERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def as_batch_runner(model, backend: str, rows: int, capacity: int, exact: bool | str | None = None) -> BatchRunner:
    """A BatchRunner for ``rows`` sequences of up to ``capacity`` positions each (#23).

    "auto": on CUDA the compact runtime's packed batch (``CompactBatchRunner``) where the
    architecture is supported, else the generic transformers backend (``HFBatchRunner``);
    on CPU the generic backend. "compact": the compact packed batch, eager; "graphs" (and
    "auto" on CUDA): the same replayed from CUDA graphs per token bucket where they can run.
    Compact runners are kept per model and reused while they are big enough."""
    from .generic_batch import HFBatchRunner

    if isinstance(model, BatchRunner):
        return _check_exact(model, exact)
    if isinstance(model, Runner):
        raise TypeError(f"a batch needs a model or a BatchRunner, got the one-sequence {type(model).__name__}; "
                        "pass the transformers model (or a specdec.backends.compact_batch.CompactBatchRunner)")
    requested = backend
    backend, param, mode = _choose(model, backend, exact, "BatchRunner")
    if backend == "generic":
        return _check_exact(HFBatchRunner(model), exact)
    kept = KEPT_BATCH_RUNNERS.setdefault(model, {})
    key = (backend, param.device, param.dtype, mode)
    runner = kept.get(key)
    if runner is None or runner.max_rows < rows or runner.max_length < min(capacity, runner.model.max_position_embeddings):
        from ..models import unsupported_reason
        from .compact_batch import CompactBatchRunner

        length = -(-capacity // 256) * 256  # rounded up, so close calls reuse the runner
        runner = None
        try:
            runner = CompactBatchRunner.from_hf(model, max_rows=rows, max_length=length, exact=mode,
                                                mode="eager" if backend == "compact" else None)
            reason = None if runner is not None else unsupported_reason(model)
        except ValueError as e:  # e.g. attention soft-capping (the packed forward does not cover it)
            reason = str(e)
        if runner is None:
            if requested != "auto":
                raise ValueError(f"backend={requested!r} cannot batch this model: {reason}; use backend='generic'")
            _note_fallback(model, reason)
            return _check_exact(HFBatchRunner(model), exact)
        kept.clear()  # one batch cache per model at a time
        kept[key] = runner
    return runner


def _choose(model, backend: str, exact, runner_kind: str) -> tuple[str, torch.nn.Parameter, str | None]:
    """Checks shared by both selectors -> (backend with "auto" resolved, first parameter, the
    compact runtime's exact mode; None for the generic backend)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a transformers causal LM or a specdec {runner_kind}, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    param = next(model.parameters())
    if param.device.type == "meta":
        raise ValueError("the model is on the meta device (its weights were never loaded); load it with "
                         "real weights (from_pretrained without device_map='meta', or model.to_empty + load)")
    if backend == "auto":
        backend = "graphs" if param.device.type == "cuda" else "generic"
    mode = None if backend == "generic" else exact_ops.resolve(exact, param.dtype, param.device)
    return backend, param, mode


def _check_exact(runner: Runner, exact: bool | str | None) -> Runner:
    """An explicit ``exact`` the runner does not run in is an error, not a silent downgrade."""
    if exact is None:
        return runner
    want = exact_ops.resolve(exact, torch.float32, "cpu")
    have = getattr(runner, "exact", "off")
    if want != have:
        how = ("build it with CompactRunner.from_hf(model, exact=...)" if hasattr(runner, "exact") else
               "only the compact runtime (backend='compact' or 'graphs', supported architectures) has an exact mode")
        raise ValueError(f"exact={exact!r} asked for, but this {type(runner).__name__} runs with exact mode "
                         f"{have!r}: {how}, or leave exact=None")
    return runner


def _note_fallback(model, reason: str) -> None:
    name = type(model).__name__
    if name not in _FALLBACKS:
        _FALLBACKS.add(name)
        print(f"specdec: {name} runs on the generic transformers backend ({reason})", file=sys.stderr, flush=True)
