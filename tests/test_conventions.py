"""MetaLearner meets PyTorch conventions: ``step`` accumulates into ``.grad`` like ``backward()``,
any loss callable or loss module works, ragged tasks are exact, device and dtype follow the model,
and ``torch.compile`` on a step is refused with a reason.

Oracle: the plain per-task MAML loop (Sharp-MAML eq. 9 inner step, Fallah et al. eq. 5 outer
gradient) of tests/reference.py, which calls the loss exactly as the user wrote it."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta
from fastmeta.tasks import RaggedTaskBatch, TaskBatch
from reference import conv_case, flat, maml_meta_grad, mlp_case, rel_err


def _plain_maml(model, tasks, loss_fn, lr, steps=1):
    """Mean over a list of tasks ``(xs, ys, xq, yq)`` (any sizes) of the reference MAML meta-gradient,
    one single-task batch each."""
    names = [n for n, _ in model.named_parameters()]
    per_task = [maml_meta_grad(model, TaskBatch(*(t[None] for t in task)), loss_fn, lr, steps, names)
                for task in tasks]
    return {n: sum(g[n] for g in per_task) / len(tasks) for n in names}


# ---------------------------------------------------------------- step accumulates like backward()
def test_step_adds_to_existing_grad_like_backward():
    model, batch, _, lr = mlp_case()
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(lr), loss_fn="mse", strategy="vmap")
    want = learner.meta_gradient(batch).grad
    reg = 1e-2 * sum((p ** 2).sum() for p in model.parameters())  # an L2 regulariser
    reg.backward()
    reg_grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()
    assert reg_grad.abs().max() > 1e-3  # the regulariser's gradient is not negligible
    learner.step(batch)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert rel_err(got, want + reg_grad) < 1e-12
    # and a second step without zero_grad adds again, as two backward() calls would
    learner.step(batch)
    got2 = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert rel_err(got2, 2 * want + reg_grad) < 1e-12


# ---------------------------------------------------------------- any loss
def _weighted_ce(out, y):
    w = torch.tensor([1.0, 2.0, 0.5], dtype=out.dtype)
    return F.cross_entropy(out, y, weight=w)  # a weighted mean: not the mean of per-sample losses


LOSSES = {
    "lambda_mse": (lambda out, y: ((out - y) ** 2).mean(), "mlp"),
    "MSELoss": (nn.MSELoss(), "mlp"),
    "HuberLoss": (nn.HuberLoss(delta=0.3), "mlp"),
    "L1Loss_sum": (nn.L1Loss(reduction="sum"), "mlp"),
    "CE_label_smoothing": (nn.CrossEntropyLoss(label_smoothing=0.2), "conv"),
    "CE_class_weights": (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)), "conv"),
    "callable_weighted_ce": (_weighted_ce, "conv"),
}


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_callables_and_modules_match_plain_loop(name, strategy):
    loss_fn, kind = LOSSES[name]
    model, batch, _, lr = mlp_case() if kind == "mlp" else conv_case()
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(lr), loss_fn=loss_fn, strategy=strategy)
    got = learner.meta_gradient(batch).grad
    want = flat(maml_meta_grad(model, batch, loss_fn, lr, 1, learner.layout.adapted), learner.layout)
    assert rel_err(got, want) < 1e-9
    # guard: the loss really matters (another loss gives a different meta-gradient)
    base = F.l1_loss if kind == "mlp" else F.cross_entropy
    other = flat(maml_meta_grad(model, batch, base, lr, 1, learner.layout.adapted), learner.layout)
    assert rel_err(other, want) > 1e-4


def test_loss_module_classification_reports_accuracy():
    model, batch, _, lr = conv_case()
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(lr), loss_fn=nn.CrossEntropyLoss(), strategy="loop")
    assert learner.classification
    assert learner.step(batch).accuracy is not None


def test_loss_returning_non_scalar_is_refused():
    model, batch, _, lr = mlp_case()
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(lr), loss_fn=lambda out, y: (out - y) ** 2)
    with pytest.raises(ValueError, match="loss_fn: must return a scalar"):
        learner.meta_gradient(batch)


def test_per_sample_algorithm_asks_for_reduction_none():
    model, batch, _, lr = mlp_case()
    learner = fastmeta.MetaLearner(model, fastmeta.SharpMAML(lr, alpha_low=0.05, sds_ratio=0.5),
                                   loss_fn=lambda out, y: ((out - y) ** 2).mean(), strategy="vmap")
    with pytest.raises(ValueError, match="loss_fn: .*per-sample.*reduction='none'"):
        learner.meta_gradient(batch)


# ---------------------------------------------------------------- ragged tasks
def _ragged_tasks(dtype=torch.float64):
    torch.manual_seed(1)
    tasks = []
    for ns, nq in [(3, 5), (6, 4), (3, 5), (10, 2)]:  # two tasks share a shape, two are unique
        x = torch.rand(ns + nq, 1, dtype=dtype) * 10 - 5
        y = 1.5 * torch.sin(x + 0.2 * ns)
        tasks.append((x[:ns], y[:ns], x[ns:], y[ns:]))
    return tasks


@pytest.mark.parametrize("strategy", ["loop", "vmap", "bmm"])
def test_ragged_tasks_are_exact(strategy):
    model = fastmeta.SineMLP(hidden=12).double()
    tasks = _ragged_tasks()
    batch = TaskBatch.from_tasks(tasks)
    assert isinstance(batch, RaggedTaskBatch) and batch.num_tasks == 4 and len(batch.groups) == 3
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(0.05), loss_fn="mse", strategy=strategy)
    res = learner.meta_gradient(batch)
    want = flat(_plain_maml(model, tasks, F.mse_loss, 0.05), learner.layout)
    assert rel_err(res.grad, want) < 1e-9
    # per-task losses come back in the caller's task order
    for t, (xs, ys, xq, yq) in enumerate(tasks):
        single = learner.meta_gradient(TaskBatch.from_tasks([(xs, ys, xq, yq)]))
        assert torch.allclose(res.query_loss[t], single.query_loss[0], rtol=1e-12)
    # guard: padding-free grouping matters (dropping the unique-shape tasks changes the mean)
    partial = flat(_plain_maml(model, tasks[:3], F.mse_loss, 0.05), learner.layout)
    assert rel_err(partial, want) > 1e-3
    ev = learner.evaluate(batch)
    assert ev.num_tasks == 4 and torch.allclose(ev.per_task_loss[3], learner.evaluate(
        TaskBatch.from_tasks([tasks[3]])).per_task_loss[0])


def test_ragged_classification_step_reports_accuracy():
    model, batch, _, lr = conv_case()
    tasks = [(batch.support_x[t, : 3 - (t % 2)], batch.support_y[t, : 3 - (t % 2)], batch.query_x[t],
              batch.query_y[t]) for t in range(3)]
    ragged = TaskBatch.from_tasks(tasks, ways=3)
    assert isinstance(ragged, RaggedTaskBatch)
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(lr), strategy="loop")
    res = learner.step(ragged)
    assert res.accuracy is not None and 0.0 <= res.accuracy <= 1.0
    want = flat(_plain_maml(model, tasks, F.cross_entropy, lr), learner.layout)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert rel_err(got, want) < 1e-9


def test_from_tasks_equal_sizes_is_one_taskbatch():
    tasks = [t for t in _ragged_tasks() if t[0].shape[0] == 3]
    b = TaskBatch.from_tasks(tasks)
    assert isinstance(b, TaskBatch) and b.num_tasks == 2
    assert torch.equal(b.query_x[1], tasks[1][2])


@pytest.mark.parametrize("bad, match", [
    ([], "tasks: expected at least one task"),
    ([(torch.zeros(2, 1),) * 3], r"tasks\[0\]: expected a tuple"),
    ([(torch.zeros(2, 1),) * 4, (torch.zeros(2, 1),) * 6], r"tasks\[1\]: has 6 tensors"),
    ([(torch.zeros(2, 1), "y", torch.zeros(2, 1), torch.zeros(2, 1))], r"tasks\[0\]: support_y must be a tensor"),
])
def test_from_tasks_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        TaskBatch.from_tasks(bad)


# ---------------------------------------------------------------- device and dtype follow the model
def test_dtype_follows_model_after_double():
    model = fastmeta.SineMLP(hidden=12)  # float32 when the learner is built
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(0.05), loss_fn="mse", strategy="vmap")
    model.double()
    _, batch, _, _ = mlp_case()
    got = learner.meta_gradient(batch).grad
    assert got.dtype == torch.float64
    want = flat(maml_meta_grad(model, batch, F.mse_loss, 0.05, 1, learner.layout.adapted), learner.layout)
    assert rel_err(got, want) < 1e-9
    learner.to(torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="batch: inputs are torch.float64 but the model is torch.float32"):
        learner.meta_gradient(batch)  # data and model disagree: the only error


# ---------------------------------------------------------------- torch.compile
def test_torch_compile_on_step_is_refused_with_reason():
    model, batch, _, lr = mlp_case()
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(lr), loss_fn="mse", strategy="vmap")
    with pytest.raises(RuntimeError, match="MetaLearner.step: torch.compile cannot .* double backward"):
        torch.compile(learner.step)(batch)
    with pytest.raises(RuntimeError, match="MetaLearner.meta_gradient: torch.compile"):
        torch.compile(lambda b: learner.meta_gradient(b).grad)(batch)
    learner.step(batch)  # eager use afterwards is unaffected


# ---------------------------------------------------------------- schedules count meta-steps, not timing passes
@pytest.mark.parametrize("ragged", [False, True])
def test_auto_timing_and_ragged_groups_do_not_advance_maml_plus_plus_schedule(ragged):
    model = fastmeta.SineMLP(hidden=12).double()
    algo = fastmeta.MAMLPlusPlus(0.05, inner_steps=2, steps_per_epoch=1)
    learner = fastmeta.MetaLearner(model, algo, loss_fn="mse", strategy="auto")
    tasks = _ragged_tasks()
    batch = TaskBatch.from_tasks(tasks) if ragged else TaskBatch.from_tasks([t for t in tasks if t[0].shape[0] == 3])
    learner.step(batch)
    assert algo.meta_step == 1
    learner.step(batch)
    assert algo.meta_step == 2
