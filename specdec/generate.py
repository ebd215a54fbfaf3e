"""The speculative decoding loop: draft a tree, verify it in one forward, accept, commit."""
from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch

from . import device_loop
from .adaptive import BudgetController
from .backends.base import Runner
from .backends.select import as_runner
from .budgets import BudgetPlan, resolve
from .config import SamplingParams, TreeBudget
from .drafters.base import DraftRequest, Drafter, NoDrafter, VerifyResult
from .node_processors import TreeLogitsProcessor, first_stop
from .sampling import accept_greedy, accept_sampling, context_counts, process
from .tree import TokenTree


@dataclass
class StepResult:
    """One step: the tree verified, what was accepted and committed, and its times."""

    tree: TokenTree
    budget: TreeBudget  # what the drafter was given
    accepted_nodes: list[int]  # node indices of the accepted path, root to tip
    new_tokens: list[int]  # committed: accepted tokens then the bonus token (cut at a stop)
    stop: bool  # EOS or max_new_tokens reached
    logits: torch.Tensor  # [n + 1, vocab] the target's raw logits (row 0: the root)
    draft_s: float
    verify_s: float  # the target's forward, acceptance and the KV commit
    timed: bool  # False when the forward captured a CUDA graph (no timing sample)
    total_s: float = 0.0  # the whole step, the drafter's update included (set by the loop)

    @property
    def accepted(self) -> int:
        return len(self.accepted_nodes)

    @property
    def depth_cap(self) -> int:
        return self.budget.max_depth


@dataclass
class GenerationStats:
    steps: int = 0  # target verify forwards
    new_tokens: int = 0
    accepted_per_step: list[int] = field(default_factory=list)  # drafted tokens kept per step
    tree_sizes: list[int] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)  # the node budget each step's drafter was given
    depth_caps: list[int] = field(default_factory=list)  # ... and its depth cap
    draft_time_s: float = 0.0  # drafter.propose (and the budget checks on its tree)
    verify_time_s: float = 0.0  # the target's forward, acceptance, KV commit
    update_time_s: float = 0.0  # drafter.update after each verification
    control_time_s: float = 0.0  # the adaptive controller (on a GPU mostly inside verify_time_s)
    prefill_time_s: float = 0.0
    total_time_s: float = 0.0
    loop: str = "host"  # "device": the device-resident loop ran the steps (specdec.device_loop)
    replays: int = 0  # device loop: steps run, those queued past the stop included
    host_time_s: float = 0.0  # device loop: time the host spent outside waiting for the device

    def add(self, step: StepResult) -> None:
        self.steps += 1
        self.new_tokens += len(step.new_tokens)
        self.accepted_per_step.append(step.accepted)
        self.tree_sizes.append(len(step.tree))
        self.budgets.append(step.budget.max_nodes)
        self.depth_caps.append(step.budget.max_depth)
        self.draft_time_s += step.draft_s
        self.verify_time_s += step.verify_s

    @property
    def mean_accepted_length(self) -> float:
        """tau: committed tokens per target forward (accepted + bonus)."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(self.accepted_per_step).items()))

    @property
    def tokens_per_second(self) -> float:
        t = self.total_time_s - self.prefill_time_s
        return self.new_tokens / t if t > 0 else 0.0

    def as_dict(self) -> dict:
        mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
        return {"steps": self.steps, "new_tokens": self.new_tokens,
                "mean_accepted_length": self.mean_accepted_length,
                "acceptance_histogram": self.acceptance_histogram, "mean_tree_size": mean(self.tree_sizes),
                "mean_budget": mean(self.budgets), "mean_depth_cap": mean(self.depth_caps),
                "draft_time_s": self.draft_time_s, "verify_time_s": self.verify_time_s,
                "update_time_s": self.update_time_s, "control_time_s": self.control_time_s, "prefill_time_s": self.prefill_time_s,
                "total_time_s": self.total_time_s, "tokens_per_second": self.tokens_per_second,
                "loop": self.loop, "replays": self.replays, "host_time_s": self.host_time_s}


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [1, prompt_len + new] int64
    stats: GenerationStats

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[0, self.sequences.shape[1] - self.stats.new_tokens:]


@dataclass
class _Rules:
    """How a step turns logits into committed tokens."""

    sp: SamplingParams
    generator: torch.Generator | None
    eos: set[int]
    processor: TreeLogitsProcessor | None  # user / transformers logits processors, per node
    stopping: object | None  # a transformers StoppingCriteriaList, on the committed tokens


class _History:
    """The committed tokens: a list, a tensor the drafters get views of (only ever appended
    to, so views stay valid), and token counts for the penalties (or None)."""

    def __init__(self, prompt: torch.Tensor, max_new_tokens: int, runner: Runner, sp: SamplingParams):
        self.tokens = prompt.tolist()
        self.buf = torch.empty(len(self.tokens) + max_new_tokens + 1, dtype=torch.long)
        self.buf[:len(self.tokens)] = prompt.cpu()
        self.vocab, self.device = runner.vocab_size, runner.device
        self.counts = torch.bincount(prompt, minlength=self.vocab).float().to(self.device) \
            if sp.has_penalties else None  # [vocab]

    def view(self) -> torch.Tensor:
        return self.buf[:len(self.tokens)]

    def extend(self, new: list[int]) -> None:
        self.buf[len(self.tokens):len(self.tokens) + len(new)] = torch.tensor(new)
        self.tokens.extend(new)
        if self.counts is not None:
            self.counts += torch.bincount(torch.tensor(new, device=self.device), minlength=self.vocab)


@torch.no_grad()
def generate(model, input_ids, *, drafter: Drafter | None = None, max_new_tokens: int = 128,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
             presence_penalty: float = 0.0, eos_token_id=None, pad_token_id=None, streamer=None,
             seed: int | None = None, generator: torch.Generator | None = None,
             budget: TreeBudget | None = None, backend: str = "auto",
             adaptive: bool | BudgetController = True, logits_processor=None,
             stopping_criteria=None, exact: bool | None = None, attention_mask=None):
    """Lossless speculative decoding of one sequence; a batch [B, T] (left-padded, with
    ``attention_mask``) goes to ``specdec.batch_generate.generate_batch`` and returns its
    ``BatchGenerationOutput`` (sequences [B, T + longest new]).

    ``model``: a transformers causal LM (or a specdec Runner); ``drafter`` proposes token
    trees (None: plain decoding). Returns the sequences [1, prompt + new] and stats (steps,
    tau, acceptance histogram, draft / verify time). ``backend``: "auto" (on CUDA the compact
    static-cache runtime with CUDA graphs where the architecture is supported, else the
    generic transformers backend), "generic", "compact" (eager) or "graphs". ``adaptive``
    (greedy only, so sampling stays reproducible per seed): each step's budget follows
    acceptance and measured costs (True, or a ``specdec.adaptive.BudgetController``);
    ``budget`` pins it (with a controller given, caps it). ``logits_processor``: transformers
    logits processors applied to every tree node with that node's own context as
    ``input_ids`` (before specdec's penalties and warping; ``specdec.node_processors``);
    ``stopping_criteria``: checked after every committed token (nothing after a stop is kept).
    ``exact`` (compact runtime): every verify row computes bitwise what a one-token step
    computes, so greedy output equals plain decoding in bf16 / fp16 too (``ops.exact``;
    None: ``ops.exact.resolve``'s default, off for now; ``SPECDEC_EXACT`` overrides it;
    docs/exact_mode.md)."""
    if _is_batch(input_ids, attention_mask):
        from .batch_generate import generate_batch

        if streamer is not None or budget is not None or isinstance(adaptive, BudgetController):
            raise ValueError("a batch takes no streamer, budget or BudgetController (their state is per "
                             "sequence); decode the rows one at a time for those")
        return generate_batch(model, input_ids, attention_mask=attention_mask, drafter=drafter,
                              max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                              top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                              frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                              eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, generator=generator,
                              backend=backend, exact=exact,
                              row_logits_processors=_per_row(logits_processor, input_ids),
                              row_stopping_criteria=_per_row(stopping_criteria, input_ids))
    if attention_mask is not None:  # one row: drop its padding
        from .batch_generate import split_rows

        ids = torch.as_tensor(input_ids)
        input_ids = split_rows(ids.reshape(1, -1), torch.as_tensor(attention_mask).reshape(1, -1))[0]
    t_start = time.perf_counter()
    if max_new_tokens is None or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    sp = SamplingParams(do_sample=do_sample, temperature=temperature, top_k=top_k or 0, top_p=top_p,
                        repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                        presence_penalty=presence_penalty)
    prompt = _check_prompt(input_ids)
    drafting = drafter is not None and not isinstance(drafter, NoDrafter)
    controller, choosing = resolve(adaptive, budget, model, drafter if drafting else None, sampling=sp.do_sample)
    cap = budget or (controller.max_budget if choosing else TreeBudget())
    shape = None if isinstance(adaptive, BudgetController) else device_loop.shape_for(drafter, budget)
    nodes = max(cap.max_nodes, shape.nodes if shape is not None else 0)
    runner = as_runner(model, backend, prompt.numel() + max_new_tokens + nodes + 1, exact)
    drafter = drafter or NoDrafter()
    _check_inputs(prompt, drafter, runner)
    own_generator = generator is not None  # the device loop cannot draw from a caller's generator
    if generator is None and seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
    rules = _Rules(sp, generator, _eos_set(eos_token_id, model),
                   TreeLogitsProcessor(logits_processor) if logits_processor else None, stopping_criteria or None)

    loop = None
    if shape is not None and max_new_tokens > 0:
        extra = rules.processor is not None or rules.stopping is not None or sp.has_penalties
        issue = device_loop.device_loop_issue(runner, sp, extra, own_generator)
        if issue is None and prompt.numel() + max_new_tokens + shape.rows > runner.max_length:
            issue = "the context cannot hold a full tree at the last step"
        loop = None if issue is not None else device_loop.loop_for(runner, shape, sp)

    reads_hidden = bool(getattr(drafter, "wants_target_hidden", False))  # e.g. the EAGLE-style head
    with runner.lock:  # one sequence per cache: concurrent calls on one model take turns
        stats = GenerationStats()
        runner.reset()
        runner.keep_hidden = reads_hidden
        drafter.reset(prompt)
        if streamer is not None:
            streamer.put(prompt[None].cpu())
        if prompt.numel() > 1:  # the last prompt token is the first root: it runs with the first tree
            t0 = time.perf_counter()
            runner.prefill(prompt[:-1].to(runner.device), torch.arange(prompt.numel() - 1, device=runner.device))
            stats.prefill_time_s = time.perf_counter() - t0
            if reads_hidden:
                drafter.observe_prefill(runner.last_hidden)  # [T - 1, hidden]
        if loop is not None:
            try:
                return _on_device(loop, prompt, max_new_tokens, rules, seed, streamer, stats, t_start)
            except device_loop.LoopUnavailable as e:  # nothing committed yet: the host loop takes over
                device_loop.give_up(loop, str(e))
        plan = BudgetPlan(controller, choosing, budget, runner, model, drafter)
        history = _History(prompt, max_new_tokens, runner, sp)
        plan.while_verifying(more_steps=max_new_tokens > 0)
        done = max_new_tokens == 0
        while not done:
            t_step = time.perf_counter()
            remaining = max_new_tokens - stats.new_tokens
            room = runner.max_length - len(history.tokens)  # positions left for the tree's nodes
            if room < 0:
                warnings.warn(f"reached the model's context length {runner.max_length}; stopping early")
                break
            step = _step(runner, drafter, history, plan, plan.next_budget(remaining, room), rules, remaining)
            history.extend(step.new_tokens)
            stats.add(step)
            if streamer is not None:
                streamer.put(torch.tensor(step.new_tokens))
            done = step.stop
            t_update = time.perf_counter()
            if not done:
                drafter.update(VerifyResult(step.tree, step.accepted_nodes, torch.tensor(step.new_tokens),
                                            history.view(), step.logits,
                                            runner.last_hidden if reads_hidden else None))
            stats.update_time_s += time.perf_counter() - t_update
            step.total_s = time.perf_counter() - t_step
            plan.record(step, final=done)
        if streamer is not None:
            streamer.end()
        stats.control_time_s = plan.control_s
        stats.total_time_s = time.perf_counter() - t_start
        return GenerationOutput(torch.tensor(history.tokens, device=prompt.device)[None], stats)


def _on_device(loop: device_loop.DeviceLoop, prompt: torch.Tensor, max_new_tokens: int, rules: _Rules,
               seed: int | None, streamer, stats: GenerationStats, t_start: float) -> GenerationOutput:
    """The whole decode in the device-resident loop (``specdec.device_loop``)."""
    put = None if streamer is None else (lambda toks: streamer.put(torch.tensor(toks)))
    res = loop.run(prompt, max_new_tokens, rules.eos, seed, on_tokens=put)
    if streamer is not None:
        streamer.end()
    n = loop.shape.nodes
    stats.steps, stats.new_tokens, stats.accepted_per_step = res.steps, res.new_tokens, res.accepted
    stats.tree_sizes = stats.budgets = [n] * res.steps
    stats.depth_caps = [loop.shape.depth] * res.steps
    stats.verify_time_s, stats.host_time_s, stats.replays = res.wall_s, res.host_s, res.replays
    stats.loop = "device"
    stats.total_time_s = time.perf_counter() - t_start
    return GenerationOutput(torch.tensor(res.tokens, device=prompt.device)[None], stats)


def _step(runner: Runner, drafter: Drafter, history: _History, plan: BudgetPlan, budget: TreeBudget,
          rules: _Rules, remaining: int) -> StepResult:
    """Draft -> verify (one forward) -> accept -> commit the accepted path's K/V."""
    t0 = time.perf_counter()
    tree = _propose(drafter, history, budget, rules, runner.vocab_size)
    t1 = time.perf_counter()
    device, start = runner.device, runner.length  # == len(tokens) - 1: the root is not cached yet
    inp, pos, mask = _tree_inputs(tree, history, start)
    captures = runner.captures
    logits = runner.forward(inp.to(device), pos.to(device), tree_mask=mask.to(device))[:, :runner.vocab_size]
    plan.while_verifying(more_steps=remaining > 1)  # (on a GPU the forward is still running)
    accepted, new, stop = _settle(tree, logits, history, rules, remaining)
    runner.commit(start, torch.tensor([0] + [i + 1 for i in accepted]))  # (host: a prefix moves nothing)
    return StepResult(tree, budget, accepted, new, stop, logits, draft_s=t1 - t0,
                      verify_s=time.perf_counter() - t1, timed=runner.captures == captures)


def _propose(drafter: Drafter, history: _History, budget: TreeBudget, rules: _Rules, vocab: int) -> TokenTree:
    """The drafter's tree for this step, checked and fitted to the budget (on the host unless
    it carries draft distributions)."""
    request = DraftRequest(history.view(), budget, rules.sp, rules.generator)
    tree = drafter.propose(request) if budget.max_depth > 0 else TokenTree.empty()
    if not isinstance(tree, TokenTree):
        raise TypeError(f"drafter.propose must return a specdec.TokenTree, got {type(tree).__name__}")
    if tree.device.type != "cpu" and tree.draft_probs is None:
        tree = tree.to("cpu")  # one transfer: the checks, mask and positions below are host work
    return _fit(tree, budget, vocab, rules.sp.do_sample)


def _tree_inputs(tree: TokenTree, history: _History, start: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The verify forward's inputs on the host: ids [n + 1] (the root, i.e. the last committed
    token, then the nodes), positions [n + 1] from ``start``, ancestor mask [n + 1, n + 1]."""
    if len(tree) == 0:  # plain decoding: the root alone
        return torch.tensor([history.tokens[-1]]), torch.tensor([start]), torch.ones(1, 1, dtype=torch.bool)
    _, mask = tree.with_root()
    inp = torch.cat([torch.tensor([history.tokens[-1]]), tree.tokens.cpu()])
    pos = start + torch.cat([torch.zeros(1, dtype=torch.long), tree.depth.cpu()])
    return inp, pos, mask


def _settle(tree: TokenTree, logits: torch.Tensor, history: _History, rules: _Rules, remaining: int
            ) -> tuple[list[int], list[int], bool]:
    """From a tree's logits [n + 1, V] (row 0: the root) to (accepted node indices, committed
    tokens -- accepted then the bonus, cut at EOS / max_new_tokens / a stopping criterion --,
    whether the sequence stops)."""
    sp, device = rules.sp, logits.device
    counts = context_counts(history.counts, tree.to(device)) if history.counts is not None else None
    processed = logits if rules.processor is None else rules.processor(logits, history.view(), tree)
    processed = process(processed, sp, counts, check_nan=False)  # NaNs: checked in accept_*
    if sp.do_sample:
        acc = accept_sampling(tree, torch.softmax(processed, -1), rules.generator)
    else:
        acc = accept_greedy(tree, processed)
    drafted = tree.tokens.tolist()
    new, stop = _truncate([drafted[i] for i in acc.accepted_nodes] + [acc.bonus_token], rules.eos, remaining)
    cut = None if rules.stopping is None else first_stop(rules.stopping, history.view(), new, device)
    if cut is not None:
        new, stop = new[:cut + 1], True
    return acc.accepted_nodes, new, stop


def _is_batch(input_ids, attention_mask) -> bool:
    """More than one row: a [B > 1, T] tensor or a list of rows."""
    if isinstance(input_ids, torch.Tensor):
        return input_ids.dim() == 2 and input_ids.shape[0] > 1
    return (isinstance(input_ids, (list, tuple)) and len(input_ids) > 1
            and isinstance(input_ids[0], (list, tuple, torch.Tensor)))


def _per_row(option, input_ids) -> list | None:
    """The same per-sequence option for every row of a batch."""
    return None if option is None else [option] * (input_ids.shape[0] if isinstance(input_ids, torch.Tensor)
                                                   else len(input_ids))


def _eos_set(eos_token_id, model) -> set[int]:
    if eos_token_id is None:
        gc = getattr(model, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.tolist()
    return {int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple, set)) else [eos_token_id])}


def _check_prompt(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"expected one sequence, got batch {ids.shape[0]} (specdec.generate sends batches "
                             "to specdec.batch_generate.generate_batch)")
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"input_ids must be [seq] or [1, seq], got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("empty prompt: input_ids has no tokens; give at least one token (e.g. BOS)")
    return ids.long()


def _check_inputs(prompt: torch.Tensor, drafter, runner: Runner) -> None:
    if isinstance(drafter, str):
        raise TypeError(f"drafter must be a Drafter, got the string {drafter!r}; build one with "
                        f"specdec.drafters.make({drafter!r}, target=model)")
    missing = [m for m in ("reset", "propose", "update") if not callable(getattr(drafter, m, None))]
    if missing:
        raise TypeError(f"drafter {type(drafter).__name__} lacks {', '.join(missing)}: a Drafter needs "
                        "reset(prompt), propose(request) -> TokenTree and update(result) (specdec.drafters.base)")
    _check_drafter(drafter, runner)
    if prompt.numel() > runner.max_length:
        raise ValueError(f"prompt has {prompt.numel()} tokens but the model's context is "
                         f"{runner.max_length}; truncate the prompt")
    if int(prompt.max()) >= runner.vocab_size or int(prompt.min()) < 0:
        raise ValueError(f"prompt holds token ids outside the model's vocabulary [0, {runner.vocab_size})")


def _check_drafter(drafter, runner) -> None:
    dv = getattr(drafter, "vocab_size", None)
    if dv is not None and dv != runner.vocab_size:
        raise ValueError(f"draft and target vocabularies differ: drafter has {dv} logits, target "
                         f"{runner.vocab_size}. The draft model must share the target's tokenizer.")
    dd = getattr(drafter, "draft_device", None)  # a draft model's device (not e.g. a host-side table's)
    if dd is not None and torch.device(dd) != torch.device(runner.device):
        raise ValueError(f"draft model is on {dd} but the target is on {runner.device}; "
                         "move both to the same device")


def _fit(tree: TokenTree, budget: TreeBudget, vocab: int, sampling: bool) -> TokenTree:
    """Check what a drafter returned and enforce the step budget on it."""
    if len(tree) == 0:
        return tree
    if int(tree.tokens.max()) >= vocab or int(tree.tokens.min()) < 0:
        raise ValueError("drafter proposed token ids outside the target's vocabulary")
    if sampling and tree.draft_probs is not None:
        _check_draft_probs(tree, vocab)
    tree = tree.truncate(budget.max_nodes)
    if int(tree.depth.max()) > budget.max_depth:
        # nodes deeper than the budget have all descendants deeper too: the rest is ancestor-closed
        tree = tree.select((tree.depth <= budget.max_depth).nonzero().flatten())
    return tree


def _check_draft_probs(tree: TokenTree, vocab: int) -> None:
    """A node's draft distribution must be finite, non-negative and give its own token q > 0
    (q = 0 would accept it unconditionally, NaN would draw garbage): one check, one transfer."""
    dp = tree.draft_probs  # [n, V']
    if dp.dim() != 2 or dp.shape[1] < vocab:
        raise ValueError(f"TokenTree.draft_probs must be [nodes, vocab >= {vocab}], got {tuple(dp.shape)}")
    own = dp.gather(1, tree.tokens.to(dp.device)[:, None])  # [n, 1]
    if bool((~torch.isfinite(dp)).any() | (dp < 0).any() | (own <= 0).any()):
        raise ValueError("drafter returned draft_probs that are not a distribution its tokens were drawn from "
                         "(NaN/inf, negative, or probability 0 at the proposed token)")


def _truncate(new: list[int], eos: set[int], remaining: int) -> tuple[list[int], bool]:
    """Cut the committed tokens at the first EOS (kept) or at max_new_tokens."""
    for i, t in enumerate(new):
        if t in eos:
            return new[: min(i + 1, remaining)], True
    if len(new) >= remaining:
        return new[:remaining], True
    return new, False
