"""The tree budgets of one ``generate`` call: fixed, or chosen by an adaptive controller.

``BudgetPlan`` answers what ``generate`` asks about budgets, in three calls:
``next_budget(remaining, room)`` before drafting, ``while_verifying(more_steps)`` while the
device runs the verify forward (or the prefill), ``record(step)`` once the step is
committed. With a fixed budget the plan is that budget; with a controller, on a GPU the
controller learns from the previous step and picks the next step's budget while the
device verifies (a one-step lag that hides its host time), on a CPU it runs in between.
"""
from __future__ import annotations

import time
import weakref

import torch

from .adaptive import BudgetController, drafter_key
from .config import TreeBudget

_SHARED: "weakref.WeakKeyDictionary[object, BudgetController]" = weakref.WeakKeyDictionary()


def resolve(adaptive, budget: TreeBudget | None, model, drafter, *,
            sampling: bool) -> tuple[BudgetController | None, bool]:
    """(controller, whether it chooses each step's budget).

    A BudgetController passed as ``adaptive`` chooses (``budget`` then caps it).
    ``adaptive=True`` without ``budget``, greedy only (budgets that follow measured times
    would break "same seed, same output" when sampling): the drafter's own controller, else
    one shared by every call on this target. Otherwise the budget is fixed, and only a
    controller the drafter carries (chain stopping) keeps learning. ``drafter`` None: plain."""
    if drafter is None:
        return None, False
    if isinstance(adaptive, BudgetController):
        return adaptive, True
    own = getattr(drafter, "controller", None)
    own = own if isinstance(own, BudgetController) else None
    if not adaptive or budget is not None or sampling:
        return own, False
    if own is not None:
        return own, True
    try:
        if model not in _SHARED:
            _SHARED[model] = BudgetController()
        return _SHARED[model], True
    except TypeError:  # not weak-referenceable
        return BudgetController(), True


def overlaps(runner) -> bool:
    """Whether the controller runs while the device verifies (on a GPU: kernels run async)."""
    return torch.device(runner.device).type == "cuda"


class BudgetPlan:
    """The budgets of one ``generate`` call (see the module docstring)."""

    def __init__(self, controller: BudgetController | None, choosing: bool, budget: TreeBudget | None,
                 runner, model, drafter):
        self.controller, self.choosing = controller, choosing and controller is not None
        self.cap = budget or (controller.max_budget if self.choosing else TreeBudget())
        self.fit_nodes = runner.fit_nodes
        self.key = drafter_key(drafter)
        self.overlap = controller is not None and overlaps(runner)
        self._ahead: TreeBudget | None = None  # the next step's arm, chosen during a verify
        self._pending: dict | None = None  # the last step, observed during the next verify
        self._arm = self.cap
        self._last: tuple[int, int] | None = None  # the last step's (accepted, depth cap)
        self.control_s = 0.0  # host seconds in the controller (on a GPU, mostly behind the verify)
        if controller is not None:
            with controller.lock:
                controller.attach(runner, model)
                controller.begin_request(self.key)

    def next_budget(self, remaining: int, room: int) -> TreeBudget:
        """The budget the drafter gets for the next step (``remaining`` tokens to generate,
        ``room`` positions left in the context)."""
        chosen = self.cap
        if self.choosing:
            t0 = time.perf_counter()
            with self.controller.lock:
                chosen, self._ahead = self._ahead or self.controller.choose(self.key), None
            self.control_s += time.perf_counter() - t0
        deepest = min(self.cap.max_depth, remaining - 1, room)
        self._arm = TreeBudget(min(chosen.max_nodes, self.cap.max_nodes, room), min(chosen.max_depth, deepest))
        depth = chosen.max_depth
        if self.choosing and self._last is not None:  # deeper after a full accept
            depth = self.controller.step_depth(chosen.max_depth, *self._last)
        return TreeBudget(self.fit_nodes(self._arm.max_nodes), min(depth, deepest))

    def while_verifying(self, more_steps: bool) -> None:
        """On a GPU: learn from the last step and choose the next budget (if ``more_steps``
        may follow the work in flight), hidden behind the device's work."""
        if not self.overlap:
            return
        self._observe(None, choose_next=more_steps and self.choosing)

    def record(self, step, final: bool) -> None:
        """After a step (a ``generate.StepResult``); ``final``: no step follows."""
        self._last = (step.accepted, step.depth_cap)
        if self.controller is None:
            return
        seen = dict(key=self.key, tree_size=len(step.tree), accepted=step.accepted, tree=step.tree,
                    accepted_nodes=step.accepted_nodes, budget=self._arm, timed=step.timed,
                    draft_time=step.total_s - step.verify_s, verify_time=step.verify_s)
        # (the draft side is everything but the verify: drafting, the drafter's update, bookkeeping)
        if self.overlap and not final:
            self._pending = seen
        else:
            self._observe(seen, choose_next=False)

    def _observe(self, seen: dict | None, choose_next: bool) -> None:
        """Learn from the pending step (and ``seen``); optionally choose the next budget ahead."""
        t0 = time.perf_counter()
        with self.controller.lock:
            for step in (self._pending, seen):
                if step is not None:
                    self.controller.observe(**step)
            self._pending = None
            if choose_next:
                self._ahead = self.controller.choose(self.key)
        self.control_s += time.perf_counter() - t0
