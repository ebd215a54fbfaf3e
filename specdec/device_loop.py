"""The device-resident decode loop (#8): whole steps on the device, replayed from one CUDA graph.

A step -- draft (suffix matching over the history, ``ops.suffix_match``), verify (one
target forward over the tree), accept (greedy, or sample-and-match at temperature), KV
commit, the stop rules (EOS, max_new_tokens) -- is fixed-shape tensor work with no host
sync, so it is captured once per (runner, tree shape) and replayed back to back. The host
enqueues a chunk of replays, then reads the committed tokens of the chunk before it
(pinned buffer + event): the GPU always has the next chunk queued while Python runs.

State on the device (one sequence)::

    history [S] int64   committed tokens (prompt + generated); ``length`` [1] of them
    cache               K/V of history[:length - 1]: the last committed token is the next root
    done [1] bool, new [1] int64 (tokens generated), steps [1] int64 (live steps),
    accepted [max_steps] int64 (drafted tokens kept per live step), bad [1] bool (NaN seen)

A step over a tree of N slots (a suffix trie of C candidates x L tokens and/or a Token
Recycling template; N = 0 is plain decoding) runs the target on the root and every slot: a
slot left empty gets token 0 and can never be accepted. Acceptance walks from the root:
a child is taken when its token equals the target's choice at its parent (argmax when
greedy; when sampling, a sample of the processed distribution by Gumbel-max with fresh
noise per row). That walk emits exactly the tokens plain decoding would (greedy) or
draws each token from the target's distribution given the tokens before it (sampling:
one-hot drafts, so "sample, then follow the child holding that token" is lossless).
After a stop the step still runs (a graph cannot skip work) but commits nothing.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from .config import SamplingParams
from .ops import backend
from .ops.attention import pack_tree_mask
from .ops.kv import compact_kv
from .ops.recycling import recycling_update
from .ops.suffix_match import candidates_to_tree, suffix_candidates
from .sampling import NAN_MESSAGE, warp

# Replays per host round trip (fewer near the end, see DeviceLoop.run). Two chunks are queued
# at a time, so after an EOS up to two chunks of steps run for nothing: short chunks waste less.
CHUNK_STEPS = int(os.environ.get("SPECDEC_LOOP_CHUNK", "4"))


class LoopUnavailable(RuntimeError):
    """The loop could not start (its capture failed) before committing anything."""


@dataclass(frozen=True)
class LoopShape:
    """The tree every step of one captured graph verifies: a suffix trie of ``candidates``
    x ``depth`` slots and a Token Recycling template (rank paths, ``recycle_k`` ranks kept
    per token); both empty is plain decoding."""

    candidates: int = 0
    depth: int = 0
    max_order: int = 4
    max_scan: int = 64
    template: tuple[tuple[int, ...], ...] = ()  # recycling paths (TreeTemplate.priority)
    recycle_k: int = 8
    keep_adjacency: bool = False  # keep the recycled matrix across calls

    @property
    def suffix_nodes(self) -> int:
        return self.candidates * self.depth

    @property
    def nodes(self) -> int:
        return self.suffix_nodes + len(self.template)

    @property
    def rows(self) -> int:  # the forward's rows: root + slots
        return self.nodes + 1

    @property
    def max_depth(self) -> int:
        return max([self.depth if self.suffix_nodes else 0] + [len(p) for p in self.template])


@dataclass
class LoopResult:
    tokens: list[int]  # prompt + generated
    new_tokens: int
    steps: int  # live steps (target forwards that committed tokens)
    accepted: list[int]  # drafted tokens kept, per live step
    replays: int  # steps run, the ones after the stop included
    wall_s: float
    host_s: float  # time the host spent outside waiting for the device


# ----------------------------------------------------------------------------- one step's pieces
def suffix_slots(tokens: torch.Tensor, parents: torch.Tensor, valid: torch.Tensor, depth: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The candidates' trie (``candidates_to_tree``: [N] each) as verify slots.
    -> (ids [N] (empty slots: 0), parent_row [N] (0 = the root), depth [N])."""
    n = tokens.numel()
    ids = torch.where(valid, tokens, 0)
    parent_row = torch.where(valid, parents, -1) + 1
    return ids, parent_row, torch.arange(n, device=tokens.device) % depth + 1


def recycled_slots(adj: torch.Tensor, root: torch.Tensor, levels, parents: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A Token Recycling template expanded from the root on the device, one gather per level.
    adj [V, k], root [1], levels [((s, e), (parent idx [w], rank [w])), ...] (breadth first),
    parents [P] -> (tokens [P] (-1: unknown, and below it), parent slot [P] (-1: the root))."""
    tokens = torch.empty(parents.numel(), dtype=torch.long, device=adj.device)
    for (s, e), (par, rank) in levels:
        parent_tok = root.expand(e - s) if s == 0 else tokens[par]
        tokens[s:e] = torch.where(parent_tok >= 0, adj[parent_tok.clamp(min=0), rank], -1)
    return tokens, parents


def ancestor_rows(parent_row: torch.Tensor, max_depth: int) -> torch.Tensor:
    """parent_row [M] (0 = the root; parents precede children) -> [M + 1, M + 1] bool:
    row i sees row j when j is i or one of its ancestors (the root row sees itself)."""
    m, dev = parent_row.numel(), parent_row.device
    link = torch.eye(m + 1, device=dev)
    link[1:].scatter_(1, parent_row[:, None], 1.0)  # row i: itself and its parent
    hops = 1
    while hops < max_depth:  # squaring doubles the ancestor distance covered
        link = (link @ link).clamp_(max=1.0)
        hops *= 2
    return link > 0


def walk(ids: torch.Tensor, parent_row: torch.Tensor, depth_row: torch.Tensor, ancestors: torch.Tensor,
         valid: torch.Tensor, choice: torch.Tensor, max_depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Follow the target's choices from the root. ids/parent_row/valid [N], depth_row [N + 1],
    ancestors [N + 1, N + 1], choice [N + 1] (the target's token at every row).

    -> (accepted [1] int64: slots taken, path_rows [max_depth + 1] int64: the rows of the
    path by depth, root first; entries past ``accepted`` are arbitrary). Siblings of a trie
    hold distinct tokens, so at most one child matches: the taken rows form one chain."""
    rows = depth_row.numel()
    ok = torch.cat([torch.ones(1, dtype=torch.bool, device=ids.device),
                    valid & (ids == choice[parent_row])])  # [N + 1]
    on_path = ~(ancestors & ~ok[None, :]).any(1)  # [N + 1] every row from the root to it matches
    tip = torch.where(on_path, depth_row, -1).argmax().view(1)  # the deepest (the root when none)
    accepted = depth_row[tip]  # [1]
    path = ancestors.index_select(0, tip)[0]  # [N + 1] the rows on root -> tip (no .item())
    slot = torch.where(path, depth_row, max_depth + 1)  # rows off the path go to a scratch slot
    path_rows = torch.zeros(max_depth + 2, dtype=torch.long, device=ids.device)
    path_rows.index_copy_(0, slot, torch.arange(rows, device=ids.device))  # (scratch: duplicates)
    return accepted, path_rows[:max_depth + 1]


def choose(logits: torch.Tensor, sp: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [R, V] fp32 -> the target's token at every row [R]: the argmax when greedy,
    else a sample of the warped distribution (temperature, top-k, top-p) by Gumbel-max."""
    if not sp.do_sample:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, device=logits.device, generator=generator)
    gumbel = -torch.log(-torch.log(u))  # u = 0 gives -inf: never chosen
    return (warp(logits, sp) + gumbel).argmax(-1)


# ----------------------------------------------------------------------------- the loop
class DeviceLoop:
    """The device-resident loop for one runner (a ``GraphedCompactRunner``) and one tree shape.

    ``graphed``: capture the step in a CUDA graph (the runner's mode is "graph"); otherwise
    every step runs as eager tensor work ("static" mode: any device, for tests)."""

    def __init__(self, runner, shape: LoopShape, sp: SamplingParams, *, graphed: bool):
        self.runner, self.shape, self.sp, self.graphed = runner, shape, sp, graphed
        self.model, self.cache = runner.model, runner.cache
        self.device = torch.device(runner.device)
        dev, S = self.device, runner.max_length + shape.rows + 1
        self.history = torch.zeros(S, dtype=torch.long, device=dev)  # [S]
        self.length = torch.ones(1, dtype=torch.long, device=dev)  # [1]
        self.new = torch.zeros(1, dtype=torch.long, device=dev)
        self.steps = torch.zeros(1, dtype=torch.long, device=dev)
        self.done = torch.zeros(1, dtype=torch.bool, device=dev)
        self.bad = torch.zeros(1, dtype=torch.bool, device=dev)
        self.max_new = torch.zeros(1, dtype=torch.long, device=dev)
        self.eos = torch.full((8,), -1, dtype=torch.long, device=dev)  # [E] padded with -1
        self.accepted = torch.zeros(runner.max_length + 1, dtype=torch.long, device=dev)  # per live step
        self.generator = torch.Generator(device=dev) if sp.do_sample else None
        self.adj, tpl = None, None
        if shape.template:
            from .drafters.recycling import TreeTemplate

            tpl = TreeTemplate(shape.template)
            self.adj = torch.full((runner.vocab_size, shape.recycle_k), -1, dtype=torch.long, device=dev)  # [V, k]
            self._levels = list(zip(tpl.levels, tpl.on(dev)))
            self._tpl_parents, self._tpl_depth = tpl.parents.to(dev), tpl.depth.to(dev)  # [P] breadth first
        self._pack = backend.use_triton(dev)
        self._static_tree(tpl)
        pinned = dev.type == "cuda"  # two snapshot buffers (history + 4 counters), each with its event
        self._snapshots = [(torch.empty(S + 4, dtype=torch.long, pin_memory=pinned),
                            torch.cuda.Event() if pinned else None) for _ in range(2)]
        self.graph: torch.cuda.CUDAGraph | None = None

    def _static_tree(self, tpl) -> None:
        """What does not change from step to step: every row's depth (so its position
        offset), the recycled rows' parents, and the ancestor mask of every row but the
        suffix trie's (the whole mask, packed, when there is no suffix trie)."""
        sh, dev = self.shape, self.device
        n_suffix = sh.suffix_nodes
        depth = [torch.zeros(1, dtype=torch.long)]
        parent_row = []
        if n_suffix:
            depth.append(torch.arange(n_suffix) % sh.depth + 1)
            parent_row.append(torch.zeros(n_suffix, dtype=torch.long))  # (placeholder: the trie is drafted per step)
        if tpl is not None:
            depth.append(tpl.depth)
            parent_row.append(torch.where(tpl.parents >= 0, tpl.parents + 1 + n_suffix, 0))
        self._depth_row = torch.cat(depth).to(dev)  # [R]
        self._parent_row = torch.cat(parent_row).to(dev) if parent_row else None  # [N]
        self._ancestors = ancestor_rows(self._parent_row, sh.max_depth) if sh.nodes else \
            torch.ones(1, 1, dtype=torch.bool, device=dev)  # [R, R] (the suffix block is redone per step)
        self._packed = pack_tree_mask(self._ancestors) if self._pack else self._ancestors

    # --- the step (what the graph captures)
    def step(self) -> None:
        sh, dev = self.shape, self.device
        n_suffix = sh.suffix_nodes
        start = self.length - 1  # [1] the root's slot == the cache length
        root = self.history.index_select(0, start)  # [1]
        ids, valid = [root], []  # root row first
        parent_row, ancestors, mask = self._parent_row, self._ancestors, self._packed
        if n_suffix:
            cands, lens = suffix_candidates(self.history, self.length, max_order=sh.max_order,
                                            num_candidates=sh.candidates, depth=sh.depth, max_scan=sh.max_scan)
            tokens, parents, ok = candidates_to_tree(cands, lens)  # [N] each
            suffix_ids, suffix_parent, _ = suffix_slots(tokens, parents, ok, sh.depth)
            ids.append(suffix_ids), valid.append(ok)
            parent_row = torch.cat([suffix_parent, parent_row[n_suffix:]])  # [N + P]
            ancestors = ancestors.clone()
            ancestors[:n_suffix + 1, :n_suffix + 1] = ancestor_rows(suffix_parent, sh.depth)
            mask = pack_tree_mask(ancestors) if self._pack else ancestors
        if sh.template:
            tokens, _ = recycled_slots(self.adj, root, self._levels, self._tpl_parents)  # [P]
            ok = tokens >= 0
            if n_suffix:  # the root's children must differ (one match per choice when sampling)
                first = torch.where(valid[0] & (self._depth_row[1:n_suffix + 1] == 1), ids[1], -2)  # [N]
                ok &= ~((tokens[:, None] == first[None, :]).any(1) & (self._tpl_depth == 1))
            ids.append(tokens.clamp(min=0)), valid.append(ok)
        inputs = torch.cat(ids) if len(ids) > 1 else root  # [R]
        positions = start + self._depth_row  # [R]
        logits = self.model.forward_static(inputs, positions, self.cache, start, mask)[:, :self.runner.vocab_size]
        if self.sp.do_sample:  # [R, V]: fp32 for the warping; greedy reads the model's dtype (same argmax)
            logits = logits.float()
        choice = choose(logits, self.sp, self.generator)  # [R]
        bad = torch.isnan(logits).any() if self.sp.do_sample else torch.isnan(logits.gather(1, choice[:, None])).any()
        if not sh.nodes:
            self._commit(choice, torch.zeros(1, dtype=torch.long, device=dev), bad)
            return
        valid = torch.cat(valid)  # [N]
        if sh.template:  # recycle every row's top-k (rejected nodes too)
            rows = torch.cat([root, torch.where(valid, inputs[1:], -1)])
            recycling_update(self.adj, rows, logits.topk(sh.recycle_k, dim=-1).indices)
        accepted, path_rows = walk(inputs[1:], parent_row, self._depth_row, ancestors, valid, choice, sh.max_depth)
        compact_kv(self.cache.k, self.cache.v, path_rows, accepted + 1, start=start)
        self.cache.pos.index_copy_(0, start + torch.arange(sh.max_depth + 1, device=dev), positions[path_rows])
        self._commit(choice[path_rows], accepted, bad)  # [D + 1]: the accepted tokens, then the bonus

    def _commit(self, emitted: torch.Tensor, accepted: torch.Tensor, bad: torch.Tensor) -> None:
        """Append emitted[:accepted + 1] to the history, cut at the first EOS and at max_new."""
        idx = torch.arange(emitted.numel(), device=self.device)
        live = ~self.done
        is_eos = (emitted[:, None] == self.eos[None, :]).any(1) & (idx <= accepted)  # [L + 1]
        eos_cut = torch.where(is_eos, idx + 1, emitted.numel() + 1).min().view(1)  # through the first EOS
        cut = torch.minimum(torch.minimum(accepted + 1, eos_cut), self.max_new - self.new)
        cut = torch.where(live, cut, 0).clamp_(min=0)  # [1]
        self.history.index_copy_(0, self.length + idx, emitted)  # past the cut: scratch beyond the length
        self.accepted.index_copy_(0, self.steps, accepted)
        self.length += cut
        self.new += cut
        self.steps += live.long()
        self.bad |= live & bad
        self.done |= live & ((eos_cut <= cut) | (self.new >= self.max_new))

    # --- running
    def start(self, prompt: torch.Tensor, max_new_tokens: int, eos: set[int], seed: int | None) -> None:
        """Load a prefilled sequence: the cache holds prompt[:-1]."""
        if len(eos) > self.eos.numel():
            raise ValueError(f"the device loop takes at most {self.eos.numel()} EOS ids, got {len(eos)}")
        n = prompt.numel()
        self.history[:n].copy_(prompt.to(self.device))
        self.length.fill_(n)
        self.new.zero_()
        self.steps.zero_()
        self.done.fill_(max_new_tokens <= 0)
        self.bad.zero_()
        self.max_new.fill_(max_new_tokens)
        self.eos.fill_(-1)
        if eos:
            self.eos[:len(eos)].copy_(torch.tensor(sorted(eos)))
        if self.adj is not None and not self.shape.keep_adjacency:  # seeded with the prompt's bigrams
            self.adj.fill_(-1)
            if n > 1:
                first = torch.full((n - 1, self.shape.recycle_k), -1, dtype=torch.long, device=self.device)
                first[:, 0] = self.history[1:n]
                recycling_update(self.adj, self.history[:n - 1], first)
        if self.generator is not None:
            self.generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()

    def run(self, prompt: torch.Tensor, max_new_tokens: int, eos: set[int], seed: int | None = None,
            on_tokens=None) -> LoopResult:
        """Decode after a prefill of prompt[:-1]; ``on_tokens(list)`` gets the new tokens in
        order, a chunk at a time. Up to two chunks of replays are queued while the host reads
        the oldest one's snapshot; near the end chunks shrink to what the tokens left need
        at the measured tokens per step, so few steps run past the stop."""
        t0 = time.perf_counter()
        self.start(prompt, max_new_tokens, eos, seed)
        if self.graphed and self.graph is None:
            try:
                self._capture()
            except Exception as e:  # noqa: BLE001 -- any failure: the host loop takes over
                raise LoopUnavailable(f"capture failed: {type(e).__name__}: {e}") from e
            self.start(prompt, max_new_tokens, eos, seed)  # the warm-up moved the state and the generator
        n_prompt = prompt.numel()
        pinned = self.device.type == "cuda"
        free = list(self._snapshots)
        pending: list[tuple[torch.Tensor, object, int]] = []  # (snapshot, event, steps) oldest first
        queued, seen, waited, tau, done = 0, n_prompt, 0.0, 1.0, max_new_tokens <= 0
        snap = free[0][0]  # the latest snapshot read
        while not done:
            while free and queued < max_new_tokens:  # each live step commits >= 1 token
                left = max_new_tokens - (seen - n_prompt)
                need = math.ceil(left / max(tau, 1.0)) - sum(p[2] for p in pending)
                if need <= 0 and pending:
                    break  # what is queued probably finishes: read it first
                want = min(CHUNK_STEPS, max_new_tokens - queued, max(1, need))
                for _ in range(want):
                    self.replay()
                queued += want
                host, event = free.pop()
                host[:4].copy_(torch.cat([self.length, self.steps, self.done.long(), self.bad.long()]),
                               non_blocking=pinned)
                host[4:].copy_(self.history, non_blocking=pinned)
                if event is not None:
                    event.record()
                pending.append((host, event, want))
            if not pending:
                break
            snap, event, _ = pending.pop(0)
            tw = time.perf_counter()
            if event is not None:
                event.synchronize()
            waited += time.perf_counter() - tw
            free.append((snap, event))
            length, steps, done, bad = snap[:4].tolist()
            if bad:
                raise FloatingPointError(NAN_MESSAGE)
            if length > seen and on_tokens is not None:
                on_tokens(snap[4 + seen:4 + length].tolist())
            seen, tau = length, (length - n_prompt) / max(1, steps)
        for _, event, _ in pending:  # queued past the stop: they commit nothing
            if event is not None:
                event.synchronize()
        tokens = snap[4:4 + seen].tolist() if seen > n_prompt else prompt.tolist()
        steps = int(self.steps[0])
        self.cache.length = seen - 1
        wall = time.perf_counter() - t0
        return LoopResult(tokens, seen - n_prompt, steps, self.accepted[:steps].tolist(), queued, wall,
                          wall - waited)

    def _capture(self) -> None:
        """Warm up (Triton compiles; syncs made errors), then capture. The warm-up steps run
        from the loaded sequence and write only past its committed length; ``run`` loads the
        sequence again afterwards (counters, recycled matrix, generator seed)."""
        dev = self.device
        torch.cuda.synchronize(dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        previous = torch.cuda.get_sync_debug_mode()
        try:
            with torch.cuda.stream(side):
                for i in range(3):
                    if i == 1:
                        torch.cuda.set_sync_debug_mode("error")
                    self.step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:
            graph.register_generator_state(self.generator)
        with torch.cuda.graph(graph):
            self.step()
        self.graph = graph


# ----------------------------------------------------------------------------- choosing it
def shape_for(drafter, budget) -> LoopShape | None:
    """The loop shape for this drafter (None: the drafter needs the host loop): no drafter,
    the suffix drafter, Token Recycling, or the two merged ("suffix+recycling")."""
    from .drafters.base import NoDrafter
    from .drafters.merged import MergedDrafter
    from .drafters.recycling import RecyclingDrafter
    from .drafters.suffix import SuffixDrafter

    if drafter is None or isinstance(drafter, NoDrafter):
        return LoopShape()
    parts = drafter.drafters if type(drafter) is MergedDrafter else [drafter]
    kinds = [type(p) for p in parts]
    if not parts or len(set(kinds)) != len(kinds) or not set(kinds) <= {SuffixDrafter, RecyclingDrafter}:
        return None
    max_nodes = budget.max_nodes if budget is not None else 1 << 30
    max_depth = budget.max_depth if budget is not None else 1 << 30
    shape = {}
    for p in parts:
        if isinstance(p, SuffixDrafter):
            o = p.opts
            depth = min(o["depth"], max_depth)
            cands = min(o["num_candidates"], max(1, max_nodes // max(1, depth)))
            if depth > 0:
                shape.update(candidates=cands, depth=depth, max_order=o["max_order"], max_scan=o["max_scan"])
        else:
            if p.accepted_last or not p.seed_prompt:
                return None  # options the loop does not implement
            left = max_nodes - shape.get("candidates", 0) * shape.get("depth", 0)
            tpl = p.template.select(left, max_depth)
            shape.update(template=tuple(tpl.priority), recycle_k=p.k, keep_adjacency=p.keep_across_prompts)
    return LoopShape(**shape)


def device_loop_issue(runner, sp: SamplingParams, rules_extra: bool, own_generator: bool) -> str | None:
    """Why ``generate`` must use the host loop for this call, or None."""
    from .backends.cuda_graphs import GraphedCompactRunner

    if os.environ.get("SPECDEC_DEVICE_LOOP", "1") == "0":
        return "SPECDEC_DEVICE_LOOP=0"
    if not isinstance(runner, GraphedCompactRunner) or runner.mode == "eager":
        return "not the graphed compact runtime"
    if rules_extra:
        return "logits processors, stopping criteria or penalties (host rules)"
    if sp.do_sample and own_generator:
        return "a caller's torch.Generator (the loop samples from its own, seeded by seed=)"
    if sp.do_sample and runner.mode == "graph" and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        return "this torch cannot capture a private generator in a CUDA graph"
    return None


def loop_for(runner, shape: LoopShape, sp: SamplingParams) -> DeviceLoop:
    """The runner's kept loop for this shape and sampling rule (graphs are captured once)."""
    loops = runner.__dict__.setdefault("_device_loops", {})
    key = loop_key(shape, sp)
    if key not in loops:
        loops[key] = DeviceLoop(runner, shape, sp, graphed=runner.mode == "graph")
    return loops[key]


def loop_key(shape: LoopShape, sp: SamplingParams) -> tuple:
    return (shape, sp.do_sample, sp.temperature, sp.top_k, sp.top_p)


def give_up(loop: DeviceLoop, reason: str) -> None:
    """Drop a loop whose capture failed (later calls take the host loop); say why once."""
    loops = loop.runner.__dict__.get("_device_loops", {})
    loops[loop_key(loop.shape, loop.sp)] = None
    if reason not in _REPORTED:
        _REPORTED.add(reason)
        print(f"specdec: device loop off ({reason}); the host loop runs instead", file=sys.stderr, flush=True)


_REPORTED: set[str] = set()


__all__ = ["DeviceLoop", "LoopResult", "LoopUnavailable", "LoopShape", "choose", "device_loop_issue", "loop_for", "shape_for",
           "walk", "suffix_slots", "recycled_slots", "ancestor_rows"]
