import pytest
import torch

from fastmeta import ops
from fastmeta.testing import RowCase, as_float64, assert_oracle_close, make_rows, make_vector, row_cases

from fastmeta.testing import require_backend as require

CASES = row_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fd_hvp_points_matches_reference(backend, run_on, case):
    require(backend, "fd_hvp_points")
    v = make_rows(case)
    for theta in (make_vector(case.d, case.dtype, noncontiguous=case.noncontiguous), make_rows(case, seed=5, zero=False)):
        delta = torch.linspace(1e-3, 1e-1, case.t, dtype=case.dtype)
        out = run_on(backend, ops.fd_hvp_points, theta, v, delta)
        ref = run_on("reference", ops.fd_hvp_points, theta, v, delta)
        oracle = run_on("reference", ops.fd_hvp_points, *as_float64(theta, v, delta))
        assert_oracle_close(out, ref, oracle, what=f"{backend} {case.id}")
        assert out.shape == (2 * case.t, case.d)


def test_fd_hvp_points_layout(every_backend, run_on):
    require(every_backend, "fd_hvp_points")
    theta = torch.tensor([1.0, 2.0], dtype=torch.float64)
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    out = run_on(every_backend, ops.fd_hvp_points, theta, v, torch.tensor([0.5, 0.25], dtype=torch.float64))
    expected = torch.tensor([[1.5, 2.0], [1.0, 2.5], [0.5, 2.0], [1.0, 1.5]], dtype=torch.float64)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("reduce", ["mean", "none"])
def test_fd_hvp_combine_matches_reference(backend, run_on, case, reduce):
    require(backend, "fd_hvp_combine")
    g_o, g_p, g_m = make_rows(case, seed=0), make_rows(case, seed=1, zero=False), make_rows(case, seed=2, zero=False)
    delta = torch.linspace(1e-2, 1e-1, case.t, dtype=case.dtype)
    out = run_on(backend, ops.fd_hvp_combine, g_o, g_p, g_m, delta, 0.4, reduce)
    ref = run_on("reference", ops.fd_hvp_combine, g_o, g_p, g_m, delta, 0.4, reduce)
    oracle = run_on("reference", ops.fd_hvp_combine, *as_float64(g_o, g_p, g_m, delta), 0.4, reduce)
    # the difference quotient amplifies input rounding by inner_lr / (2 delta) (= 20 here)
    assert_oracle_close(out, ref, oracle, ulps=64, what=f"{backend} {case.id} {reduce}")


def test_fd_hvp_combine_recovers_hessian_vector_product_of_quadratic(every_backend, run_on):
    # f(x) = 1/2 x^T A x per task: grad(theta +- delta v) = A theta +- delta A v, so the combine
    # must give mean_t(g_o - lr * A_t v_t) exactly up to rounding (Fallah eq. 10-11 with v = g_o).
    require(every_backend, "fd_hvp_points")
    torch.manual_seed(0)
    t, d, lr = 4, 9, 0.3
    a = torch.randn(t, d, d, dtype=torch.float64)
    a = a @ a.transpose(1, 2)
    theta = torch.randn(d, dtype=torch.float64)
    g_o = torch.randn(t, d, dtype=torch.float64)
    delta = torch.tensor([1e-3, 1e-2, 1e-1, 1.0], dtype=torch.float64)
    with ops.use_backend(every_backend):
        pts = ops.fd_hvp_points(theta, g_o, delta)
        grads = torch.cat([torch.einsum("tij,tj->ti", a, pts[:t]), torch.einsum("tij,tj->ti", a, pts[t:])])
        out = ops.fd_hvp_combine(g_o, grads[:t], grads[t:], delta, lr)
        per_task = ops.fd_hvp_combine(g_o, grads[:t], grads[t:], delta, lr, reduce="none")
    expected = (g_o - lr * torch.einsum("tij,tj->ti", a, g_o))
    torch.testing.assert_close(per_task, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out, expected.mean(0), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["reference", "cpp", "triton"])
def test_fd_hvp_gradcheck_and_opcheck(name):
    require(name, "fd_hvp_points")
    c = RowCase(3, 5, torch.float64)
    theta = make_vector(5, torch.float64).requires_grad_()
    v = make_rows(c, seed=1).requires_grad_()
    delta = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64, requires_grad=True)
    g_o, g_p, g_m = (make_rows(c, seed=s).requires_grad_() for s in (2, 3, 4))
    with ops.use_backend(name):
        assert torch.autograd.gradcheck(ops.fd_hvp_points, (theta, v, delta))
        assert torch.autograd.gradcheck(lambda th: ops.fd_hvp_points(th, v, delta), (make_rows(c, seed=9).requires_grad_(),))
        for reduce in ("mean", "none"):
            assert torch.autograd.gradcheck(lambda *a: ops.fd_hvp_combine(*a, 0.4, reduce), (g_o, g_p, g_m, delta))
        torch.library.opcheck(torch.ops.fastmeta_ops.fd_hvp_points.default, (theta, v, delta))
        torch.library.opcheck(torch.ops.fastmeta_ops.fd_hvp_combine.default, (g_o, g_p, g_m, delta, 0.4, True))
        torch.library.opcheck(torch.ops.fastmeta_ops.fd_hvp_combine.default, (g_o, g_p, g_m, delta, 0.4, False))
