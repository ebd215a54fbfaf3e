"""The adaptive controller's options: one frozen dataclass.

Why each default is what it is (and which options were tried and dropped): docs/adaptive.md.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ControllerConfig:
    grid: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # node budgets (arms) to choose from, small to large
    max_depth: int = 8  # depth cap of every arm: min(nodes, max_depth)
    discount: float = 0.99  # per-step forgetting of the arm statistics (memory ~100 steps)
    explore: float = 0.1  # UCB bonus scale (0 = greedy on the estimates; probes still explore)
    warmup: int = 8  # steps that must reveal the largest arm before choosing (at most 4x as many steps)
    probe_cost: float = 0.01  # probes of bigger arms may cost at most this share of the time
    probe_far: bool | None = None  # also probe the largest arm (None: on with a CUDA runner, off on CPU)
    request_prior: float | None = None  # per-request estimates, pooled prior worth this many steps (None: 8 CPU, 0 GPU)
    extend_depth: int = 16  # after a step that accepted every level, the next may draft this deep (0: never)
    measure_latency: str = "cuda"  # measure the verify-latency curve up front: "cuda", "always" or "never"

    def __post_init__(self):
        if not self.grid or any(int(n) < 0 for n in self.grid):
            raise ValueError(f"ControllerConfig.grid must hold node budgets >= 0, got {self.grid!r}")
        if self.measure_latency not in ("cuda", "always", "never"):
            raise ValueError(f"measure_latency must be 'cuda', 'always' or 'never', got {self.measure_latency!r}")
        if not 0 < self.discount <= 1:
            raise ValueError(f"discount must be in (0, 1], got {self.discount}")
