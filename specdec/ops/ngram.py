"""N-gram index for n-gram drafting: native ``specdec._C.NgramIndex`` when built,
else the pure-Python reference ``NgramIndexRef`` (same API and results)."""
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
