"""alpha* estimators (Zou, Liu & Li) and the closed-form mixed-linear-regression solutions.

The references here are brute force: risks evaluated on fresh tasks over alpha grids, normal
equations checked by autograd on the empirical loss written from eq. 2.5, and parabola vertices of
traces computed from explicitly formed C(alpha) matrices."""
import math

import pytest
import torch

from fastmeta.lr import (OnlineAlphaStar, alpha_star, alpha_star_overparam, alpha_star_range, closed_form_solutions,
                         fast_adaptation_distance, maml_solution)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


D, K = 20, 50


def zou_tasks(n, g):
    """Zou H.3 underparameterized setup: identity features X [n, K=50, d=20] with x ~ U(-5, 5),
    task optima a ~ N(0, 3 I)."""
    X = torch.rand(n, K, D, generator=g, dtype=torch.float64) * 10 - 5
    a = torch.randn(n, D, generator=g, dtype=torch.float64) * math.sqrt(3.0)
    return X, a


def vertex(f, a0=0.0, a1=1.0, a2=2.0):
    """Vertex of the parabola through (a_i, f(a_i))."""
    y0, y1, y2 = f(a0), f(a1), f(a2)
    # f = c0 + c1 a + c2 a^2 with equally spaced nodes
    h = a1 - a0
    c2 = (y2 - 2 * y1 + y0) / (2 * h * h)
    c1 = (y1 - y0) / h - c2 * (a0 + a1)
    return -c1 / (2 * c2)


def test_zou_h3_alpha_star_of_n_approaches_the_limit():
    """alpha*(N): argmin over a fine alpha grid of the average population risk (eq. 3.2) of the
    closed-form MAML solution w_m(alpha) fitted on N tasks (eq. 3.1). The population risk
    E_{a, X} (1/K) ||C(alpha)(w - a)||^2 is taken with the a-expectation in closed form
    (E a = 0, Cov a = 3 I): (1/K) (w^T M w + 3 tr M), M(alpha) = E_X C^T C estimated on fresh
    tasks with C formed from its definition; the average over w_m uses R independent fits."""
    g = torch.Generator().manual_seed(0)
    lim = alpha_star(zou_tasks(2000, g)[0])
    assert lim == pytest.approx(0.0357, rel=0.03)   # the independent simulation

    Xf, _ = zou_tasks(2000, g)                      # fresh tasks for the risk
    grid = torch.linspace(0.025, 0.047, 1101, dtype=torch.float64)
    S = Xf.transpose(1, 2) @ Xf
    I = torch.eye(D, dtype=torch.float64)
    # E[C^T C] with C = X (I - (2 alpha / K) S), expanded by alpha power: C^T C = P S P, P = I - cS
    m0, m1, m2 = S.mean(0), (S @ S).mean(0), (S @ S @ S).mean(0)
    c = 2 * grid / K
    M = m0 - 2 * c[:, None, None] * m1 + (c ** 2)[:, None, None] * m2
    # spot-check the expansion against explicit C at one alpha
    P = I - (2 * 0.03 / K) * S[:50]
    Ce = Xf[:50] @ P
    m_direct = (Ce.transpose(1, 2) @ Ce).mean(0)
    m_poly = (S[:50] - 2 * (0.06 / K) * S[:50] @ S[:50] + (0.06 / K) ** 2 * S[:50] @ S[:50] @ S[:50]).mean(0)
    assert torch.allclose(m_direct, m_poly, rtol=1e-10)
    trM = M.diagonal(dim1=1, dim2=2).sum(-1)

    errs = {}
    for N in (2, 8, 32, 128, 512, 1024):
        R = 5
        risk = torch.zeros_like(grid)
        for _ in range(R):
            X, a = zou_tasks(N, g)
            w = maml_solution(X, grid, optima=a)            # [A, d]
            risk += (torch.einsum("ad,ade,ae->a", w, M, w) + 3.0 * trM) / K
        best = float(grid[risk.argmin()])
        assert grid[0] < best < grid[-1]
        errs[N] = abs(best - lim) / lim
    assert errs[512] < 0.03 and errs[1024] < 0.03, errs
    assert (errs[2] + errs[8]) / 2 > (errs[512] + errs[1024]) / 2, errs


def test_closed_form_solutions_solve_the_empirical_risks():
    g = torch.Generator().manual_seed(1)
    N, Kt, d, alpha = 6, 9, 4, 0.02
    X = torch.randn(N, Kt, d, generator=g, dtype=torch.float64)
    a = torch.randn(N, d, generator=g, dtype=torch.float64)
    y = (X @ a[..., None])[..., 0] + 0.1 * torch.randn(N, Kt, generator=g, dtype=torch.float64)

    def maml_loss(w, alpha):      # Zou eq. 2.5 written out, with general targets y
        r = X @ w - y
        w_ad = w - (2 * alpha / Kt) * (X.transpose(1, 2) @ r[..., None])[..., 0]
        return ((X @ w_ad[..., None])[..., 0] - y).pow(2).sum() / (N * Kt)

    for al in (0.0, alpha):
        w = maml_solution(X, al, targets=y).requires_grad_()
        (gr,) = torch.autograd.grad(maml_loss(w, al), w)
        assert gr.norm() < 1e-10
    cf = closed_form_solutions(X, a, alpha)
    assert torch.allclose(cf.w_maml, maml_solution(X, alpha, targets=(X @ a[..., None])[..., 0]))
    grid = maml_solution(X, torch.tensor([0.0, alpha]), optima=a)
    assert torch.allclose(grid[0], cf.w_erm) and torch.allclose(grid[1], cf.w_maml)


def test_fast_adaptation_distance_matches_an_explicit_loop():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(5, 7, 3, generator=g, dtype=torch.float64)
    a = torch.randn(5, 3, generator=g, dtype=torch.float64)
    w0 = torch.randn(3, generator=g, dtype=torch.float64)
    eta, steps = 0.05, 3
    want = []
    for t in range(steps + 1):
        tot = 0.0
        for i in range(5):
            w = w0.clone()
            for _ in range(t):
                w = w - eta * (2 / 7) * X[i].T @ (X[i] @ w - X[i] @ a[i])
            tot += float((w - a[i]).pow(2).sum())
        want.append(tot / 5)
    got = fast_adaptation_distance(w0, X, a, eta, steps)
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12)
    cf = closed_form_solutions(X, a, 1e-3, eval_features=X, eval_optima=a, eta=eta, steps=steps)
    assert cf.F_erm.shape == (steps + 1,) and cf.F_maml.shape == (steps + 1,)


def test_h6_train_validation_split_is_the_vertex_of_the_validation_trace():
    g = torch.Generator().manual_seed(3)
    fu = torch.rand(30, 12, 5, generator=g, dtype=torch.float64) * 2 - 1
    ft = torch.rand(30, 8, 5, generator=g, dtype=torch.float64) * 2 - 1

    def trace(alpha):   # sum_i tr(Chat^T Chat), Chat = Phi(t) (I - (2 alpha / k1) S_u)   (H.2, H.4)
        S_u = fu.transpose(1, 2) @ fu
        Ch = ft @ (torch.eye(5, dtype=torch.float64) - (2 * alpha / 12) * S_u)
        return float((Ch ** 2).sum())

    assert alpha_star(fu, ft) == pytest.approx(vertex(trace, 0.0, 0.5, 1.0), rel=1e-9)
    assert alpha_star(fu, fu) == pytest.approx(alpha_star(fu), rel=1e-12)
    assert alpha_star(fu) == pytest.approx(vertex(lambda al: float(((fu @ (torch.eye(5, dtype=torch.float64)
                                           - (2 * al / 12) * fu.transpose(1, 2) @ fu)) ** 2).sum()), 0.0, 0.5, 1.0), rel=1e-9)


def test_overparam_h14_h15():
    g = torch.Generator().manual_seed(4)
    psi = torch.rand(6, 5, 40, generator=g, dtype=torch.float64)    # K = 5 << d = 40
    N, Kt = 100, 5
    I = torch.eye(40, dtype=torch.float64)

    def trace(alpha):   # E tr C^T C with C = Psi (I - (2 alpha / NK) Psi^T Psi)    (H.12-H.13)
        S = psi.transpose(1, 2) @ psi
        C = psi @ (I - (2 * alpha / (N * Kt)) * S)
        return float((C ** 2).sum())

    r = alpha_star_overparam(psi, N, Kt)
    assert r.h14 == pytest.approx(vertex(trace, 0.0, 1.0, 2.0), rel=1e-9)
    var = float(((psi - psi.mean()) ** 2).mean())
    assert r.sigma2 == pytest.approx(var)
    assert r.h15 == pytest.approx(1 / (2 * N * Kt * var))


def test_alpha_star_range_h18_h25():
    lo, hi = alpha_star_range(25, 10, 1000)            # min(NK, d) = 250, n~ = 250, features in [0, 1]
    assert (lo, hi) == pytest.approx((2 / 250, 250 / 250))
    lo, hi = alpha_star_range(1000, 10, 300, n_obs=50, feature_range=(-1.0, 1.0))   # min = 300, width^2 = 4
    assert (lo, hi) == pytest.approx((2 / (300 * 4), 50 / (300 * 4)))


def test_online_alpha_star_buffer():
    f1 = torch.tensor([[3.0, 4.0], [1.0, 0.0]])        # normalized: [.6, .8], [1, 0]; entry variance 0.14
    est = 1 / (2 * 2 * 1 * 0.14)
    o = OnlineAlphaStar()
    assert o.update(f1, ways=2, shots=1) == pytest.approx(est)
    f2 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])        # normalized [1, 0], [0, 1]: variance 0.25
    est2 = 1 / (2 * 2 * 1 * 0.25)
    assert o.update(f2, ways=2, shots=1) == pytest.approx(0.9 * est + 0.1 * est2)
    assert o.last == pytest.approx(est2)


def test_bad_inputs_name_the_argument():
    one = torch.rand(1, 10, 3)
    with pytest.raises(ValueError, match="^features_train:.*at least 2 tasks"):
        alpha_star(one)
    with pytest.raises(ValueError, match="^features_train:"):
        alpha_star(torch.rand(10, 3))
    with pytest.raises(ValueError, match="^features_val:"):
        alpha_star(torch.rand(4, 10, 3), torch.rand(4, 10, 2))
    bad = torch.rand(3, 4, 2)
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="^features_train:.*NaN or inf"):
        alpha_star(bad)
    with pytest.raises(ValueError, match="^features:"):
        alpha_star_overparam(one, 10, 10)
    with pytest.raises(ValueError, match="^n_tasks:"):
        alpha_star_overparam(torch.rand(3, 4, 5), 0, 4)
    with pytest.raises(ValueError, match="^d:"):
        alpha_star_range(3, 4, 0)
    with pytest.raises(ValueError, match="^momentum:"):
        OnlineAlphaStar(momentum=1.0)
    with pytest.raises(ValueError, match="^optima:"):
        maml_solution(torch.rand(3, 4, 2), 0.1, optima=torch.rand(3, 3))
