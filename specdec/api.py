"""Drop-in entry points: ``accelerate(model)`` and ``dualdec(...)``."""
from __future__ import annotations

import types

import torch

from .generate import generate


_SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
_UNSUPPORTED = ("num_beams", "num_return_sequences", "output_scores", "output_logits",
                "output_attentions", "output_hidden_states", "prefix_allowed_tokens_fn",
                "logits_processor", "stopping_criteria", "assistant_model", "prompt_lookup_num_tokens")
_UNSUPPORTED_OK = {"num_beams": 1, "num_return_sequences": 1}


def _resolve_config(model, generation_config, kwargs) -> dict:
    """Merge model.generation_config, an explicit GenerationConfig and kwargs (HF precedence)."""
    base = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    cfg = base.to_dict() if base is not None else {}
    cfg.update({k: v for k, v in kwargs.items()})
    return cfg


def _accelerated_generate(self, inputs=None, generation_config=None, streamer=None, **kwargs):
    """transformers-compatible ``generate`` backed by specdec (same args, same outputs)."""
    model = self
    drafter_factory = model._specdec_drafter
    input_ids = kwargs.pop("input_ids", inputs)
    attention_mask = kwargs.pop("attention_mask", None)
    return_dict = kwargs.pop("return_dict_in_generate", None)
    seed = kwargs.pop("seed", None)
    cfg = _resolve_config(model, generation_config, kwargs)
    for key in _UNSUPPORTED:
        val = cfg.get(key)
        if val not in (None, False, _UNSUPPORTED_OK.get(key, None)):
            raise NotImplementedError(f"specdec.accelerate: generate(..., {key}={val!r}) is not supported; "
                                      "call the model's original generate for this option")
    if return_dict is None:
        return_dict = cfg.get("return_dict_in_generate", False)
    if input_ids is None:
        raise ValueError("generate needs input_ids")
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    max_new = cfg.get("max_new_tokens")
    if max_new is None:
        max_length = cfg.get("max_length") or 20
        max_new = max(0, max_length - input_ids.shape[1])
    eos = cfg.get("eos_token_id")
    pad = cfg.get("pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, (list, tuple)) else (eos if eos is not None else 0)
    sampling = {k: cfg[k] for k in _SAMPLING_KEYS if cfg.get(k) is not None}
    if not sampling.get("do_sample", False):
        sampling = {k: v for k, v in sampling.items() if k in ("do_sample", "repetition_penalty")}
    if streamer is not None and input_ids.shape[0] > 1:
        raise ValueError("streaming supports batch size 1 only (as in transformers)")

    rows, stats = [], []
    for b in range(input_ids.shape[0]):
        ids = input_ids[b]
        if attention_mask is not None:
            keep = torch.as_tensor(attention_mask)[b].bool()
            if not bool(keep[keep.nonzero().min():].all()) if keep.any() else True:
                raise ValueError("attention_mask must be left-padded (zeros only before the first token)")
            ids = ids[keep]
        out = generate(model._specdec_target, ids, drafter=drafter_factory(), max_new_tokens=max_new,
                       eos_token_id=eos, streamer=streamer, seed=seed, **sampling)
        new = out.new_tokens.to(input_ids.device)
        rows.append(torch.cat([input_ids[b], new]))
        stats.append(out.stats)
    width = max(r.numel() for r in rows)
    seqs = torch.full((len(rows), width), int(pad), dtype=input_ids.dtype, device=input_ids.device)
    for b, r in enumerate(rows):
        seqs[b, :r.numel()] = r
    model.specdec_stats = stats
    if return_dict:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=seqs)
    return seqs


def accelerate(model, drafter=None):
    """Return ``model`` with ``.generate`` replaced by specdec's lossless speculative decoding.

    ``drafter`` is a Drafter instance (reused across calls) or a zero-argument factory.
    The original method stays available as ``model.generate_original``. Stats of the
    last call are in ``model.specdec_stats`` (one per batch row)."""
    from .drafters.base import NoDrafter

    if drafter is None:
        factory = NoDrafter
    elif callable(drafter) and not hasattr(drafter, "propose"):
        factory = drafter
    else:
        factory = lambda: drafter  # noqa: E731
    if not hasattr(model, "generate_original"):
        model.generate_original = model.generate
    model._specdec_target = model
    model._specdec_drafter = factory
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
