"""Differentiable inner optimizers (fastmeta.InnerSGD / InnerAdam) and the generalised inner-loop rates,
against plain per-task loops (tests/reference_inner.py) in float64, <= 1e-9 relative, under the loop,
vmap and bmm strategies.

The inner optimizers implement torch.optim.SGD's and torch.optim.Adam's documented algorithms
(momentum buffer b_0 = g_0, b_k = mu b + (1 - tau) g, nesterov d = g + mu b; Adam's bias-corrected
m_hat / (sqrt(v_hat) + eps)); the meta-gradient is MAML's (Fallah eq. 5) through those updates.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta
from fastmeta.evaluation import Evaluator, inner_loop
from fastmeta.evaluation.inner_optim import InnerAdam, InnerSGD, make_inner_optimizer
from fastmeta.params import ParamLayout
from fastmeta.tasks import TaskBatch

from reference import conv_case, flat, mlp_case, rel_err, run
from reference_inner import adam_rule, adapted_order, meta_grad, sgd_rule, split_named

OPTIMIZERS = {
    "momentum": (dict(name="sgd", momentum=0.9, dampening=0.1, weight_decay=0.01),
                 sgd_rule(momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "nesterov": (dict(name="sgd", momentum=0.8, nesterov=True), sgd_rule(momentum=0.8, nesterov=True)),
    "adam": (dict(name="adam", betas=(0.8, 0.95), eps=1e-6, weight_decay=0.02),
             adam_rule(betas=(0.8, 0.95), eps=1e-6, weight_decay=0.02)),
}
# (case, strategy): bmm applies to Linear/activation models only (see tests/test_bmm.py).
CASES = [(mlp_case, s) for s in ("loop", "vmap", "bmm")] + [(conv_case, s) for s in ("loop", "vmap")]


def _lr_scale(case, opt):
    # Adam's steps have size ~lr per entry whatever the gradient: keep the conv case's adapted
    # weights in a region where its loss is smooth.
    return 0.1 if (case is conv_case and opt == "adam") else 1.0


@pytest.mark.parametrize("case,strategy", CASES, ids=[f"{c.__name__[:-5]}-{s}" for c, s in CASES])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_maml_with_inner_optimizer_matches_plain_loop(case, strategy, steps, opt, first_order):
    model, batch, loss_fn, lr = case()
    lr *= _lr_scale(case, opt)
    spec, rule = OPTIMIZERS[opt]
    algo = fastmeta.MAML(lr, steps, first_order=first_order, inner_optimizer=spec)
    res, layout = run(algo, model, batch, loss_fn, "all", strategy)
    names = adapted_order(model, "all")
    want, _ = meta_grad(model, batch, loss_fn, names, steps, lambda k, n: lr, first_order, rule)
    assert rel_err(res.grad, flat(want, layout)) < 1e-9


@pytest.mark.parametrize("strategy", ["loop", "vmap", "bmm"])
@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_anil_with_inner_optimizer(strategy, opt):
    model, batch, loss_fn, lr = mlp_case()
    spec, rule = OPTIMIZERS[opt]
    res, layout = run(fastmeta.MAML(lr, 2, inner_optimizer=spec), model, batch, loss_fn, "head", strategy)
    want, _ = meta_grad(model, batch, loss_fn, adapted_order(model, "head"), 2, lambda k, n: lr, False, rule)
    assert rel_err(res.grad, flat(want, layout)) < 1e-9


def test_optimizers_change_the_meta_gradient():
    # Guards the comparisons above: each rule gives a different meta-gradient from plain SGD and
    # from the others, and second order differs from first order through Adam's state.
    model, batch, loss_fn, lr = mlp_case()
    grads = {}
    for name, opt in [("plain", None), ("momentum", OPTIMIZERS["momentum"][0]), ("adam", OPTIMIZERS["adam"][0])]:
        grads[name] = run(fastmeta.MAML(lr, 3, inner_optimizer=opt), model, batch, loss_fn)[0].grad
    assert rel_err(grads["momentum"], grads["plain"]) > 1e-3
    assert rel_err(grads["adam"], grads["plain"]) > 1e-2
    fo = run(fastmeta.MAML(lr, 3, first_order=True, inner_optimizer="adam"), model, batch, loss_fn)[0].grad
    so = run(fastmeta.MAML(lr, 3, inner_optimizer="adam"), model, batch, loss_fn)[0].grad
    assert rel_err(fo, so) > 1e-3
    # Adam's bias correction matters: the same rule without it gives another meta-gradient.
    no_bc = adam_rule(betas=(0.8, 0.95), eps=1e-6, weight_decay=0.02, bias_correction=False)
    want, _ = meta_grad(model, batch, loss_fn, adapted_order(model, "all"), 3, lambda k, n: lr, False, no_bc)
    got, layout = run(fastmeta.MAML(lr, 3, inner_optimizer=OPTIMIZERS["adam"][0]), model, batch, loss_fn)
    assert rel_err(got.grad, flat(want, layout)) > 1e-3


@pytest.mark.parametrize("opt,torch_opt", [
    (InnerSGD(momentum=0.9, dampening=0.2, weight_decay=0.05), lambda p, lr: torch.optim.SGD(
        p, lr, momentum=0.9, dampening=0.2, weight_decay=0.05)),
    (InnerSGD(momentum=0.7, nesterov=True), lambda p, lr: torch.optim.SGD(p, lr, momentum=0.7, nesterov=True)),
    (InnerAdam(betas=(0.7, 0.9), eps=1e-5, weight_decay=0.03), lambda p, lr: torch.optim.Adam(
        p, lr, betas=(0.7, 0.9), eps=1e-5, weight_decay=0.03)),
], ids=["sgd-momentum", "sgd-nesterov", "adam"])
@pytest.mark.parametrize("strategy", ["loop", "vmap", "bmm"])
def test_adapted_weights_equal_torch_optim(opt, torch_opt, strategy):
    """Meta-test adaptation with an inner optimizer == torch.optim on a copy of the model, per task."""
    model, batch, loss_fn, lr = mlp_case()
    layout = ParamLayout(model)
    ev = Evaluator(model, layout, loss_fn, strategy)
    algo = fastmeta.MAML(lr, 4, inner_optimizer=opt)
    w = algo.adapt(ev, layout, layout.flatten(model), batch.support_x, batch.support_y)
    for t in range(batch.num_tasks):
        m = copy.deepcopy(model)
        o = torch_opt(m.parameters(), lr)
        for _ in range(4):
            o.zero_grad()
            loss_fn(m(batch.support_x[t]), batch.support_y[t]).backward()
            o.step()
        assert rel_err(w[t], layout.flatten(m)) < 1e-12


class DeadInput(nn.Module):
    """A Linear whose second input feature is always 0 in the data: those weights' gradients are
    exactly 0 at every inner step (Adam's v = 0 there)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(2, 6)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def _dead_case():
    torch.manual_seed(0)
    model = DeadInput().double()
    x = torch.randn(3, 10, 2, dtype=torch.float64)
    x[..., 1] = 0.0
    y = torch.sin(x[..., :1])
    return model, TaskBatch(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:]), F.mse_loss, 0.05


@pytest.mark.parametrize("strategy", ["loop", "vmap", "bmm"])
def test_adam_second_order_is_finite_at_zero_second_moment(strategy):
    model, batch, loss_fn, lr = _dead_case()
    res, layout = run(fastmeta.MAML(lr, 3, inner_optimizer="adam"), model, batch, loss_fn, "all", strategy)
    assert torch.isfinite(res.grad).all()
    names = adapted_order(model, "all")
    want, _ = meta_grad(model, batch, loss_fn, names, 3, lambda k, n: lr, False, adam_rule())
    assert rel_err(res.grad, flat(want, layout)) < 1e-9
    # The case does exercise the trap: with autograd's own sqrt the meta-gradient is NaN.
    naive, _ = meta_grad(model, batch, loss_fn, names, 3, lambda k, n: lr, False, adam_rule(sqrt=torch.sqrt))
    assert torch.isnan(naive["body.weight"]).any()


# ---------------------------------------------------------------------------------------- inner_loop rates
@pytest.mark.parametrize("strategy", ["loop", "vmap", "bmm"])
@pytest.mark.parametrize("form", ["vector", "per_row", "per_step", "scalar_tensor"])
def test_inner_loop_rate_forms(strategy, form):
    """``lr`` as a [D] tensor, a [T, D] tensor, a per-step list or a 0-d tensor: values and the
    gradient w.r.t. theta and the rates match the plain loop (query loss after 2 steps)."""
    model, batch, loss_fn, _ = mlp_case()
    layout = ParamLayout(model)
    ev = Evaluator(model, layout, loss_fn, strategy)
    names = adapted_order(model, "all")
    T, D = batch.num_tasks, layout.D
    gen = torch.Generator().manual_seed(1)
    base = 0.02 + 0.06 * torch.rand((2, T, D), generator=gen, dtype=torch.float64)
    if form == "vector":
        leaf = base[0, 0].clone().requires_grad_()
        lr, ref = leaf, (lambda t: lambda k, n: split_named(leaf, model, names)[n])
    elif form == "per_row":
        leaf = base[0].clone().requires_grad_()
        lr, ref = leaf, (lambda t: lambda k, n: split_named(leaf[t], model, names)[n])
    elif form == "per_step":
        leaf = base[:, 0].clone().requires_grad_()
        lr, ref = [leaf[0], leaf[1]], (lambda t: lambda k, n: split_named(leaf[k], model, names)[n])
    else:
        leaf = torch.tensor(0.04, dtype=torch.float64, requires_grad=True)
        lr, ref = leaf, (lambda t: lambda k, n: leaf)
    theta = layout.flatten(model).requires_grad_()
    for structured in (False, True):
        w, _ = inner_loop(ev, theta, theta[D:], batch.support_x, batch.support_y, lr, 2, True, structured=structured)
        q = ev.losses(w, theta[D:], batch.query_x, batch.query_y)
        got = torch.autograd.grad(q.mean(), [theta, leaf])
        want_theta, want_leaf = 0, 0
        for t in range(T):
            one = batch.select(slice(t, t + 1))
            g, (gl,) = meta_grad(model, one, loss_fn, names, 2, ref(t), leaves=[leaf])
            want_theta = want_theta + flat(g, layout) / T
            want_leaf = want_leaf + gl / T
        assert rel_err(got[0], want_theta) < 1e-9
        assert rel_err(got[1], want_leaf) < 1e-9


def test_inner_loop_bad_rates_and_optimizer():
    model, batch, loss_fn, lr = mlp_case()
    layout = ParamLayout(model)
    ev = Evaluator(model, layout, loss_fn, "vmap")
    theta = layout.flatten(model)
    args = (ev, theta, theta[layout.D:], batch.support_x, batch.support_y)
    with pytest.raises(ValueError, match="lr: a rate tensor"):
        inner_loop(*args, torch.ones(layout.D + 1, dtype=torch.float64), 1, False)
    with pytest.raises(ValueError, match="lr: a per-step list"):
        inner_loop(*args, [0.1, 0.1], 3, False)
    with pytest.raises(ValueError, match=r"lr\[1\]: a rate tensor"):
        inner_loop(*args, [0.1, torch.ones(2, layout.D, dtype=torch.float64)], 2, False)
    with pytest.raises(ValueError, match="lr: rate tensor is torch.float32"):
        inner_loop(*args, torch.ones(layout.D), 1, False)
    with pytest.raises(ValueError, match="lr: expected a float"):
        inner_loop(*args, "0.1", 1, False)
    with pytest.raises(TypeError, match="optimizer"):
        inner_loop(*args, 0.1, 1, False, optimizer=torch.optim.SGD)


def test_inner_optimizer_arguments():
    assert make_inner_optimizer(None) is None
    assert make_inner_optimizer("adam") == InnerAdam()
    assert make_inner_optimizer({"name": "sgd", "momentum": 0.5}) == InnerSGD(momentum=0.5)
    adam = InnerAdam(betas=(0.5, 0.6), eps=1e-4)
    assert make_inner_optimizer(adam.config()) == adam
    with pytest.raises(ValueError, match="inner_optimizer: unsupported inner optimizer 'rmsprop'"):
        fastmeta.MAML(0.1, inner_optimizer="rmsprop")
    with pytest.raises(TypeError, match="inner_optimizer"):
        fastmeta.MAML(0.1, inner_optimizer=torch.optim.Adam)
    with pytest.raises(TypeError, match="inner_optimizer"):
        make_inner_optimizer({"name": "sgd", "betas": (0.9, 0.9)})
    with pytest.raises(ValueError, match="nesterov"):
        InnerSGD(nesterov=True)
    with pytest.raises(ValueError, match="momentum"):
        InnerSGD(momentum=-0.1)
    with pytest.raises(ValueError, match="betas"):
        InnerAdam(betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="betas"):
        InnerAdam(betas=0.9)
    with pytest.raises(ValueError, match="eps"):
        InnerAdam(eps=0.0)
    with pytest.raises(ValueError, match="inner_optimizer: recompute"):
        fastmeta.MAML(0.1, recompute=True, inner_optimizer="adam")


def test_learner_adapt_and_evaluate_use_the_inner_optimizer():
    model, batch, loss_fn, lr = mlp_case()
    plain = fastmeta.MetaLearner(model, fastmeta.MAML(lr, 2), loss_fn="mse", strategy="vmap")
    adam = fastmeta.MetaLearner(model, fastmeta.MAML(lr, 2, inner_optimizer="adam"), loss_fn="mse", strategy="vmap")
    assert abs(plain.evaluate(batch).loss - adam.evaluate(batch).loss) > 1e-6
    fast = adam.adapt(batch.support_x[0], batch.support_y[0])
    m = copy.deepcopy(model)
    o = torch.optim.Adam(m.parameters(), lr)
    for _ in range(2):
        o.zero_grad()
        F.mse_loss(m(batch.support_x[0]), batch.support_y[0]).backward()
        o.step()
    assert rel_err(ParamLayout(fast).flatten(fast), ParamLayout(m).flatten(m)) < 1e-12
