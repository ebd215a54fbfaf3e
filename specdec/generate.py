"""The speculative decoding loop: draft a tree, verify it in one forward, accept, commit."""
from __future__ import annotations

import sys
import time
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch

from . import adaptive as _adaptive
from .backends.generic import HFRunner
from .config import SamplingParams, TreeBudget
from .drafters.base import DraftRequest, Drafter, NoDrafter, VerifyResult
from .sampling import accept_greedy, accept_sampling, context_counts, process
from .tree import TokenTree


@dataclass
class GenerationStats:
    steps: int = 0  # target verify forwards
    new_tokens: int = 0
    accepted_per_step: list[int] = field(default_factory=list)  # drafted tokens kept per step
    tree_sizes: list[int] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)  # the node budget each step's drafter was given
    depth_caps: list[int] = field(default_factory=list)  # ... and its depth cap
    draft_time_s: float = 0.0  # drafter.propose (and the budget checks on its tree)
    verify_time_s: float = 0.0  # the target's forward, acceptance, KV compaction
    update_time_s: float = 0.0  # drafter.update after each verification
    control_time_s: float = 0.0  # the adaptive controller's choose + observe (on a GPU mostly run
    # while the verify forward is in flight, so that part is inside verify_time_s too)
    prefill_time_s: float = 0.0
    total_time_s: float = 0.0

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
        return {"steps": self.steps, "new_tokens": self.new_tokens,
                "mean_accepted_length": self.mean_accepted_length,
                "acceptance_histogram": self.acceptance_histogram,
                "mean_tree_size": sum(self.tree_sizes) / max(1, len(self.tree_sizes)),
                "mean_budget": sum(self.budgets) / max(1, len(self.budgets)),
                "mean_depth_cap": sum(self.depth_caps) / max(1, len(self.depth_caps)),
                "draft_time_s": self.draft_time_s, "verify_time_s": self.verify_time_s,
                "update_time_s": self.update_time_s, "control_time_s": self.control_time_s,
                "prefill_time_s": self.prefill_time_s, "total_time_s": self.total_time_s,
                "tokens_per_second": self.tokens_per_second}


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [1, prompt_len + new] int64
    stats: GenerationStats

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[0, self.sequences.shape[1] - self.stats.new_tokens:]


BACKENDS = ("auto", "generic", "compact", "graphs")
# compact runners kept per model, so CUDA graphs and the static cache outlive one call
_RUNNERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _as_runner(model, backend: str, capacity: int):
    """A Runner for ``model``.

    "auto": on CUDA, the compact static-cache runtime with CUDA graphs ("graphs") when the
    architecture is supported, else the generic transformers backend (one log line says
    why); on CPU, the generic backend. "compact": the compact runtime, eager. "graphs":
    the compact runtime replayed from CUDA graphs (eager where graphs cannot run, with
    one line saying why). "generic": transformers' own forward. Compact runners are kept
    on the model between calls (their cache and captured graphs are reused)."""
    if not isinstance(model, torch.nn.Module):
        return model  # already a Runner
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    param = next(model.parameters())
    requested = backend
    if backend == "auto":
        backend = "graphs" if param.device.type == "cuda" else "generic"
    if backend == "generic":
        return HFRunner(model)
    kept = _RUNNERS.setdefault(model, {})
    key = (backend, param.device, param.dtype)
    runner = kept.get(key)
    if runner is None or runner.max_length < min(capacity, runner.model.max_position_embeddings):
        from .backends.compact import DEFAULT_MAX_LENGTH, CompactRunner
        from .models import unsupported_reason

        compact = CompactRunner.from_hf(model, max_length=max(capacity, DEFAULT_MAX_LENGTH))
        if compact is None:
            reason = unsupported_reason(model)
            if requested != "auto":
                raise ValueError(f"backend={backend!r} does not support this model: {reason}; "
                                 "use backend='generic'")
            _note_fallback(model, reason)
            return HFRunner(model)
        if backend == "graphs":
            from .backends.cuda_graphs import GraphedCompactRunner

            runner = GraphedCompactRunner(compact)
        else:
            runner = compact
        kept.clear()  # one static cache per model at a time
        kept[key] = runner
    return runner


_FALLBACKS: set[str] = set()


def _note_fallback(model, reason: str) -> None:
    name = type(model).__name__
    if name not in _FALLBACKS:
        _FALLBACKS.add(name)
        print(f"specdec: {name} runs on the generic transformers backend ({reason})", file=sys.stderr, flush=True)


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
            raise ValueError(f"specdec.generate decodes one sequence at a time, got batch {ids.shape[0]}; "
                             "loop over the rows (specdec.accelerate(model).generate does this for you)")
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"input_ids must be [seq] or [1, seq], got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("empty prompt: input_ids has no tokens; give at least one token (e.g. BOS)")
    return ids.long()


def _check_drafter(drafter, runner) -> None:
    dv = getattr(drafter, "vocab_size", None)
    if dv is not None and dv != runner.vocab_size:
        raise ValueError(f"draft and target vocabularies differ: drafter has {dv} logits, target "
                         f"{runner.vocab_size}. The draft model must share the target's tokenizer.")
    dd = getattr(drafter, "draft_device", None)  # a draft model's device (not e.g. a host-side table's)
    if dd is not None and torch.device(dd) != torch.device(runner.device):
        raise ValueError(f"draft model is on {dd} but the target is on {runner.device}; "
                         "move both to the same device")


@torch.no_grad()
def generate(model, input_ids, *, drafter: Drafter | None = None, max_new_tokens: int = 128,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
             presence_penalty: float = 0.0, eos_token_id=None, pad_token_id=None, streamer=None,
             seed: int | None = None, generator: torch.Generator | None = None,
             budget: TreeBudget | None = None, backend: str = "auto",
             adaptive: bool | _adaptive.BudgetController = True) -> GenerationOutput:
    """Lossless speculative decoding of one sequence.

    ``model`` is a transformers causal LM (or a specdec Runner); ``drafter`` proposes
    token trees (None = plain decoding). Returns the sequences [1, prompt + new] and
    stats (steps, tau, acceptance histogram, draft / verify time). ``backend``: "auto"
    (on CUDA the compact static-cache runtime with CUDA graphs when the architecture is
    supported; otherwise the generic transformers backend), "generic", "compact" (eager)
    or "graphs". ``adaptive``: a
    ``specdec.adaptive.BudgetController`` (or True: the drafter's own, else one kept per
    target; greedy only, so sampling stays reproducible per seed) picks each step's
    budget for throughput; an explicit ``budget`` pins it (with a controller given, it
    caps the choice)."""
    t_start = time.perf_counter()
    if max_new_tokens is None or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    sp = SamplingParams(do_sample=do_sample, temperature=temperature, top_k=top_k or 0, top_p=top_p,
                        repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                        presence_penalty=presence_penalty)
    drafting = drafter is not None and not isinstance(drafter, NoDrafter)
    controller, choosing = _adaptive.resolve(adaptive, budget, model, drafter if drafting else None,
                                             sampling=sp.do_sample)
    cap = budget or (controller.max_budget if choosing else TreeBudget())  # the most any step may draft
    prompt = _check_prompt(input_ids)
    runner = _as_runner(model, backend, prompt.numel() + max_new_tokens + cap.max_nodes + 1)
    drafter = drafter or NoDrafter()
    key = _adaptive.drafter_key(drafter)
    if controller is not None:
        controller.attach(runner, model)
        controller.begin_request(key, learns_from_tree=bool(getattr(drafter, "learns_from_tree", False)))
    _check_drafter(drafter, runner)
    if prompt.numel() > runner.max_length:
        raise ValueError(f"prompt has {prompt.numel()} tokens but the model's context is "
                         f"{runner.max_length}; truncate the prompt")
    if int(prompt.max()) >= runner.vocab_size or int(prompt.min()) < 0:
        raise ValueError(f"prompt holds token ids outside the model's vocabulary [0, {runner.vocab_size})")
    eos = _eos_set(eos_token_id, model)
    device = runner.device
    fit_nodes = getattr(runner, "fit_nodes", None)  # runners that pad to buckets: no wasted slots
    if generator is None and seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(seed)

    stats = GenerationStats()
    tokens = prompt.tolist()
    # the same tokens as a tensor the drafters get views of (rebuilding it from the list
    # each step costs O(length) per step); only ever appended to, so views stay valid
    token_buf = torch.empty(len(tokens) + max_new_tokens + 1, dtype=torch.long)
    token_buf[:len(tokens)] = prompt.cpu()
    runner.reset()
    drafter.reset(prompt)
    if streamer is not None:
        streamer.put(prompt[None].cpu())
    if len(tokens) > 1:  # the last prompt token is the first root: it runs with the first tree
        t0 = time.perf_counter()
        fill = getattr(runner, "prefill", None) or runner.forward  # (the prompt's logits are not needed)
        fill(prompt[:-1].to(device), torch.arange(len(tokens) - 1, device=device))
        stats.prefill_time_s = time.perf_counter() - t0
    overlap = _overlap_control(controller, device)
    chosen_ahead: TreeBudget | None = None  # the next step's budget, chosen during a verify
    context: int | None = None  # the context the step's budget was taken in (per-context choices)
    if overlap and choosing and max_new_tokens > 0:  # the first budget, chosen while the GPU runs the prefill
        t_ctl = time.perf_counter()
        chosen_ahead, context = controller.choose(key), controller.chosen_context(key)
        stats.control_time_s += time.perf_counter() - t_ctl
    base_counts = torch.bincount(prompt, minlength=runner.vocab_size).float().to(device) \
        if sp.has_penalties else None
    stop = max_new_tokens == 0
    # On a GPU the verify forward runs asynchronously until acceptance reads its result: the
    # controller learns from step s - 1 and picks step s + 1's budget in that window, so its
    # host time hides behind the GPU's (a one-step lag; with per-context choices it decides
    # for every context of step s's outcome and takes one once acceptance has run). On a CPU
    # it runs between steps.
    pending: dict | None = None  # the last step, waiting to be observed
    last_accepted = last_depth = None  # the last step's accepted count and depth cap
    while not stop:
        t_step = time.perf_counter()
        remaining = max_new_tokens - stats.new_tokens
        room = runner.max_length - len(tokens)  # positions left for the tree's nodes
        if room < 0:
            warnings.warn(f"reached the model's context length {runner.max_length}; stopping early")
            break
        if controller is not None:
            controller.set_sequence_length(len(tokens))  # (for length_bands)
        if choosing and chosen_ahead is not None:
            chosen, chosen_ahead = chosen_ahead, None
        elif choosing:
            t_choose = time.perf_counter()
            chosen = controller.choose(key)
            context = controller.chosen_context(key)
            stats.control_time_s += time.perf_counter() - t_choose
        else:
            chosen = cap
        deepest = min(cap.max_depth, remaining - 1, room)
        arm_budget = TreeBudget(max_nodes=min(chosen.max_nodes, cap.max_nodes, room),  # the controller's view
                                max_depth=min(chosen.max_depth, deepest))
        # what is drafted: the runner's cut of the nodes; deeper after a full accept (``extend_depth``)
        depth = controller.step_depth(chosen.max_depth, last_accepted, last_depth) if choosing else chosen.max_depth
        step_budget = TreeBudget(arm_budget.max_nodes if fit_nodes is None else fit_nodes(arm_budget.max_nodes),
                                 min(depth, deepest))
        t0 = time.perf_counter()
        request = DraftRequest(token_buf[:len(tokens)], step_budget, sp, generator)
        tree = drafter.propose(request) if step_budget.max_depth > 0 else TokenTree.empty()
        if tree.device.type != "cpu" and tree.draft_probs is None:
            tree = tree.to("cpu")  # one transfer: the checks, mask and positions below are host work
        tree = _fit(tree, step_budget, runner.vocab_size)
        t1 = time.perf_counter()

        L = runner.length  # == len(tokens) - 1: the root is not cached yet
        _, mask_r = tree.with_root()  # [n + 1, n + 1] ancestor mask with the root as node 0
        n = len(tree)
        inp = torch.cat([torch.tensor([tokens[-1]]), tree.tokens.cpu()]).to(device)
        pos = (L + torch.cat([torch.zeros(1, dtype=torch.long), tree.depth.cpu()])).to(device)
        captures = getattr(runner, "captures", 0)  # a step that captures a CUDA graph is no timing sample
        logits = runner.forward(inp, pos, tree_mask=mask_r.to(device))[:, :runner.vocab_size]  # [n+1, V]
        planned = overlap and choosing and remaining > 1  # decide the next budget ahead (else this step is the last)
        if overlap:  # the GPU verifies; the host learns from the last step and decides the next
            t_ctl = time.perf_counter()
            if pending is not None:
                controller.observe(**pending)
                pending = None
            if planned:
                controller.choose_ahead(key)
            stats.control_time_s += time.perf_counter() - t_ctl
        counts = context_counts(base_counts, tree.to(device)) if sp.has_penalties else None
        processed = process(logits, sp, counts, check_nan=False)  # NaNs: checked in accept_*
        if sp.do_sample:
            acc = accept_sampling(tree, torch.softmax(processed, -1), generator)
        else:
            acc = accept_greedy(tree, processed)  # on CUDA: device path selection, one transfer
        runner.keep(L, torch.tensor([0] + [i + 1 for i in acc.accepted_nodes], device=device))
        drafted = tree.tokens.tolist()  # one transfer when the drafter works on the GPU
        new = [drafted[i] for i in acc.accepted_nodes] + [acc.bonus_token]
        new, stop = _truncate(new, eos, remaining)
        t2 = time.perf_counter()
        step_context = context
        if planned and not stop:  # the next step's budget, for this step's outcome
            context = len(acc.accepted_nodes)
            chosen_ahead = controller.take(key, context)
        stats.verify_time_s += t2 - t1
        stats.draft_time_s += t1 - t0

        token_buf[len(tokens):len(tokens) + len(new)] = torch.tensor(new)
        tokens.extend(new)
        stats.steps += 1
        stats.new_tokens += len(new)
        stats.accepted_per_step.append(len(acc.accepted_nodes))
        stats.tree_sizes.append(n)
        stats.budgets.append(step_budget.max_nodes)
        stats.depth_caps.append(step_budget.max_depth)
        last_accepted, last_depth = len(acc.accepted_nodes), step_budget.max_depth
        if base_counts is not None:
            base_counts += torch.bincount(torch.tensor(new, device=device), minlength=runner.vocab_size)
        if streamer is not None:
            streamer.put(torch.tensor(new))
        t3 = time.perf_counter()
        if not stop:
            drafter.update(VerifyResult(tree, acc.accepted_nodes, torch.tensor(new), token_buf[:len(tokens)], logits))
        t4 = time.perf_counter()
        stats.update_time_s += t4 - t3
        if controller is not None:
            # The controller prices a step by all of its time: whatever is not the verify forward
            # (drafting, the drafter's update, bookkeeping) counts on the drafting side. On a GPU
            # that is no detail: in an H200 bf16 sweep steps took ~1 ms more than draft + verify.
            other = time.perf_counter() - t_step - (t2 - t1)
            step = dict(key=key, tree_size=n, accepted=len(acc.accepted_nodes), draft_time=other,
                        verify_time=t2 - t1, tree=tree, accepted_nodes=acc.accepted_nodes, budget=arm_budget,
                        timed=getattr(runner, "captures", 0) == captures, overlapped=overlap, context=step_context)
            if overlap and not stop:
                pending = step  # observed during the next step's verify forward
            else:
                controller.observe(**step)
                stats.control_time_s += time.perf_counter() - t4
    if pending is not None:  # (the loop stopped at the context's end)
        controller.observe(**pending)
    if streamer is not None:
        streamer.end()
    stats.total_time_s = time.perf_counter() - t_start
    return GenerationOutput(torch.tensor(tokens, device=prompt.device)[None], stats)


def _overlap_control(controller, device) -> bool:
    """Whether the controller runs while the device verifies (see ``generate``)."""
    return controller is not None and torch.device(device).type == "cuda"


def _fit(tree: TokenTree, budget: TreeBudget, vocab: int) -> TokenTree:
    """Enforce the step budget on whatever a drafter returned."""
    if len(tree) == 0:
        return tree
    if int(tree.tokens.max()) >= vocab or int(tree.tokens.min()) < 0:
        raise ValueError("drafter proposed token ids outside the target's vocabulary")
    tree = tree.truncate(budget.max_nodes)
    if int(tree.depth.max()) > budget.max_depth:
        keep = (tree.depth <= budget.max_depth).nonzero().flatten()
        # nodes deeper than the budget have all descendants deeper too: dropping them keeps order
        remap = torch.full((len(tree),), -1, dtype=torch.long)
        remap[keep] = torch.arange(keep.numel())
        parents = tree.parents[keep]
        parents = torch.where(parents >= 0, remap[parents.clamp(min=0)], parents)
        dp = None if tree.draft_probs is None else tree.draft_probs[keep]
        sc = None if tree.scores is None else tree.scores[keep]
        tree = TokenTree(tree.tokens[keep], parents, dp, sc)
    return tree


def _truncate(new: list[int], eos: set[int], remaining: int) -> tuple[list[int], bool]:
    """Cut the committed tokens at the first EOS (kept) or at max_new_tokens."""
    for i, t in enumerate(new):
        if t in eos:
            return new[: min(i + 1, remaining)], True
    if len(new) >= remaining:
        return new[:remaining], True
    return new, False
