"""EarlyExitDrafter: self-speculation with the target's own first L layers (Kangaroo-style).

The draft model is a *shallow view* of the target: a model object of the target's own
class whose decoder runs ``layers[:L]`` and then the target's final norm and LM head,
sharing every parameter with the target (no copy), with ``config.num_hidden_layers = L``
(and ``layer_types`` cut to L for hybrid-attention models like Gemma3 / Qwen2). An
optional ``ResidualAdapter`` sits between layer L and the final norm:
``h + W_up(act(W_down(rmsnorm(h))))`` with ``W_up`` zero-initialised, so an untrained
adapter is plain early exit. ``python -m specdec.train_adapter`` distils it.

Drafting is ModelDrafter's chain (its own KV cache for the shallow layers through
HFRunner, rollback to the committed prefix, sampling from the processed draft
distribution with ``draft_probs`` attached), stopped early when the draft's top-1
probability falls below ``threshold``.

Supported: models whose base model holds ``layers`` (a ModuleList) and ``norm`` and
whose forward loops over ``layers[: config.num_hidden_layers]`` (Llama, Mistral, Qwen2,
Qwen3, Gemma, Gemma2/3, Phi3, ... in transformers 5).
"""
from __future__ import annotations

import copy
import json

import torch
from torch import nn

from .model import ModelDrafter


class ResidualAdapter(nn.Module):
    """h -> h + up(silu(down(rmsnorm(h)))): [..., hidden] -> [..., hidden]; identity at init."""

    def __init__(self, hidden_size: int, bottleneck: int | None = None, eps: float = 1e-6):
        super().__init__()
        bottleneck = bottleneck or hidden_size
        self.hidden_size, self.bottleneck, self.eps = hidden_size, bottleneck, eps
        self.norm_weight = nn.Parameter(torch.ones(hidden_size))
        self.down = nn.Linear(hidden_size, bottleneck, bias=False)
        self.up = nn.Linear(bottleneck, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight.float()
        return h + self.up(nn.functional.silu(self.down(x.to(h.dtype))))

    # ----------------------------------------------------------------- files
    def save(self, path: str, **meta) -> None:
        from safetensors.torch import save_file

        info = {"hidden_size": self.hidden_size, "bottleneck": self.bottleneck, "eps": self.eps, **meta}
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, path,
                  metadata={"specdec_adapter": json.dumps(info)})

    @classmethod
    def load(cls, path: str, device=None, dtype=None) -> tuple["ResidualAdapter", dict]:
        """(adapter, metadata) from a file written by ``save``."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            info = json.loads((f.metadata() or {}).get("specdec_adapter", "{}"))
        state = load_file(path)
        hidden = info.get("hidden_size", state["norm_weight"].numel())
        ad = cls(hidden, info.get("bottleneck", state["down.weight"].shape[0]), info.get("eps", 1e-6))
        ad.load_state_dict(state)
        return ad.to(device=device, dtype=dtype), info


class _AdaptedNorm(nn.Module):
    """The target's final norm applied after the adapter."""

    def __init__(self, adapter: nn.Module, norm: nn.Module):
        super().__init__()
        self.adapter, self.norm = adapter, norm

    def forward(self, h):
        return self.norm(self.adapter(h))


def _base(model):
    base = getattr(model, model.base_model_prefix, None)
    if base is None or not isinstance(getattr(base, "layers", None), nn.ModuleList) \
            or getattr(base, "norm", None) is None:
        raise ValueError(f"early exit needs a decoder with `layers` and `norm` ({type(model).__name__} has "
                         "another layout)")
    return base


def _module_copy(mod: nn.Module) -> nn.Module:
    """A new module object sharing all parameters/submodules, with its own child slots."""
    new = copy.copy(mod)
    for name, value in mod.__dict__.items():  # _modules, _parameters, _buffers, hook dicts, ...
        if isinstance(value, dict):
            new.__dict__[name] = value.copy()  # own slots; the values are shared
    return new


def num_layers(model) -> int:
    return len(_base(model).layers)


def shallow_view(target, layers: int, *, adapter: nn.Module | None = None):
    """A model of ``target``'s class running only its first ``layers`` decoder layers,
    then (``adapter``,) the final norm and the LM head; all parameters are shared."""
    base = _base(target)
    total = len(base.layers)
    if not 1 <= layers <= total:
        raise ValueError(f"early exit: layers must be in [1, {total}], got {layers}")
    cfg = copy.deepcopy(target.config)
    text_cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    text_cfg.num_hidden_layers = layers
    if getattr(text_cfg, "layer_types", None) is not None:
        text_cfg.layer_types = list(text_cfg.layer_types)[:layers]
    new_base = _module_copy(base)
    new_base.config = text_cfg
    new_base.layers = nn.ModuleList(list(base.layers)[:layers])
    if adapter is not None:
        new_base.norm = _AdaptedNorm(adapter, base.norm)
    if hasattr(new_base, "has_sliding_layers"):  # Qwen2: decides which masks to build
        new_base.has_sliding_layers = "sliding_attention" in (text_cfg.layer_types or [])
    view = _module_copy(target)
    view.config = cfg
    setattr(view, target.base_model_prefix, new_base)
    return view.eval() if not target.training else view


class EarlyExitDrafter(ModelDrafter):
    """Drafts a chain with the target's first ``layers`` layers (+ optional adapter).

    target:    the target HF model (its parameters are shared, not copied).
    layers:    L, decoder layers used for drafting (default: a quarter, at least 1).
    adapter:   None, a ResidualAdapter, or a path to a ``.safetensors`` from train_adapter
               (its recorded layer count is used when ``layers`` is not given).
    gamma:     most tokens drafted per step; threshold: stop when top-1 prob < threshold.
    topk:      > 1 drafts ModelDrafter's top-k tree instead of a chain (deterministic nodes).
    """

    def __init__(self, target, *, layers: int | None = None, adapter=None, gamma: int = 4,
                 threshold: float = 0.0, topk: int = 1):
        if isinstance(adapter, str):
            p = next(target.parameters())
            adapter, info = ResidualAdapter.load(adapter, device=p.device, dtype=p.dtype)
            layers = layers or info.get("layers")
        total = num_layers(target)
        self.layers = int(layers) if layers else max(1, total // 4)
        self.adapter = adapter
        self.view = shallow_view(target, self.layers, adapter=adapter)
        super().__init__(self.view, gamma=gamma, topk=topk, threshold=threshold)
