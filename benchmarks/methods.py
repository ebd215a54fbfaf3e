"""The decoding methods a benchmark compares, all on the same model, prompts and machine.

Each method has ``setup(ctx)`` (raises ``Unavailable`` with a reason: the method is then
reported as absent, never a crash), ``warmup(ctx, prompts)`` and ``run(ctx, ids, seed)
-> RunResult``. Names:

- ``hf_greedy``: transformers ``generate`` (dynamic cache); the reference for exact match
  and speedups (it samples when --temperature > 0);
- ``hf_static``: the same with ``cache_implementation="static"`` (auto-compiled on GPU);
- ``hf_assisted_k{K}``: assisted generation with ``--draft-model``, constant schedule of K
  draft tokens, confidence threshold 0;
- ``hf_prompt_lookup_{N}``: prompt lookup decoding with ``prompt_lookup_num_tokens=N``;
- ``specdec_{drafter}``: ``specdec.generate`` with each drafter of
  ``specdec.drafters.NAMES`` (``specdec_none`` is plain decoding through the same engine);
- ``specdec_compact_{drafter}``: the same on the compact runtime (``CompactRunner``),
  only with ``--compact``.
"""
from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field

import torch

from .common import sync


class Unavailable(Exception):
    """The method cannot run here; the message says why."""


@dataclass
class Context:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    max_new_tokens: int
    eos_token_id: list[int] | None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    draft_model: torch.nn.Module | None = None
    drafter_opts: dict = field(default_factory=dict)  # {drafter name: {option: value}}
    adaptive: bool = False  # specdec's adaptive budget (False: the fixed default TreeBudget)

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = self.eos_token_id[0] if self.eos_token_id else 0
        return int(pad)


@dataclass
class RunResult:
    new_tokens: list[int]
    wall_s: float  # the whole call: prefill + decode
    prefill_s: float | None = None  # HF: time to first token; specdec: the prefill forward
    stats: dict | None = None  # specdec: GenerationStats.as_dict() plus accepted_per_step


class Method:
    name = "?"
    family = "?"  # "hf" or "specdec"
    description = ""

    def setup(self, ctx: Context) -> None:
        pass

    def warmup(self, ctx: Context, prompts: list[torch.Tensor]) -> None:
        self.run(ctx, prompts[0], seed=0, max_new_tokens=min(8, ctx.max_new_tokens))

    def run(self, ctx: Context, ids: torch.Tensor, seed: int, max_new_tokens: int | None = None) -> RunResult:
        raise NotImplementedError


# --- transformers ------------------------------------------------------------------------------------

class _FirstTokenClock:
    """A streamer that only notes when the first generated token arrives."""

    def __init__(self):
        self.calls = 0
        self.first = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt
            self.first = time.perf_counter()

    def end(self):
        pass


class HFMethod(Method):
    family = "hf"

    def __init__(self, name: str, description: str, **gen_kwargs):
        self.name, self.description, self.gen_kwargs = name, description, gen_kwargs

    def kwargs(self, ctx: Context) -> dict:
        kw = dict(max_new_tokens=ctx.max_new_tokens, eos_token_id=ctx.eos_token_id, pad_token_id=ctx.pad_token_id,
                  do_sample=ctx.do_sample, repetition_penalty=1.0)
        if ctx.do_sample:
            kw.update(temperature=ctx.temperature, top_k=ctx.top_k or 0, top_p=ctx.top_p)
        return {**kw, **self.gen_kwargs}

    def run(self, ctx, ids, seed, max_new_tokens=None):
        kw = self.kwargs(ctx)
        if max_new_tokens is not None:
            kw["max_new_tokens"] = max_new_tokens
        ids = ids.to(ctx.device)
        clock = _FirstTokenClock()
        torch.manual_seed(seed)
        sync(ctx.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = ctx.model.generate(ids, attention_mask=torch.ones_like(ids), streamer=clock, **kw)
        sync(ctx.device)
        wall = time.perf_counter() - t0
        return RunResult(out[0, ids.shape[1]:].tolist(), wall, (clock.first - t0) if clock.first else None)


class HFStatic(HFMethod):
    def __init__(self):
        super().__init__("hf_static", "transformers generate, static KV cache (compiled on GPU)",
                         cache_implementation="static")

    def warmup(self, ctx, prompts):
        # Size the static cache for the longest prompt + max_new_tokens once: later calls
        # reuse that size (transformers keeps the largest), so nothing recompiles mid-run.
        longest = max(prompts, key=lambda p: p.shape[1])
        try:
            self.run(ctx, longest, seed=0)
            self.run(ctx, prompts[0], seed=0, max_new_tokens=min(8, ctx.max_new_tokens))
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"static cache failed: {type(e).__name__}: {e}") from e


class HFAssisted(HFMethod):
    def __init__(self, k: int):
        super().__init__(f"hf_assisted_k{k}", f"transformers assisted generation, {k} draft tokens (constant)")
        self.k = k

    def setup(self, ctx):
        if ctx.draft_model is None:
            raise Unavailable("needs --draft-model")

    def run(self, ctx, ids, seed, max_new_tokens=None):
        gc = ctx.draft_model.generation_config
        gc.num_assistant_tokens = self.k
        gc.num_assistant_tokens_schedule = "constant"
        gc.assistant_confidence_threshold = 0.0
        self.gen_kwargs = {"assistant_model": ctx.draft_model}
        return super().run(ctx, ids, seed, max_new_tokens)


# --- specdec -----------------------------------------------------------------------------------------

class SpecdecMethod(Method):
    family = "specdec"

    def __init__(self, drafter: str, compact: bool = False):
        self.drafter_name, self.compact = drafter, compact
        self.name = f"specdec_{'compact_' if compact else ''}{drafter}"
        self.description = ("specdec plain decoding (no drafter)" if drafter == "none"
                            else f"specdec, drafter '{drafter}'") + (" on the compact runtime" if compact else "")
        self.drafter = self.target = None

    def setup(self, ctx):
        try:
            from specdec import drafters
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"import specdec failed: {type(e).__name__}: {e}") from e
        self.target = ctx.model
        if self.compact:
            try:
                from specdec.backends.compact import CompactRunner

                self.target = CompactRunner.from_hf(ctx.model)
            except Exception as e:  # noqa: BLE001
                raise Unavailable(f"compact runtime failed: {type(e).__name__}: {e}") from e
            if self.target is None:
                raise Unavailable("the compact runtime does not cover this model")
        opts = dict(ctx.drafter_opts.get(self.drafter_name, {}))
        if self.drafter_name == "model" and ctx.draft_model is None:
            raise Unavailable("needs --draft-model")
        try:
            self.drafter = drafters.make(self.drafter_name, target=ctx.model, **opts)
        except Exception as e:  # noqa: BLE001 -- maybe it needs a draft model
            if ctx.draft_model is None:
                raise Unavailable(f"{type(e).__name__}: {e}") from e
            try:
                self.drafter = drafters.make(self.drafter_name, target=ctx.model, draft_model=ctx.draft_model, **opts)
            except Exception as e2:  # noqa: BLE001
                raise Unavailable(f"{type(e2).__name__}: {e2}") from e2

    def run(self, ctx, ids, seed, max_new_tokens=None):
        import specdec

        sync(ctx.device)
        t0 = time.perf_counter()
        out = specdec.generate(self.target, ids.to(ctx.device), drafter=self.drafter,
                               max_new_tokens=ctx.max_new_tokens if max_new_tokens is None else max_new_tokens,
                               do_sample=ctx.do_sample, temperature=ctx.temperature, top_k=ctx.top_k,
                               top_p=ctx.top_p, eos_token_id=ctx.eos_token_id, seed=seed,
                               adaptive=ctx.adaptive)
        sync(ctx.device)
        wall = time.perf_counter() - t0
        s = out.stats
        stats = {**s.as_dict(), "accepted_per_step": list(s.accepted_per_step)}
        return RunResult(out.new_tokens.tolist(), wall, s.prefill_time_s, stats)


# --- the catalogue -----------------------------------------------------------------------------------

def drafter_names() -> tuple[tuple[str, ...], str | None]:
    """(specdec.drafters.NAMES, None) or ((), why the import failed)."""
    try:
        from specdec import drafters

        return tuple(drafters.NAMES), None
    except Exception as e:  # noqa: BLE001
        return (), f"{type(e).__name__}: {e}"


def catalogue(*, assist_tokens=(3, 5, 8), lookup_tokens=(3, 10), compact: bool = False) -> list[Method]:
    """Every method this benchmark knows, reference first."""
    ms: list[Method] = [HFMethod("hf_greedy", "transformers generate (dynamic cache)"), HFStatic()]
    ms += [HFAssisted(k) for k in assist_tokens]
    ms += [HFMethod(f"hf_prompt_lookup_{n}", f"transformers prompt lookup, {n} tokens",
                    prompt_lookup_num_tokens=n) for n in lookup_tokens]
    names, _ = drafter_names()
    names = ("none",) + tuple(n for n in names if n != "none")
    ms += [SpecdecMethod(n) for n in names]
    if compact:
        ms += [SpecdecMethod(n, compact=True) for n in names]
    return ms


def select(methods: list[Method], spec: str | None) -> tuple[list[Method], list[str]]:
    """Pick methods by comma-separated names or glob patterns ('all' or None: every one).
    Returns (chosen methods, the patterns that matched none)."""
    if spec in (None, "", "all"):
        return list(methods), []
    pats = [p.strip() for p in spec.split(",") if p.strip()]
    chosen = [m for m in methods if any(fnmatch.fnmatchcase(m.name, p) for p in pats)]
    unknown = [p for p in pats if not any(fnmatch.fnmatchcase(m.name, p) for m in methods)]
    return chosen, unknown
