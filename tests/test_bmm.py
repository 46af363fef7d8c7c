"""The "bmm" strategy (fastmeta.evaluation.BmmPlan): Linear/activation models run as batched matmuls
over tasks. Same oracles as the other strategies (tests/reference.py, float64, 1e-9 relative):
MAML / FO-MAML (Sharp-MAML Alg. 2 / eq. 9 inner step, Fallah eqs. 5 and 8), HF-MAML (Fallah
eqs. 10-11 with the per-task shared-parameter rows), Sharp-MAML low / up / both (eqs. 11-13)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta
from fastmeta.evaluation import BmmPlan, Evaluator
from fastmeta.params import ParamLayout
from fastmeta.tasks import TaskBatch

from reference import (conv_case, flat, hfmaml_meta_grad, maml_meta_grad, mlp_case, rel_err, run,
                       sharp_maml_meta_grad)


@pytest.mark.parametrize("activation", ["tanh", "relu", "softplus"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("adapt", ["all", "head"])
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
def test_maml_matches_plain_loop(activation, steps, adapt, first_order):
    model, batch, loss_fn, lr = mlp_case(activation)
    algo = fastmeta.FOMAML(lr, steps) if first_order else fastmeta.MAML(lr, steps)
    res, layout = run(algo, model, batch, loss_fn, adapt, "bmm")
    want = flat(maml_meta_grad(model, batch, loss_fn, lr, steps, layout.adapted, first_order), layout)
    assert rel_err(res.grad, want) < 1e-9


@pytest.mark.parametrize("steps,delta", [(1, None), (2, 1e-3)], ids=["1step-thm417", "2steps-fixed"])
@pytest.mark.parametrize("adapt", ["all", "head"])
def test_hfmaml_matches_per_task_finite_differences(steps, delta, adapt):
    model, batch, loss_fn, lr = mlp_case()
    res, layout = run(fastmeta.HFMAML(lr, steps, delta=delta, rho=2.0), model, batch, loss_fn, adapt, "bmm")
    want = flat(hfmaml_meta_grad(model, batch, loss_fn, lr, steps, layout.adapted, delta=delta, rho=2.0), layout)
    assert rel_err(res.grad, want) < 1e-9


@pytest.mark.parametrize("lo,up", [(0.1, 0.0), (0.0, 0.1), (0.1, 0.1)], ids=["low", "up", "both"])
@pytest.mark.parametrize("adapt", ["all", "head"])
def test_sharp_maml_matches_plain_loop(lo, up, adapt):
    model, batch, loss_fn, lr = mlp_case()
    res, layout = run(fastmeta.SharpMAML(lr, 2, alpha_low=lo, alpha_up=up), model, batch, loss_fn, adapt, "bmm")
    want = flat(sharp_maml_meta_grad(model, batch, loss_fn, lr, 2, layout.adapted, lo, up), layout)
    assert rel_err(res.grad, want) < 1e-9


class Residual(nn.Module):
    """Not a Sequential: a custom forward with a skip connection and functional activations."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(2, 8), nn.Linear(8, 8, bias=False), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + F.softplus(self.mid(h)) * 0.5
        return self.out(h)


def test_custom_forward_with_skip_and_biasless_layer():
    torch.manual_seed(0)
    model = Residual().double()
    x = torch.randn(4, 10, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (4, 10))
    batch = TaskBatch(x[:, :4], y[:, :4], x[:, 4:], y[:, 4:], ways=3)
    for adapt in ("all", ["mid.weight", "out.bias"]):
        res, layout = run(fastmeta.MAML(0.2, 2), model, batch, F.cross_entropy, adapt, "bmm")
        want = flat(maml_meta_grad(model, batch, F.cross_entropy, 0.2, 2, layout.adapted), layout)
        assert rel_err(res.grad, want) < 1e-9


class Reshaping(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("model,why", [
    (fastmeta.Conv4(3, hidden=4, image_size=16), "'features.0' is a Conv2d"),
    (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)), "BatchNorm1d"),
    (nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1)), "Dropout"),
    (Reshaping(), "tensor method 'flatten'"),
])
def test_models_it_cannot_batch_are_refused_by_name(model, why):
    assert why in BmmPlan.reason(model)
    layout = ParamLayout(model)
    with pytest.raises(ValueError, match="strategy: 'bmm'") as e:
        Evaluator(model, layout, F.mse_loss, "bmm")
    assert why in str(e.value)
    assert "no nn.Linear" in BmmPlan.reason(nn.Sequential(nn.Tanh()))


def test_inputs_must_be_task_by_sample_by_feature():
    model, batch, loss_fn, lr = mlp_case()
    layout = ParamLayout(model)
    ev = Evaluator(model, layout, loss_fn, "bmm")
    theta = layout.flatten(model)
    with pytest.raises(ValueError, match="x: .*bmm"):
        ev.forward(theta[: layout.D].expand(3, -1), theta[layout.D:], torch.zeros(3, 5, 1, 1, dtype=torch.float64))


def test_auto_measures_bmm_only_where_the_model_qualifies():
    model, batch, _, lr = mlp_case()
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(lr), loss_fn="mse")
    learner.step(batch)
    assert set(learner.strategy_timings) == {"vmap", "loop", "bmm"}
    assert learner.chosen_strategy == min(learner.strategy_timings, key=learner.strategy_timings.get)
    model, batch, _, lr = conv_case()
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(lr))
    learner.step(batch)
    assert set(learner.strategy_timings) == {"vmap", "loop"}


@pytest.mark.parametrize("strategy", ["bmm", "loop", "vmap"])
@pytest.mark.parametrize("loss", [F.mse_loss, F.l1_loss, F.huber_loss])
def test_losses_of_elementwise_losses_are_per_task_means(strategy, loss):
    """Evaluator.losses applies element-wise losses to [T, N, 1] outputs without reshaping: the
    per-task mean (and per-sample values) must equal the loss of each task computed on its own."""
    model, batch, _, _ = mlp_case()
    layout = ParamLayout(model)
    ev = Evaluator(model, layout, loss, strategy)
    theta = layout.flatten(model)
    rows = theta.expand(batch.num_tasks, -1) + 0.01 * torch.randn(batch.num_tasks, layout.D, dtype=theta.dtype)
    per_task = ev.losses(rows, theta[layout.D:], batch.query_x, batch.query_y)
    per_sample = ev.losses(rows, theta[layout.D:], batch.query_x, batch.query_y, per_sample=True)
    for t in range(batch.num_tasks):
        m = torch.func.functional_call(model, layout.named(rows[t], None), (batch.query_x[t],))
        want = loss(m, batch.query_y[t], reduction="none").reshape(-1)
        torch.testing.assert_close(per_sample[t], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(per_task[t], want.mean(), rtol=1e-12, atol=1e-12)


def test_structured_inner_loop_returns_what_the_rows_loop_returns():
    """inner_loop(structured=True) on bmm: per-parameter tensors equal to the rows loop's rows."""
    from fastmeta.evaluation import inner_loop

    model, batch, loss_fn, lr = mlp_case()
    layout = ParamLayout(model)
    ev = Evaluator(model, layout, loss_fn, "bmm")
    theta = layout.flatten(model).requires_grad_()
    adapted, shared = layout.split(theta)
    rows, _ = inner_loop(ev, adapted, shared, batch.support_x, batch.support_y, lr, 3, create_graph=True)
    params, iterates = inner_loop(ev, adapted, shared, batch.support_x, batch.support_y, lr, 3,
                                  create_graph=True, structured=True)
    assert isinstance(params, dict) and iterates == []
    for name, value in layout.named(rows, None).items():
        torch.testing.assert_close(params[name], value, rtol=1e-12, atol=1e-14)
    loop_ev = Evaluator(model, layout, loss_fn, "loop")  # other strategies keep returning rows
    same, _ = inner_loop(loop_ev, adapted, shared, batch.support_x, batch.support_y, lr, 3,
                         create_graph=True, structured=True)
    assert isinstance(same, torch.Tensor)
    with pytest.raises(ValueError, match="bmm"):
        loop_ev.losses(params, shared, batch.query_x, batch.query_y)
