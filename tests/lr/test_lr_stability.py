"""Stability bounds (two-learning-rates paper, "2LR"): batched Lanczos against explicit Hessians,
the sec. 5.1 converge/diverge map against the exact quadratic boundary, and bad inputs."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastmeta
from fastmeta.lr import (beta_c_exact, beta_c_paper, bounds_from_eigenvalues, lanczos_topk, linear_regression_map,
                         stability_bounds)
from fastmeta.tasks import TaskBatch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The machine is shared; small problems run faster and steadier on one thread.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def explicit_hessian(model, x, y, loss_fn):
    """Full Hessian [D, D] of one task's loss w.r.t. all parameters, by torch.autograd.functional."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        params, off = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[off: off + s.numel()].view(s)
            off += s.numel()
        return loss_fn(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(f, flat0, vectorize=True)


def mlp_batch(T=3, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(T, 2 * n, 1, generator=g, dtype=torch.float64) * 10 - 5
    amp = 0.5 + 4 * torch.rand(T, 1, 1, generator=g, dtype=torch.float64)
    y = amp * torch.sin(x - 0.7)
    return TaskBatch(x[:, :n], y[:, :n], x[:, n:], y[:, n:])


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_lanczos_top5_matches_eigvalsh_of_explicit_hessian(strategy):
    torch.manual_seed(0)
    model = fastmeta.SineMLP(hidden=10, activation="tanh").double()   # D = 141
    batch = mlp_batch()
    res = stability_bounds(model, batch, loss_fn="mse", k=5, strategy=strategy, tol=1e-10, max_iter=141)
    assert res.eigenvalues.shape == (3, 5)
    lam_max = 0.0
    for t in range(3):
        H = explicit_hessian(model, batch.support_x[t], batch.support_y[t], F.mse_loss)
        want = torch.linalg.eigvalsh(H).flip(0)[:5]
        rel = ((res.eigenvalues[t] - want).abs() / want.abs()).max()
        assert rel < 1e-6, (t, res.eigenvalues[t], want)
        lam_max = max(lam_max, float(want[0]))
    assert res.alpha_c == pytest.approx(1 / lam_max, rel=1e-6)


def test_lanczos_converges_before_dimension():
    # A diagonal operator with a clear top of the spectrum: Lanczos must get the top-5 far
    # below D iterations (batched over two different operators).
    D = 400
    d1 = torch.cat([torch.tensor([50.0, 40, 30, 20, 15]), torch.linspace(0, 5, D - 5)]).double()
    d2 = torch.cat([torch.tensor([9.0, 8, 7, 6, 5.5]), torch.linspace(-3, 1, D - 5)]).double()
    diag = torch.stack([d1, d2])
    r = lanczos_topk(lambda v: diag * v, 2, D, 5, max_iter=120, tol=1e-10)
    assert r.converged and r.iterations < 120
    want = diag.sort(dim=1, descending=True).values[:, :5]
    assert torch.allclose(r.eigenvalues, want, rtol=1e-8, atol=0)


def test_finite_difference_hvp_option_is_close_in_float64():
    torch.manual_seed(1)
    model = fastmeta.SineMLP(hidden=8, activation="tanh").double()
    batch = mlp_batch(T=2, seed=3)
    a = stability_bounds(model, batch, k=3, hvp="autograd", tol=1e-10, max_iter=60)
    b = stability_bounds(model, batch, k=3, hvp="finite_difference", fd_delta=1e-5, tol=1e-10, max_iter=60)
    assert torch.allclose(a.eigenvalues, b.eigenvalues, rtol=1e-5)


def test_beta_c_formulas_by_hand():
    eig = [4.0, 1.0]
    # paper eq. 18: min(2/(4 - 0.1*16), 2/(1 - 0.1)) = min(2/2.4, 2/0.9)
    assert beta_c_paper(eig, 0.1) == pytest.approx(2 / 2.4)
    # alpha = 0.3 > 1/4: lambda=4 drops out (4 - 4.8 < 0), only lambda=1 remains
    assert beta_c_paper(eig, 0.3) == pytest.approx(2 / 0.7)
    # exact: 2 / (lambda (1 - alpha lambda)^2)
    assert beta_c_exact(eig, 0.1) == pytest.approx(min(2 / (4 * 0.36), 2 / (1 * 0.81)))
    assert beta_c_exact(eig, 0.5) == pytest.approx(min(2 / (4 * 1.0), 2 / (1 * 0.25)))
    res = bounds_from_eigenvalues([[4.0, 1.0], [3.0, 2.0]])
    assert res.alpha_c == pytest.approx(0.25)
    a, b = res.recommended
    assert a == pytest.approx(0.125)                      # 0.5 * alpha_c
    assert b == pytest.approx(0.5 * 2 / (4 - 0.125 * 16))  # set by lambda_max = 4 at alpha = 1/(2 lambda_max)
    assert res.beta_c(0.0) == pytest.approx(2 / 4)        # plain GD: 2 / lambda_max


def test_linear_regression_map_matches_exact_boundary():
    """2LR sec. 5.1: y = s x + b, x in [-5, 5], steepest GD, same data inner/outer, 500 iterations.
    The eigenvalues come from ``stability_bounds`` on an ``nn.Linear(1, 1)``; the exact
    quadratic-case boundary beta > 2 / (lambda (1 - alpha lambda)^2) must classify >= 95% of the
    cells outside a +-15% band around it."""
    alphas = np.logspace(-5, math.log10(9e-2), 24)
    betas = np.logspace(math.log10(5e-3), math.log10(9), 24)
    m = linear_regression_map(alphas, betas, iters=500, n_points=100, seed=0)
    model = nn.Linear(1, 1).double()
    x, y = m.x.view(1, -1, 1), m.y.view(1, -1, 1)
    res = stability_bounds(model, TaskBatch(x, y, x, y), loss_fn="mse", k=2, curve="exact")
    # the linear model's Hessian is 2 mean([x,1][x,1]^T): independent check of the Lanczos values
    feats = torch.stack([m.x, torch.ones_like(m.x)], 1)
    assert torch.allclose(res.eigenvalues[0], torch.linalg.eigvalsh(2 * feats.T @ feats / 100).flip(0), rtol=1e-8)
    bc = res.beta_c(alphas)
    assert alphas.max() > res.alpha_c            # the grid crosses the paper's alpha_c
    ratio = betas[None, :] / bc[:, None]
    away = np.abs(np.log(ratio)) > math.log(1.15)
    pred = ratio > 1
    assert away.mean() > 0.9
    assert 0.1 < m.diverged[away].mean() < 0.9     # both classes present
    acc = (pred == m.diverged)[away].mean()
    assert acc >= 0.95, acc
    # the paper's approximate curve with alpha < alpha_c is conservative where it applies
    paper = beta_c_paper(res.eigenvalues, alphas)
    ok = alphas < res.alpha_c
    assert np.all(paper[ok] <= bc[ok] * (1 + 1e-12))


# ---------------------------------------------------------------------------------------- bad input
def test_no_adapted_parameters_is_named():
    model = fastmeta.SineMLP(hidden=4).double()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="^model:"):
        stability_bounds(model, mlp_batch(T=2))


def test_non_finite_eigenvalues_are_named():
    with pytest.raises(ValueError, match="^eigenvalues:"):
        bounds_from_eigenvalues([[1.0, float("nan")]])
    with pytest.raises(ValueError, match="^eigenvalues:"):
        bounds_from_eigenvalues([float("inf"), 1.0])
    b = mlp_batch(T=2)
    b.support_x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="^eigenvalues:"):
        stability_bounds(fastmeta.SineMLP(hidden=4).double(), b, k=2)


def test_other_bad_arguments_are_named():
    model = fastmeta.SineMLP(hidden=4).double()
    with pytest.raises(ValueError, match="^batch:"):
        stability_bounds(model, (torch.zeros(2, 3, 1), torch.zeros(2, 3, 1)))
    with pytest.raises(ValueError, match="^k:"):
        stability_bounds(model, mlp_batch(T=2), k=0)
    with pytest.raises(ValueError, match="^hvp:"):
        stability_bounds(model, mlp_batch(T=2), hvp="exact")
    with pytest.raises(ValueError, match="^eigenvalues:"):
        bounds_from_eigenvalues([-1.0, -2.0])
    with pytest.raises(ValueError, match="^alpha_margin:"):
        bounds_from_eigenvalues([1.0], alpha_margin=2.0)
