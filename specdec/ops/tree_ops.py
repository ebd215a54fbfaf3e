"""Tree acceptance ops: native (specdec._C) when built, with the reference beside it."""
from __future__ import annotations

import torch

from . import backend


def greedy_accept_ref(parents: list[int], tokens: list[int], argmax: list[int]) -> list[int]:
    """Reference: the deepest root-to-node path whose tokens equal the target's argmax
    at their parent (ties go to the lower node index)."""
    n = len(parents)
    if len(tokens) != n or len(argmax) != n + 1:
        raise ValueError(f"greedy_accept: need parents[n], tokens[n], argmax[n+1]; got n={n}, "
                         f"tokens={len(tokens)}, argmax={len(argmax)}")
    depth = [0] * n
    best, best_depth = -1, 0
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError("greedy_accept: parents[i] must be in [-1, i)")
        pd = 0 if p < 0 else depth[p]
        if (p < 0 or pd > 0) and tokens[i] == argmax[p + 1]:
            depth[i] = pd + 1
            if depth[i] > best_depth:
                best, best_depth = i, depth[i]
    path = []
    while best >= 0:
        path.append(best)
        best = parents[best]
    return path[::-1]


def greedy_accept(parents: torch.Tensor, tokens: torch.Tensor, argmax: torch.Tensor) -> list[int]:
    """parents [n], tokens [n], argmax [n + 1] -> accepted node indices (root to tip)."""
    p, t, a = parents.tolist(), tokens.tolist(), argmax.tolist()
    ext = backend.native()
    if ext is not None:
        return ext.greedy_accept(p, t, a)
    return greedy_accept_ref(p, t, a)
