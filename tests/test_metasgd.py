"""Meta-SGD (Li et al. 2017, eq. 1 / Alg. 1): theta'_m = theta - alpha o grad L(theta; D_m) with
per-entry rates alpha [D] meta-learned with theta. The meta-gradient [P + D] (theta's, then
alpha's; mean over tasks) against the plain per-task loop (tests/reference_inner.py) in float64,
<= 1e-9 relative, under the loop, vmap and bmm strategies; then through MetaLearner."""
import io

import pytest
import torch

import fastmeta
from fastmeta.algorithms.metasgd import MetaSGD
from fastmeta.algorithms.registry import build_algorithm
from fastmeta.evaluation import Evaluator
from fastmeta.params import ParamLayout

from reference import conv_case, flat, maml_meta_grad, mlp_case, rel_err
from reference_inner import adam_rule, adapted_order, meta_grad, split_named

CASES = [(mlp_case, s) for s in ("loop", "vmap", "bmm")] + [(conv_case, s) for s in ("loop", "vmap")]


def bound(algo, model, adapt="all", seed=0):
    """``algo`` bound to ``model``'s layout, with non-uniform rates (alpha_i in [0.5, 1.5] x inner_lr)."""
    layout = ParamLayout(model, adapt)
    algo.bind(layout, model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        algo.alpha.mul_(0.5 + torch.rand(layout.D, generator=gen, dtype=layout.dtype))
    return layout


def oracle(algo, model, batch, loss_fn, adapt, steps, first_order, rule=None):
    names = adapted_order(model, adapt)
    alpha = algo.alpha.detach().clone().requires_grad_()
    g, (ga,) = meta_grad(model, batch, loss_fn, names, steps,
                         lambda k, n: split_named(alpha, model, names)[n], first_order, rule, leaves=[alpha])
    return g, ga


@pytest.mark.parametrize("case,strategy", CASES, ids=[f"{c.__name__[:-5]}-{s}" for c, s in CASES])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("adapt", ["all", "head"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_meta_grad_matches_plain_loop(case, strategy, steps, adapt, first_order):
    model, batch, loss_fn, lr = case()
    algo = MetaSGD(lr, steps, first_order=first_order)
    layout = bound(algo, model, adapt)
    res = algo.meta_grad(Evaluator(model, layout, loss_fn, strategy), layout, layout.flatten(model), batch)
    g, ga = oracle(algo, model, batch, loss_fn, adapt, steps, first_order)
    assert res.grad.shape == (layout.P + layout.D,)
    assert rel_err(res.grad[:layout.P], flat(g, layout)) < 1e-9
    assert rel_err(res.grad[layout.P:], ga) < 1e-9


@pytest.mark.parametrize("strategy", ["loop", "vmap", "bmm"])
def test_with_adam_inner_optimizer(strategy):
    model, batch, loss_fn, lr = mlp_case()
    algo = MetaSGD(lr, 2, inner_optimizer="adam")
    layout = bound(algo, model)
    res = algo.meta_grad(Evaluator(model, layout, loss_fn, strategy), layout, layout.flatten(model), batch)
    g, ga = oracle(algo, model, batch, loss_fn, "all", 2, False, adam_rule())
    assert rel_err(res.grad, torch.cat([flat(g, layout), ga])) < 1e-9


def test_learned_rates_change_the_result():
    # Guards: with alpha = inner_lr everywhere Meta-SGD's theta-gradient is MAML's; with per-entry
    # rates it differs, and the alpha-gradient is not zero. First order differs from second.
    model, batch, loss_fn, lr = mlp_case()
    layout = ParamLayout(model)
    ev = Evaluator(model, layout, loss_fn, "vmap")
    theta = layout.flatten(model)
    uniform = MetaSGD(lr, 2)
    uniform.bind(layout, model)
    maml = flat(maml_meta_grad(model, batch, loss_fn, lr, 2, layout.adapted), layout)
    assert rel_err(uniform.meta_grad(ev, layout, theta, batch).grad[:layout.P], maml) < 1e-9
    algo = MetaSGD(lr, 2)
    bound(algo, model)
    res = algo.meta_grad(ev, layout, theta, batch).grad
    assert rel_err(res[:layout.P], maml) > 1e-3
    assert float(res[layout.P:].abs().max()) > 1e-3
    fo = MetaSGD(lr, 2, first_order=True)
    bound(fo, model)
    assert rel_err(fo.meta_grad(ev, layout, theta, batch).grad, res) > 1e-3


def test_first_order_rate_gradient_closed_form():
    # One step, first order: dL(theta')/d alpha = -grad L(theta; D_m) o grad L(theta'; D'_m) (mean over tasks).
    model, batch, loss_fn, lr = mlp_case()
    algo = MetaSGD(lr, 1, first_order=True)
    layout = bound(algo, model)
    ev = Evaluator(model, layout, loss_fn, "loop")
    theta = layout.flatten(model)
    got = algo.meta_grad(ev, layout, theta, batch).grad[layout.P:]
    _, g_in = ev.grads(theta, None, batch.support_x, batch.support_y)
    w = theta - algo.alpha.detach() * g_in
    _, g_out = ev.grads(w, None, batch.query_x, batch.query_y)
    assert rel_err(got, -(g_in * g_out).mean(0)) < 1e-12


def test_learner_trains_rates_and_checkpoints_them():
    model, batch, loss_fn, lr = mlp_case()
    algo = MetaSGD(lr, 2)
    learner = fastmeta.MetaLearner(model, algo, loss_fn="mse", strategy="vmap")
    assert algo.meta_parameters() == [algo.alpha] and algo.alpha.shape == (learner.layout.D,)
    assert torch.all(algo.alpha == lr)
    params = list(learner.parameters())
    assert params[-1] is algo.alpha and len(params) == len(list(model.parameters())) + 1
    opt = torch.optim.Adam(learner.parameters(), 1e-2)
    opt.zero_grad()
    learner.step(batch)
    g, ga = oracle(algo, model, batch, loss_fn, "all", 2, False)
    assert rel_err(algo.alpha.grad, ga) < 1e-9
    assert rel_err(model.head.weight.grad, g["head.weight"]) < 1e-9
    before = algo.alpha.detach().clone()
    opt.step()
    assert not torch.equal(algo.alpha.detach(), before)
    # evaluate / adapt use the learned rates
    fast = learner.adapt(batch.support_x[0], batch.support_y[0])
    theta = learner.layout.flatten(model)
    ev = Evaluator(model, learner.layout, loss_fn, "loop")
    _, g_in = ev.grads(theta, None, batch.support_x[:1], batch.support_y[:1])
    w = theta - algo.alpha.detach() * g_in[0]
    _, g2 = ev.grads(w, None, batch.support_x[:1], batch.support_y[:1])
    assert rel_err(learner.layout.flatten(fast), w - algo.alpha.detach() * g2[0]) < 1e-12
    # state_dict round trip through torch.save / torch.load(weights_only=True), in place
    buf = io.BytesIO()
    torch.save(algo.state_dict(), buf)
    saved = algo.alpha.detach().clone()
    with torch.no_grad():
        algo.alpha.fill_(0.0)
    alpha_obj = algo.alpha
    buf.seek(0)
    algo.load_state_dict(torch.load(buf, weights_only=True))
    assert algo.alpha is alpha_obj and torch.equal(algo.alpha.detach(), saved)
    # a fresh algorithm loaded before MetaLearner keeps the loaded rates through bind()
    fresh = MetaSGD(lr, 2)
    fresh.load_state_dict(algo.state_dict())
    fastmeta.MetaLearner(model, fresh, loss_fn="mse", strategy="vmap")
    assert torch.equal(fresh.alpha.detach(), saved)


def test_registry_and_bad_inputs():
    a = build_algorithm(dict(algo="metasgd", inner_lr=0.1, inner_steps=2, first_order=True, inner_optimizer="adam"))
    assert isinstance(a, MetaSGD) and a.first_order and a.inner_steps == 2 and a.inner_optimizer is not None
    with pytest.raises(ValueError, match="inner_lr"):
        MetaSGD(0.0)
    model, batch, loss_fn, lr = mlp_case()
    algo = MetaSGD(lr)
    layout = ParamLayout(model)
    algo.bind(layout, model)
    with pytest.raises(ValueError, match="state_dict"):
        algo.load_state_dict({"alpha": torch.ones(3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="state_dict"):
        algo.load_state_dict({"rates": torch.ones(layout.D, dtype=torch.float64)})
    with pytest.raises(ValueError, match="state_dict"):
        algo.load_state_dict({"alpha": [0.1] * layout.D})
    head = ParamLayout(model, "head")
    with pytest.raises(ValueError, match="layout"):
        algo.meta_grad(Evaluator(model, head, loss_fn, "vmap"), head, head.flatten(model), batch)
    with pytest.raises(ValueError, match="state_dict"):
        fastmeta.MAML(lr).load_state_dict({"alpha": torch.ones(2)})
