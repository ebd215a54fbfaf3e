"""The EAGLE-style draft head (#24): runners hand out the target's hidden states, training
lowers the unrolled loss, the saved head round-trips and refuses another target, the tree
the drafter builds equals a from-scratch reference, and drafting with it is lossless."""
from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy, tiny_model

import specdec
from specdec import drafters, train_head
from specdec.backends.compact import CompactRunner
from specdec.backends.cuda_graphs import GraphedCompactRunner
from specdec.backends.generic import HFRunner, final_norm
from specdec.config import SamplingParams, TreeBudget
from specdec.drafters.base import DraftRequest
from specdec.drafters.head import HeadDrafter, load_head, save_head, shipped_head

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _seqs(vocab: int, n: int = 8, length: int = 40) -> list[torch.Tensor]:
    """Sequences with a repeated motif (something a head can learn) and noise."""
    g = torch.Generator().manual_seed(0)
    motif = torch.randint(0, vocab, (8,), generator=g)
    return [torch.cat([motif.roll(i), motif.roll(i), torch.randint(0, vocab, (length - 16,), generator=g)])
            for i in range(n)]


@pytest.fixture
def head_dir(tmp_path):
    """(target, folder) of a briefly trained head for a tiny llama."""
    target = tiny_model("llama", vocab=64, layers=3)
    data = train_head.collect(target, _seqs(64), topk=8, log=lambda s: None)
    head = train_head.init_head(target)
    train_head.train(head, target, data, steps=30, lr=3e-3, rows=4, length=24, log_every=0)
    save_head(head, target, tmp_path, {"steps": 30})
    return target, tmp_path


# ----------------------------------------------------------------------------- hidden states
def _norm_input(model, ids):
    seen = []
    hook = final_norm(model).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=ids[None])
    hook.remove()
    return seen[-1][0]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("runner_kind", ["generic", "compact", "static"])
def test_runners_give_the_final_norm_input_as_hidden_states(family, runner_kind):
    target = tiny_model(family)
    ids = torch.tensor([5, 9, 3, 5, 9, 3, 7])
    want = _norm_input(target, ids)
    if runner_kind == "generic":
        runner = HFRunner(target)
    else:
        runner = CompactRunner.from_hf(target)
        if runner_kind == "static":
            if runner.model.static_forward_issue():
                pytest.skip(runner.model.static_forward_issue())
            runner = GraphedCompactRunner(runner, mode="static")
    runner.keep_hidden = True
    runner.prefill(ids[:4], torch.arange(4))
    assert torch.allclose(runner.last_hidden.float(), want[:4], atol=1e-4)
    runner.forward(ids[4:], torch.arange(4, 7))
    assert runner.last_hidden.shape == (3, want.shape[-1])
    assert torch.allclose(runner.last_hidden.float(), want[4:], atol=1e-4)
    runner.keep_hidden = False
    runner.forward(torch.tensor([1]), torch.tensor([7]))
    assert runner.last_hidden is None


# ----------------------------------------------------------------------------- training
def test_unrolled_mask_is_what_a_depth_j_node_sees():
    m = train_head.unrolled_mask(4, 2, "cpu").int()
    # pass 2, entry t: pass-1 keys s <= t - 1, its own pass-2 key at t
    assert m.tolist() == [[0, 0, 0, 0, 1, 0, 0, 0],
                          [1, 0, 0, 0, 0, 1, 0, 0],
                          [1, 1, 0, 0, 0, 0, 1, 0],
                          [1, 1, 1, 0, 0, 0, 0, 1]]
    m3 = train_head.unrolled_mask(4, 3, "cpu")
    assert m3[3].nonzero().flatten().tolist() == [0, 1, 4 + 2, 8 + 3]  # true <= 1, pass 2 at 2, itself


def test_training_lowers_the_loss_and_leaves_the_target_alone():
    target = tiny_model("llama", vocab=64, layers=3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    data = train_head.collect(target, _seqs(64), topk=8, log=lambda s: None)
    head = train_head.init_head(target)
    losses = train_head.train(head, target, data, steps=60, lr=3e-3, rows=4, length=24, log_every=0)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
    assert not any(p.requires_grad for p in head.parameters())


def test_saved_head_round_trips_and_refuses_another_target(head_dir):
    target, path = head_dir
    head = load_head(path, target)
    again = load_head(path, target)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values()))
    assert head.fc.weight.dtype == next(target.parameters()).dtype
    other = tiny_model("llama", vocab=64, layers=3, seed=7)
    with pytest.raises(ValueError, match="trained for .* train one for it"):
        load_head(path, other)
    with pytest.raises(FileNotFoundError, match="train-draft --kind head"):
        load_head(path / "missing", target)
    with pytest.raises(FileNotFoundError, match="no draft head ships for this model"):
        shipped_head(other)
    with pytest.raises(ValueError, match="pass target="):
        drafters.make("head", path=path)


# ----------------------------------------------------------------------------- drafting
def _reference_tree(drafter: HeadDrafter, feats: torch.Tensor, tokens: torch.Tensor, budget: TreeBudget):
    """The tree ``propose`` should build, recomputing every node's head output from scratch
    (the committed entries and the node's own path, causal, no cache)."""
    head, embed = drafter.head, drafter.embed
    T = tokens.numel() - 1  # root position; entries 0..T-1 from true features

    def out_for(path_tokens: list[int]) -> torch.Tensor:
        """Head output at the last entry for the root's path extended by path_tokens."""
        n_true = T
        emb = embed(torch.cat([tokens[1:], torch.tensor(path_tokens[:-1] if path_tokens else [], dtype=torch.long)]))
        feat = drafter.norm(feats[:n_true])
        outs, _, _ = head(emb[:n_true], feat, torch.arange(n_true))
        chain = outs[-1:]
        all_emb, all_feat = emb[:n_true], feat
        for i, tok in enumerate(path_tokens):
            all_emb = torch.cat([all_emb, embed(torch.tensor([tok]))])
            all_feat = torch.cat([all_feat, drafter.norm(chain[-1:])])
            o, _, _ = head(all_emb, all_feat, torch.arange(all_emb.shape[0]))
            chain = torch.cat([chain, o[-1:]])
        return chain[-1]

    k, depth = min(drafter.topk, budget.max_nodes), min(drafter.depth, budget.max_depth)
    nodes = []  # (score, token, parent, path)
    lp = drafter._log_probs(out_for([])[None])[0]
    top = lp.topk(k)
    level = [(float(s), int(t), -1, [int(t)]) for s, t in zip(top.values, drafter._token_ids(top.indices))]
    nodes += level
    for _ in range(1, depth):
        base = len(nodes) - len(level)
        order = sorted(range(len(level)), key=lambda i: -level[i][0])[:drafter.width]
        nxt = []
        for i in sorted(order, key=lambda i: -level[i][0]):
            s, _, _, path = level[i]
            lp = drafter._log_probs(out_for(path)[None])[0].topk(k)
            nxt += [(s + float(v), int(t), base + i, path + [int(t)])
                    for v, t in zip(lp.values, drafter._token_ids(lp.indices))]
        level = nxt
        nodes += level
    best = sorted(range(len(nodes)), key=lambda i: (-nodes[i][0], i))[:budget.max_nodes]
    return sorted((nodes[i][3] for i in best))


@pytest.mark.parametrize("vocab", ["all", "subset"])
def test_head_tree_equals_the_from_scratch_reference(head_dir, vocab):
    target, path = head_dir
    if vocab == "subset":  # a draft vocabulary: 40 of the 64 tokens
        head = load_head(path, target)
        head.draft_vocab = train_head.draft_vocab(_seqs(64), 40)
        save_head(head, target, path / "sub")
        path = path / "sub"
        assert load_head(path, target).draft_vocab.tolist() == head.draft_vocab.tolist()
    drafter = drafters.make("head", target=target, path=path, topk=3, width=2, depth=3)
    prompt = torch.tensor([5, 9, 3, 5, 9, 3, 7, 1, 5])
    feats = _norm_input(target, prompt)
    drafter.reset(prompt)
    with torch.no_grad():
        drafter.observe_prefill(feats[:-1])
        budget = TreeBudget(max_nodes=7, max_depth=3)
        tree = drafter.propose(DraftRequest(prompt, budget, SamplingParams()))
        want = _reference_tree(drafter, feats[:-1], prompt, budget)
    paths = sorted([[int(tree.tokens[j]) for j in tree.path_to(i)] for i in range(len(tree))])
    assert len(tree) == 7 and paths == want, (paths, want)
    if vocab == "subset":
        assert set(tree.tokens.tolist()) <= set(drafter.vocab_ids.tolist())


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("name", ["head", "head+ngram"])
def test_greedy_lossless(family, name, tmp_path):
    target = tiny_model(family)
    save_head(train_head.init_head(target), target, tmp_path)  # untrained: lossless all the same
    opts = {"path": tmp_path} if name == "head" else {"head": {"path": tmp_path}}
    drafter = drafters.make(name, target=target, **opts)
    for seed, (ids, n) in enumerate([(torch.tensor([[5, 9, 3, 5, 9, 3, 5]]), 24), (torch.tensor([[7]]), 12)]):
        out = specdec.generate(target, ids, drafter=drafter, max_new_tokens=n, eos_token_id=None)
        assert out.sequences.tolist() == hf_greedy(target, ids, n).tolist(), seed
    runner = CompactRunner.from_hf(target)
    if runner is not None:
        ids = torch.tensor([[5, 9, 3, 5, 9, 3, 5]])
        out = specdec.generate(runner, ids, drafter=drafter, max_new_tokens=20, eos_token_id=None)
        assert out.sequences.tolist() == hf_greedy(target, ids, 20).tolist()


def test_trained_head_is_accepted(head_dir):
    """A head trained on motif-repeating text gets drafts accepted on such text."""
    target, path = head_dir
    ids = _seqs(64)[0][:20][None]
    out = specdec.generate(target, ids, drafter=drafters.make("head", target=target, path=path),
                           max_new_tokens=24, eos_token_id=None)
    assert out.sequences.tolist() == hf_greedy(target, ids, 24).tolist()
    assert out.stats.mean_accepted_length > 1.0


def test_update_without_hidden_states_is_a_clear_error(head_dir):
    from specdec.drafters.base import VerifyResult
    from specdec.tree import TokenTree

    target, path = head_dir
    drafter = drafters.make("head", target=target, path=path)
    drafter.reset(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="needs the target's hidden states"):
        drafter.update(VerifyResult(TokenTree.empty(), [], torch.tensor([3]), torch.tensor([1, 2, 3])))


def test_sampling_distribution(tmp_path):
    """First two sampled tokens follow the target's exact joint distribution through the head."""
    from test_drafters_lossless import assert_first_two_follow_target, peaky_target

    target = peaky_target()
    save_head(train_head.init_head(target), target, tmp_path)
    assert_first_two_follow_target(target, drafters.make("head", target=target, path=tmp_path, topk=2))


# ----------------------------------------------------------------------------- GPU
@gpu
@needs_cuda
def test_graphs_give_the_eager_hidden_states_and_stay_lossless_gpu(tmp_path):
    target = tiny_model("llama", head_dim=16).cuda()
    ids = torch.tensor([5, 9, 3, 5, 9, 3, 7], device="cuda")
    want = _norm_input(target, ids)
    runner = GraphedCompactRunner(CompactRunner.from_hf(target))
    runner.keep_hidden = True
    runner.prefill(ids[:4], torch.arange(4, device="cuda"))
    runner.forward(ids[4:], torch.arange(4, 7, device="cuda"))
    assert runner.mode == "graph", runner.disabled_reason
    assert torch.allclose(runner.last_hidden.float(), want[4:], atol=1e-3)
    # Lossless against plain decoding through the same graphed runtime in exact mode (every
    # verify row computes bitwise what a one-token step does; fp32 Triton dots may run in TF32,
    # so a comparison with transformers' own greedy can flip a random model's near-ties).
    exact = GraphedCompactRunner(CompactRunner.from_hf(target, exact=True))
    save_head(train_head.init_head(target), target, tmp_path)
    drafter = drafters.make("head", target=target, path=tmp_path)
    prompt = torch.tensor([[5, 9, 3, 5, 9, 3, 5]], device="cuda")
    plain = specdec.generate(exact, prompt, max_new_tokens=32, eos_token_id=None)
    out = specdec.generate(exact, prompt, drafter=drafter, max_new_tokens=32, eos_token_id=None)
    assert out.sequences.cpu().tolist() == plain.sequences.cpu().tolist()
    assert exact.mode == "graph", exact.disabled_reason


@gpu
@needs_cuda
def test_graphed_tree_growth_equals_eager_gpu(tmp_path):
    """The captured tree growth (whole K/V buffers, masked past the length) gives the eager tree."""
    target = tiny_model("llama", head_dim=16).cuda()
    save_head(train_head.init_head(target), target, tmp_path)
    prompt = torch.tensor([5, 9, 3, 5, 9, 3, 7, 1, 5], device="cuda")
    feats = _norm_input(target, prompt)[:-1]
    trees = []
    for graphs in (True, False):
        drafter = drafters.make("head", target=target, path=tmp_path, graphs=graphs)
        drafter.reset(prompt)
        drafter.observe_prefill(feats)
        for budget in (TreeBudget(max_nodes=31, max_depth=5), TreeBudget(max_nodes=7, max_depth=3)):
            trees.append(drafter.propose(DraftRequest(prompt.cpu(), budget, SamplingParams())))
        assert drafter.graphs == graphs, drafter.graph_issue
    for a, b in zip(trees[:2], trees[2:]):
        assert a.tokens.tolist() == b.tokens.tolist() and a.parents.tolist() == b.parents.tolist()
        assert torch.allclose(a.scores, b.scores, rtol=1e-4)


def test_best_nodes_respects_the_node_and_depth_budget():
    from specdec.drafters.head import _best_nodes

    tokens = torch.tensor([10, 11, 20, 21, 30])
    parents = torch.tensor([-1, -1, 0, 0, 2])
    scores = torch.tensor([-0.1, -2.0, -0.2, -0.3, -0.25])  # a child never above its parent
    depth = torch.tensor([1, 1, 2, 2, 3])
    tree = _best_nodes(tokens, parents, scores, depth, 4)
    assert tree.tokens.tolist() == [10, 20, 21, 30] and tree.parents.tolist() == [-1, 0, 0, 1]
    tree = _best_nodes(tokens, parents, scores, depth, 4, max_depth=2)
    assert tree.tokens.tolist() == [10, 11, 20, 21] and tree.parents.tolist() == [-1, -1, 0, 0]
    assert _best_nodes(tokens, parents, scores, depth, 9, max_depth=1).tokens.tolist() == [10, 11]


def test_padded_update_equals_the_eager_update(head_dir):
    """The step's update as the CUDA graph captures it (padded to depth + 1 entries, lengths on
    the device), run eagerly here, proposes the same trees as the plain update."""
    target, path = head_dir
    seen = {}
    for padded in (False, True):
        drafter = drafters.make("head", target=target, path=path, topk=3, width=3, depth=3)
        drafter.pad_appends = padded
        trees = []
        real = drafter.propose

        def propose(request, real=real, trees=trees):
            tree = real(request)
            trees.append((tree.tokens.tolist(), tree.parents.tolist()))
            return tree

        drafter.propose = propose
        ids = _seqs(64)[1][:12][None]
        out = specdec.generate(target, ids, drafter=drafter, max_new_tokens=24, eos_token_id=None,
                               budget=TreeBudget(max_nodes=9, max_depth=3))
        assert out.sequences.tolist() == hf_greedy(target, ids, 24).tolist()
        assert int(drafter.length_dev) == drafter.length
        seen[padded] = trees
    assert seen[True] == seen[False] and len(seen[True]) > 3
