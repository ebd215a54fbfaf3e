"""CompactBatchRunner: the BatchRunner protocol on a compact model (#23).

B sequences share one flat static cache: row b owns slots [b * S, (b + 1) * S), S positions
per row (``StaticKVCache`` with capacity B * S; its own ``length`` is unused). A forward packs
every given row's new tokens into one [m] run (``CompactModel.forward_packed``): the linear
layers see all m rows at once (the weights stream once for the batch), attention reads each
row's own prefix and tree ancestors (``ops.attention.packed_attention_exact``), so a row's
logits do not depend on its neighbours, and in the exact mode they are bitwise what the row
decoded alone computes. Commit compacts one row's accepted entries inside its own range.

CUDA graphs: a forward of m <= 128 tokens whose trees are at most ANC_WIDTH deep is padded
to a token bucket M (8, 16, ..., 128) and replayed from a graph captured on the bucket's first
use. Its inputs are one static int64 block [6 + ANC_WIDTH, M] (ids, positions, slots, prefix
bases and lengths, ancestor counts, ancestor lists) filled by one copy per step. Padding rows
attend only to themselves and write into a scratch range past the last row, so the real
rows' logits are those of the unpadded forward. Prefills and deeper trees run eagerly. Mode
"static" runs the padded forward uncaptured (any device: what the tests check on CPU).
"""
from __future__ import annotations

import sys

import torch

from ..models import CompactModel, load_compact
from ..ops import attention as attn_ops
from ..ops import exact as exact_ops
from ..ops import kv as kv_ops
from .batch import BatchRunner, RowInput
from .compact import DEFAULT_MAX_LENGTH
from .cuda_graphs import capture, graph_issue

TOKEN_BUCKETS = (8, 16, 32, 64, 128)
ANC_WIDTH = 16  # ancestor-list width of the graphed forwards (trees up to 15 deep below their root)
MODES = ("graph", "static", "eager")
_SELF = (torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32))  # one token's ancestor list


class CompactBatchRunner(BatchRunner):
    def __init__(self, model: CompactModel, *, max_rows: int, max_length: int | None = None,
                 exact: bool | str | None = None, mode: str | None = None):
        """``max_rows``: the most sequences a batch may hold; ``max_length``: positions per row
        (prompt + generated + one tree; default min(model context, DEFAULT_MAX_LENGTH));
        ``exact``: as ``CompactRunner``; ``mode``: "graph" (default where CUDA graphs can run,
        else "eager"), "static" or "eager" (see the module). The cache takes
        (max_rows + 1) * max_length positions (one row of scratch for padding)."""
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        issue = model.static_forward_issue()
        if issue is not None:
            raise ValueError(f"batched decoding cannot run this model: {issue}")
        self.model = model
        model.exact = exact_ops.resolve(exact, model.dtype, model.device)
        self.max_rows = int(max_rows)
        self.max_length = min(model.max_position_embeddings, max_length or DEFAULT_MAX_LENGTH)
        self.vocab_size = model.vocab_size
        self.device = model.device
        self.cache = model.new_cache((self.max_rows + 1) * self.max_length)
        self.rows = 0
        self._lengths: list[int] = []
        self._released: set[int] = set()
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
        if mode in (None, "graph"):
            mode = "graph" if graph_issue(self) is None else "eager"
        self.mode = mode
        self.buckets = tuple(b for b in TOKEN_BUCKETS if b <= self.max_length)
        self._graphs: dict[int, tuple] = {}  # bucket -> (static block, graph or None, output)
        self._pool = None

    @classmethod
    def from_hf(cls, hf_model, *, max_rows: int, max_length: int | None = None,
                exact: bool | str | None = None, mode: str | None = None) -> CompactBatchRunner | None:
        """A runner sharing ``hf_model``'s weights, or None if the architecture is not covered."""
        model = load_compact(hf_model)
        return None if model is None else cls(model, max_rows=max_rows, max_length=max_length, exact=exact,
                                              mode=mode)

    @property
    def exact(self) -> str:
        return self.model.exact

    def reset(self, rows: int) -> None:
        if not 1 <= rows <= self.max_rows:
            raise ValueError(f"a batch of {rows} rows does not fit this runner's cache of {self.max_rows} rows; "
                             f"build it with max_rows >= {rows} (or decode fewer rows at once)")
        self.rows = rows
        self._lengths = [0] * rows
        self._released = set()

    def length(self, row: int) -> int:
        return self._lengths[row]

    @torch.inference_mode()
    def forward(self, inputs: list[RowInput]) -> list[torch.Tensor]:
        """One packed forward (see the module); logits [m_b, vocab] fp32 per input."""
        self.check_rows(inputs)
        if not inputs:
            raise ValueError("forward needs at least one row")
        for inp in inputs:
            if inp.row in self._released:
                raise ValueError(f"row {inp.row} was released")
        dev, S = self.device, self.max_length
        ids, pos, slots, base, plen, anc_rows, counts = [], [], [], [], [], [], []
        offset = 0
        for inp in inputs:
            m, L = inp.input_ids.shape[0], self._lengths[inp.row]
            if m == 1:  # a one-token step (plain decoding): it sees itself
                anc, cnt = _SELF
            else:
                mask = (torch.ones(m, m, dtype=torch.bool).tril() if inp.tree_mask is None
                        else inp.tree_mask.to("cpu", torch.bool))
                anc, cnt = attn_ops.ancestor_lists(mask)  # [m, m] local rows, padded with m
            anc_rows.append(anc + offset)  # (entries past cnt are never read)
            counts.append(cnt)
            ids.append(inp.input_ids.reshape(-1).cpu())
            pos.append(inp.position_ids.reshape(-1).cpu())
            slots.append(inp.row * S + L + torch.arange(m))
            base.append(torch.full((m,), inp.row * S))
            plen.append(torch.full((m,), L))
            offset += m
        width = max(int(c.max()) for c in counts)
        bucket = next((b for b in self.buckets if b >= offset), None) if self.mode != "eager" else None
        rows = bucket or offset
        # one int64 block [6 + A, rows]: ids, pos, slots, base, plen, cnt, then the ancestor lists
        A = ANC_WIDTH if bucket is not None and width <= ANC_WIDTH else width
        block = torch.zeros(6 + A, rows, dtype=torch.long)
        for k, part in enumerate((ids, pos, slots, base, plen, counts)):
            block[k, :offset] = torch.cat(part)
        start = 0
        for a in anc_rows:
            w = min(a.shape[1], A)
            block[6:6 + w, start:start + a.shape[0]] = a[:, :w].T
            start += a.shape[0]
        if rows > offset:  # padding rows: each sees only itself, written in the scratch range
            pad = torch.arange(offset, rows)
            scratch = self.max_rows * S
            block[2, offset:], block[3, offset:], block[5, offset:], block[6, offset:] = scratch + pad, scratch, 1, pad
        if bucket is not None and width <= ANC_WIDTH:
            logits = self._run_bucket(bucket, block)[:offset]
        else:
            logits = self._forward_block(block.to(dev))[:offset]
        for inp in inputs:
            self._lengths[inp.row] += inp.input_ids.shape[0]
        return list(logits.float().split([inp.input_ids.shape[0] for inp in inputs]))

    def _forward_block(self, block: torch.Tensor) -> torch.Tensor:
        """forward_packed on a [6 + A, rows] block (on the device) -> logits [rows, vocab]."""
        return self.model.forward_packed(block[0], block[1], self.cache, block[2], block[3], block[4],
                                         block[6:].T.to(torch.int32), block[5].to(torch.int32))

    def _run_bucket(self, bucket: int, block: torch.Tensor) -> torch.Tensor:
        """The padded forward of one token bucket: its static block refilled, then a graph
        replay (captured on first use; "static" mode runs it uncaptured)."""
        if bucket not in self._graphs:
            self._graphs[bucket] = (torch.zeros_like(block, device=self.device), None, None)
        static, graph, out = self._graphs[bucket]
        static.copy_(block, non_blocking=True)
        if self.mode == "static":
            return self._forward_block(static)
        if graph is None:
            self.captures += 1
            try:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph, out = capture(lambda: self._forward_block(static), self.device, warmup=2, pool=self._pool,
                                     verify_tol=1e-3 if self.model.dtype == torch.float32 else 3e-2)
            except Exception as e:  # noqa: BLE001 -- any failure: say why once, run eagerly from now on
                self.mode = "eager"
                self._graphs.clear()
                print(f"specdec: CUDA graphs off for batches (capture of bucket {bucket} failed: "
                      f"{type(e).__name__}: {e}); the packed forward runs eagerly", file=sys.stderr, flush=True)
                return self._forward_block(static)
            self._graphs[bucket] = (static, graph, out)
            return out
        graph.replay()
        return out

    def commit(self, row: int, start: int, keep_idx: torch.Tensor) -> None:
        """Keep row ``row``'s entries [0, start) plus start + keep_idx, compacted in its range."""
        if row in self._released or not 0 <= row < self.rows:
            raise ValueError(f"commit: row {row} is not a live row of this batch")
        a = int(keep_idx.numel())
        if start < 0 or start + a > self._lengths[row]:
            raise ValueError(f"commit: start {start} + {a} kept entries exceed row {row}'s length {self._lengths[row]}")
        prefix = keep_idx.device.type == "cpu" and bool((keep_idx == torch.arange(a)).all())
        if a and not prefix:
            first = row * self.max_length + start
            idx = keep_idx.to(device=self.device, dtype=torch.long)  # [a]
            kv_ops.compact_kv(self.cache.k, self.cache.v, idx, start=first)
            self.cache.pos[first:first + a] = self.cache.pos[idx + first]
        self._lengths[row] = start + a

    def release(self, row: int) -> None:
        if row in self._released or not 0 <= row < self.rows:
            raise ValueError(f"release: row {row} is not a live row of this batch")
        self._released.add(row)
