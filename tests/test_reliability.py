"""Silent wrong results and unclear failures of the learner, caught up front (issue: no silent wrong
results). Each test pins one defect: on the code before the fix it returned a number or failed late
with another error."""
import copy

import pytest
import torch
from torch import nn

import fastmeta
from fastmeta.data import SinusoidTasks
from fastmeta.tasks import TaskBatch


def _sine_batch(T=3, n=5, seed=0):
    return SinusoidTasks(n, n, seed=seed).sample(T)


def _class_batch(T=2, ways=3, n=2, x_dtype=torch.float32, labels=None, **kw):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(ways).repeat(T, n) if labels is None else labels
    x = torch.randn(T, ways * n, 4, generator=g).to(x_dtype)
    return TaskBatch(x, y, x.clone(), y.clone(), **kw)


class _NaNOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x) * float("nan")


def test_evaluate_raises_on_non_finite_outputs():
    learner = fastmeta.MetaLearner(_NaNOut(), fastmeta.MAML(inner_lr=0.1), strategy="loop")
    with pytest.raises(FloatingPointError, match="loss: non-finite"):
        learner.evaluate(_class_batch())


@pytest.mark.parametrize("strategy", ["loop", "vmap", "bmm"])
def test_mse_target_that_would_broadcast_is_refused(strategy):
    # Output [T, N, 1] against a target [T, N]: the loss broadcast to [N, N] per task (under
    # vmap/bmm across tasks) and trained on it.
    b = _sine_batch()
    bad = TaskBatch(b.support_x, b.support_y, b.query_x, b.query_y[..., 0])
    learner = fastmeta.MetaLearner(fastmeta.SineMLP(), fastmeta.MAML(inner_lr=0.01), loss_fn="mse", strategy=strategy)
    with pytest.raises(ValueError, match=r"^query_y: targets of shape \(5,\) per task do not fit"):
        learner.step(bad)
    bad_support = TaskBatch(b.support_x, b.support_y[..., 0], b.query_x, b.query_y)
    with pytest.raises(ValueError, match="^support_y:"):
        learner.meta_gradient(bad_support)
    learner.step(b)  # the right shapes still train


def test_negative_labels_refused_without_ways():
    # -100 is cross-entropy's ignore index: those samples silently dropped out of the loss.
    y = torch.arange(3).repeat(2, 2)
    y[0, 0] = -100
    with pytest.raises(ValueError, match=r"^support_y: labels must lie in \[0, number of classes\)"):
        _class_batch(labels=y)


def test_labels_beyond_the_models_classes_refused_without_ways():
    model = nn.Linear(4, 3)
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(inner_lr=0.1), strategy="loop")
    y = torch.arange(3).repeat(2, 2)
    y[1, 2] = 5
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) for the model's 3 outputs"):
        learner.step(_class_batch(labels=y))


def test_integer_inputs_refused_up_front_naming_the_field():
    learner = fastmeta.MetaLearner(fastmeta.Conv4(3, hidden=4), fastmeta.MAML(inner_lr=0.1), strategy="loop")
    x = torch.randint(0, 255, (2, 3, 1, 28, 28))
    y = torch.arange(3).repeat(2, 1)
    with pytest.raises(ValueError, match=r"^support_x: the model cannot evaluate inputs of shape \(3, 1, 28, 28\)"):
        learner.step(TaskBatch(x, y, x.clone(), y.clone(), ways=3))


@pytest.mark.parametrize("steps", [0, -3, 1.5])
def test_evaluate_steps_must_be_a_positive_int(steps):
    # -3 ran no inner step (the pre-adaptation loss reported as the meta-test result); 0 silently
    # became the training value.
    learner = fastmeta.MetaLearner(fastmeta.SineMLP(), fastmeta.MAML(inner_lr=0.01), loss_fn="mse")
    with pytest.raises(ValueError, match="^steps: expected an int >= 1"):
        learner.evaluate(_sine_batch(), steps=steps)


class _BnDropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        # BatchNorm1d over the samples of one task: [N, 8]
        return self.head(self.body(x))


def test_auto_strategy_leaves_no_trace():
    # The timing passes of strategy="auto" updated BatchNorm running statistics (many times over)
    # and consumed the RNG (Dropout); after the fix one auto step leaves the model and the RNG
    # exactly as one step of the chosen strategy does.
    batch = _sine_batch(T=4)
    base = _BnDropNet()
    auto_model, fixed_model = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(1)
    auto = fastmeta.MetaLearner(auto_model, fastmeta.MAML(inner_lr=0.01), loss_fn="mse", strategy="auto")
    auto.step(batch)
    after_auto = torch.rand(3)
    torch.manual_seed(1)
    fixed = fastmeta.MetaLearner(fixed_model, fastmeta.MAML(inner_lr=0.01), loss_fn="mse",
                                 strategy=auto.chosen_strategy)
    fixed.step(batch)
    after_fixed = torch.rand(3)
    assert torch.equal(after_auto, after_fixed)
    for (name, a), (_, b) in zip(auto_model.named_buffers(), fixed_model.named_buffers()):
        assert torch.equal(a, b), name


def test_vmap_moves_no_batchnorm_counter():
    # Under vmap the composite batch norm updates no running statistics; the counter moved anyway.
    model = _BnDropNet().eval().train()
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(inner_lr=0.01), loss_fn="mse", strategy="vmap")
    bn = model.body[1]
    mean, count = bn.running_mean.clone(), int(bn.num_batches_tracked)
    learner.step(_sine_batch())
    assert torch.equal(bn.running_mean, mean) and int(bn.num_batches_tracked) == count


def test_hfmaml_divergence_is_a_floating_point_error():
    # Query gradients whose norm overflows float32: the delta rule gave delta = 0 and the op
    # raised "delta must be > 0", which reads like a bug in the caller's arguments.
    b = _sine_batch(T=2)
    b.query_y.mul_(1e19)
    learner = fastmeta.MetaLearner(fastmeta.SineMLP(), fastmeta.HFMAML(inner_lr=0.01), loss_fn="mse", strategy="vmap")
    with pytest.raises(FloatingPointError):
        learner.step(b)
    v = torch.full((2, 10), 1e20)
    assert fastmeta.HFMAML(inner_lr=0.01).deltas(v).tolist() == [1.0, 1.0]
