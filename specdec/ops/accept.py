"""Tree acceptance: greedy path selection (plain Python on host lists, every device) and
the tree rejection sampler (a Triton kernel, kernels/tree_accept.py, on the device with no
host sync, beside its PyTorch reference, the test oracle and CPU path).

Words (see DESIGN.md): the *accepted* nodes are the drafted nodes the target keeps, a
root-to-node path; the *bonus* token is the token the target itself produces after the
last accepted node (after the root if none is accepted). A step commits accepted + 1.

Sampler shapes: every tree input may carry a leading batch dimension ``B`` (one tree
per row); ``parents`` may stay ``[n]`` when all rows share one tree shape. Unbatched
inputs give unbatched outputs. Outputs, per row:
    path          [max_depth] int64  accepted node indices root to tip, padded with -1
    num_accepted  []          int64  number of accepted nodes
    bonus         []          int64  the bonus token
``max_depth`` (default ``n``) bounds the output: nodes deeper than ``max_depth`` are
treated as absent (the tree is pruned), which keeps both rules lossless.

Greedy rule: a node is acceptable when every token on its root path equals the target
argmax at its parent; the accepted path ends at the deepest acceptable node, ties going
to the lower node index (``greedy_accept``); bonus = ``argmax[tip + 1]`` (``argmax[0]``
when nothing is accepted).

Sampling rule (multi-draft speculative sampling over a tree; lossless when each node's
token was drawn from its ``draft_probs`` row independently of the uniforms, or is a
deterministic proposal):
    Start at the root with residual ``p = target_probs[0]``. Visit nodes in index order;
    node ``i`` is *examined* when its parent is the current node (and the current depth
    is below ``max_depth``). With ``x = tokens[i]``, ``q = draft_probs[i]`` (a one-hot
    at ``x`` when ``draft_probs`` is None) and ``u = uniforms[i]``:
      accept  iff ``u * q[x] < p[x]``  (probability ``min(1, p[x] / q[x])``): the walk
              moves to ``i`` and ``p = target_probs[i + 1]``;
      reject  otherwise: ``p = normalize(max(p - q, 0))`` (one-hot: zero ``p[x]``,
              renormalize) and the next sibling is examined against this residual.
    When the walk stops (all children of the current node rejected, or it has none),
    bonus = inverse CDF of ``p`` at ``uniforms[n]``: the number of ``k`` with
    ``cdf[k] <= uniforms[n] * cdf[V-1]``, capped at the last ``k`` with ``p[k] > 0``.
    So ``uniforms[i]`` (``i < n``) belongs to node ``i`` (each node is examined at most
    once) and ``uniforms[n]`` to the bonus token.
Exact arithmetic shared by the reference and the kernel (so they agree bit for bit up
to fp64 summation order): the residual is kept as ``r / z`` with ``r`` fp32 and ``z``
fp64; a fresh row has ``r = target_probs[c + 1]``, ``z = 1`` (rows are assumed
normalized); the accept test is ``fp64(u) * fp64(q[x]) * z < fp64(r[x])``; a rejection
with draft probs sets ``r = fp32(max(fp64(r) - z * fp64(q), 0))``, ``z = sum(fp64(r))``;
a one-hot rejection sets ``r[x] = 0``, ``z = max(z - fp64(r[x]), 0)``; the inverse CDF
sums ``fp64(r)``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import backend


# ---------------------------------------------------------------------------- helpers
def tree_uniforms(n: int, batch: int | None = None, *, device=None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The uniforms one sampling step consumes: ``[n + 1]`` (or ``[batch, n + 1]``) in [0, 1)."""
    shape = (n + 1,) if batch is None else (batch, n + 1)
    return torch.rand(shape, device=device, generator=generator, dtype=torch.float32)


def _batched(parents, tokens, *rows):
    """Add the batch dim when absent; parents [n] -> stride-0 [B, n]."""
    unbatched = tokens.dim() == 1
    if unbatched:
        tokens = tokens.unsqueeze(0)
        rows = tuple(None if r is None else r.unsqueeze(0) for r in rows)
    B, n = tokens.shape
    if parents.dim() == 1:
        parents = parents.unsqueeze(0).expand(B, n)
    if parents.shape != (B, n):
        raise ValueError(f"parents {tuple(parents.shape)} does not match tokens {(B, n)}")
    return unbatched, parents, tokens, rows


def _outputs(B, max_depth, device):
    """Uninitialized outputs: the kernels write every element (padding included)."""
    path = torch.empty((B, max_depth), dtype=torch.long, device=device)
    num = torch.empty(B, dtype=torch.long, device=device)
    bonus = torch.empty(B, dtype=torch.long, device=device)
    return path, num, bonus


def _unbatch(out, unbatched):
    return tuple(t[0] for t in out) if unbatched else out


# ---------------------------------------------------------------------------- greedy
def greedy_accept(parents: Sequence[int],  # [n] parents[i] in [-1, i)
                  tokens: Sequence[int],   # [n]
                  argmax: Sequence[int],   # [n + 1]; row 0 = root
                  max_depth: int | None = None) -> list[int]:
    """Greedy acceptance on host lists -> accepted node indices, root to tip (see the
    module docstring; the bonus token is ``argmax[path[-1] + 1]``, ``argmax[0]`` if none).

    One pass over the nodes, on every device: the step reads its argmax row back anyway,
    and on an H100 this adds 2 to 8 us after the verify forward for 16 to 128 nodes
    where a Triton kernel added 12 to 14 us (``benchmarks/bench_ops.py``)."""
    n = len(parents)
    if len(tokens) != n or len(argmax) != n + 1:
        raise ValueError(f"greedy_accept: need parents[n], tokens[n], argmax[n+1]; got n={n}, "
                         f"tokens={len(tokens)}, argmax={len(argmax)}")
    max_depth = n if max_depth is None else max_depth
    depth = [0] * n  # > 0 iff the node and all its ancestors match (parents precede children)
    best, best_depth = -1, 0
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError("greedy_accept: parents[i] must be in [-1, i)")
        pd = 0 if p < 0 else depth[p]
        if (p < 0 or pd > 0) and pd < max_depth and tokens[i] == argmax[p + 1]:
            depth[i] = pd + 1
            if depth[i] > best_depth:
                best, best_depth = i, depth[i]
    path = []
    while best >= 0:
        path.append(best)
        best = parents[best]
    return path[::-1]


# ---------------------------------------------------------------- rejection sampler
def _inverse_cdf_ref(r: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """r [B, V] fp32 (unnormalized), u [B] fp64 -> [B] int64 (see module docstring)."""
    cdf = torch.cumsum(r.double(), dim=1)
    count = (cdf <= (u * cdf[:, -1])[:, None]).sum(1)
    ks = torch.arange(r.shape[1], device=r.device)
    last = torch.where(r > 0, ks, -1).max(1).values
    return torch.minimum(count, last.clamp(min=0))


def tree_rejection_sample_ref(parents: torch.Tensor,       # [n] or [B, n] int
                              tokens: torch.Tensor,        # [n] or [B, n] int
                              target_probs: torch.Tensor,  # [n + 1, V] or [B, n + 1, V]
                              uniforms: torch.Tensor,      # [n + 1] or [B, n + 1] in [0, 1)
                              draft_probs: torch.Tensor | None = None,  # [n, V] / [B, n, V]
                              *, max_depth: int | None = None):
    """Reference tree rejection sampler, vectorized over the batch; a Python loop over
    nodes in index order (the walk is sequential). See the module docstring for the rule."""
    unbatched, par, tok, (tp, u, dp) = _batched(parents, tokens, target_probs, uniforms, draft_probs)
    B, n = tok.shape
    max_depth = n if max_depth is None else max_depth
    dev = tok.device
    par, tok = par.long(), tok.long()
    tp, u = tp.float(), u.double()
    dp = None if dp is None else dp.float()
    rows = torch.arange(B, device=dev)
    cur = torch.full((B,), -1, dtype=torch.long, device=dev)
    depth = torch.zeros(B, dtype=torch.long, device=dev)
    r = tp[:, 0].clone()
    z = torch.ones(B, dtype=torch.float64, device=dev)
    path = torch.full((B, max_depth + 1), -1, dtype=torch.long, device=dev)  # last col: dump
    for i in range(n):
        examined = (par[:, i] == cur) & (depth < max_depth)
        x = tok[:, i : i + 1]
        rx = r.gather(1, x)[:, 0].double()
        q = torch.ones_like(rx) if dp is None else dp[:, i].gather(1, x)[:, 0].double()
        acc = examined & (u[:, i] * q * z < rx)
        rej = examined & ~acc
        if dp is None:
            r_rej, z_rej = r.scatter(1, x, 0.0), (z - rx).clamp(min=0)
        else:
            r_rej = (r.double() - z[:, None] * dp[:, i].double()).clamp(min=0).float()
            z_rej = r_rej.double().sum(1)
        r = torch.where(rej[:, None], r_rej, r)
        z = torch.where(rej, z_rej, z)
        path[rows, torch.where(acc, depth, max_depth)] = i
        r = torch.where(acc[:, None], tp[:, i + 1], r)
        z = torch.where(acc, 1.0, z)
        cur = torch.where(acc, i, cur)
        depth = depth + acc.long()
    bonus = _inverse_cdf_ref(r, u[:, n])
    return _unbatch((path[:, :max_depth].contiguous(), depth, bonus), unbatched)


def tree_rejection_sample(parents: torch.Tensor,       # [n] or [B, n] int
                          tokens: torch.Tensor,        # [n] or [B, n] int
                          target_probs: torch.Tensor,  # [n + 1, V] or [B, n + 1, V]
                          uniforms: torch.Tensor,      # [n + 1] or [B, n + 1] in [0, 1)
                          draft_probs: torch.Tensor | None = None,  # [n, V] / [B, n, V]
                          *, max_depth: int | None = None):
    """Tree rejection sampling on the device -> (path, num_accepted, bonus); Triton on
    CUDA (or under TRITON_INTERPRET=1), else the torch reference. Same uniforms, same
    output. On an H100 (vocab 49152, 16 to 128 nodes) 29 to 56 us vs the reference's
    4 to 34 ms (``benchmarks/bench_ops.py``)."""
    dev = tokens.device
    if not backend.use_triton(dev):
        return tree_rejection_sample_ref(parents, tokens, target_probs, uniforms, draft_probs,
                                         max_depth=max_depth)
    unbatched, par, tok, (tp, u, dp) = _batched(parents, tokens, target_probs, uniforms, draft_probs)
    B, n = tok.shape
    V = tp.shape[-1]
    max_depth = n if max_depth is None else max_depth
    if tp.shape != (B, n + 1, V) or u.shape != (B, n + 1) or (dp is not None and dp.shape != (B, n, V)):
        raise ValueError("tree_rejection_sample: need target_probs [B, n+1, V], uniforms [B, n+1], "
                         f"draft_probs [B, n, V]; got {tuple(tp.shape)}, {tuple(u.shape)}, "
                         f"{None if dp is None else tuple(dp.shape)} for n={n}")
    out = _outputs(B, max_depth, dev)
    from ..kernels import tree_accept

    tp = tp.float() if tp.stride(-1) == 1 else tp.float().contiguous()
    dp = None if dp is None else (dp.float() if dp.stride(-1) == 1 else dp.float().contiguous())
    tree_accept.tree_rejection_sample(par.long(), tok.long(), tp, u, dp, *out)
    return _unbatch(out, unbatched)
