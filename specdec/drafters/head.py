"""HeadDrafter: token trees from an EAGLE-style draft head that reads the target's hidden states.

The head (``DraftHead``) is one decoder layer. For position t it reads the target's feature
there (``f_t``: the residual stream the target fed its final norm, normalised by that norm)
and the embedding of the token that followed (``x_{t+1}``), and predicts the feature at t + 1,
whose logits -- the target's own final norm and LM head -- give the token after that:

    entry t:  fc([embed(x_{t+1}), norm(f_t)]) -> layer (attends to entries <= t) -> f^_{t+1}
    draft:    lm_head(norm(f^_{t+1})) -> a distribution over x_{t+2}

Only the head's own weights are trained and saved (``specdec train-draft --kind head``); the
embeddings, final norm and LM head are the target's.

Drafting (``HeadDrafter``): the head keeps one KV entry per committed position, built from the
TRUE features the target computed (the prompt's prefill, then every verify forward's rows of
the accepted path: ``VerifyResult.target_hidden``). A tree grows level by level (EAGLE-2):
each level's frontier -- the ``width`` best nodes by cumulative log-probability -- runs one head
forward (its entries see the committed entries and their own ancestors' draft entries; their
input feature is the parent's predicted one), each expands its ``topk`` children, and the
tree is the ``max_nodes`` best nodes of all levels. Draft entries never enter the cache.
One transfer to the host per tree. Deterministic proposals: lossless for greedy and sampling.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..models.common import rope_cos_sin
from ..ops import norm as norm_ops
from ..ops import rope as rope_ops
from ..tree import TokenTree
from .base import DraftRequest, VerifyResult

FORMAT = 1
WEIGHTS, CONFIG = "head.safetensors", "head.json"


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        if not torch.is_grad_enabled():  # drafting: the fused kernel where there is one (same formula)
            return norm_ops.rms_norm(x, self.weight, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class DraftHead(nn.Module):
    """fc([embedding, feature]) then one Llama-style decoder layer (GQA attention with RoPE, a
    gated SiLU MLP): [n, hidden] x 2 -> predicted feature [n, hidden]."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, *,
                 eps: float = 1e-6, rope_theta: float = 10000.0):
        super().__init__()
        self.config = dict(hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                           intermediate=intermediate, eps=eps, rope_theta=rope_theta)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.attn_norm = _RMSNorm(hidden, eps)
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.mlp_norm = _RMSNorm(hidden, eps)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        inv = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)
        # [V'] int64: the tokens drafting scores (the most frequent in the training data, as in
        # EAGLE-3): an LM head of V' rows instead of the whole vocabulary. None: all of it.
        self.draft_vocab: torch.Tensor | None = None

    @classmethod
    def for_target(cls, target) -> "DraftHead":
        """A head shaped like one of ``target``'s decoder layers."""
        cfg = target.config.get_text_config(decoder=True) if hasattr(target.config, "get_text_config") \
            else target.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get(
            "rope_theta", 10000.0)
        return cls(cfg.hidden_size, heads, getattr(cfg, "num_key_value_heads", None) or heads, head_dim,
                   cfg.intermediate_size, eps=getattr(cfg, "rms_norm_eps", 1e-6), rope_theta=float(theta))

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [..., h, n, d] rotated by positions [n] (Llama's half-split RoPE)."""
        ang = positions.float()[:, None] * self.inv_freq[None, :]  # [n, d/2]
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        x1, x2 = x[..., : self.head_dim // 2], x[..., self.head_dim // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def forward(self, emb: torch.Tensor, feat: torch.Tensor, positions: torch.Tensor,
                ctx_k: torch.Tensor | None = None, ctx_v: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """emb, feat [(B,) n, hidden] (the next token's embedding, the normalised feature),
        positions [n]; ctx_k, ctx_v [(B,) kv_heads, c, head_dim] earlier entries; mask
        [n, c + n] bool (True = visible; None = every context entry, causal among the n).
        Returns (predicted feature [(B,) n, hidden], this call's k, v [(B,) kv_heads, n, head_dim])."""
        lead, n = emb.shape[:-2], emb.shape[-2]
        x = self.fc(torch.cat([emb, feat], -1))
        h = self.attn_norm(x)

        def split(t, heads):  # [..., n, heads * d] -> [..., n, heads, d]
            return t.view(*lead, n, heads, self.head_dim)

        q, k, v = split(self.q_proj(h), self.heads), split(self.k_proj(h), self.kv_heads), \
            split(self.v_proj(h), self.kv_heads)
        if not lead and not torch.is_grad_enabled():  # drafting: one fused RoPE launch where there is one
            cos, sin = rope_cos_sin(self.inv_freq, 1.0, positions, q.dtype)  # [n, 1, d]
            q, k = rope_ops.apply_rope(q.contiguous(), k.contiguous(), cos, sin)
            q, k, v = q.transpose(-2, -3), k.transpose(-2, -3), v.transpose(-2, -3)
        else:
            q, k, v = q.transpose(-2, -3), k.transpose(-2, -3), v.transpose(-2, -3)
            q, k = self._rope(q, positions), self._rope(k, positions)
        keys = k if ctx_k is None else torch.cat([ctx_k, k], -2)  # [..., kv, c + n, d]
        vals = v if ctx_v is None else torch.cat([ctx_v, v], -2)
        if mask is None:
            c = keys.shape[-2] - n
            mask = torch.ones(n, c + n, dtype=torch.bool, device=x.device).tril(c)
        rep = self.heads // self.kv_heads
        att = F.scaled_dot_product_attention(q, keys.repeat_interleave(rep, -3), vals.repeat_interleave(rep, -3),
                                             attn_mask=mask)  # [..., heads, n, d]
        x = x + self.o_proj(att.transpose(-2, -3).reshape(*lead, n, -1))
        h = self.mlp_norm(x)
        x = x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        return x, k, v


# ----------------------------------------------------------------------------- files
def fingerprint(target) -> str:
    from ..train_draft import fingerprint as fp

    return fp(target)


def save_head(head: DraftHead, target, out: str | Path, record: dict | None = None) -> None:
    """``out``/head.safetensors (fp16) + head.json (shape, the target's fingerprint, training record)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in head.state_dict().items()}
    if head.draft_vocab is not None:
        tensors["draft_vocab"] = head.draft_vocab.to(torch.int64).contiguous().cpu()
    save_file(tensors, str(out / WEIGHTS))
    meta = {"format": FORMAT, "kind": "head", "config": head.config,
            "target": getattr(target.config, "_name_or_path", "") or target.config.model_type,
            "target_fingerprint": fingerprint(target), **(record or {})}
    (out / CONFIG).write_text(json.dumps(meta, indent=2))


def load_head(path: str | Path, target) -> DraftHead:
    """The head saved in ``path`` for ``target``, on its device and dtype; another target is an error."""
    from safetensors.torch import load_file

    from ..train_draft import read_record

    path = Path(path)
    meta = read_record(path, CONFIG, "head", target,
                       "train one for it with `specdec train-draft --kind head`")
    head = DraftHead(**meta["config"])
    state = load_file(str(path / WEIGHTS))
    vocab = state.pop("draft_vocab", None)
    head.load_state_dict(state)
    p0 = next(target.parameters())
    head = head.to(device=p0.device, dtype=p0.dtype).eval().requires_grad_(False)
    if vocab is not None:
        if int(vocab.min()) < 0 or int(vocab.max()) >= target.get_output_embeddings().weight.shape[0]:
            raise ValueError(f"{path}: the head's draft vocabulary holds ids outside this model's vocabulary")
        head.draft_vocab = vocab.to(p0.device)
    return head


# ----------------------------------------------------------------------------- drafting
class HeadDrafter:
    """Token trees from a ``DraftHead`` (see the module docstring). ``topk``: children per
    expanded node; ``width``: nodes expanded per level; ``depth``: levels at most (the step's
    budget caps them). ``graphs``: on CUDA, grow each tree shape from one captured CUDA graph
    (None: wherever CUDA is; a failed capture says why once and drafting runs eagerly)."""

    wants_target_hidden = True  # generate hands it the target's hidden states

    def __init__(self, target, head: DraftHead, *, topk: int = 8, width: int = 8, depth: int = 6,
                 graphs: bool | None = None):
        from ..backends.generic import final_norm

        if topk < 1 or width < 1 or depth < 1:
            raise ValueError(f"topk, width and depth must be >= 1, got {topk}, {width}, {depth}")
        norm = final_norm(target)
        if norm is None:
            raise ValueError(f"{type(target).__name__}: no final norm (model.model.norm) for the head to read")
        self.norm = _fast_norm(norm)
        self.embed, self.lm_head = target.get_input_embeddings(), target.get_output_embeddings()
        self.head = head
        self.topk, self.width, self.depth = topk, width, depth
        self.vocab_size = int(self.lm_head.weight.shape[0])
        self.draft_device = dev = self.lm_head.weight.device
        # the rows drafting scores: [V', hidden] (a copy of the target's rows) and their ids [V']
        self.vocab_ids = head.draft_vocab
        self.head_weight = self.lm_head.weight if self.vocab_ids is None else \
            self.lm_head.weight.index_select(0, self.vocab_ids.to(dev))
        bias = getattr(self.lm_head, "bias", None)
        self.head_bias = bias if bias is None or self.vocab_ids is None else bias.index_select(0, self.vocab_ids)
        self.graphs = dev.type == "cuda" if graphs is None else bool(graphs) and dev.type == "cuda"
        self.graph_issue: str | None = None
        self._graphs: dict[tuple, tuple] = {}  # (k, w, depth) -> (graph, outputs)
        self._append_graph = None  # the step's update (see _append_padded)
        self._pool = None
        hidden = head.fc.out_features
        # a step's update: at most depth + 1 entries (accepted + the root's), padded to that
        self.max_append = depth + 1
        self.pad_appends = False  # pad updates without graphs too (tests)
        self._append_inputs = {
            "hidden": torch.zeros(self.max_append, hidden, dtype=self.lm_head.weight.dtype, device=dev),
            "tokens": torch.zeros(self.max_append, dtype=torch.long, device=dev),
            "count": torch.ones(1, dtype=torch.long, device=dev), "base": torch.zeros(1, dtype=torch.long, device=dev)}
        self.root = torch.zeros(hidden, dtype=self.lm_head.weight.dtype, device=dev)  # [hidden] see reset
        self.length_dev = torch.zeros(1, dtype=torch.long, device=dev)  # [1] == self.length
        self.k = self.v = None
        self._grow_cache(1024 if self.graphs else 256)
        self.reset(torch.zeros(1, dtype=torch.long))

    # ---------------------------------------------------------------- sequence state
    def reset(self, prompt: torch.Tensor) -> None:
        self.tokens = prompt.reshape(-1).to(self.draft_device)  # committed tokens so far
        self.length = 0  # committed entries (one per position) in self.k / self.v
        self.length_dev.zero_()
        self.has_root = False  # self.root holds the head's feature for the root's position

    def _grow_cache(self, capacity: int) -> None:
        """K/V buffers [kv, capacity, d] (the first ``length`` entries kept); graphs read the
        old buffers, so they are dropped."""
        shape = (self.head.kv_heads, capacity, self.head.head_dim)
        k = torch.zeros(shape, dtype=self.lm_head.weight.dtype, device=self.draft_device)
        v = torch.zeros_like(k)
        if self.k is not None:
            k[:, :self.length], v[:, :self.length] = self.k[:, :self.length], self.v[:, :self.length]
        self.k, self.v = k, v
        self._graphs.clear()
        self._append_graph = None

    @torch.no_grad()
    def observe_prefill(self, hidden: torch.Tensor) -> None:
        """hidden [T - 1, hidden]: the target's features over the prompt but its last token."""
        self._append(hidden, self.tokens[1:hidden.shape[0] + 1])

    @torch.no_grad()
    def update(self, result: VerifyResult) -> None:
        if result.target_hidden is None:
            raise ValueError("HeadDrafter needs the target's hidden states (VerifyResult.target_hidden); "
                             "run it through specdec.generate, which asks the runner for them")
        rows = torch.tensor([0] + [i + 1 for i in result.accepted_nodes], device=result.target_hidden.device)
        new = result.committed.to(self.draft_device)
        if self.length + 1 != self.tokens.numel():  # (a prompt of one token: no prefill, no entry yet)
            raise RuntimeError(f"HeadDrafter out of step: {self.length} entries for {self.tokens.numel()} tokens")
        self.tokens = torch.cat([self.tokens, new])
        self._append(result.target_hidden.index_select(0, rows), new)

    def _append(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> None:
        """Entries for the next positions: target features [a, hidden] and the tokens after them [a]."""
        a, L = hidden.shape[0], self.length
        if a == 0:
            return
        if L + max(a, self.max_append) > self.k.shape[1]:
            self._grow_cache(max(2 * self.k.shape[1], L + max(a, self.max_append)))
        if a <= self.max_append and (self.graphs or self.pad_appends):
            st = self._append_inputs
            st["hidden"][:a].copy_(hidden)
            st["tokens"][:a].copy_(next_tokens)
            st["count"].fill_(a)
            st["base"].fill_(L)
            if not self.graphs:  # (tests: the padded update the graph captures, run eagerly)
                self._append_padded()
            elif not self._replay_append():
                return self._append(hidden, next_tokens)  # (capture failed: graphs are off now)
            self.length += a
            self.has_root = True
            return
        pos = torch.arange(L, L + a, device=self.draft_device)
        out, k, v = self.head(self.embed(next_tokens), self.norm(hidden.to(self.draft_device)), pos,
                              self.k[:, :L], self.v[:, :L])
        self.k[:, L:L + a], self.v[:, L:L + a] = k, v
        self.length += a
        self.length_dev.fill_(self.length)
        self.root.copy_(out[-1])
        self.has_root = True

    def _append_padded(self) -> None:
        """A step's update padded to ``max_append`` entries, with no host sync and fixed shapes
        (what the update's CUDA graph captures). Reads ``_append_inputs``: hidden [A, hidden],
        tokens [A], count and base [1] (rows used; the committed length before). Writes the A
        entries' K/V at base + arange(A) (the padding's land past the new length: masked, then
        overwritten), the root feature and ``length_dev`` = base + count. Running it twice
        gives the same state (the capture's warm-up runs it)."""
        st, C = self._append_inputs, self.k.shape[1]
        A = st["tokens"].numel()
        pos = st["base"] + torch.arange(A, device=self.draft_device)  # [A]
        visible = torch.arange(C, device=self.draft_device)[None, :] < st["base"]  # [1, C]
        mask = torch.cat([visible.expand(A, C), torch.ones(A, A, dtype=torch.bool, device=self.draft_device).tril()], 1)
        out, k, v = self.head(self.embed(st["tokens"]), self.norm(st["hidden"]), pos, self.k, self.v, mask)
        self.k.index_copy_(1, pos, k)
        self.v.index_copy_(1, pos, v)
        self.root.copy_(out.index_select(0, st["count"] - 1)[0])
        self.length_dev.copy_(st["base"] + st["count"])

    def _replay_append(self) -> bool:
        """The update from its CUDA graph (captured on first use); False if the capture failed."""
        from ..backends.cuda_graphs import capture

        if self._append_graph is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            try:
                self._append_graph, _ = capture(lambda: self._append_padded() or self.root, self.draft_device,
                                                warmup=2, pool=self._pool, verify_tol=None)
            except Exception as e:  # noqa: BLE001 -- any failure: say why once, update eagerly
                self._no_graphs(e)
                return False
            return True  # (capture replayed it once)
        self._append_graph.replay()
        return True

    def _no_graphs(self, e: Exception) -> None:
        self.graphs, self.graph_issue = False, f"{type(e).__name__}: {e}"
        self._graphs.clear()
        self._append_graph = None
        print(f"specdec: HeadDrafter drafts without CUDA graphs ({self.graph_issue})", file=sys.stderr)

    # ---------------------------------------------------------------- drafting
    def _log_probs(self, feat: torch.Tensor) -> torch.Tensor:
        """Predicted features [n, hidden] -> log-probabilities [n, V'] (fp32) over the draft
        vocabulary (``_token_ids`` maps column indices to token ids)."""
        return torch.log_softmax(F.linear(self.norm(feat), self.head_weight, self.head_bias).float(), -1)

    def _token_ids(self, idx: torch.Tensor) -> torch.Tensor:
        return idx if self.vocab_ids is None else self.vocab_ids[idx]

    @torch.no_grad()
    def propose(self, request: DraftRequest) -> TokenTree:
        budget = request.budget
        if not self.has_root or budget.max_nodes < 1 or budget.max_depth < 1:
            return TokenTree.empty()
        if request.tokens.numel() != self.tokens.numel():
            raise RuntimeError(f"HeadDrafter out of step: it has {self.tokens.numel()} committed tokens, "
                               f"the request {request.tokens.numel()}")
        # On CUDA one captured shape, the whole tree (a capture per budget would cost more than
        # the levels it saves), cut to the budget on the host; eagerly, the budget's shape.
        out = self._replay((self.topk, self.width, self.depth)) if self.graphs else None
        if out is None:
            L = self.length
            out = self._grow(min(self.topk, budget.max_nodes), min(self.width, budget.max_nodes),
                             min(self.depth, budget.max_depth, budget.max_nodes), self.k[:, :L], self.v[:, :L], None)
        return _best_nodes(*out, budget.max_nodes, budget.max_depth)

    def _replay(self, shape: tuple) -> tuple | None:
        """The candidates from this shape's CUDA graph (captured on first use), or None when
        graphs are off. The graph reads the whole K/V buffers, masked past ``length_dev``."""
        from ..backends.cuda_graphs import capture

        if shape not in self._graphs:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            try:
                self._graphs[shape] = capture(lambda: self._grow(*shape, self.k, self.v, self.length_dev),
                                              self.draft_device, warmup=2, pool=self._pool, verify_tol=None)
            except Exception as e:  # noqa: BLE001 -- any failure: say why once, draft eagerly
                self._no_graphs(e)
                return None
            return self._graphs[shape][1]  # (capture replayed it once)
        graph, out = self._graphs[shape]
        graph.replay()
        return out

    def _grow(self, k: int, width: int, depth: int, ctx_k: torch.Tensor, ctx_v: torch.Tensor,
              length: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every candidate of a tree of ``depth`` levels: (tokens, parents, cumulative log-probs, depth),
        each [k + (depth - 1) * width * k], ids growing level by level. ctx_k, ctx_v [kv, C, d]:
        the committed entries, all of them visible when ``length`` is None, else the first
        ``length`` ([1] on the device). No host sync and fixed shapes: CUDA-graph safe."""
        dev, C = self.draft_device, ctx_k.shape[1]
        L = length if length is not None else torch.full((1,), C, dtype=torch.long, device=dev)
        visible = torch.arange(C, device=dev)[None, :] < L if length is not None else \
            torch.ones(1, C, dtype=torch.bool, device=dev)  # [1, C]
        lp, col = self._log_probs(self.root[None])[0].topk(k)  # level 1: [k]
        tok = self._token_ids(col)
        scores, tokens, parents = [lp], [tok], [torch.full((k,), -1, dtype=torch.long, device=dev)]
        depths = [torch.ones(k, dtype=torch.long, device=dev)]
        level_ids = torch.arange(k, device=dev)  # this level's node ids
        level_out = self.root[None].expand(k, -1)  # [k, hidden] each node's parent's predicted feature
        dk = dv = None  # [kv, E, d] this tree's draft entries
        anc = torch.zeros(0, 0, dtype=torch.bool, device=dev)  # [E, E] entry e sees entry e'
        node_entry = torch.full((k,), -1, dtype=torch.long, device=dev)  # entry of each node (-1: none)
        n_nodes, E = k, 0
        for level in range(1, depth):
            w = min(width, level_ids.numel())
            sel = scores[-1].topk(w).indices  # [w] positions within this level
            nodes = level_ids[sel]  # [w] node ids to expand
            par = torch.cat(parents)[nodes]  # [w] their parents (-1 at level 1)
            par_entry = torch.where(par >= 0, node_entry[par.clamp(min=0)], -1)  # [w]
            # what each new entry sees: the visible committed entries, its parent's ancestry, itself
            seen = torch.eye(w, dtype=torch.bool, device=dev)
            if E:
                above = torch.where(par_entry[:, None] >= 0, anc[par_entry.clamp(min=0)], False)  # [w, E]
                seen = torch.cat([above, seen], 1)
            mask = torch.cat([visible.expand(w, C), seen], 1)  # [w, C + E + w]
            ck = ctx_k if dk is None else torch.cat([ctx_k, dk], 1)
            cv = ctx_v if dv is None else torch.cat([ctx_v, dv], 1)
            pos = (L + (level - 1)).expand(w)
            out, nk, nv = self.head(self.embed(torch.cat(tokens)[nodes]), self.norm(level_out[sel]), pos,
                                    ck, cv, mask)
            dk = nk if dk is None else torch.cat([dk, nk], 1)
            dv = nv if dv is None else torch.cat([dv, nv], 1)
            anc = torch.cat([torch.cat([anc, torch.zeros(E, w, dtype=torch.bool, device=dev)], 1), seen], 0)
            node_entry = node_entry.index_put((nodes,), torch.arange(E, E + w, device=dev))
            E += w
            lp, col = self._log_probs(out).topk(k, dim=-1)  # [w, k]
            tok = self._token_ids(col)
            scores.append((scores[-1][sel][:, None] + lp).reshape(-1))
            tokens.append(tok.reshape(-1))
            parents.append(nodes.repeat_interleave(k))
            depths.append(torch.full((w * k,), level + 1, dtype=torch.long, device=dev))
            level_ids = torch.arange(n_nodes, n_nodes + w * k, device=dev)
            level_out = out.repeat_interleave(k, 0)  # [w * k, hidden]
            node_entry = torch.cat([node_entry, torch.full((w * k,), -1, dtype=torch.long, device=dev)])
            n_nodes += w * k
        return torch.cat(tokens), torch.cat(parents), torch.cat(scores), torch.cat(depths)


def _fast_norm(norm: nn.Module):
    """The target's final norm as ``ops.norm.rms_norm`` (one fused launch on a GPU) where its
    formula is known -- Llama's ``w * x_hat.to(dtype)``, Gemma's ``x_hat * (1 + w)`` -- else the
    module itself."""
    name, weight = type(norm).__name__, getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
    known = name in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Gemma3RMSNorm", "GemmaRMSNorm")
    if not known or weight is None or eps is None:
        return norm
    offset = name.startswith("Gemma")
    return lambda x: norm_ops.rms_norm(x, weight, float(eps), offset)


def _best_nodes(tokens: torch.Tensor, parents: torch.Tensor, scores: torch.Tensor, depth: torch.Tensor,
                max_nodes: int, max_depth: int | None = None) -> TokenTree:
    """The ``max_nodes`` best candidates no deeper than ``max_depth`` by cumulative
    log-probability, as a TokenTree in topological order (ids grow level by level, so parents
    precede children and the nodes within ``max_depth`` are a prefix). A child never scores
    above its parent and a stable sort puts the parent first on a tie: the set is
    ancestor-closed. One transfer to the host per tensor."""
    tokens, parents, scores, depth = (t.cpu() for t in (tokens, parents, scores, depth))
    if max_depth is not None:
        ok = depth <= max_depth
        tokens, parents, scores = tokens[ok], parents[ok], scores[ok]
    n = min(max_nodes, tokens.numel())
    keep = torch.sort(torch.argsort(-scores, stable=True)[:n]).values
    remap = torch.full((tokens.numel(),), -1, dtype=torch.long)
    remap[keep] = torch.arange(n)
    par = parents[keep]
    new_par = torch.where(par >= 0, remap[par.clamp(min=0)], -1)
    if bool(((par >= 0) & (new_par < 0)).any()):  # (cannot happen: see above)
        raise RuntimeError("HeadDrafter: the best nodes are not ancestor-closed")
    return TokenTree(tokens[keep], new_par, scores=scores[keep].exp())


SHIPPED = Path(__file__).resolve().parent.parent / "heads"  # heads that ship inside the package


def shipped_head(target) -> Path:
    """The folder of the head that ships for ``target`` (matched by fingerprint), or a clear error."""
    want = fingerprint(target)
    for cfg in sorted(SHIPPED.glob(f"*/{CONFIG}")):
        if json.loads(cfg.read_text()).get("target_fingerprint") == want:
            return cfg.parent
    raise FileNotFoundError(f"no draft head ships for this model (fingerprint {want}; shipped: "
                            f"{sorted(p.name for p in SHIPPED.glob('*'))}); train one with "
                            "`specdec train-draft --kind head --out DIR` and pass path=DIR")
