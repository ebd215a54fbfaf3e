"""transformers' ``generate`` arguments, resolved exactly as transformers does.

``resolve_call`` merges the model's ``generation_config``, a passed ``GenerationConfig`` and
keywords with transformers' own ``_prepare_generation_config`` (same defaults, e.g.
``top_k=50`` when sampling, 20 new tokens when no length is given), rejects unknown keywords
as transformers does ("model_kwargs are not used") and infers a missing attention mask from
the pad token. Logits-level options run as transformers' own processors on every tree node
(``specdec.node_processors``), stop strings / max_time / user criteria on the committed
tokens; what the loop cannot honour (beams, extra outputs, assistants, ...) is refused with
an error that names it: nothing is silently ignored. The table of options is in the README.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .node_processors import with_prefix

# option -> its neutral value once transformers has filled in its defaults: honoured through
# transformers' own logits processors, applied per tree node (``specdec.node_processors``)
PER_NODE = {
    "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None,
    "no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "sequence_bias": None, "forced_bos_token_id": None, "forced_eos_token_id": None, "min_length": 0,
    "min_new_tokens": None, "encoder_repetition_penalty": 1.0, "exponential_decay_length_penalty": None,
    "renormalize_logits": None, "remove_invalid_values": False,
}
# honoured through transformers' stopping criteria, on the committed tokens
STOPPING = {"stop_strings": None, "max_time": None}

# option -> its neutral value: anything else is refused
REFUSED_CONFIG = {
    "num_beams": 1, "num_return_sequences": 1, "num_beam_groups": 1, "diversity_penalty": 0.0,
    "penalty_alpha": None, "guidance_scale": None, "dola_layers": None, "watermarking_config": None,
    "token_healing": None, "force_words_ids": None, "constraints": None, "prompt_lookup_num_tokens": None,
    "output_scores": False, "output_logits": None, "output_attentions": False, "output_hidden_states": False,
}
_FALSY_IS_NEUTRAL = {"renormalize_logits", "output_logits", "token_healing", "remove_invalid_values"}
# generate() arguments that are not GenerationConfig fields
REFUSED_ARGS = ("assistant_model", "negative_prompt_ids", "negative_prompt_attention_mask", "assistant_tokenizer",
                "custom_generate", "synced_gpus", "inputs_embeds")


class UnsupportedOption(NotImplementedError):
    """A ``generate`` option specdec cannot honour losslessly (yet)."""


@dataclass
class ResolvedCall:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] bool, left padding only
    max_new_tokens: int
    eos_token_id: list[int]
    pad_token_id: int
    sampling: dict  # SamplingParams fields for specdec.generate
    return_dict: bool
    model: object = None
    config: object = None  # the resolved GenerationConfig
    per_node: bool = False  # transformers' processors run in the loop
    user_processors: object = None
    prefix_allowed_tokens_fn: object = None
    user_criteria: object = None
    tokenizer: object = None

    def processors_for(self, row: int):
        """transformers' logits processors for batch row ``row``, built and fed as transformers
        does for that row (its left padding stays in the processors' ``input_ids``, lengths
        count the padded width); None on the fast path."""
        if not self.per_node:
            return None
        ids = self.input_ids[row]  # [T] with its padding
        fn = self.prefix_allowed_tokens_fn
        procs = self.model._get_logits_processor(
            generation_config=self._config(), input_ids_seq_length=ids.numel(), encoder_input_ids=ids[None],
            prefix_allowed_tokens_fn=None if fn is None else (lambda _, sent: fn(row, sent)),
            logits_processor=self.user_processors, device=ids.device,
            model_kwargs={"attention_mask": self.attention_mask[row][None].long()})
        pads = self._padding(row)
        for p in procs:  # the repetition penalty skips the row's pads, given per batch row: here every
            if isinstance(getattr(p, "prompt_ignore_length", None), torch.Tensor):  # context is this row's
                p.prompt_ignore_length = pads.numel()
        return with_prefix(procs, pads)

    def criteria_for(self, row: int):
        """Stopping criteria beyond EOS and length (stop strings, max_time, the user's) for batch
        row ``row``, or None."""
        if not self.user_criteria and not any(_set(self.config, n, v) for n, v in STOPPING.items()):
            return None
        from transformers import StoppingCriteriaList

        criteria = self.model._get_stopping_criteria(self._config(), self.user_criteria or StoppingCriteriaList(),
                                                     tokenizer=self.tokenizer)
        return with_prefix(criteria, self._padding(row))

    def _padding(self, row: int) -> torch.Tensor:
        return self.input_ids[row][~self.attention_mask[row]]  # [pads] (specdec decodes the row without them)

    def _config(self):
        config = copy.deepcopy(self.config)
        width = self.input_ids.shape[1]
        config.max_length = width + self.max_new_tokens
        if config.min_new_tokens is not None:
            config.min_length = config.min_new_tokens + width
        self.model._prepare_special_tokens(config, True, device=self.input_ids.device)
        return config


def resolve_call(model, inputs, generation_config, kwargs: dict) -> ResolvedCall:
    """Resolve a ``model.generate(inputs, generation_config, **kwargs)`` call (see the module)."""
    kwargs = dict(kwargs)
    if isinstance(inputs, Mapping):  # a BatchEncoding (or dict) passed positionally
        kwargs = {**inputs, **kwargs}
        inputs = None
    input_ids = kwargs.pop("input_ids", None) if inputs is None else inputs
    tokenizer = kwargs.pop("tokenizer", None)  # (for stop_strings)
    user_processors, user_criteria = kwargs.pop("logits_processor", None), kwargs.pop("stopping_criteria", None)
    prefix_fn = kwargs.pop("prefix_allowed_tokens_fn", None)
    for name in REFUSED_ARGS:
        value = kwargs.pop(name, None)
        if name == "synced_gpus" and not value:
            continue
        if name == "inputs_embeds" and value is not None and input_ids is not None:
            continue  # transformers decodes from input_ids then; so do we
        if value is not None:
            raise _refuse(name, value)
    if input_ids is None:
        raise ValueError("generate needs input_ids (inputs_embeds alone are not supported by specdec)")
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    model_config = getattr(model, "generation_config", None)
    has_default_max_length = (kwargs.get("max_length") is None
                              and (generation_config is None or generation_config.max_length is None)
                              and getattr(model_config, "max_length", None) is None)
    config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    model._validate_model_kwargs(dict(model_kwargs))  # unknown or misspelt keywords: transformers' error
    for name, neutral in REFUSED_CONFIG.items():
        if _set(config, name, neutral):
            raise _refuse(name, getattr(config, name))
    per_node = bool(user_processors) or prefix_fn is not None or any(_set(config, n, v) for n, v in PER_NODE.items())
    eos = _ids(config.eos_token_id)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    mask = _attention_mask(model_kwargs.get("attention_mask"), input_ids, config.pad_token_id, eos)
    max_new = _max_new_tokens(model, config, input_ids.shape[1], has_default_max_length)
    sampling = {"do_sample": bool(config.do_sample)}  # per node, transformers' processors do the rest
    if not per_node:
        sampling["repetition_penalty"] = float(config.repetition_penalty or 1.0)
        if config.do_sample:
            sampling.update(temperature=float(config.temperature), top_k=int(config.top_k or 0),
                            top_p=float(config.top_p if config.top_p is not None else 1.0))
    return ResolvedCall(input_ids, mask, max_new, eos, int(pad), sampling, bool(config.return_dict_in_generate),
                        model, config, per_node, user_processors, prefix_fn, user_criteria, tokenizer)


def _set(config, name: str, neutral) -> bool:
    value = getattr(config, name, neutral)
    return value != neutral and not (name in _FALSY_IS_NEUTRAL and not value)


def _refuse(name: str, value) -> UnsupportedOption:
    shown = repr(value) if len(repr(value)) < 60 else type(value).__name__
    return UnsupportedOption(
        f"specdec's generate does not support {name}={shown} yet (it would be ignored, changing the output). "
        f"Unset it (check model.generation_config too), or call model.generate_original(...) for this call.")


def _ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return [int(v) for v in (value if isinstance(value, (list, tuple, set)) else [value])]


def _attention_mask(mask, input_ids: torch.Tensor, pad_token_id, eos: list[int]) -> torch.Tensor:
    """[B, T] bool; without one, pads are inferred from ``pad_token_id`` as transformers does
    (when the pad token occurs and is not the EOS token)."""
    if mask is None:
        if pad_token_id is not None and pad_token_id not in eos and bool((input_ids == pad_token_id).any()):
            mask = input_ids != pad_token_id
        else:
            mask = torch.ones_like(input_ids, dtype=torch.bool)
    mask = torch.as_tensor(mask).to(input_ids.device).bool()
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
    for row in mask:
        if not row.any():
            raise ValueError("attention_mask has a row with no tokens: every prompt needs at least one")
        if not bool(row[int(row.nonzero()[0]):].all()):
            raise ValueError("attention_mask must be left-padded (zeros only before the first token); "
                             "tokenize with padding_side='left'")
    return mask


def _max_new_tokens(model, config, input_len: int, has_default_max_length: bool) -> int:
    """transformers' rule: max_new_tokens wins; a default max_length counts new tokens (20);
    an explicit max_length counts from the start and must exceed the prompt."""
    if config.max_new_tokens is not None:
        if config.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be greater than 0, but is {config.max_new_tokens}.")
        return int(config.max_new_tokens)
    max_length = config.max_length
    if has_default_max_length:
        max_length = max_length + input_len
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if limit is not None:
            max_length = min(max_length, limit)
        warnings.warn(f"Using the model-agnostic default `max_length` (={config.max_length}) to control the "
                      "generation length. We recommend setting `max_new_tokens` to control the maximum length "
                      "of the generation.", UserWarning, stacklevel=3)
    if input_len >= max_length:
        raise ValueError(f"Input length of input_ids is {input_len}, but `max_length` is set to {max_length}. "
                         "This can lead to unexpected behavior. You should consider increasing `max_length` or, "
                         "better yet, setting `max_new_tokens`.")
    return int(max_length - input_len)
