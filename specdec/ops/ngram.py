"""N-gram index for n-gram drafting: native ``specdec._C.NgramIndex`` when built,
else the pure-Python reference ``NgramIndexRef`` (same API and results).

The native index stays for what it buys on the host, every step: after a 2000-token
prompt a decoding step's index work took 40 us native vs 474 us in Python, the prompt's
insert 6 ms vs 32 ms (one AMD EPYC core; 4000 tokens: 40 vs 713 us, 3.4 vs 74 ms); the
Python step alone took 307 us on an H100 host, next to a graphed SmolLM2 forward of
~1 ms (``benchmarks/bench_ops.py``, ``ngram`` rows)."""
from __future__ import annotations

from ..drafters.ngram_index import NgramIndexRef
from . import backend


def make_ngram_index(max_order: int = 4, max_continuation: int = 8, capacity: int = 65536,
                     max_per_key: int = 8, *, native: bool | None = None):
    """A new n-gram index (see csrc/ngram_index.h for the semantics).

    ``native``: None picks the native index when ``backend.native()`` has it; True
    requires it (RuntimeError if missing); False forces the reference."""
    ext = backend.native() if native is not False else None
    if ext is not None and hasattr(ext, "NgramIndex"):
        return ext.NgramIndex(max_order, max_continuation, capacity, max_per_key)
    if native:
        raise RuntimeError("make_ngram_index(native=True): specdec._C.NgramIndex is not built")
    return NgramIndexRef(max_order, max_continuation, capacity, max_per_key)


def has_native_ngram_index() -> bool:
    ext = backend.native()
    return ext is not None and hasattr(ext, "NgramIndex")


__all__ = ["make_ngram_index", "has_native_ngram_index", "NgramIndexRef"]
