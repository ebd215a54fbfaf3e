"""Adaptive drafting: each step's tree budget follows what verification costs on this
hardware and what the drafter gets accepted. ``generate`` uses it by default for greedy
decoding; pass ``adaptive=BudgetController(ControllerConfig(...))`` to tune it, or
``budget=TreeBudget(...)`` / ``adaptive=False`` to pin the budget. Evidence: docs/adaptive.md.
"""
from ..latency import LATENCY_GRID, LatencyModel, latency_key, runner_verify_fn
from .config import ControllerConfig
from .controller import BudgetController, drafter_key, size_bin

__all__ = ["BudgetController", "ControllerConfig", "LATENCY_GRID", "LatencyModel", "drafter_key",
           "latency_key", "runner_verify_fn", "size_bin"]
