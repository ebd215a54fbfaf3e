"""Token Recycling's adjacency-matrix update: Triton on CUDA (or TRITON_INTERPRET=1),
else the torch reference.

``adj`` [vocab, k] holds, for each token, the target's top-k next tokens seen most
recently after it (-1 = never seen). After a verification, row ``node_tokens[i]``
becomes ``topk_ids[i]`` for every verified position ``i`` (the root and every tree
node, rejected ones too). Rule for duplicates: when several positions share a token,
the LAST one in node order wins -- as if the rows were written one by one in order.
Tokens outside ``[0, vocab)`` are skipped (so -1 can pad ``node_tokens``).
"""
from __future__ import annotations

import torch

from . import backend

SENTINEL = -1  # an adjacency entry never written


def recycling_update_ref(adj: torch.Tensor,          # [vocab, k] int, updated in place
                         node_tokens: torch.Tensor,  # [m] int
                         topk_ids: torch.Tensor      # [m, k] int
                         ) -> torch.Tensor:
    """Reference (and CPU fallback): the last position of each token writes its row."""
    vocab = adj.shape[0]
    m = node_tokens.numel()
    if m == 0:
        return adj
    tok = node_tokens.to(device=adj.device, dtype=torch.long)
    valid = (tok >= 0) & (tok < vocab)
    slot = torch.where(valid, tok, vocab)  # invalid tokens go to a dump slot
    pos = torch.arange(m, device=adj.device)
    last = torch.full((vocab + 1,), -1, dtype=torch.long, device=adj.device)
    last.scatter_reduce_(0, slot, pos, reduce="amax")
    winner = valid & (last[slot] == pos)  # each row has at most one winner: no write races
    adj[tok[winner]] = topk_ids.to(device=adj.device)[winner].to(adj.dtype)
    return adj


def recycling_update(adj: torch.Tensor,          # [vocab, k] int, updated in place
                     node_tokens: torch.Tensor,  # [m] int, on adj's device
                     topk_ids: torch.Tensor      # [m, k] int, on adj's device
                     ) -> torch.Tensor:
    """adj[node_tokens[i]] = topk_ids[i], last i wins; returns adj. No host sync on CUDA."""
    _check(adj, node_tokens, topk_ids)
    if backend.use_triton(adj.device):
        from ..kernels import recycling

        recycling.recycling_update(adj, node_tokens, topk_ids)
        return adj
    return recycling_update_ref(adj, node_tokens, topk_ids)


def _check(adj, tok, top) -> None:
    if adj.dim() != 2 or adj.is_floating_point():
        raise ValueError(f"recycling_update: adj must be an int [vocab, k] tensor, got {tuple(adj.shape)} {adj.dtype}")
    if tok.dim() != 1 or tok.is_floating_point():
        raise ValueError(f"recycling_update: node_tokens must be a 1-D int tensor, got {tuple(tok.shape)}")
    if top.dim() != 2 or top.is_floating_point() or top.shape != (tok.numel(), adj.shape[1]):
        raise ValueError(f"recycling_update: topk_ids must be int [m={tok.numel()}, k={adj.shape[1]}], "
                         f"got {tuple(top.shape)} {top.dtype}")
    if tok.device != adj.device or top.device != adj.device:
        raise ValueError(f"recycling_update: all tensors must be on {adj.device}")
