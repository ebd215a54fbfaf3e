"""Suffix matching over the token history, on the tensors' device, with no host sync.

The building block of a device-resident n-gram drafter (#8, issue 21): the history lives
in a fixed-size device buffer with a device-side length, and every output has a fixed
shape, so a step can be captured in a CUDA graph. Each function has its plain-Python
reference beside it (``*_ref``), which defines the semantics exactly.

Candidates (``suffix_candidates``): a position ``p`` in ``[1, T)`` of the history ``h[:T]``
matches with length ``m(p)``, the largest ``n <= min(max_order, p)`` with
``h[p-n:p] == h[T-n:T]`` (0 if none). Positions with ``m >= 1`` are ordered by ``m``
descending, then ``p`` descending (longest match first, most recent first), and the first
``max_scan`` are read. Each gives the continuation ``h[p:min(p + depth, T)]``. A
continuation equal to, or a prefix of, an earlier one is dropped, and the first
``num_candidates`` of the rest are kept.

Tree (``candidates_to_tree``): the candidates' trie with a fixed shape. Node ``c * depth +
j`` is the ``j``-th token of candidate ``c``. It is valid when ``j`` is inside the
candidate and no earlier candidate shares its first ``j + 1`` tokens. Its parent is the
node of the first candidate that shares its first ``j`` tokens (-1, the root, for ``j = 0``).
Parents precede children, and invalid nodes sit among valid ones: a consumer masks them out.
"""
from __future__ import annotations

import torch


# ----------------------------------------------------------------------------- references
def suffix_candidates_ref(history: list[int], *, max_order: int, num_candidates: int, depth: int,
                          max_scan: int) -> list[list[int]]:
    """The module's candidate rule, directly."""
    T = len(history)
    matches = []  # (m, p)
    for p in range(1, T):
        m = 0
        for n in range(1, min(max_order, p) + 1):
            if history[p - n:p] != history[T - n:T]:
                break
            m = n
        if m:
            matches.append((m, p))
    matches.sort(reverse=True)
    scanned = [history[p:min(p + depth, T)] for _, p in matches[:max_scan]]
    kept = [c for i, c in enumerate(scanned) if not any(prev[:len(c)] == c for prev in scanned[:i])]
    return kept[:num_candidates]


def candidates_to_tree_ref(cands: list[list[int]], num_candidates: int, depth: int
                           ) -> tuple[list[int], list[int], list[bool]]:
    """(tokens, parents, valid), each of length num_candidates * depth, as the module says."""
    n = num_candidates * depth
    tokens, parents, valid = [-1] * n, [-1] * n, [False] * n
    for c, cand in enumerate(cands):
        for j, tok in enumerate(cand):
            tokens[c * depth + j] = tok
            first = next(k for k, other in enumerate(cands) if other[:j + 1] == cand[:j + 1])
            valid[c * depth + j] = first == c
            if j:
                parent_c = next(k for k, other in enumerate(cands) if len(other) >= j and other[:j] == cand[:j])
                parents[c * depth + j] = parent_c * depth + j - 1
    return tokens, parents, valid


# ----------------------------------------------------------------------------- device versions
def suffix_candidates(history: torch.Tensor,  # [S] int64, the first ``length`` entries are the history
                      length: torch.Tensor | int,  # [] int64 on history's device (or an int)
                      *, max_order: int, num_candidates: int, depth: int, max_scan: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (candidates [num_candidates, depth] int64, padded with -1; their lengths [num_candidates])."""
    S, dev = history.numel(), history.device
    T = torch.as_tensor(length, device=dev, dtype=torch.long)
    pos = torch.arange(S, device=dev)  # [S] candidate positions p
    n = torch.arange(1, max_order + 1, device=dev)  # [K] match lengths tried
    suffix_tok = history[(T.view(1) - n).clamp(min=0)]  # [K] h[T - n] (no .item())
    before = history[(pos[:, None] - n[None, :]).clamp(min=0)]  # [S, K] h[p - n]
    agree = (before == suffix_tok) & (pos[:, None] >= n) & (T.view(1) >= n)  # [S, K]
    m = agree.cumprod(1).sum(1) * ((pos >= 1) & (pos < T.view(1)))  # [S] the longest run of agreements
    M = min(max_scan, S)
    score, top = torch.where(m > 0, m * S + pos, -1).topk(M)  # (m desc, p desc); [M]
    scanned = score >= 0
    offs = torch.arange(depth, device=dev)
    at = top[:, None] + offs[None, :]  # [M, L]
    inside = scanned[:, None] & (at < T)
    cont = torch.where(inside, history[at.clamp(max=S - 1)], -1)  # [M, L]
    clen = inside.sum(1)  # [M]
    # i is dropped when it is equal to or a prefix of an earlier j (transitively: kept or not)
    same = (cont[:, None, :] == cont[None, :, :]) | (offs[None, None, :] >= clen[:, None, None])  # [M, M, L]
    prefix = same.all(-1) & (clen[:, None] <= clen[None, :])  # prefix[i, j]: cont_i is a prefix of cont_j
    earlier = torch.ones(M, M, dtype=torch.bool, device=dev).tril(-1)  # earlier[i, j]: j < i
    keep = scanned & ~(prefix & earlier).any(1)
    rank = keep.long().cumsum(0) - 1
    slot = torch.where(keep & (rank < num_candidates), rank, num_candidates)  # row num_candidates: discarded
    out = torch.full((num_candidates + 1, depth), -1, dtype=torch.long, device=dev)
    out_len = torch.zeros(num_candidates + 1, dtype=torch.long, device=dev)
    out.index_copy_(0, slot, cont)
    out_len.index_copy_(0, slot, clen)
    return out[:num_candidates], out_len[:num_candidates]


def candidates_to_tree(cands: torch.Tensor,  # [C, L] int64, -1 padded
                       lengths: torch.Tensor  # [C] int64
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (tokens [C * L], parents [C * L], valid [C * L] bool), as the module says."""
    C, L = cands.shape
    dev = cands.device
    offs = torch.arange(L, device=dev)
    inside = offs[None, :] < lengths[:, None]  # [C, L]
    eq = (cands[:, None, :] == cands[None, :, :]) & inside[:, None, :] & inside[None, :, :]  # [C, C', L]
    shared = eq.long().cumprod(-1).bool()  # shared[c, c', j]: the first j + 1 tokens agree
    first = shared.long().argmax(1)  # [C, L] the first c' sharing c's first j + 1 tokens (c itself at worst)
    cs = torch.arange(C, device=dev)[:, None]
    valid = inside & (first == cs)
    parent_c = torch.cat([torch.zeros(C, 1, dtype=torch.long, device=dev), first[:, :-1]], dim=1)  # shares j tokens
    parents = torch.where(offs[None, :] == 0, -1, parent_c * L + offs[None, :] - 1)
    tokens = torch.where(inside, cands, -1)
    return tokens.reshape(-1), parents.reshape(-1), valid.reshape(-1)
