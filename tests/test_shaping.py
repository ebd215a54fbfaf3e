"""Tree shaping for model drafters: calibration, SpecDec++ chain stopping, dynamic trees."""
import numpy as np
import torch

from specdec.adaptive import BudgetController, LatencyModel
from specdec.config import TreeBudget
from specdec.drafters.shaping import (AcceptanceCalibrator, ChainStopper, DynamicTreeBuilder, node_features,
                                      stop_threshold)
from specdec.tree import ROOT, TokenTree


def _trained_controller(key="ModelDrafter"):
    """A controller that has seen chains of 4 accepting 2 on a linear verify curve."""
    ctl = BudgetController(latency=LatencyModel.from_function(lambda n: 0.01 + 0.0002 * n))
    chain = TokenTree(torch.tensor([1, 2, 3, 4]), torch.tensor([-1, 0, 1, 2]))
    for i in range(50):
        arm = ctl.choose(key)
        ctl.observe(key, 4, 2, 0.001 + 0.002 * 4 * (1 + 0.05 * (i % 3)), 0.0108, tree=chain,
                    accepted_nodes=[0, 1], budget=TreeBudget(max(arm.max_nodes, 4), 8))
    return ctl


def test_stop_rule_and_chain_stopper():
    ctl = _trained_controller()
    thr = stop_threshold(ctl, "ModelDrafter", depth=3)
    assert 0 < thr < 1
    calibrate = lambda p: p  # noqa: E731 -- a calibrated drafter
    assert ChainStopper(ctl, "ModelDrafter", calibrate).should_continue(0.01, 1)  # never before min_depth
    low = ChainStopper(ctl, "ModelDrafter", calibrate)
    low.path = thr / 2
    assert not low.should_continue(0.99, 3)
    stop = ChainStopper(ctl, "ModelDrafter", calibrate)
    assert stop.should_continue(0.99, 3) and stop.should_continue(0.9, 4) and stop.path < 1.0


def test_calibrator_converges_to_true_acceptance():
    rng = np.random.default_rng(0)
    cal = AcceptanceCalibrator("prob", decay=1.0)
    truth = lambda c: c ** 2  # noqa: E731  an over-confident drafter
    for _ in range(40):
        c = rng.random(500)
        cal.update(c, rng.random(500) < truth(c))
    grid = np.linspace(0.1, 0.9, 9)
    assert np.abs(cal(grid) - truth(grid)).max() < 0.04
    assert np.all(np.diff(cal(np.linspace(0, 1, 50))) >= -1e-12)  # monotone


def test_calibrator_tracks_a_shift_and_prior():
    rng = np.random.default_rng(1)
    cal = AcceptanceCalibrator("prob", decay=0.999)
    assert abs(cal(0.75) - 0.75) < 1e-9  # no data: the prior says "calibrated"
    for truth in (lambda c: c ** 2, lambda c: np.sqrt(c)):
        for _ in range(20):
            c = rng.random(500)
            cal.update(c, rng.random(500) < truth(c))
        assert abs(cal(0.5) - truth(0.5)) < 0.06


def test_depth_calibrator_and_tree_labels():
    alphas = {1: 0.8, 2: 0.5, 3: 0.3}
    rng = np.random.default_rng(2)
    cal = AcceptanceCalibrator("depth", decay=1.0)
    for _ in range(4000):
        d = int(rng.integers(1, 4))
        cal.update([d], [rng.random() < alphas[d]])
    for d, a in alphas.items():
        assert abs(cal(d) - a) < 0.04
    # tree labels: only nodes whose parent was accepted (or the root's children) are labelled
    tree = TokenTree(torch.tensor([1, 2, 3, 4, 5]), torch.tensor([-1, -1, 0, 0, 2]),
                     scores=torch.tensor([0.6, 0.3, 0.3, 0.2, 0.15]))
    assert np.allclose(node_features(tree, "prob"), [0.6, 0.3, 0.5, 1 / 3, 0.5])
    c = AcceptanceCalibrator("prob", decay=1.0, prior_strength=0.0)
    c.observe(tree, [0, 3])  # labelled: 0 (yes), 1 (no), 2 (no), 3 (yes); 4's parent rejected
    assert c.n.sum() == 4 and c.a.sum() == 2


def _toy_probs(vocab=10):
    """next-token probabilities that depend on the last token: a peaked chain 0 -> 1 -> 2 ..."""
    def probs_after(tok):
        p = torch.full((vocab,), 0.02)
        p[(tok + 1) % vocab] = 0.7
        p[(tok + 2) % vocab] = 0.14
        return p / p.sum()
    return probs_after


def test_dynamic_tree_builder_best_first_and_calibrated():
    after = _toy_probs()
    forwards = []

    def expand(b, nodes):
        forwards.append(list(nodes))
        mask = b.ancestor_mask(nodes, [i for f in forwards for i in f])
        assert mask[torch.arange(len(nodes)), -len(nodes) + torch.arange(len(nodes))].all()  # sees itself
        return torch.stack([after(b.tokens[i]) for i in nodes])

    b = DynamicTreeBuilder(max_nodes=10, max_depth=5, topk=3, width=3)
    tree = b.build(after(0), expand)
    assert len(tree) == 10 and int(tree.depth.max()) <= 5
    sc = tree.scores.tolist()
    plist = tree.parents.tolist()
    assert all(p < i for i, p in enumerate(plist))  # topological
    assert all(p == ROOT or sc[p] >= sc[i] for i, p in enumerate(plist))
    assert tree.tokens[:4].tolist() == [1, 2, 3, 4]  # the peaked chain comes first
    assert len(forwards) == 4  # one forward per level below the root
    # a calibrator that distrusts confident drafts flattens the tree
    flat = DynamicTreeBuilder(max_nodes=10, max_depth=5, topk=3, width=3,
                              calibrate=lambda p: np.where(np.asarray(p) > 0.5, 0.2, 0.15))
    t2 = flat.build(after(0), lambda b, nodes: torch.stack([after(b.tokens[i]) for i in nodes]))
    assert int(t2.depth.max()) < int(tree.depth.max())
    # thresholds: nothing worth a forward -> the root's best child only
    lazy = DynamicTreeBuilder(max_nodes=10, max_depth=5, topk=3, width=3, node_threshold=0.9)
    assert len(lazy.build(after(0), expand)) == 1
