"""Triton adjacency-matrix update for Token Recycling.

``adj`` is ``[vocab, k]``: row ``t`` holds the target's top-k next tokens seen most
recently after token ``t``. One verification gives ``m`` (token, top-k) pairs; row
``node_tokens[i]`` becomes ``topk_ids[i]``, and when several nodes share a token the
LAST one in node order wins (the rule of specdec/ops/recycling.py, whose
``recycling_update_ref`` this kernel must match exactly).

One program per node: it looks for a later node with the same token (m is a tree's
size, so the scan is short) and writes its row only when there is none, so every row
has at most one writer and no ordering between programs is needed. Tokens outside
``[0, vocab)`` (e.g. a -1 pad) are skipped.
"""
import triton
import triton.language as tl


@triton.jit
def _recycling_update_kernel(adj_ptr, tok_ptr, topk_ptr, m, vocab, k,
                             s_adj_v, s_adj_k, s_tok, s_top_m, s_top_k,
                             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    tok = tl.load(tok_ptr + i * s_tok).to(tl.int64)
    later = tl.zeros((), tl.int32)
    for start in range(0, m, BLOCK_M):
        offs = start + tl.arange(0, BLOCK_M).to(tl.int64)
        live = (offs > i) & (offs < m)
        other = tl.load(tok_ptr + offs * s_tok, mask=live, other=-1).to(tl.int64)
        later += tl.sum((live & (other == tok)).to(tl.int32), 0)
    write = (later == 0) & (tok >= 0) & (tok < vocab)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    km = offs_k < tl.where(write, k, 0)  # a skipped row writes nothing
    vals = tl.load(topk_ptr + i * s_top_m + offs_k * s_top_k, mask=km, other=0)
    tl.store(adj_ptr + tok * s_adj_v + offs_k * s_adj_k, vals.to(adj_ptr.dtype.element_ty), mask=km)


def recycling_update(adj,          # [vocab, k] int, updated in place
                     node_tokens,  # [m] int
                     topk_ids):    # [m, k] int
    m = node_tokens.numel()
    if m == 0:
        return
    vocab, k = adj.shape
    _recycling_update_kernel[(m,)](
        adj, node_tokens, topk_ids, m, vocab, k,
        adj.stride(0), adj.stride(1), node_tokens.stride(0), topk_ids.stride(0), topk_ids.stride(1),
        BLOCK_M=max(16, min(64, triton.next_power_of_2(m))), BLOCK_K=max(2, triton.next_power_of_2(k)))
