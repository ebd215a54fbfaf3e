"""Drop-in entry points: ``accelerate(model)`` and ``dualdec(...)``."""
from __future__ import annotations

import types

import torch

from .batch_generate import generate_batch
from .generate import generate
from .hf_generate import resolve_call


def _accelerated_generate(self, inputs=None, generation_config=None, streamer=None, **kwargs):
    """transformers-compatible ``generate`` backed by specdec (same arguments, same outputs;
    logits-level options run per tree node as transformers' own processors; options it
    cannot honour raise ``UnsupportedOption``: see ``specdec.hf_generate``)."""
    model = self
    seed = kwargs.pop("seed", None)
    call = resolve_call(model, inputs, generation_config, kwargs)
    ids, mask = call.input_ids, call.attention_mask
    if streamer is not None and ids.shape[0] > 1:
        raise ValueError("streaming supports batch size 1 only (as in transformers)")
    target = model.__dict__.get("_specdec_target", model)
    rows, stats = [], []
    if ids.shape[0] == 1:
        out = generate(target, ids[0][mask[0]], drafter=model._specdec_drafter(),
                       max_new_tokens=call.max_new_tokens, eos_token_id=call.eos_token_id or None,
                       streamer=streamer, seed=seed, logits_processor=call.processors_for(0),
                       stopping_criteria=call.criteria_for(0), exact=model._specdec_exact, **call.sampling)
        rows.append(torch.cat([ids[0], out.new_tokens.to(ids.device)]))
        stats.append(out.stats)
    else:  # one batched forward per step (specdec.batch_generate)
        out = generate_batch(target, ids, attention_mask=mask.long(), drafter=model._specdec_drafter,
                             max_new_tokens=call.max_new_tokens, eos_token_id=call.eos_token_id or None,
                             pad_token_id=call.pad_token_id, seed=seed, exact=model._specdec_exact,
                             row_logits_processors=[call.processors_for(b) for b in range(ids.shape[0])],
                             row_stopping_criteria=[call.criteria_for(b) for b in range(ids.shape[0])],
                             **call.sampling)
        for b, new in enumerate(out.new_token_lists):
            rows.append(torch.cat([ids[b], torch.tensor(new, dtype=ids.dtype, device=ids.device)]))
        stats = out.stats.rows
    width = max(r.numel() for r in rows)
    seqs = torch.full((len(rows), width), call.pad_token_id, dtype=ids.dtype, device=ids.device)
    for b, r in enumerate(rows):
        seqs[b, :r.numel()] = r
    model.specdec_stats = stats  # (the last call's; with threads, read them off the output instead)
    if call.return_dict:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        out = GenerateDecoderOnlyOutput(sequences=seqs)
        out.specdec_stats = stats  # this call's, one per row
        return out
    return seqs


def accelerate(model, drafter=None, exact: bool | None = None):
    """Return ``model`` with ``.generate`` replaced by specdec's lossless speculative decoding.

    ``drafter`` is a Drafter instance (reused across calls) or a zero-argument factory.
    The original method stays available as ``model.generate_original``. Stats (one per
    batch row): ``out.specdec_stats`` with ``return_dict_in_generate=True`` (per call, safe
    with threads), and the last call's in ``model.specdec_stats``. Concurrent calls on one
    model are safe: on CUDA they share one static cache and take turns (a lock per runner).
    ``exact``: the exact mode (``specdec.generate``'s ``exact``; None: its default)."""
    from .drafters.base import NoDrafter

    if drafter is None:
        factory = NoDrafter
    elif isinstance(drafter, type) or (callable(drafter) and not hasattr(drafter, "propose")):  # a factory
        factory = drafter
    else:
        factory = lambda: drafter  # noqa: E731
    if not hasattr(model, "generate_original"):
        model.generate_original = model.generate
    # (not ``model._specdec_target = model``: nn.Module would register the model as its own
    # submodule, and state_dict / to / save_pretrained would recurse forever)
    model._specdec_drafter = factory
    model._specdec_exact = exact
    model.generate = types.MethodType(_accelerated_generate, model)
    return model


def dualdec(prefix, approx_model, target_model, ngram_cache=None, max_len=512, gamma=4, window_size=20,
            guess_set_size=20, lookahead_level=7, eos_token_id=2, topk=3):
    """Dual decoding with the ``dualdec`` package's signature: greedy, lossless.

    prefix [1, T] token ids; approx_model drafts ``gamma`` tokens per step; ``max_len``
    new tokens at most; returns prefix + generated tokens [1, T + new]. With the n-gram
    drafters available, the draft model's chain is merged with the n-gram pool
    (``ngram_cache``: pass the same object across calls for a warm start)."""
    from .drafters import dual

    drafter = dual.make_dual_drafter(approx_model, ngram_cache=ngram_cache, gamma=gamma,
                                     window_size=window_size, guess_set_size=guess_set_size,
                                     lookahead_level=lookahead_level, topk=topk)
    out = generate(target_model, prefix, drafter=drafter, max_new_tokens=max_len, eos_token_id=eos_token_id)
    return out.sequences.to(torch.as_tensor(prefix).device)
