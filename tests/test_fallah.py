"""Fallah et al.'s meta step size beta = c / L~(w) (eqs. 16-17; c from Theorems 4.12 / 4.15 / 4.17),
against a plain per-task computation."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import fastmeta
from fastmeta.evaluation import Evaluator
from fastmeta.params import ParamLayout
from fastmeta.tasks import TaskBatch


def mlp_case():
    model = fastmeta.SineMLP(hidden=12, activation="tanh").double()
    x = torch.rand(4, 14, 1, dtype=torch.float64) * 10 - 5
    y = 2.0 * torch.sin(x - 0.3)
    return model, TaskBatch(x[:, :6], y[:, :6], x[:, 6:], y[:, 6:])


def plain_beta(model, batch, L, rho, alpha, c):
    # eq. 16: L~ = 4L + 2 rho alpha (1/B') sum_j ||grad f_j(w, D_beta^j)||, gradient over all parameters.
    params = dict(model.named_parameters())
    norms = []
    for j in range(batch.support_x.shape[0]):
        loss = F.mse_loss(functional_call(model, params, (batch.support_x[j],)), batch.support_y[j])
        g = torch.autograd.grad(loss, list(params.values()))
        norms.append(torch.sqrt(sum((gi ** 2).sum() for gi in g)))
    return c / (4 * L + 2 * rho * alpha * float(torch.stack(norms).mean()))  # eq. 17


@pytest.mark.parametrize("adapt", ["all", "head"])
@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_matches_plain_computation(adapt, strategy):
    model, batch = mlp_case()
    layout = ParamLayout(model, adapt)
    ev = Evaluator(model, layout, F.mse_loss, strategy)
    step = fastmeta.FallahStepSize(L=3.0, rho=2.0, inner_lr=0.05, c="hfmaml")
    got = step(ev, layout, layout.flatten(model), batch)
    assert got == pytest.approx(plain_beta(model, batch, 3.0, 2.0, 0.05, 1 / 25), rel=1e-12)


def test_theorem_constants_and_learner_use():
    assert fastmeta.FallahStepSize(1, 1, 0.1).c == pytest.approx(1 / 12)
    assert fastmeta.FallahStepSize(1, 1, 0.1, c="fomaml").c == pytest.approx(1 / 18)
    assert fastmeta.FallahStepSize(1, 1, 0.1, c=fastmeta.HFMAML(0.1)).c == pytest.approx(1 / 25)
    assert fastmeta.FallahStepSize(1, 1, 0.1, c=0.3).c == 0.3
    model, batch = mlp_case()
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(0.05), loss_fn="mse", strategy="loop")
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    step = fastmeta.FallahStepSize(L=3.0, rho=2.0, inner_lr=0.05)
    lr = step.for_learner(learner, batch)
    step.apply(opt, lr)
    assert opt.param_groups[0]["lr"] == pytest.approx(plain_beta(model, batch, 3.0, 2.0, 0.05, 1 / 12), rel=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="L"):
        fastmeta.FallahStepSize(0.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="rho"):
        fastmeta.FallahStepSize(1.0, -1.0, 0.1)
    with pytest.raises(ValueError, match="inner_lr"):
        fastmeta.FallahStepSize(1.0, 1.0, 0)
    with pytest.raises(ValueError, match="c"):
        fastmeta.FallahStepSize(1.0, 1.0, 0.1, c="reptile")
