"""ANIL combinations (Sharp-MAML sec. 5.4, eq. 19): every algorithm with adapt="head" adapts only the
head in the inner loop and still meta-learns the body. The exact meta-gradients of the ANIL variants
are checked against the plain loops in test_hfmaml.py / test_sharp.py (adapt="head" cases); here:
each registry algorithm runs as ANIL through MetaLearner and the CLI config."""
import pytest
import torch

import fastmeta
from fastmeta.algorithms.registry import FACTORIES, build_algorithm
from fastmeta.tasks import TaskBatch


def conv_batch():
    x = torch.randn(2, 3 * 2, 1, 16, 16, dtype=torch.float64)
    y = torch.arange(3).repeat_interleave(2).expand(2, -1)
    return TaskBatch(x[:, ::2], y[:, ::2].contiguous(), x[:, 1::2], y[:, 1::2].contiguous(), ways=3)


@pytest.mark.parametrize("algo", sorted(FACTORIES))
def test_every_algorithm_runs_as_anil(algo):
    model = fastmeta.Conv4(ways=3, hidden=4, image_size=16).double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    learner = fastmeta.MetaLearner(model, build_algorithm(dict(algo=algo, inner_lr=0.3, inner_steps=2)),
                                   adapt="head", strategy="loop")
    assert learner.layout.adapted == ["head.weight", "head.bias"]
    res = learner.step(conv_batch())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert float(model.features[0].weight.grad.abs().sum()) > 0  # the body is meta-learned
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # step() does not update
    assert 0.0 <= res.accuracy <= 1.0
    # meta-test adaptation touches only the head
    fast = learner.adapt(conv_batch().support_x[0], conv_batch().support_y[0])
    assert torch.equal(fast.features[0].weight, model.features[0].weight)
