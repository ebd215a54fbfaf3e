"""The exact mode's switch (#22): which path the ops take for a forward.

In the exact mode every linear layer (``ops.linear.linear_exact``) and the attention
(``ops.attention.tree_attention_exact``) compute each row in a fixed order whatever the
number of rows, so a token's logits in an n-node verify are bitwise its logits in a one-token
step, and speculative greedy output equals plain decoding in bf16 / fp16 too.

Modes: "on", "off", and "linear" (the linear layers only: a diagnostic). A compact model
carries its own mode (``CompactModel.exact``, set by its runner) and runs its forward inside
``scope``; code outside a scope follows the ``SPECDEC_EXACT`` environment variable
(1 / on, linear, 0 / off), which also overrides the default of ``resolve``.
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import torch

MODES = ("on", "off", "linear")
_ENV = {"1": "on", "on": "on", "true": "on", "linear": "linear", "0": "off", "off": "off", "false": "off", "": None}
_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar("specdec_exact", default=None)


def env_mode() -> str | None:
    """SPECDEC_EXACT as a mode, or None when unset."""
    raw = os.environ.get("SPECDEC_EXACT", "").strip().lower()
    if raw not in _ENV:
        raise ValueError(f"SPECDEC_EXACT={raw!r}: use 1 (on), 0 (off) or linear")
    return _ENV[raw]


def mode() -> str:
    """The mode in force here: the innermost ``scope``, else SPECDEC_EXACT, else "off"."""
    return _scoped.get() or env_mode() or "off"


@contextlib.contextmanager
def scope(m: str | None):
    """Run the block in mode ``m`` (None: leave the mode as it is)."""
    if m is None:
        yield
        return
    if m not in MODES:
        raise ValueError(f"exact mode must be one of {MODES}, got {m!r}")
    token = _scoped.set(m)
    try:
        yield
    finally:
        _scoped.reset(token)


# The default for bf16 / fp16 on CUDA, where a many-row verify and a one-row step round
# differently enough to flip near-ties. Off until the mode's cost and reach are measured on a
# GPU (docs/exact_mode.md); fp32 and CPU stay off (there the exact path is a slow reference).
DEFAULT_FOR_HALF_ON_CUDA = "off"


def resolve(exact: bool | str | None, dtype: torch.dtype, device: torch.device | str) -> str:
    """A runner's mode from the caller's ``exact``: True / False, a mode name, or None for the
    default -- SPECDEC_EXACT when set, else ``DEFAULT_FOR_HALF_ON_CUDA`` for bf16 / fp16 on
    CUDA and "off" in fp32 and on CPU."""
    if isinstance(exact, bool):
        return "on" if exact else "off"
    if exact is not None:
        if exact not in MODES:
            raise ValueError(f"exact must be True, False, None or one of {MODES}, got {exact!r}")
        return exact
    env = env_mode()
    if env is not None:
        return env
    half = dtype in (torch.bfloat16, torch.float16)
    return DEFAULT_FOR_HALF_ON_CUDA if half and torch.device(device).type == "cuda" else "off"
