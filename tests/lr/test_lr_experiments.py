"""fastmeta.lr.experiments and tangent_features against answers known in closed form.

The oracles are the linear-regression task family of linear_family.py: every task loss is exactly
quadratic, so the one-step MAML meta-loss, its minimizer (Zou eq. 3.1, by least squares on the
stacked P_t X_t), the GD trajectory on it and the divergence boundary of beta
(beta lambda (1 - alpha lambda)^2 > 2; 2LR eqs. 16-18 for an exact quadratic) are written out in the
test; the Jacobian of tangent_features comes from torch.autograd.functional.jacobian. Float64."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import fastmeta
from fastmeta.lr import alpha_sweep, beta_divergence_boundary, maml_ab_map, train_maml
from fastmeta.lr.alpha import tangent_features

from linear_family import (LinearFamily, beta_c_exact_of, design, gd_iterate, hessians, maml_quadratic, params,
                           zero_linear)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_train_maml_follows_gd_on_the_maml_quadratic_to_zou_solution():
    """Tasks with different inputs: the meta-loss minimizer is Zou's w_m (eq. 3.1), not the ERM
    solution and not the mean of the task optima; train_maml's iterates are exactly GD on it."""
    fam = LinearFamily(K=10, shared_x=False, spread=1.0, seed=1)
    batch = fam.sample(5)
    alpha = 0.03
    Hbar, theta_star, loss = maml_quadratic(batch, alpha)
    _, theta_erm, _ = maml_quadratic(batch, 0.0)
    assert rel(theta_star, theta_erm) > 1e-3                  # guard: alpha matters here
    lam = torch.linalg.eigvalsh(Hbar)
    beta = 1.0 / float(lam[-1])                               # well inside 2 / lambda_max
    n = 400
    r = train_maml(zero_linear(), [batch] * n, alpha, beta, keep_model=True)
    assert not r.diverged and r.model is not None
    theta0 = torch.zeros(2, dtype=torch.float64)
    got = params(r.model)
    assert rel(got, gd_iterate(Hbar, theta_star, theta0, beta, n)) < 1e-9
    assert rel(got, theta_star) < 1e-9                        # converged: (1 - lam_min / lam_max)^400 is tiny
    # the recorded losses are the meta-loss before each step, along the same trajectory
    for k in (0, 1, 7):
        assert r.losses[k] == pytest.approx(loss(gd_iterate(Hbar, theta_star, theta0, beta, k)), rel=1e-9)
    assert r.final == pytest.approx(loss(theta_star), rel=1e-6)
    # beyond 2 / lambda_max(Hbar) GD on the quadratic diverges, and train_maml says so
    bad = train_maml(zero_linear(), [batch] * 60, alpha, 2.2 / float(lam[-1]))
    assert bad.diverged and bad.final == float("inf")


def shared_setup(T=4, seed=0):
    fam = LinearFamily(K=12, shared_x=True, seed=seed)
    batch = fam.sample(T)
    eigs = torch.linalg.eigvalsh(hessians(batch)[0]).numpy()
    return fam, batch, eigs


def test_beta_divergence_boundary_brackets_the_exact_beta_c():
    fam, batch, eigs = shared_setup()
    alpha = 0.5 / eigs.max()
    bc = float(beta_c_exact_of(eigs, alpha))
    steps = 7
    lo, hi, probes = beta_divergence_boundary(zero_linear(), [batch] * 100, alpha, bc / 3, bc * 1.5, steps=steps,
                                              progress=False)
    # below beta_c GD contracts every component: nothing there may count as diverged
    assert all(b > bc for b, d in probes if d)
    assert hi > bc
    # above it the top component grows by (beta mu - 1)^2 per step: within 100 steps a few % suffice
    assert lo <= bc * 1.03
    assert hi / lo == pytest.approx((1.5 * 3) ** (1 / 2 ** steps), rel=1e-9)   # the bisection's resolution
    # the paper's first-order beta_c (eq. 18) at this alpha is half the exact one: the bracket
    # excludes it (this is the case where the two curves differ)
    paper = 2 / (eigs.max() - alpha * eigs.max() ** 2)
    assert paper < lo / 1.5


def test_maml_ab_map_diverges_exactly_above_the_exact_boundary():
    fam, batch, eigs = shared_setup()
    lam = eigs.max()
    alphas = np.array([0.2, 0.6, 1.3]) / lam
    betas = np.geomspace(0.02, 2.0, 5)
    m = maml_ab_map(zero_linear(), [batch] * 40, alphas, betas, progress=False)
    bc = beta_c_exact_of(eigs, alphas)
    ratio = betas[None, :] / bc[:, None]
    away = np.abs(np.log(ratio)) > math.log(1.15)
    assert away.sum() >= 10 and 0 < m.diverged[away].mean() < 1      # both classes, most cells
    assert np.array_equal(m.diverged[away], (ratio > 1)[away])
    assert np.all(np.isinf(m.loss[m.diverged])) and np.all(np.isfinite(m.loss[~m.diverged]))
    # a converged cell's loss is the mean of the last 10% of the per-step meta-losses: GD on the quadratic
    i, j = 0, 1
    assert not m.diverged[i, j]
    Hbar, theta_star, loss = maml_quadratic(batch, alphas[i])
    want = np.mean([loss(gd_iterate(Hbar, theta_star, torch.zeros(2, dtype=torch.float64), betas[j], k))
                    for k in range(36, 40)])
    assert m.loss[i, j] == pytest.approx(want, rel=1e-9)


def test_alpha_sweep_scores_match_closed_form_and_find_the_known_best_alpha():
    """Post-adaptation held-out loss after training at each alpha. With shared inputs the meta-
    loss minimizer is the mean of the training optima theta_bar for every alpha, and for a test task
    with optimum a_t the post-step loss is (1/K) e^T (S - 2c S^2 + c^2 S^3) e, e = theta - a_t,
    c = 2 alpha / K, S = X^T X: a parabola in alpha with vertex alpha* = (K/2) sum e^T S^2 e /
    sum e^T S^3 e (the per-task form of Zou eq. 3.3). Training starts at the family's centre, and the
    held-out tasks spread 10x wider than the training tasks, so the few components that converge
    slowly at some alpha (lambda (1 - alpha lambda)^2 near 0) do not move the vertex."""
    fam, train, eigs = shared_setup(T=4)
    wide = LinearFamily(K=12, shared_x=True, spread=1.0, seed=0)    # the same inputs x
    assert torch.equal(wide.x, fam.x)
    test = wide.sample(10).select(slice(4, 10))   # not the draws the training tasks used
    lam = eigs.max()
    alphas = np.geomspace(0.4 / lam, 2.0 / lam, 7)
    beta = 0.5 * float(beta_c_exact_of(eigs, alphas).min())
    n = 100
    theta0 = torch.tensor([3.0, 2.0], dtype=torch.float64)
    sw = alpha_sweep(zero_linear(3.0, 2.0), [train] * n, test, alphas, beta, progress=False)
    X, _ = design(train)
    S = X[0].T @ X[0]
    K = X.shape[1]
    Xt, yt = design(test)
    opt_t = torch.linalg.lstsq(Xt, yt[..., None]).solution[..., 0]        # exact: targets are linear
    for i, a in enumerate(alphas):
        Hbar, theta_star, _ = maml_quadratic(train, a)
        th = gd_iterate(Hbar, theta_star, theta0, beta, n)
        c = 2 * a / K
        P = torch.eye(K, dtype=torch.float64) - c * X[0] @ X[0].T
        post = float(((P @ (Xt @ th - yt)[..., None]) ** 2).mean())
        pre = float(((Xt @ th - yt) ** 2).mean())
        assert sw.post[i] == pytest.approx(post, rel=1e-9) and sw.pre[i] == pytest.approx(pre, rel=1e-9)
    _, theta_bar, _ = maml_quadratic(train, 0.0)
    e = theta_bar - opt_t
    a_star = K / 2 * float(torch.einsum("ti,ij,tj->", e, S @ S, e) / torch.einsum("ti,ij,tj->", e, S @ S @ S, e))
    assert alphas[0] < a_star < alphas[-1]
    best = alphas[int(np.argmin(sw.post))]
    step = alphas[1] / alphas[0]
    assert a_star / step < best < a_star * step                        # the grid point next to the vertex
    assert np.ptp(sw.post) > 0.1 * sw.post.min()                       # guard: alpha matters a lot


def test_tangent_features_equal_the_jacobian():
    torch.manual_seed(0)
    model = fastmeta.SineMLP(hidden=5, activation="tanh").double()
    x = torch.rand(3, 4, 1, dtype=torch.float64) * 10 - 5
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat, xt):
        ps, off = {}, 0
        for n, s in zip(names, shapes):
            ps[n] = flat[off: off + s.numel()].view(s)
            off += s.numel()
        return functional_call(model, ps, (xt,)).reshape(-1)

    want = torch.stack([torch.autograd.functional.jacobian(lambda p: f(p, x[t]), flat0) for t in range(3)])
    got = tangent_features(model, x)
    assert got.shape == (3, 4, flat0.numel())
    assert rel(got, want) < 1e-12
    # ANIL ("head"): only the last layer's columns; the body is held fixed
    n_head = sum(p.numel() for p in list(model.parameters())[-2:])
    head = tangent_features(model, x, adapt="head")
    assert head.shape == (3, 4, n_head)
    assert rel(head, want[..., -n_head:]) < 1e-12
    # for a linear model the tangent features are the inputs [x, 1] themselves
    lin = torch.nn.Linear(1, 1).double()
    assert torch.equal(tangent_features(lin, x), torch.cat([x, torch.ones_like(x)], -1))
