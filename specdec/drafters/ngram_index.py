"""NgramIndexRef: the pure-Python reference of the native ``specdec._C.NgramIndex``.

Same constructor, methods and results as csrc/ngram_index.{h,cpp}; it is the test
oracle and the fallback when the extension is not built. Get one through
``specdec.ops.ngram.make_ngram_index`` rather than constructing either directly.

Semantics (kept word for word in csrc/ngram_index.h):

- key: an n-gram of token ids, ``1 <= n <= max_order``; continuation: the 1 to
  ``max_continuation`` tokens that followed it. An *entry* is one (key,
  continuation) pair; at most ``capacity`` entries in all, ``max_per_key`` per key.
- ``_record(key, c)``, the primitive every insert is made of:
  1. if an entry of ``key`` starts with ``c`` (prefix or equal), touch the most
     recent such entry (make it the most recent) and stop;
  2. else if an entry of ``key`` is a strict prefix of ``c``, remove it;
  3. add ``(key, c)`` as the most recent entry; drop the key's least recent entry
     beyond ``max_per_key``; drop the least recent entry of all while more than
     ``capacity`` (LRU).
- ``insert(tokens, start=0)``: for e in ``[max(start, 1), len(tokens))`` ascending,
  n in ``1..min(max_order, e)`` ascending: ``_record(tokens[e-n:e], tokens[e:e+max_continuation])``.
- ``insert_next(context, next_tokens)``: for n in ``1..min(max_order, len(context))``
  ascending, t in ``next_tokens`` last to first: ``_record(context[-n:], [t])``.
- ``lookup(context, max_candidates)``: keys ``context[-n:]`` for n from
  ``min(max_order, len(context))`` down to 1, each key's entries most recent first,
  skipping a continuation equal to or a prefix of one already returned; at most
  ``max_candidates``. Read-only.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

Tokens = tuple[int, ...]


def _is_prefix(a: Sequence[int], b: Sequence[int]) -> bool:
    return len(a) <= len(b) and tuple(b[:len(a)]) == tuple(a)


class NgramIndexRef:
    """Bounded pool of n-gram -> continuation entries (reference implementation)."""

    def __init__(self, max_order: int = 4, max_continuation: int = 8, capacity: int = 65536,
                 max_per_key: int = 8):
        for name, v in (("max_order", max_order), ("max_continuation", max_continuation),
                        ("capacity", capacity), ("max_per_key", max_per_key)):
            if int(v) < 1:
                raise ValueError(f"NgramIndex: {name} must be >= 1, got {v}")
        self._max_order, self._max_cont = int(max_order), int(max_continuation)
        self._capacity, self._max_per_key = int(capacity), int(max_per_key)
        self._map: dict[Tokens, list[Tokens]] = {}  # key -> continuations, most recent first
        self._lru: OrderedDict[tuple[Tokens, Tokens], None] = OrderedDict()  # least recent first

    # ------------------------------------------------------------ properties
    max_order = property(lambda self: self._max_order)
    max_continuation = property(lambda self: self._max_cont)
    capacity = property(lambda self: self._capacity)
    max_per_key = property(lambda self: self._max_per_key)

    def __len__(self) -> int:
        return len(self._lru)

    def num_keys(self) -> int:
        return len(self._map)

    def clear(self) -> None:
        self._map.clear()
        self._lru.clear()

    def continuations(self, key: Sequence[int]) -> list[list[int]]:
        """The continuations of one key, most recent first."""
        return [list(c) for c in self._map.get(tuple(key), [])]

    # ---------------------------------------------------------------- writes
    def _drop(self, key: Tokens, cont: Tokens) -> None:
        items = self._map[key]
        items.remove(cont)
        if not items:
            del self._map[key]
        del self._lru[(key, cont)]

    def _record(self, key: Tokens, cont: Tokens) -> None:
        items = self._map.setdefault(key, [])
        for i, e in enumerate(items):  # 1. touch an entry that starts with cont
            if _is_prefix(cont, e):
                items.insert(0, items.pop(i))
                self._lru.move_to_end((key, e))
                return
        for i, e in enumerate(items):  # 2. cont extends an entry: replace it
            if _is_prefix(e, cont):
                items.pop(i)
                del self._lru[(key, e)]
                break
        items.insert(0, cont)  # 3. add; per-key cap; global LRU cap
        self._lru[(key, cont)] = None
        if len(items) > self._max_per_key:
            del self._lru[(key, items.pop())]
        while len(self._lru) > self._capacity:
            self._drop(*next(iter(self._lru)))

    def insert(self, tokens: Sequence[int], start: int = 0) -> None:
        """tokens: [L]; record every n-gram whose continuation starts at e >= start."""
        if start < 0:
            raise ValueError(f"NgramIndex.insert: start must be >= 0, got {start}")
        t = tuple(int(x) for x in tokens)
        for e in range(max(start, 1), len(t)):
            cont = t[e:e + self._max_cont]
            for n in range(1, min(self._max_order, e) + 1):
                self._record(t[e - n:e], cont)

    def insert_next(self, context: Sequence[int], next_tokens: Sequence[int]) -> None:
        """context: [C]; next_tokens: [k] the target's next tokens after it, best first."""
        ctx = tuple(int(x) for x in context[len(context) - min(self._max_order, len(context)):])
        nxt = [int(x) for x in next_tokens]
        for n in range(1, len(ctx) + 1):
            for tok in reversed(nxt):
                self._record(ctx[len(ctx) - n:], (tok,))

    # ----------------------------------------------------------------- reads
    def lookup(self, context: Sequence[int], max_candidates: int) -> list[list[int]]:
        """context: [C] -> at most max_candidates continuations, longest key first."""
        if max_candidates < 0:
            raise ValueError(f"NgramIndex.lookup: max_candidates must be >= 0, got {max_candidates}")
        ctx = tuple(int(x) for x in context[len(context) - min(self._max_order, len(context)):])
        out: list[Tokens] = []
        for n in range(len(ctx), 0, -1):
            if len(out) >= max_candidates:
                break
            for c in self._map.get(ctx[len(ctx) - n:], ()):
                if any(_is_prefix(c, o) for o in out):
                    continue
                out.append(c)
                if len(out) >= max_candidates:
                    break
        return [list(c) for c in out]
