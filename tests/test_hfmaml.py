"""HF-MAML (Fallah et al. 2020, eqs. 9-11, Alg. 3, Thm 4.17) against the plain per-task loop with
the same finite differences (tests/reference.py), float64; and against exact MAML as delta -> 0."""
import pytest
import torch

import fastmeta
from fastmeta.evaluation import Evaluator
from fastmeta.params import ParamLayout
from fastmeta.tasks import TaskBatch

from reference import (adapted_query_grads, conv_case, flat, hfmaml_meta_grad, maml_meta_grad, mlp_case, rel_err,
                       run)


@pytest.mark.parametrize("case", [mlp_case, conv_case], ids=["mlp", "conv4_bn"])
@pytest.mark.parametrize("steps,delta", [(1, None), (2, 1e-3)], ids=["1step-thm417", "2steps-fixed"])
@pytest.mark.parametrize("adapt", ["all", "head"])
@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_matches_per_task_finite_differences(case, steps, adapt, strategy, delta):
    # Fallah eqs. 10-11 (and the K-step chain), shared-parameter mixed term included for adapt="head".
    model, batch, loss_fn, lr = case()
    res, layout = run(fastmeta.HFMAML(lr, steps, delta=delta, rho=2.0), model, batch, loss_fn, adapt, strategy)
    want = flat(hfmaml_meta_grad(model, batch, loss_fn, lr, steps, layout.adapted, delta=delta, rho=2.0), layout)
    assert rel_err(res.grad, want) < 1e-9
    assert res.extras["delta"].shape == (3, steps)


def test_delta_rule_theorem_4_17():
    model, batch, loss_fn, lr = mlp_case()
    algo = fastmeta.HFMAML(lr, rho=3.0)
    res, layout = run(algo, model, batch, loss_fn)
    # Fallah Thm 4.17: delta_i = 1 / (6 rho alpha ||g_o,i||), g_o,i the query gradient at the adapted
    # parameters w_i = theta - alpha grad f_i(theta; D_in), from the plain per-task loop.
    g_o = adapted_query_grads(model, batch, loss_fn, lr, 1)
    want = 1.0 / (6 * 3.0 * lr * g_o.norm(dim=1))
    assert rel_err(want, want.mean().expand(3)) > 1e-2       # guard: the tasks' deltas differ
    assert rel_err(res.extras["delta"][:, 0], want) < 1e-12
    # guard: the query gradient at theta (no adaptation) gives other deltas
    at_theta = 1.0 / (6 * 3.0 * lr * adapted_query_grads(model, batch, loss_fn, lr, 0).norm(dim=1))
    assert rel_err(at_theta, want) > 1e-3
    zero = algo.deltas(torch.zeros(2, 5, dtype=torch.float64))
    assert torch.equal(zero, torch.ones(2, dtype=torch.float64))  # guarded: no inf / nan


@pytest.mark.parametrize("adapt", ["all", "head"])
def test_delta_rule_for_several_inner_steps(adapt):
    # K inner steps: the factor (I - alpha H(w_k)) is applied backwards, v_K = g_o at w_K,
    # v_k = v_{k+1} - alpha FD(w_k, v_{k+1}); the rule sets delta_k = 1 / (6 rho alpha ||v_{k+1}||)
    # (adapted part of v). Column k of extras["delta"] is step k's delta.
    model, batch, loss_fn, lr = mlp_case()
    K, rho = 3, 2.0
    res, layout = run(fastmeta.HFMAML(lr, K, rho=rho), model, batch, loss_fn, adapt)
    rec = []
    want_grad = flat(hfmaml_meta_grad(model, batch, loss_fn, lr, K, layout.adapted, rho=rho, record_deltas=rec),
                     layout)
    want = torch.tensor(rec, dtype=torch.float64)
    assert res.extras["delta"].shape == (3, K)
    assert rel_err(res.extras["delta"], want) < 1e-10
    assert rel_err(res.grad, want_grad) < 1e-9
    # guards: the columns differ (each step has its own vector), so a reused delta would fail
    assert rel_err(want[:, 0], want[:, K - 1]) > 1e-3
    if adapt == "all":
        # the last step's delta depends on the final iterate's query gradient only
        g_o = adapted_query_grads(model, batch, loss_fn, lr, K)
        assert rel_err(res.extras["delta"][:, K - 1], 1.0 / (6 * rho * lr * g_o.norm(dim=1))) < 1e-12


def test_hessian_batch_is_used():
    model, batch, loss_fn, lr = mlp_case()
    xh = torch.rand(3, 9, 1, dtype=torch.float64) * 10 - 5
    hb = TaskBatch(batch.support_x, batch.support_y, batch.query_x, batch.query_y, xh, torch.cos(xh))
    res, layout = run(fastmeta.HFMAML(lr, delta=1e-3), model, hb, loss_fn)
    want = flat(hfmaml_meta_grad(model, hb, loss_fn, lr, 1, layout.adapted, delta=1e-3), layout)
    assert rel_err(res.grad, want) < 1e-9
    plain, _ = run(fastmeta.HFMAML(lr, delta=1e-3), model, batch, loss_fn)
    assert rel_err(res.grad, plain.grad) > 1e-4


@pytest.mark.parametrize("activation", ["tanh", "softplus"])
@pytest.mark.parametrize("steps", [1, 3])
def test_approaches_maml_like_delta_squared(activation, steps):
    # Central differences: error O(delta^2) (Fallah eq. 9 with a smooth Hessian), until round-off.
    model, batch, loss_fn, lr = mlp_case(activation)
    layout = ParamLayout(model)
    exact = flat(maml_meta_grad(model, batch, loss_fn, lr, steps, layout.adapted), layout)
    errs = {}
    for d in (1e-1, 1e-2, 1e-3):
        g = run(fastmeta.HFMAML(lr, steps, delta=d), model, batch, loss_fn)[0].grad
        errs[d] = rel_err(g, exact)
        cos = float(g @ exact / (g.norm() * exact.norm()))
        if d <= 1e-2:
            assert cos >= 0.9999
    assert 30 < errs[1e-1] / errs[1e-2] < 300 and 30 < errs[1e-2] / errs[1e-3] < 300, errs
    fo = flat(maml_meta_grad(model, batch, loss_fn, lr, steps, layout.adapted, first_order=True), layout)
    assert errs[1e-3] < 1e-3 * rel_err(fo, exact)  # far closer to MAML than FO-MAML is


@pytest.mark.parametrize("steps", [1, 3])
def test_anil_shared_term_exact_for_quadratic_head(steps):
    # ANIL with a linear head and MSE: the loss is quadratic in the head and its head-gradient is
    # linear in the head, so the central differences -- including the shared (body) mixed term
    # d/dphi grad_head L . v -- are exact for every delta: HF-MAML must equal MAML to round-off.
    # A missing or wrong shared term fails this (FO-MAML is far off).
    model, batch, loss_fn, lr = mlp_case("tanh")
    layout = ParamLayout(model, "head")
    exact = flat(maml_meta_grad(model, batch, loss_fn, lr, steps, layout.adapted), layout)
    for d in (1e-1, 1e-3, None):
        g = run(fastmeta.HFMAML(lr, steps, delta=d), model, batch, loss_fn, "head")[0].grad
        assert rel_err(g, exact) < 1e-10
    fo = flat(maml_meta_grad(model, batch, loss_fn, lr, steps, layout.adapted, first_order=True), layout)
    assert rel_err(fo, exact) > 1e-3


def test_one_batched_gradient_call_over_2T_rows(monkeypatch):
    model, batch, loss_fn, lr = conv_case()
    for adapt in ("all", "head"):
        layout = ParamLayout(model, adapt)
        ev = Evaluator(model, layout, loss_fn, "vmap")
        rows = []
        orig = Evaluator.forward

        def spy(self, r, shared, x):
            rows.append(x.shape[0])
            return orig(self, r, shared, x)

        monkeypatch.setattr(Evaluator, "forward", spy)
        fastmeta.HFMAML(lr, inner_steps=2).meta_grad(ev, layout, layout.flatten(model), batch)
        monkeypatch.setattr(Evaluator, "forward", orig)
        # 2 inner gradients + 1 query pass on T rows, then one call on 2T rows per inner step.
        assert rows == [3, 3, 3, 6, 6], rows


def test_never_builds_a_second_order_graph(monkeypatch):
    model, batch, loss_fn, lr = conv_case()
    seen = []
    orig = torch.autograd.grad

    def spy(*a, **kw):
        seen.append(bool(kw.get("create_graph", False)))
        return orig(*a, **kw)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    for adapt in ("all", "head"):
        run(fastmeta.HFMAML(lr, 2), model, batch, loss_fn, adapt)
    assert seen and not any(seen)


def test_fd_float64_on_float32_model():
    model, batch, loss_fn, lr = conv_case(torch.float32)
    res, layout = run(fastmeta.HFMAML(lr, delta=1e-4, fd_dtype=torch.float64), model, batch, loss_fn, strategy="loop")
    assert res.grad.dtype == torch.float32
    want = flat(hfmaml_meta_grad(model, batch, loss_fn, lr, 1, layout.adapted, delta=1e-4, fd_dtype=torch.float64),
                layout)
    assert rel_err(res.grad, want) < 1e-5
    # The same differences in float64 from the double model: float32 only in the inner/query part.
    m64 = model.double()
    b64 = batch.to(torch.float64)
    exact = flat(maml_meta_grad(m64, b64, loss_fn, lr, 1, layout.adapted), ParamLayout(m64))
    assert rel_err(res.grad.double(), exact) < 1e-3


def test_bad_arguments():
    with pytest.raises(ValueError, match="delta"):
        fastmeta.HFMAML(0.1, delta=0.0)
    with pytest.raises(ValueError, match="rho"):
        fastmeta.HFMAML(0.1, rho=-1.0)
    with pytest.raises(ValueError, match="fd_dtype"):
        fastmeta.HFMAML(0.1, fd_dtype=torch.int32)
    with pytest.raises(ValueError, match="inner_lr"):
        fastmeta.HFMAML(0.0)


def test_learner_step_with_hfmaml_anil():
    model, batch, _, lr = conv_case()
    learner = fastmeta.MetaLearner(model, fastmeta.HFMAML(lr), adapt="head", strategy="loop")
    res = learner.step(batch)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert 0.0 <= res.accuracy <= 1.0
