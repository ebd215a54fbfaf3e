"""ModelDrafter: a small Hugging Face causal LM drafts a chain or a top-k tree."""
from __future__ import annotations

import torch

from ..adaptive import drafter_key
from ..backends.base import Runner
from ..backends.generic import HFRunner
from ..sampling import apply_penalties, probs_from_logits
from ..tree import ROOT, TokenTree
from .base import DraftRequest, VerifyResult
from .shaping import AcceptanceCalibrator, ChainStopper, dynamic_tree_builder


class ModelDrafter:
    """Drafts with a small model that keeps its own KV cache.

    - ``topk == 1``: a chain of ``gamma`` tokens (greedy, or sampled from the processed
      draft distribution when sampling, with those distributions attached so the
      verifier can do exact rejection sampling).
    - ``topk > 1``: a tree grown level by level, ``gamma`` levels deep; at each level
      the ``width`` children with the highest cumulative draft probability (among the
      top-k of every frontier node) are kept (EAGLE-2 style). Tree nodes are
      deterministic proposals.
    After each step the cache is rolled back to the longest prefix it shares with the
    committed tokens, so accepted drafts keep their K/V.
    ``threshold`` (chain only): stop drafting once the draft's top-1 probability falls
    below it (that token is not proposed), as in Kangaroo / adaptive draft lengths.
    ``controller`` (a ``specdec.adaptive.BudgetController``): the chain stops by the
    calibrated SpecDec++ rule priced by its costs, and trees grow by calibrated acceptance
    estimates (``specdec.drafters.shaping``); ``generate`` then also lets it pick each
    step's budget. The drafter's own ``calibrator`` learns from every verified tree.
    Chain nodes carry ``scores`` (cumulative draft probability) for calibration.
    """

    def __init__(self, model, *, gamma: int = 4, topk: int = 1, width: int | None = None,
                 threshold: float = 0.0, controller=None):
        if gamma < 1 or topk < 1:
            raise ValueError("ModelDrafter: gamma and topk must be >= 1")
        self.runner = model if isinstance(model, Runner) else HFRunner(model)
        self.gamma, self.topk = gamma, topk
        self.threshold = float(threshold)
        self.controller = controller
        self.calibrator = AcceptanceCalibrator("prob")  # P(accepted | parent accepted) from draft probs
        self.width = width or topk * 2
        self.vocab_size = self.runner.vocab_size
        self.device = self.runner.device
        self.draft_device = self.device  # checked against the target's by generate
        self._fed: list[int] = []  # tokens whose K/V the cache holds, in order

    def reset(self, prompt: torch.Tensor) -> None:
        self.runner.reset()
        self._fed = []

    # ------------------------------------------------------------------ cache
    def _sync(self, tokens: list[int]) -> torch.Tensor:
        """Bring the cache to ``tokens`` (all committed) and return logits at the root [vocab]."""
        common = 0
        for a, b in zip(self._fed, tokens):
            if a != b:
                break
            common += 1
        common = min(common, len(tokens) - 1, self.runner.length)
        self.runner.crop(common)
        new = torch.tensor(tokens[common:], dtype=torch.long, device=self.device)
        pos = torch.arange(common, len(tokens), device=self.device)
        logits = self.runner.forward(new, pos)
        self._fed = list(tokens)
        return logits[-1]

    def _probs(self, logits: torch.Tensor, request: DraftRequest, counts: torch.Tensor | None):
        sp = request.sampling
        logits = logits[None, :self.vocab_size]
        if sp.do_sample:
            return probs_from_logits(logits, sp, None if counts is None else counts[None])[0]
        if sp.has_penalties:
            logits = apply_penalties(logits, counts[None].to(logits.dtype), sp)
        return torch.softmax(logits, dim=-1)[0]

    # ---------------------------------------------------------------- propose
    def propose(self, request: DraftRequest) -> TokenTree:
        tokens = request.tokens.tolist()
        depth = min(self.gamma, request.budget.max_depth, request.budget.max_nodes)
        if depth <= 0:
            return TokenTree.empty(request.tokens.device)
        counts = None
        if request.sampling.has_penalties:
            counts = torch.bincount(request.tokens.to(self.device), minlength=self.vocab_size).float()
        root_logits = self._sync(tokens)
        if self.topk == 1:
            return self._chain(root_logits, depth, request, counts)
        if self.controller is not None:
            return self._dynamic_tree(root_logits, depth, request)
        return self._tree(root_logits, depth, request)

    def _chain(self, logits, depth, request, counts) -> TokenTree:
        drafted, rows, scores = [], [], []
        base = len(self._fed)
        stopper = None if self.controller is None else ChainStopper(self.controller, drafter_key(self), self.calibrator)
        for i in range(depth):
            q = self._probs(logits, request, counts)
            if self.threshold > 0 and float(q.max()) < self.threshold:
                break  # the draft is unsure: stop the chain before this token
            if stopper is not None and not stopper.should_continue(float(q.max()), i + 1):
                break  # not worth its draft + verify cost (calibrated SpecDec++ rule)
            if request.sampling.do_sample:
                tok = int(torch.multinomial(q, 1, generator=request.generator))
            else:
                tok = int(q.argmax())
            drafted.append(tok)
            rows.append(q)
            scores.append((scores[-1] if scores else 1.0) * float(q[tok]))
            if counts is not None:
                counts = counts.clone()
                counts[tok] += 1
            if i + 1 < depth:
                logits = self.runner.forward(torch.tensor([tok], device=self.device),
                                             torch.tensor([base + i], device=self.device))[-1]
                self._fed.append(tok)
        toks = torch.tensor(drafted, dtype=torch.long)
        parents = torch.arange(len(drafted)) - 1
        dp = torch.stack(rows).cpu() if request.sampling.do_sample and rows else None
        return TokenTree(toks, parents, draft_probs=dp, scores=torch.tensor(scores))

    def _tree(self, root_logits, depth, request) -> TokenTree:
        """Level-wise best-first expansion; the scratch K/V is dropped afterwards."""
        start = self.runner.length  # == len(tokens): committed prefix incl. root
        max_nodes = request.budget.max_nodes
        tokens, parents, scores, depths = [], [], [], []
        frontier = [ROOT]
        frontier_probs = torch.softmax(root_logits[:self.vocab_size].float(), -1)[None]  # [f, vocab]
        for level in range(depth):
            base = torch.tensor([1.0 if f == ROOT else scores[f] for f in frontier])[:, None]
            p, ids = frontier_probs.cpu().topk(self.topk, dim=-1)  # [f, k]
            cand = (base * p).flatten()
            room = min(self.width, max_nodes - len(tokens))
            if room <= 0:
                break
            best = cand.topk(min(room, cand.numel())).indices.tolist()
            new_nodes = []
            for b in best:
                f, j = divmod(b, self.topk)
                tokens.append(int(ids[f, j]))
                parents.append(frontier[f])
                scores.append(float(cand[b]))
                depths.append(level + 1)
                new_nodes.append(len(tokens) - 1)
            if level + 1 == depth or len(tokens) >= max_nodes:
                break
            # Forward the new level: each sees the prefix, its ancestors (scratch) and itself.
            tree = TokenTree(torch.tensor(tokens), torch.tensor(parents))
            anc = tree.ancestor_mask  # [N, N]
            first = new_nodes[0]
            mask = anc[first:, :]  # scratch holds nodes [0, first); new nodes [first, N)
            logits = self.runner.forward(torch.tensor(tokens[first:], device=self.device),
                                         torch.tensor([start - 1 + d for d in depths[first:]], device=self.device),
                                         tree_mask=mask.to(self.device), mask_start=start)
            frontier = new_nodes
            frontier_probs = torch.softmax(logits[:, :self.vocab_size].float(), -1)
        self.runner.crop(start)
        return TokenTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long),
                         scores=torch.tensor(scores))

    def _dynamic_tree(self, root_logits, depth, request) -> TokenTree:
        """Best-first by calibrated acceptance (``shaping.DynamicTreeBuilder``); one
        draft forward per level over the expanded nodes; the scratch K/V is dropped."""
        start, fed, dev = self.runner.length, [], self.device  # fed: builder nodes in scratch, in order

        def expand(b, nodes: list[int]) -> torch.Tensor:
            mask = b.ancestor_mask(nodes, fed + nodes)  # [m, scratch + m]
            logits = self.runner.forward(torch.tensor([b.tokens[i] for i in nodes], device=dev),
                                         torch.tensor([start - 1 + b.depths[i] for i in nodes], device=dev),
                                         tree_mask=mask.to(dev), mask_start=start)
            fed.extend(nodes)
            return torch.softmax(logits[:, :self.vocab_size].float(), -1)

        builder = dynamic_tree_builder(self.controller, drafter_key(self), self.calibrator,
                                       max_nodes=request.budget.max_nodes, max_depth=depth, topk=self.topk,
                                       width=self.width)
        tree = builder.build(torch.softmax(root_logits[:self.vocab_size].float(), -1), expand)
        self.runner.crop(start)
        return tree

    def update(self, result: VerifyResult) -> None:
        # (the next propose() rolls the cache back to the shared prefix)
        if self.controller is not None:
            self.calibrator.observe(result.tree, result.accepted_nodes)
