"""alpha* estimators (Zou, Liu & Li) and the closed-form mixed-linear-regression solutions.

The references here never call the code under test: alpha*_lim from exact moments of the H.3
setting (eq. 3.3), risks evaluated on fresh tasks over alpha grids, the ERM / MAML solutions
(eq. 3.1) by least squares on explicitly formed P_i X_i, F_t (Def. 1) by an autograd loop, and
parabola vertices of traces computed from explicitly formed C(alpha) matrices."""
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


def _set_partitions(n):
    """All set partitions of n positions, as restricted-growth strings (block label per position)."""
    def rec(prefix, m):
        if len(prefix) == n:
            yield tuple(prefix)
            return
        for b in range(m + 1):
            yield from rec(prefix + [b], max(m, b + 1))
    yield from rec([], 0)


def expected_trace_power(p, K, d, moment):
    """E tr(S^p) exactly, S = X^T X, X [K, d] with i.i.d. symmetric entries, E x^m = moment(m).

    tr(S^p) = sum over features f_1..f_p and samples s_1..s_p of prod_t x[s_t, f_t] x[s_t, f_{t+1}]
    (f_{p+1} = f_1). Group the index tuples by which features are equal and which samples are equal
    (a set partition of each): every tuple in a group has the same expectation (a product of moments
    over the distinct entries, by independence), and the group has d (d-1) ... (d-#blocks+1) times
    K (K-1) ... tuples."""
    from collections import Counter
    from fractions import Fraction

    def falling(n, k):
        out = 1
        for i in range(k):
            out *= n - i
        return out

    total = Fraction(0)
    for fs in _set_partitions(p):
        for ss in _set_partitions(p):
            mult = Counter()
            for t in range(p):
                mult[(ss[t], fs[t])] += 1
                mult[(ss[t], fs[(t + 1) % p])] += 1
            e = Fraction(1)
            for m in mult.values():
                e *= moment(m)
            total += falling(d, max(fs) + 1) * falling(K, max(ss) + 1) * e
    return total


def uniform_moment(m):
    """E x^m for x ~ U(-5, 5): 0 for odd m, 5^m / (m + 1) for even m."""
    from fractions import Fraction

    return Fraction(0) if m % 2 else Fraction(5 ** m, m + 1)


# Zou Theorem 1, eq. 3.3 in the H.3 setting written out: K = 50 samples, d = 20 features, entries
# x ~ U(-5, 5) i.i.d., loss (1/K) ||Phi w - y||^2, so alpha*_lim = K E tr S^2 / (2 E tr S^3), with
# both expectations exact (expected_trace_power): 0.035745639705...  (the 0.0357).
ALPHA_LIM_H3 = float(K * expected_trace_power(2, K, D, uniform_moment) / (2 * expected_trace_power(3, K, D, uniform_moment)))


def test_expected_trace_powers_by_hand_and_by_simulation():
    # p = 2 by hand: E S_ii^2 = K m4 + K (K-1) m2^2 (d terms), E S_ij^2 = K m2^2 (d (d-1) terms)
    m2, m4 = 25 / 3, 125.0
    want2 = D * (K * m4 + K * (K - 1) * m2 ** 2) + D * (D - 1) * K * m2 ** 2
    assert float(expected_trace_power(2, K, D, uniform_moment)) == pytest.approx(want2, rel=1e-15)
    # p = 3 against a simulation (relative standard error ~2e-4 with 20000 draws)
    g = torch.Generator().manual_seed(11)
    X = torch.rand(20000, K, D, generator=g, dtype=torch.float64) * 10 - 5
    S = X.transpose(1, 2) @ X
    sim3 = float((S @ S @ S).diagonal(dim1=1, dim2=2).sum(-1).mean())
    assert sim3 == pytest.approx(float(expected_trace_power(3, K, D, uniform_moment)), rel=2e-3)
    assert ALPHA_LIM_H3 == pytest.approx(0.0357, abs=5e-5)


def w_maml_by_normal_equations(X, a, grid):
    """The minimizer of the empirical one-step MAML risk (Zou eq. 2.5) for every alpha of a grid,
    by its own normal equations: the post-step residual of task i is C_i (w - a_i) with
    C_i = X_i (I - c S_i), c = 2 alpha / K, S_i = X_i^T X_i (eq. 3.1), so
    (sum_i C_i^T C_i) w = sum_i C_i^T C_i a_i, and C^T C = S - 2c S^2 + c^2 S^3."""
    S = X.transpose(1, 2) @ X
    S2 = S @ S
    S3 = S2 @ S
    c = (2 * grid / X.shape[1])[:, None, None]
    lhs = S.sum(0) - 2 * c * S2.sum(0) + c ** 2 * S3.sum(0)
    rhs = ((S @ a[..., None]).sum(0) - 2 * c * (S2 @ a[..., None]).sum(0) + c ** 2 * (S3 @ a[..., None]).sum(0))
    return torch.linalg.solve(lhs, rhs)[..., 0]


def test_zou_h3_alpha_star_of_n_approaches_the_limit():
    """alpha_star on 2000 sampled H.3 tasks estimates the exact alpha*_lim (eq. 3.3, ALPHA_LIM_H3);
    and alpha*(N), the argmin over a fine alpha grid of the average population risk (eq. 3.2) of the
    MAML solution w_m(alpha) fitted on N tasks (eq. 3.1, by the normal equations above), approaches
    that limit as N grows. The population risk E_{a, X} (1/K) ||C(alpha)(w - a)||^2 is taken with the
    a-expectation in closed form (E a = 0, Cov a = 3 I): (1/K) (w^T M w + 3 tr M), M(alpha) = E_X C^T C
    estimated on fresh tasks with C formed from its definition; the average over w_m uses R
    independent fits."""
    g = torch.Generator().manual_seed(0)
    lim = ALPHA_LIM_H3
    est = alpha_star(zou_tasks(2000, g)[0])
    assert est == pytest.approx(lim, rel=0.01)

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
            w = w_maml_by_normal_equations(X, a, grid)      # [A, d]
            risk += (torch.einsum("ad,ade,ae->a", w, M, w) + 3.0 * trM) / K
        best = float(grid[risk.argmin()])
        assert grid[0] < best < grid[-1]
        errs[N] = abs(best - lim) / lim
    assert errs[512] < 0.03 and errs[1024] < 0.03, errs
    assert (errs[2] + errs[8]) / 2 > (errs[512] + errs[1024]) / 2, errs


def stacked_lstsq(A, b):
    """argmin_w sum_i ||A_i w - b_i||^2 for A [N, m, d], b [N, m], by least squares on the stack."""
    return torch.linalg.lstsq(A.reshape(-1, A.shape[-1]), b.reshape(-1, 1)).solution[:, 0]


def erm_and_maml_by_lstsq(X, y, alpha):
    """ERM: argmin sum_i (1/K) ||X_i w - y_i||^2. MAML (Zou eq. 2.5): the post-step residual is
    X_i w'_i - y_i = P_i (X_i w - y_i), P_i = I - (2 alpha / K) X_i X_i^T, so w_m minimizes
    sum_i ||(P_i X_i) w - P_i y_i||^2, a least-squares problem on the stacked P_i X_i."""
    Kt = X.shape[1]
    P = torch.eye(Kt, dtype=X.dtype) - (2 * alpha / Kt) * X @ X.transpose(1, 2)
    return stacked_lstsq(X, y), stacked_lstsq(P @ X, (P @ y[..., None])[..., 0])


def test_closed_form_solutions_match_least_squares():
    g = torch.Generator().manual_seed(1)
    N, Kt, d, alpha = 6, 9, 4, 0.02
    X = torch.randn(N, Kt, d, generator=g, dtype=torch.float64)
    a = torch.randn(N, d, generator=g, dtype=torch.float64)
    y_real = (X @ a[..., None])[..., 0]
    y = y_real + 0.1 * torch.randn(N, Kt, generator=g, dtype=torch.float64)

    w_r, w_m = erm_and_maml_by_lstsq(X, y, alpha)
    assert rel_err(w_m, w_r) > 1e-2                 # guard: alpha changes the solution
    assert rel_err(maml_solution(X, alpha, targets=y), w_m) < 1e-9
    assert rel_err(maml_solution(X, 0.0, targets=y), w_r) < 1e-9

    w_r, w_m = erm_and_maml_by_lstsq(X, y_real, alpha)
    assert rel_err(w_m, w_r) > 1e-2
    cf = closed_form_solutions(X, a, alpha)
    assert rel_err(cf.w_erm, w_r) < 1e-9 and rel_err(cf.w_maml, w_m) < 1e-9
    grid = maml_solution(X, torch.tensor([0.0, alpha, 2 * alpha], dtype=torch.float64), optima=a)
    assert grid.shape == (3, d)
    assert rel_err(grid[0], w_r) < 1e-9 and rel_err(grid[1], w_m) < 1e-9
    assert rel_err(grid[2], erm_and_maml_by_lstsq(X, y_real, 2 * alpha)[1]) < 1e-9
    # and the gradient of the empirical MAML risk written from eq. 2.5 vanishes there
    w = cf.w_maml.clone().requires_grad_()
    w_ad = w - (2 * alpha / Kt) * (X.transpose(1, 2) @ (X @ w - y_real)[..., None])[..., 0]
    (gr,) = torch.autograd.grad(((X @ w_ad[..., None])[..., 0] - y_real).pow(2).sum(), w)
    assert gr.norm() < 1e-9


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def F_by_autograd(w0, X, a, eta, steps):
    """Zou Def. 1 (eq. 3.6) directly: per task, t plain gradient steps of size eta on the task loss
    (1/K) ||X w - X a||^2 (gradient by autograd), then ||w_t - a||^2, averaged over tasks."""
    out = []
    for t in range(steps + 1):
        tot = 0.0
        for i in range(X.shape[0]):
            w = w0.clone()
            for _ in range(t):
                w = w.detach().requires_grad_()
                (gr,) = torch.autograd.grad((X[i] @ w - X[i] @ a[i]).pow(2).mean(), w)
                w = (w - eta * gr).detach()
            tot += float((w - a[i]).pow(2).sum())
        out.append(tot / X.shape[0])
    return torch.tensor(out, dtype=torch.float64)


def test_fast_adaptation_distance_matches_an_explicit_loop():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(5, 7, 3, generator=g, dtype=torch.float64)
    a = torch.randn(5, 3, generator=g, dtype=torch.float64)
    w0 = torch.randn(3, generator=g, dtype=torch.float64)
    eta, steps = 0.05, 3
    want = F_by_autograd(w0, X, a, eta, steps)
    got = fast_adaptation_distance(w0, X, a, eta, steps)
    assert rel_err(got, want) < 1e-12
    assert rel_err(want[1:], want[:-1]) > 1e-2      # guard: every step moves F


def test_closed_form_F_erm_F_maml_by_value():
    """closed_form_solutions' F_t (Def. 1) of the ERM and MAML solutions fitted on training tasks,
    evaluated on other tasks, against the least-squares solutions and the autograd loop."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(8, 10, 4, generator=g, dtype=torch.float64)
    a = torch.randn(8, 4, generator=g, dtype=torch.float64)
    Xe = torch.randn(6, 10, 4, generator=g, dtype=torch.float64)
    ae = torch.randn(6, 4, generator=g, dtype=torch.float64)
    alpha, eta, steps = 0.08, 0.03, 4
    cf = closed_form_solutions(X, a, alpha, eval_features=Xe, eval_optima=ae, eta=eta, steps=steps)
    w_r, w_m = erm_and_maml_by_lstsq(X, (X @ a[..., None])[..., 0], alpha)
    F_r, F_m = F_by_autograd(w_r, Xe, ae, eta, steps), F_by_autograd(w_m, Xe, ae, eta, steps)
    assert rel_err(F_r, F_m) > 1e-3                 # guard: the two solutions adapt differently
    assert cf.F_erm.shape == (steps + 1,) and cf.F_maml.shape == (steps + 1,)
    assert rel_err(cf.F_erm, F_r) < 1e-9 and rel_err(cf.F_maml, F_m) < 1e-9


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
