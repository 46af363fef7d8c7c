"""MAML / FO-MAML meta-gradients against the plain per-task loop (tests/reference.py), float64.

MAML: Sharp-MAML Alg. 2 / eq. 9 inner step, Fallah eq. 5 meta-gradient; FO-MAML: Fallah eq. 8.
The Conv-4 + BatchNorm cases under ``vmap`` are the ones that fail if the functorch#534 trap
(second-order batch norm under vmap) is not handled.
"""
import math

import pytest
import torch

import fastmeta
from fastmeta.algorithms.base import MetaResult
from fastmeta.evaluation import Evaluator
from fastmeta.params import ParamLayout
from fastmeta.tasks import TaskBatch

from reference import conv_case, flat, maml_meta_grad, mlp_case, rel_err


@pytest.mark.parametrize("case", [mlp_case, conv_case], ids=["mlp", "conv4_bn"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("adapt", ["all", "head"])
@pytest.mark.parametrize("strategy", ["vmap", "loop"])
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
def test_meta_grad_matches_plain_loop(case, steps, adapt, strategy, first_order):
    model, batch, loss_fn, lr = case()
    algo = fastmeta.FOMAML(lr, steps) if first_order else fastmeta.MAML(lr, steps)
    layout = ParamLayout(model, adapt)
    ev = Evaluator(model, layout, loss_fn, strategy)
    got = algo.meta_grad(ev, layout, layout.flatten(model), batch).grad
    want = flat(maml_meta_grad(model, batch, loss_fn, lr, steps, layout.adapted, first_order), layout)
    assert rel_err(got, want) < 1e-9


def test_second_order_differs_from_first_order():
    # Guards the test above against a MAML that silently drops the Hessian term.
    model, batch, loss_fn, lr = conv_case()
    layout = ParamLayout(model)
    ev = Evaluator(model, layout, loss_fn, "vmap")
    so = fastmeta.MAML(lr).meta_grad(ev, layout, layout.flatten(model), batch).grad
    fo = fastmeta.FOMAML(lr).meta_grad(ev, layout, layout.flatten(model), batch).grad
    assert rel_err(fo, so) > 1e-3


def test_learner_step_writes_grad_and_reports_accuracy():
    model, batch, loss_fn, lr = conv_case()
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(lr), loss_fn="cross_entropy", strategy="loop")
    res = learner.step(batch)
    want = maml_meta_grad(model, batch, loss_fn, lr, 1, learner.layout.adapted)
    for n, p in model.named_parameters():
        assert rel_err(p.grad, want[n]) < 1e-9
    assert 0.0 <= res.accuracy <= 1.0
    assert res.per_task_loss.shape == (3,)


def test_auto_strategy_measures_both_and_keeps_faster():
    model, batch, _, lr = mlp_case()
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(lr), loss_fn="mse")
    learner.step(batch)
    t = learner.strategy_timings
    assert set(t) == {"vmap", "loop", "bmm"}
    assert learner.chosen_strategy == min(t, key=t.get)
    assert "auto" in learner.strategy_reason


def test_anil_adapts_only_head_but_meta_learns_body():
    model, batch, _, lr = conv_case()
    layout = ParamLayout(model, "head")
    assert layout.adapted == ["head.weight", "head.bias"]
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(lr), adapt="head", strategy="vmap")
    learner.step(batch)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_non_finite_loss_is_reported():
    model, batch, _, lr = mlp_case()
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(lr), loss_fn="mse", strategy="loop")
    with pytest.raises(FloatingPointError, match="loss"):
        learner.step(batch)


def test_finite_values_whose_sum_overflows_are_not_an_error(monkeypatch):
    """The happy-path check sums in the gradient's dtype; float32 values near 3e38 overflow that sum
    although every value is finite: the element-wise diagnosis must then pass the result through."""
    model, batch, _, lr = mlp_case()
    model = model.float()
    batch = TaskBatch(batch.support_x.float(), batch.support_y.float(), batch.query_x.float(), batch.query_y.float())
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(lr), loss_fn="mse", strategy="loop")
    huge = torch.full((learner.layout.P,), 3e38)
    res = MetaResult(huge, torch.full((batch.num_tasks,), 3e38), None)
    monkeypatch.setattr(learner.algorithm, "meta_grad", lambda *a: res)
    assert not math.isfinite(float(huge.sum()))
    assert learner.meta_gradient(batch) is res
    res_nan = MetaResult(huge.clone().index_fill_(0, torch.tensor([1]), float("nan")), res.query_loss, None)
    monkeypatch.setattr(learner.algorithm, "meta_grad", lambda *a: res_nan)
    with pytest.raises(FloatingPointError, match="meta-gradient is non-finite"):
        learner.meta_gradient(batch)


def test_evaluate_ci_and_adapt():
    model, batch, _, lr = conv_case()
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(lr), strategy="loop")
    r = learner.evaluate(batch)
    assert r.num_tasks == 3 and r.accuracy_ci95 > 0 and r.per_task_accuracy.shape == (3,)
    # evaluate == adapt a copy by hand and score it
    fast = learner.adapt(batch.support_x[1], batch.support_y[1])
    with torch.no_grad():
        acc = (fast(batch.query_x[1]).argmax(-1) == batch.query_y[1]).double().mean()
    assert float(acc) == pytest.approx(float(r.per_task_accuracy[1]))
    assert not torch.equal(fast.head.weight, model.head.weight)


def test_bad_arguments():
    model, _, _, lr = mlp_case()
    with pytest.raises(ValueError, match="strategy"):
        fastmeta.MetaLearner(model, fastmeta.MAML(lr), strategy="fast")
    with pytest.raises(ValueError, match="inner_lr"):
        fastmeta.MAML(-1.0)
    with pytest.raises(ValueError, match="inner_steps"):
        fastmeta.MAML(0.1, inner_steps=0)
    with pytest.raises(ValueError, match="adapt"):
        fastmeta.MetaLearner(model, fastmeta.MAML(lr), adapt=["nope"])
    with pytest.raises(ValueError, match="loss_fn"):
        fastmeta.MetaLearner(model, fastmeta.MAML(lr), loss_fn="hinge")
