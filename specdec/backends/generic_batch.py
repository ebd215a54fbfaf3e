"""Generic batch backend: any transformers causal LM over B sequences at once (#23).

``HFBatchRunner`` is ``HFRunner`` (generic.py) for a ragged batch. The live rows share one
rectangular ``DynamicCache``, K/V [B, H, W, D]: row b's entries are columns [0, L_b) in order,
and columns [L_b, W) are holes that no query sees (W = the longest row).

A forward pads every given row's m_b new tokens to n = max m_b, and the model appends them at
columns [W, W + n) of every cache row. A 4D additive mask [B, 1, n, W + n] lets row b's real
tokens see its entries [0, L_b) and, among its new tokens, what its tree mask allows -- never
another row's keys. Rows not in the forward, and the padding tokens of the rows that are, run
a dummy token that sees only itself and that nobody sees. Right after the model call each row's
real new entries move down to [L_b, L_b + m_b) and the cache is cut to its longest row, so
"row b = columns [0, L_b)" holds again and ``commit`` is HFRunner's, on one row.

A released row leaves the cache batch (``index_select`` on the batch dimension): later
forwards are one row smaller. Rows keep their ids; ``_slots`` maps a row to its cache row.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from .batch import BatchRunner, RowInput
from .generic import HFRunner


class HFBatchRunner(BatchRunner):
    """A transformers model plus a KV cache of B rows. Implements ``BatchRunner``.

    ``max_rows`` caps the rows ``reset`` accepts (None: no cap)."""

    def __init__(self, model, max_rows: int | None = None):
        # HFRunner refuses what the generic backend cannot drive (encoder-decoders, flash
        # attention) and reads what the forward needs from the config; we take its findings.
        one = HFRunner(model)
        self.model, self.vocab_size, self.max_length = model, one.vocab_size, one.max_length
        self.device, self.dtype = one.device, one.dtype
        self.max_rows = max_rows
        # Hybrid sliding models take a {layer type: mask} dict, the sliding layers' mask with
        # ``_window``; Mistral v0.1 has ``_global_window`` in its one mask (see HFRunner).
        self._mask_dict, self._window, self._global_window = one._mask_dict, one.window, one._global_window
        self._cache_kwarg, self._keep_kwarg = one._cache_kwarg, one._keep_kwarg
        self.reset(0)

    def reset(self, rows: int) -> None:
        if rows < 0 or (self.max_rows is not None and rows > self.max_rows):
            raise ValueError(f"cannot make room for {rows} rows (this runner's max_rows is {self.max_rows})")
        self.rows = rows
        self._lengths = [0] * rows  # entries of each row (a released row keeps its last count)
        self._slots: list[int | None] = list(range(rows))  # each row's cache row; None once released
        self.cache = DynamicCache()
        self.key_pos = torch.zeros(rows, 0, dtype=torch.long, device=self.device)  # [B, W] position per column

    def length(self, row: int) -> int:
        if not 0 <= row < self.rows:
            raise ValueError(f"row {row} is not a row of this batch of {self.rows}")
        return self._lengths[row]

    @torch.no_grad()
    def forward(self, inputs: list[RowInput]) -> list[torch.Tensor]:
        logits = self._run(inputs).logits  # [B, n, vocab]
        return [logits[self._slots[inp.row], :inp.input_ids.shape[0]].float() for inp in inputs]

    @torch.no_grad()
    def prefill(self, inputs: list[RowInput]) -> None:
        """Append the prompts; the LM head runs on one position only, where the model allows."""
        self._run(inputs, **({self._keep_kwarg: 1} if self._keep_kwarg else {}))

    def commit(self, row: int, start: int, keep_idx: torch.Tensor) -> None:
        """As ``HFRunner.commit``, on one row: only the kept entries move; a prefix is a cut."""
        slot, length, idx = self._slot(row), self._lengths[row], keep_idx.tolist()
        if not (0 <= start <= length and all(0 <= i < length - start for i in idx)
                and all(a < b for a, b in zip(idx, idx[1:]))):
            raise ValueError(f"row {row}: cannot keep [0, {start}) + {start} + {idx} of its {length} entries "
                             "(keep_idx must be increasing, each entry cached)")
        if idx != list(range(len(idx))):
            sel = start + keep_idx.to(self.device)
            end = start + len(idx)
            for layer in self._layers():  # (index_select copies before the write)
                layer.keys[slot, :, start:end] = layer.keys[slot].index_select(1, sel)
                layer.values[slot, :, start:end] = layer.values[slot].index_select(1, sel)
            self.key_pos[slot, start:end] = self.key_pos[slot, sel]
        self._lengths[row] = start + len(idx)
        self._cut()

    def release(self, row: int) -> None:
        slot = self._slot(row)
        keep = torch.tensor([s for s in range(self.key_pos.shape[0]) if s != slot], dtype=torch.long,
                            device=self.device)
        for layer in self._layers():
            layer.keys, layer.values = layer.keys.index_select(0, keep), layer.values.index_select(0, keep)
        self.key_pos = self.key_pos.index_select(0, keep)
        self._slots = [None if s is None or s == slot else s - (s > slot) for s in self._slots]
        self._cut()

    # ------------------------------------------------------------------ internals

    def _slot(self, row: int) -> int:
        """The cache row of a known, unreleased row."""
        if not 0 <= row < self.rows or self._slots[row] is None:
            raise ValueError(f"row {row} is not a live row of this batch of {self.rows} "
                             f"(released: {[r for r, s in enumerate(self._slots) if s is None]})")
        return self._slots[row]

    def _layers(self) -> list:
        """The cache layers holding K/V [B, H, W, D] (none before the first forward)."""
        return [layer for layer in self.cache.layers if getattr(layer, "keys", None) is not None
                and layer.keys.dim() == 4]

    def _run(self, inputs: list[RowInput], **kw):
        """One model call appending each input's tokens to its row (see the module docstring)."""
        if not inputs:
            raise ValueError("a forward needs at least one row")
        self.check_rows(inputs)
        slots = [self._slot(inp.row) for inp in inputs]
        devices = {t.device for inp in inputs for t in (inp.input_ids, inp.position_ids, inp.tree_mask)
                   if t is not None}
        if len(devices) > 1:
            raise ValueError(f"the inputs lie on several devices ({sorted(map(str, devices))}); "
                             "give every row's tensors on one device")
        batch, width = self.key_pos.shape  # B, W
        n = max(inp.input_ids.shape[0] for inp in inputs)
        dev = self.device
        ids = torch.zeros(batch, n, dtype=torch.long, device=dev)  # dummies: token 0 at position 0
        pos = torch.zeros(batch, n, dtype=torch.long, device=dev)
        seen = torch.zeros(batch, n, width + n, dtype=torch.bool, device=dev)  # [B, n, W + n] query sees key
        seen[:, :, width:] = torch.eye(n, dtype=torch.bool, device=dev)  # a dummy sees only itself
        for slot, inp in zip(slots, inputs):
            m = inp.input_ids.shape[0]
            ids[slot, :m], pos[slot, :m] = inp.input_ids, inp.position_ids
            seen[slot, :m, :self._lengths[inp.row]] = True
            seen[slot, :m, width:width + m] = torch.ones(m, m, dtype=torch.bool, device=dev).tril() \
                if inp.tree_mask is None else inp.tree_mask
        attn = self._additive(seen, pos, self._global_window)
        if self._mask_dict:
            attn = {"full_attention": attn, "sliding_attention": self._additive(seen, pos, self._window)}
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=attn, **{self._cache_kwarg: self.cache},
                         use_cache=True, cache_position=torch.arange(width, width + n, device=dev), **kw)
        self.key_pos = torch.cat([self.key_pos, pos], dim=1)
        self._settle(inputs, slots, width)
        return out

    def _additive(self, seen: torch.Tensor, pos: torch.Tensor, window: int | None) -> torch.Tensor:
        """seen [B, n, W + n] bool, pos [B, n] -> [B, 1, n, W + n] additive float mask; a window
        hides keys whose position is ``window`` or more before the query's."""
        if window is not None:
            key_pos = torch.cat([self.key_pos, pos], dim=1)  # [B, W + n]
            seen = seen & (key_pos[:, None, :] > pos[:, :, None] - window)
        mask = torch.zeros(seen.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~seen, torch.finfo(self.dtype).min)[:, None]

    def _settle(self, inputs: list[RowInput], slots: list[int], width: int) -> None:
        """After a model call that appended at columns [W, W + n): move each row's m real new
        entries from [W, W + m) down to [L, L + m), count them, and cut the cache."""
        rows, src, dst = [], [], []
        for slot, inp in zip(slots, inputs):
            length, m = self._lengths[inp.row], inp.input_ids.shape[0]
            if length < width:
                rows += [slot] * m
                src += range(width, width + m)
                dst += range(length, length + m)
            self._lengths[inp.row] = length + m
        if rows:
            rows, src, dst = (torch.tensor(x, dtype=torch.long, device=self.device) for x in (rows, src, dst))
            for layer in self._layers():  # (the right side is gathered before the write)
                layer.keys[rows, :, dst] = layer.keys[rows, :, src]
                layer.values[rows, :, dst] = layer.values[rows, :, src]
            self.key_pos[rows, dst] = self.key_pos[rows, src]
        self._cut()

    def _cut(self) -> None:
        """Slice the cache to its longest live row (the columns past it are holes)."""
        width = max((n for n, s in zip(self._lengths, self._slots) if s is not None), default=0)
        if width < self.key_pos.shape[1]:
            self.key_pos = self.key_pos[:, :width]
            for layer in self._layers():
                layer.keys, layer.values = layer.keys[:, :, :width], layer.values[:, :, :width]
