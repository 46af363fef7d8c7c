"""MAML++ (Antoniou, Edwards, Storkey, ICLR 2019, sec. 4): LSLR per-layer per-step learned inner rates
[K, L], the annealed multi-step loss (MSL) and derivative-order annealing. The meta-gradient
[P + K*L] against the plain per-task loop (tests/reference_inner.py) in float64, <= 1e-9 relative,
under the loop, vmap and bmm strategies; the MSL weights against values computed by hand from the
paper's rule; then through MetaLearner."""
import io

import pytest
import torch

import fastmeta
from fastmeta.algorithms.mamlpp import MAMLPlusPlus, msl_weights
from fastmeta.algorithms.registry import build_algorithm
from fastmeta.evaluation import Evaluator
from fastmeta.params import ParamLayout

from reference import conv_case, flat, maml_meta_grad, mlp_case, rel_err
from reference_inner import adapted_order, meta_grad, sgd_rule

CASES = [(mlp_case, s) for s in ("loop", "vmap", "bmm")] + [(conv_case, s) for s in ("loop", "vmap")]


def bound(algo, model, adapt="all", seed=0):
    """``algo`` bound to ``model``'s layout with non-uniform LSLR rates ([0.5, 1.5] x inner_lr)."""
    layout = ParamLayout(model, adapt)
    algo.bind(layout, model)
    if algo.rates is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            algo.rates.mul_(0.5 + torch.rand(algo.rates.shape, generator=gen, dtype=layout.dtype))
    return layout


def oracle(algo, model, batch, loss_fn, adapt, weights, first_order, rule=None):
    """Per task: theta^l_{k+1} = theta^l_k - alpha[k, l] grad_l L(theta_k; D_m); objective
    sum_k weights[k] L(theta_{k+1}; D'_m) (weights None: the final loss)."""
    names = adapted_order(model, adapt)
    if algo.rates is None:
        return meta_grad(model, batch, loss_fn, names, algo.inner_steps, lambda k, n: algo.inner_lr,
                         first_order, rule, weights)[0], None
    rates = algo.rates.detach().clone().requires_grad_()
    g, (gr,) = meta_grad(model, batch, loss_fn, names, algo.inner_steps,
                         lambda k, n: rates[k, names.index(n)], first_order, rule, weights, leaves=[rates])
    return g, gr


@pytest.mark.parametrize("case,strategy", CASES, ids=[f"{c.__name__[:-5]}-{s}" for c, s in CASES])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_meta_grad_matches_plain_loop(case, strategy, steps, first_order):
    model, batch, loss_fn, lr = case()
    # msl_epochs=4, one meta-step per epoch, at epoch 1: weights mid-anneal (not uniform, not final-only).
    algo = MAMLPlusPlus(lr, steps, first_order=first_order, msl_epochs=4, steps_per_epoch=1)
    algo.meta_step = 1
    layout = bound(algo, model)
    weights = msl_weights(steps, 1, 4)
    res = algo.meta_grad(Evaluator(model, layout, loss_fn, strategy), layout, layout.flatten(model), batch)
    g, gr = oracle(algo, model, batch, loss_fn, "all", weights, first_order)
    assert res.grad.shape == (layout.P + steps * len(layout.adapted),)
    assert rel_err(res.grad[:layout.P], flat(g, layout)) < 1e-9
    assert rel_err(res.grad[layout.P:], gr.reshape(-1)) < 1e-9
    assert algo.meta_step == 2


@pytest.mark.parametrize("strategy", ["loop", "vmap", "bmm"])
def test_anil_no_lslr_momentum_after_msl(strategy):
    # lslr=False, past the MSL epochs (final loss only), ANIL, momentum inner optimizer.
    model, batch, loss_fn, lr = mlp_case()
    algo = MAMLPlusPlus(lr, 2, lslr=False, msl_epochs=1, steps_per_epoch=1, inner_optimizer=dict(name="sgd", momentum=0.9))
    algo.meta_step = 5
    layout = bound(algo, model, "head")
    assert algo.meta_parameters() == []
    res = algo.meta_grad(Evaluator(model, layout, loss_fn, strategy), layout, layout.flatten(model), batch)
    g, _ = oracle(algo, model, batch, loss_fn, "head", None, False, sgd_rule(momentum=0.9))
    assert res.grad.shape == (layout.P,)
    assert rel_err(res.grad, flat(g, layout)) < 1e-9


def test_msl_weights_follow_the_papers_rule():
    # K = 5, msl_epochs = 10: decay = 1/(5*10) = 0.02, floor 0.03/5 = 0.006, final cap 1 - 4*0.006 = 0.976.
    assert msl_weights(5, 0, 10) == pytest.approx([0.2] * 5, abs=1e-15)
    assert msl_weights(5, 3, 10) == pytest.approx([0.14] * 4 + [0.44], abs=1e-15)   # 0.2-3*0.02; 0.2+3*4*0.02
    assert msl_weights(5, 9, 10) == pytest.approx([0.02] * 4 + [0.92], abs=1e-15)
    assert msl_weights(5, 10, 10) == pytest.approx([0.006] * 4 + [0.976], abs=1e-15)  # at the floor
    # K = 3: decay 1/30, floor 0.01, cap 0.98: epoch 7 -> 1/3 - 7/30 = 0.1, 1/3 + 14/30 = 0.8.
    assert msl_weights(3, 7, 10) == pytest.approx([0.1] * 2 + [0.8], abs=1e-15)
    assert msl_weights(3, 12, 10) == pytest.approx([0.01] * 2 + [0.98], abs=1e-15)
    for e in range(12):
        assert sum(msl_weights(5, e, 10)) == pytest.approx(1.0, abs=1e-14)
    assert msl_weights(1, 3, 10) == [1.0]
    algo = MAMLPlusPlus(0.1, 5, msl_epochs=10, steps_per_epoch=500)
    algo.meta_step = 1999  # epoch 3 (their code anneals per epoch)
    assert algo.epoch == 3 and algo.step_weights() == msl_weights(5, 3, 10)
    algo.meta_step = 5000  # epoch 10 >= msl_epochs: the final loss alone
    assert algo.step_weights() == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert MAMLPlusPlus(0.1, 3, msl_epochs=0).step_weights() == [0.0, 0.0, 1.0]


def test_msl_changes_the_meta_gradient():
    # Guard: the MSL objective differs from the final-loss one (and matches it when MSL is over).
    model, batch, loss_fn, lr = mlp_case()
    res = {}
    for step in (0, 3):
        algo = MAMLPlusPlus(lr, 3, lslr=False, msl_epochs=3, steps_per_epoch=1)
        algo.meta_step = step
        layout = bound(algo, model)
        res[step] = algo.meta_grad(Evaluator(model, layout, loss_fn, "vmap"), layout, layout.flatten(model), batch).grad
    maml = flat(maml_meta_grad(model, batch, loss_fn, lr, 3, layout.adapted), layout)
    assert rel_err(res[3], maml) < 1e-9
    assert rel_err(res[0], maml) > 1e-3


@pytest.mark.parametrize("strategy", ["loop", "vmap", "bmm"])
def test_derivative_order_annealing_switches_at_n(strategy):
    model, batch, loss_fn, lr = mlp_case()
    algo = MAMLPlusPlus(lr, 2, msl_epochs=0, first_order_epochs=2, steps_per_epoch=1)
    layout = bound(algo, model)
    ev = Evaluator(model, layout, loss_fn, strategy)
    theta = layout.flatten(model)
    fo, fo_r = oracle(algo, model, batch, loss_fn, "all", None, True)
    so, so_r = oracle(algo, model, batch, loss_fn, "all", None, False)
    fo, so = torch.cat([flat(fo, layout), fo_r.reshape(-1)]), torch.cat([flat(so, layout), so_r.reshape(-1)])
    assert rel_err(fo, so) > 1e-3  # guard: the two orders differ on this case
    got = []
    for _ in range(4):
        got.append(algo.meta_grad(ev, layout, theta, batch).grad)
        algo.adapt(ev, layout, theta, batch.support_x, batch.support_y)  # meta-test time does not count
    assert algo.meta_step == 4
    assert [rel_err(g, fo) < 1e-9 for g in got] == [True, True, False, False]
    assert [rel_err(g, so) < 1e-9 for g in got] == [False, False, True, True]


def test_learner_trains_rates_and_checkpoints_them():
    model, batch, loss_fn, lr = mlp_case()
    algo = MAMLPlusPlus(lr, 3, msl_epochs=2, steps_per_epoch=1)
    learner = fastmeta.MetaLearner(model, algo, loss_fn="mse", strategy="bmm")
    assert algo.rates.shape == (3, len(learner.layout.adapted)) and torch.all(algo.rates == lr)
    assert list(learner.parameters())[-1] is algo.rates
    opt = torch.optim.Adam(learner.parameters(), 1e-2)
    opt.zero_grad()
    learner.step(batch)
    _, gr = oracle(algo, model, batch, loss_fn, "all", msl_weights(3, 0, 2), False)
    assert rel_err(algo.rates.grad, gr) < 1e-9
    before = algo.rates.detach().clone()
    opt.step()
    assert not torch.equal(algo.rates.detach(), before)
    # meta-test adaptation with more steps than trained reuses the last step's rates
    ev = Evaluator(model, learner.layout, loss_fn, "loop")
    theta = learner.layout.flatten(model)
    w5 = algo.adapt(ev, learner.layout, theta, batch.support_x, batch.support_y, steps=5)
    names = adapted_order(model, "all")
    r = algo.rates.detach()
    fast = {n: p.detach() for n, p in model.named_parameters()}
    from torch.func import functional_call
    for k in range(5):
        fast = {n: v.requires_grad_() for n, v in fast.items()}
        loss = loss_fn(functional_call(model, fast, (batch.support_x[0],)), batch.support_y[0])
        gs = torch.autograd.grad(loss, [fast[n] for n in names])
        fast = {n: (fast[n] - r[min(k, 2), names.index(n)] * g).detach() for n, g in zip(names, gs)}
    assert rel_err(w5[0], torch.cat([fast[n].reshape(-1) for n in names])) < 1e-12
    # state_dict round trip (torch.load weights_only=True): rates in place, the schedule counter
    sd = algo.state_dict()
    assert sd["meta_step"] == 1
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = MAMLPlusPlus(lr, 3, msl_epochs=2, steps_per_epoch=1)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    fastmeta.MetaLearner(model, fresh, loss_fn="mse", strategy="bmm")
    assert fresh.meta_step == 1 and torch.equal(fresh.rates.detach(), algo.rates.detach())


def test_registry_and_bad_inputs():
    a = build_algorithm(dict(algo="mamlpp", inner_lr=0.1, inner_steps=3, msl_epochs=4, first_order_epochs=2,
                             steps_per_epoch=10, no_lslr=True, inner_optimizer="adam", inner_betas=[0.5, 0.6]))
    assert isinstance(a, MAMLPlusPlus) and not a.lslr and (a.msl_epochs, a.first_order_epochs, a.steps_per_epoch) == (4, 2, 10)
    assert a.inner_optimizer.betas == (0.5, 0.6)
    d = build_algorithm(dict(algo="mamlpp", inner_lr=0.1, inner_steps=5))
    assert d.lslr and (d.msl_epochs, d.first_order_epochs, d.steps_per_epoch) == (15, 0, 500)
    with pytest.raises(ValueError, match="inner_momentum"):
        build_algorithm(dict(algo="maml", inner_lr=0.1, inner_steps=1, inner_momentum=0.9))
    with pytest.raises(ValueError, match="inner_optimizer: --algo sharp-low"):
        build_algorithm(dict(algo="sharp-low", inner_lr=0.1, inner_steps=1, inner_optimizer="adam"))
    with pytest.raises(ValueError, match="inner_eps"):
        build_algorithm(dict(algo="maml", inner_lr=0.1, inner_steps=1, inner_optimizer="sgd", inner_eps=1e-3))
    for kw, name in [(dict(msl_epochs=-1), "msl_epochs"), (dict(first_order_epochs=1.5), "first_order_epochs"),
                     (dict(steps_per_epoch=0), "steps_per_epoch"), (dict(inner_optimizer="lbfgs"), "inner_optimizer")]:
        with pytest.raises(ValueError, match=name):
            MAMLPlusPlus(0.1, 2, **kw)
    with pytest.raises(TypeError, match="lslr"):
        MAMLPlusPlus(0.1, 2, lslr=1)
    model, batch, loss_fn, lr = mlp_case()
    algo = MAMLPlusPlus(lr, 2)
    bound(algo, model)
    with pytest.raises(ValueError, match="state_dict"):
        algo.load_state_dict({"meta_step": 0})
    with pytest.raises(ValueError, match="state_dict"):
        algo.load_state_dict({"meta_step": 0, "rates": torch.ones(3, 6, dtype=torch.float64)})
    head = ParamLayout(model, "head")
    with pytest.raises(ValueError, match="layout"):
        algo.meta_grad(Evaluator(model, head, loss_fn, "vmap"), head, head.flatten(model), batch)
