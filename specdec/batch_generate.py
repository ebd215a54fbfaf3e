"""Batched speculative decoding (#23): B sequences, one target forward per step.

Each step every unfinished row drafts its own tree (its own drafter, its own budget), the
rows' trees are packed into ONE forward of the batch runner (``backends.batch``), and each
row accepts, commits and stops on its own -- exactly what ``generate`` does for one
sequence (the same ``_propose`` / ``_tree_inputs`` / ``_settle``), so a row's output is
the output of decoding that row alone (greedy: token-identical wherever the row's logits are,
which the exact mode makes bitwise in bf16 too; sampling: the target's distribution).

What the budget buys: a forward's cost grows with the tokens it packs once the batch
makes it compute-bound, so the tokens per forward are capped (``max_batch_tokens``) and
shared among the live rows, each row's share following its own acceptance; when the batch
alone fills the cap, speculation is off and the step is plain batched decoding. In greedy
decoding the loop also measures whether speculation pays (``_PaysCheck``: a plain step every
16 times the speculative rate against it) and turns it off for a while where it does not.
While it is off the rows' drafters are not updated either (on the host, per row, that costs
more than the plain step); each catches up from its row's tokens (``reset``) when drafting
resumes.
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field

import torch

from .backends.batch import RowInput
from .backends.select import as_batch_runner
from .config import SamplingParams, TreeBudget
from .drafters.base import NoDrafter, VerifyResult
from .generate import (GenerationStats, _check_inputs, _eos_set, _History, _propose, _Rules, _settle,
                       _tree_inputs)
from .node_processors import TreeLogitsProcessor

DEFAULT_MAX_BATCH_TOKENS = 64  # tokens per forward before speculation gives way (see the module)
MAX_DEPTH = 8


@dataclass
class BatchStats:
    """A batched call: forwards run, and each row's own stats (steps = forwards it took part in)."""

    forwards: int = 0
    rows: list[GenerationStats] = field(default_factory=list)
    prefill_time_s: float = 0.0
    total_time_s: float = 0.0
    loop: str = "batch"

    @property
    def new_tokens(self) -> int:
        return sum(r.new_tokens for r in self.rows)

    @property
    def mean_accepted_length(self) -> float:
        """Committed tokens per row-step (accepted + bonus), over all rows."""
        steps = sum(r.steps for r in self.rows)
        return self.new_tokens / steps if steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        t = self.total_time_s - self.prefill_time_s
        return self.new_tokens / t if t > 0 else 0.0

    def as_dict(self) -> dict:
        return {"forwards": self.forwards, "new_tokens": self.new_tokens,
                "mean_accepted_length": self.mean_accepted_length, "prefill_time_s": self.prefill_time_s,
                "total_time_s": self.total_time_s, "tokens_per_second": self.tokens_per_second,
                "rows": [r.as_dict() for r in self.rows]}


@dataclass
class BatchGenerationOutput:
    sequences: torch.Tensor  # [B, T + longest new]: the (padded) input ids, the new tokens, then pad
    stats: BatchStats
    new_token_lists: list[list[int]]  # each row's new tokens

    def new_tokens(self, row: int) -> torch.Tensor:
        return torch.tensor(self.new_token_lists[row], dtype=torch.long)


class _RowBudget:
    """A row's node budget: halves after a step that accepted nothing, grows back with accepted
    tokens; never above the row's share of the batch cap."""

    def __init__(self, cap: int):
        self.nodes = cap

    def next(self, share: int) -> TreeBudget:
        n = max(0, min(self.nodes, share))
        return TreeBudget(max_nodes=n, max_depth=min(n, MAX_DEPTH))

    def record(self, accepted: int, share: int) -> None:
        self.nodes = max(1, self.nodes // 2) if accepted == 0 else max(self.nodes, min(share, 2 * (accepted + 1)))


class _PaysCheck:
    """Greedy only: whether speculation pays on this batch, measured. Every ``probe_every``-th
    step runs plain (no row drafts) and times it; speculative steps are timed too. When the
    recent speculative rate (committed tokens per second) falls below the plain rate,
    speculation is off for ``off_steps`` steps, then tried again. Sampling keeps the fixed
    rule (budgets that follow timings would make seeded sampling irreproducible)."""

    def __init__(self, enabled: bool, probe_every: int = 16, off_steps: int = 48, window: int = 16):
        self.enabled, self.probe_every, self.off_steps, self.window = enabled, probe_every, off_steps, window
        self.step = 0
        self.off_until = -1
        self.plain: list[float] = []  # tokens per second of recent plain steps
        self.spec: list[float] = []  # ... of recent speculative steps

    def speculate(self) -> bool:
        if not self.enabled:
            return True
        return self.step >= self.off_until and self.step % self.probe_every != self.probe_every - 1

    def record(self, speculated: bool, tokens: int, seconds: float) -> None:
        self.step += 1
        if not self.enabled or seconds <= 0:
            return
        rates = self.spec if speculated else self.plain
        rates.append(tokens / seconds)
        del rates[:-self.window]
        if speculated and self.plain and len(self.spec) >= 4 and _median(self.spec) < _median(self.plain):
            self.off_until = self.step + self.off_steps
            self.spec.clear()


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def split_rows(input_ids, attention_mask=None, pad_token_id: int | None = None) -> list[torch.Tensor]:
    """[B, T] (left-padded) ids and a [B, T] 0/1 mask -> each row's prompt without padding.

    Without a mask every position counts, unless ``pad_token_id`` is given and appears in
    the ids (then, as transformers does, the mask is ids != pad). A list of rows of different
    lengths needs padding and a mask: a clear error, not a guess."""
    if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple, torch.Tensor)):
        lengths = {len(r) for r in input_ids}
        if len(lengths) > 1:
            raise ValueError("input_ids rows have different lengths: left-pad them to one length and pass "
                             "attention_mask (tokenizer(texts, padding=True, padding_side='left', "
                             "return_tensors='pt') gives both)")
    ids = torch.as_tensor(input_ids)
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"batched input_ids must be an integer [B, T] tensor, got {tuple(ids.shape)} {ids.dtype}")
    if attention_mask is None:
        mask = (ids != pad_token_id) if pad_token_id is not None and bool((ids == pad_token_id).any()) \
            else torch.ones_like(ids, dtype=torch.bool)
    else:
        mask = torch.as_tensor(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(ids.shape)}")
        if mask.device != ids.device:
            raise ValueError(f"attention_mask is on {mask.device} but input_ids on {ids.device}; put them together")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold 0 (padding) and 1 (token)")
        mask = mask.bool()
    rows = [ids[b][mask[b]].long() for b in range(ids.shape[0])]
    for b, r in enumerate(rows):
        if r.numel() == 0:
            raise ValueError(f"row {b} of the batch has no tokens (its attention_mask is all 0)")
    return rows


def row_drafters(drafter, rows: int) -> list:
    """One drafter per row (drafters keep per-sequence state): a factory is called per row;
    an instance is deep-copied per row (its learned tables come along), or, where it cannot be
    copied, rebuilt as ``drafters.make`` built it. Drafters that hold a model are refused
    (copies would duplicate the weights; their drafts are not batched): ``generate_batch``
    then decodes row by row."""
    from . import drafters as drafter_registry

    if drafter is None or isinstance(drafter, NoDrafter):
        return [NoDrafter() for _ in range(rows)]
    if isinstance(drafter, type) or (callable(drafter) and not hasattr(drafter, "propose")):
        return [drafter() for _ in range(rows)]
    if holds_model(drafter):
        raise TypeError(f"{type(drafter).__name__} drafts with a model (no batched drafting yet)")
    recipe = getattr(drafter, "recipe", None)
    shared = {} if recipe is None or recipe[1] is None else {id(recipe[1]): recipe[1]}  # the target, not copied
    try:
        return [copy.deepcopy(drafter, dict(shared)) for _ in range(rows)]
    except (TypeError, RuntimeError, copy.Error):  # e.g. a C++ index that does not pickle
        made = [drafter_registry.fresh(drafter) for _ in range(rows)]
        if made[0] is None:
            raise TypeError(f"{type(drafter).__name__} cannot be copied per row; pass a factory "
                            "(lambda: make(...)) to batch it") from None
        return made


def holds_model(drafter) -> bool:
    """Whether a drafter runs a model of its own (a draft model, early exit, dual)."""
    return getattr(drafter, "draft_device", None) is not None or any(
        isinstance(v, torch.nn.Module) for v in getattr(drafter, "__dict__", {}).values())


@torch.no_grad()
def generate_batch(model, input_ids, *, attention_mask=None, drafter=None, max_new_tokens: int = 128,
                   do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   repetition_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                   eos_token_id=None, pad_token_id=None, seed: int | None = None,
                   generator: torch.Generator | None = None, backend: str = "auto", exact: bool | None = None,
                   max_batch_tokens: int | None = None, row_logits_processors=None,
                   row_stopping_criteria=None) -> BatchGenerationOutput:
    """Decode a left-padded batch [B, T] (``attention_mask`` [B, T], or inferred from
    ``pad_token_id``) with lossless speculative decoding, one target forward per step for
    every live row (see the module). ``drafter``: a Drafter (copied per row), a zero-argument
    factory, or None (batched plain decoding). ``max_batch_tokens``: tokens per forward
    (default 64); rows share it, so at B >= max_batch_tokens no row speculates.
    ``row_logits_processors`` / ``row_stopping_criteria``: one list per row (or None), as
    ``generate``'s ``logits_processor`` / ``stopping_criteria`` for that row. Other arguments
    as ``specdec.generate``. Returns the sequences [B, T + longest new] (pad after a row
    ends) and per-row stats."""
    t_start = time.perf_counter()
    if max_new_tokens is None or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    sp = SamplingParams(do_sample=do_sample, temperature=temperature, top_k=top_k or 0, top_p=top_p,
                        repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                        presence_penalty=presence_penalty)
    prompts = split_rows(input_ids, attention_mask, pad_token_id)
    ids = torch.as_tensor(input_ids)
    B = len(prompts)
    cap = DEFAULT_MAX_BATCH_TOKENS if max_batch_tokens is None else int(max_batch_tokens)
    if cap < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    try:
        drafters = row_drafters(drafter, B)
    except TypeError as e:
        return _row_by_row(model, ids, prompts, drafter, str(e), max_new_tokens=max_new_tokens, sp=sp,
                           eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, generator=generator,
                           backend=backend, exact=exact, row_logits_processors=row_logits_processors,
                           row_stopping_criteria=row_stopping_criteria, t_start=t_start)
    share = max(0, cap // B - 1)
    longest = max(p.numel() for p in prompts)
    runner = as_batch_runner(model, backend, B, longest + max_new_tokens + cap + 1, exact)
    for b, (p, d) in enumerate(zip(prompts, drafters)):
        try:
            _check_inputs(p, d, runner)
        except ValueError as e:
            raise ValueError(f"row {b}: {e}") from None
    if generator is None and seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
    eos = _eos_set(eos_token_id, model)
    rules = [_Rules(sp, generator, eos, _processor(row_logits_processors, b), _criteria(row_stopping_criteria, b))
             for b in range(B)]

    with runner.lock:
        stats = BatchStats(rows=[GenerationStats(loop="batch") for _ in range(B)])
        runner.reset(B)
        histories = [_History(p, max_new_tokens, runner, sp) for p in prompts]
        for d, p in zip(drafters, prompts):
            d.reset(p)
        t0 = time.perf_counter()
        pre = [RowInput(b, p[:-1], torch.arange(p.numel() - 1)) for b, p in enumerate(prompts) if p.numel() > 1]
        if pre:
            runner.prefill(pre)
        stats.prefill_time_s = time.perf_counter() - t0
        budgets = [_RowBudget(share) for _ in range(B)]
        pays = _PaysCheck(enabled=not sp.do_sample and any(not isinstance(d, NoDrafter) for d in drafters))
        new = [[] for _ in range(B)]
        live = list(range(B)) if max_new_tokens > 0 else []
        stale = set()  # rows whose drafter missed plain steps: rebuilt from their tokens before drafting
        while live:
            speculating = pays.speculate()
            row_share = max(0, cap // len(live) - 1) if speculating else 0
            drafting = speculating and row_share > 0
            committed = 0
            trees, inputs = {}, []
            t_step = time.perf_counter()
            if drafting and stale:
                for b in sorted(stale & set(live)):
                    drafters[b].reset(histories[b].view().clone())
                stale.clear()
            for b in live:
                t_d = time.perf_counter()
                tree = _propose(drafters[b], histories[b], budgets[b].next(row_share), rules[b], runner.vocab_size)
                stats.rows[b].draft_time_s += time.perf_counter() - t_d
                inp, pos, mask = _tree_inputs(tree, histories[b], runner.length(b))
                trees[b] = tree
                inputs.append(RowInput(b, inp, pos, mask))
            t_v = time.perf_counter()
            logits = runner.forward(inputs)
            stats.forwards += 1
            done = []
            for inp, lg in zip(inputs, logits):
                b, tree, hist = inp.row, trees[inp.row], histories[inp.row]
                remaining = max_new_tokens - len(new[b])
                accepted, toks, stop = _settle(tree, lg[:, :runner.vocab_size], hist, rules[b], remaining)
                runner.commit(b, runner.length(b) - inp.input_ids.numel(),
                              torch.tensor([0] + [i + 1 for i in accepted]))
                hist.extend(toks)
                new[b].extend(toks)
                committed += len(toks)
                st = stats.rows[b]
                st.steps += 1
                st.new_tokens += len(toks)
                st.accepted_per_step.append(len(accepted))
                st.tree_sizes.append(len(tree))
                if speculating:
                    budgets[b].record(len(accepted), row_share)
                if stop:
                    done.append(b)
                elif drafting or isinstance(drafters[b], NoDrafter):
                    t_u = time.perf_counter()
                    drafters[b].update(VerifyResult(tree, accepted, torch.tensor(toks), hist.view(), lg))
                    st.update_time_s += time.perf_counter() - t_u
                else:  # a plain step: the drafter's update (per row, on the host) would cost more than the
                    stale.add(b)  # step itself; it catches up from the row's tokens when drafting resumes
            verify_s = time.perf_counter() - t_v
            pays.record(drafting, committed, time.perf_counter() - t_step)
            for b in live:
                stats.rows[b].verify_time_s += verify_s
            for b in done:
                runner.release(b)
                live.remove(b)
        stats.total_time_s = time.perf_counter() - t_start
        for st in stats.rows:
            st.total_time_s, st.prefill_time_s = stats.total_time_s, stats.prefill_time_s
        return BatchGenerationOutput(_assemble(ids, new, pad_token_id, eos), stats, new)


def _processor(row_processors, b: int):
    procs = None if row_processors is None else row_processors[b]
    return TreeLogitsProcessor(procs) if procs else None


def _criteria(row_criteria, b: int):
    return None if row_criteria is None else (row_criteria[b] or None)


def _assemble(ids: torch.Tensor, new: list[list[int]], pad_token_id, eos: set[int]) -> torch.Tensor:
    """[B, T + longest new]: each padded input row, its new tokens, then the pad id (as
    transformers; without a pad id, the first EOS id, else 0)."""
    width = max((len(n) for n in new), default=0)
    pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
    out = torch.full((ids.shape[0], ids.shape[1] + width), int(pad), dtype=torch.long, device=ids.device)
    out[:, :ids.shape[1]] = ids
    for b, n in enumerate(new):
        out[b, ids.shape[1]:ids.shape[1] + len(n)] = torch.tensor(n, dtype=torch.long)
    return out


_NOTED: set[str] = set()


def _row_by_row(model, ids, prompts, drafter, why: str, *, max_new_tokens, sp, eos_token_id, pad_token_id, seed,
                generator, backend, exact, row_logits_processors, row_stopping_criteria, t_start
                ) -> BatchGenerationOutput:
    """Rows one at a time through ``generate`` (drafters that cannot be copied per row)."""
    from .generate import generate

    name = type(drafter).__name__
    if name not in _NOTED:
        _NOTED.add(name)
        print(f"specdec: batch rows decoded one at a time ({why})", file=sys.stderr, flush=True)
    stats, new = BatchStats(loop="row by row"), []
    for b, p in enumerate(prompts):
        out = generate(model, p, drafter=drafter, max_new_tokens=max_new_tokens, do_sample=sp.do_sample,
                       temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p,
                       repetition_penalty=sp.repetition_penalty, frequency_penalty=sp.frequency_penalty,
                       presence_penalty=sp.presence_penalty, eos_token_id=eos_token_id, seed=seed,
                       generator=generator, backend=backend, exact=exact,
                       logits_processor=None if row_logits_processors is None else row_logits_processors[b],
                       stopping_criteria=None if row_stopping_criteria is None else row_stopping_criteria[b])
        new.append(out.new_tokens.tolist())
        stats.rows.append(out.stats)
        stats.forwards += out.stats.steps
    stats.total_time_s = time.perf_counter() - t_start
    return BatchGenerationOutput(_assemble(ids, new, pad_token_id, _eos_set(eos_token_id, model)), stats, new)


__all__ = ["BatchGenerationOutput", "BatchStats", "generate_batch", "split_rows"]
