import pytest
import torch

from fastmeta import ops
from fastmeta.testing import RowCase, as_float64, assert_oracle_close, make_rows, make_vector, row_cases

from fastmeta.testing import require_backend as require

CASES = row_cases()


def _inputs(case, theta_rows: bool):
    g = make_rows(case, seed=0)
    theta = make_rows(RowCase(case.t, case.d, case.dtype, noncontiguous=case.noncontiguous), seed=1) if theta_rows \
        else make_vector(case.d, case.dtype, noncontiguous=case.noncontiguous)
    return theta, g


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_sam_perturb_matches_reference(backend, run_on, case):
    require(backend, "sam_perturb")
    for theta_rows in (False, True):
        theta, g = _inputs(case, theta_rows)
        out = run_on(backend, ops.sam_perturb, theta, g, 0.05)
        ref = run_on("reference", ops.sam_perturb, theta, g, 0.05)
        oracle = run_on("reference", ops.sam_perturb, *as_float64(theta, g), 0.05)
        assert_oracle_close(out, ref, oracle, base=theta, what=f"{backend} {case.id} theta_rows={theta_rows}")
        if case.zero_row:
            # zero gradient row -> zero perturbation, exactly theta, never NaN
            assert torch.equal(out[0], (theta[0] if theta_rows else theta))


MASK_CASES = [RowCase(3, 1025, torch.float32), RowCase(8, 4099, torch.float64), RowCase(1, 7, torch.float32),
              RowCase(3, 1025, torch.float32, zero_row=True, noncontiguous=True)]


@pytest.mark.parametrize("case", MASK_CASES, ids=[c.id for c in MASK_CASES])
@pytest.mark.parametrize("rescale", [False, True])
def test_sam_perturb_masked_and_per_task_radius(backend, run_on, case, rescale):
    require(backend, "sam_perturb")
    theta, g = _inputs(case, theta_rows=False)
    mask = ops.swp_mask((case.t, case.d), 0.5, seed=3, rescale=rescale, dtype=case.dtype)
    radius = torch.linspace(0.01, 0.3, case.t, dtype=case.dtype)
    out = run_on(backend, ops.sam_perturb, theta, g, radius, mask)
    ref = run_on("reference", ops.sam_perturb, theta, g, radius, mask)
    oracle = run_on("reference", ops.sam_perturb, *as_float64(theta, g, radius, mask))
    assert_oracle_close(out, ref, oracle, base=theta, what=f"{backend} {case.id} masked")
    dropped = mask == 0
    assert torch.equal(out[dropped], theta.expand_as(out)[dropped])  # masked-out entries are not moved


GLOBAL_CASES = [RowCase(1, 7, torch.float32), RowCase(3, 1025, torch.float64), RowCase(8, 4099, torch.float32),
                RowCase(2, 40_000, torch.float32)]


@pytest.mark.parametrize("case", GLOBAL_CASES, ids=[c.id for c in GLOBAL_CASES])
def test_sam_perturb_global_norm(backend, run_on, case):
    require(backend, "sam_perturb")
    theta, g = _inputs(case, theta_rows=True)
    out = run_on(backend, ops.sam_perturb, theta, g, 0.1, global_norm=True)
    ref = run_on("reference", ops.sam_perturb, theta, g, 0.1, global_norm=True)
    oracle = run_on("reference", ops.sam_perturb, *as_float64(theta, g), 0.1, global_norm=True)
    assert_oracle_close(out, ref, oracle, base=theta, what=f"{backend} {case.id} global")
    # the whole perturbation has norm radius (Sharp-MAML eq. 13: ||eps|| = alpha over all parameters)
    assert abs(float(torch.linalg.vector_norm((out - theta).double())) - 0.1) < 1e-5
    # a single [D] meta-gradient
    v = g[0].contiguous()
    out1 = run_on(backend, ops.sam_perturb, theta[0], v, 0.1, global_norm=True)
    assert out1.shape == (case.d,)
    assert_oracle_close(out1, run_on("reference", ops.sam_perturb, theta[0], v, 0.1, global_norm=True),
                        run_on("reference", ops.sam_perturb, *as_float64(theta[0], v), 0.1, global_norm=True),
                        base=theta[0])


def test_sam_perturb_known_values(every_backend, run_on):
    require(every_backend, "sam_perturb")
    theta = torch.tensor([1.0, 1.0])
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]])
    out = run_on(every_backend, ops.sam_perturb, theta, g, 0.5)
    torch.testing.assert_close(out, torch.tensor([[1.3, 1.4], [1.0, 1.0], [1.0, 0.5]]))
    mask = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    out = run_on(every_backend, ops.sam_perturb, theta, g, 0.5, mask)
    torch.testing.assert_close(out[0], torch.tensor([1.0, 1.5]))  # ||g*m|| = 4, not 5
    out = run_on(every_backend, ops.sam_perturb, theta, g, 1.0, global_norm=True)  # ||g|| over all = sqrt(29)
    torch.testing.assert_close(out[2], torch.tensor([1.0, 1.0 - 2.0 / 29**0.5]))


@pytest.mark.parametrize("name", ["reference", "cpp", "triton"])
def test_sam_perturb_autograd_identity_to_theta(name):
    require(name, "sam_perturb")
    theta = make_vector(6, torch.float64).requires_grad_()
    g = make_rows(RowCase(3, 6, torch.float64)).requires_grad_()
    with ops.use_backend(name):
        assert torch.autograd.gradcheck(lambda th: ops.sam_perturb(th, g.detach(), 0.3), (theta,))
        out = ops.sam_perturb(theta, g, 0.3)
        (out * torch.arange(6.0, dtype=torch.float64)).sum().backward()
        torch.library.opcheck(torch.ops.fastmeta_ops.sam_perturb.default,
                              (theta.detach().requires_grad_(), g.detach(), torch.full((3,), 0.3, dtype=torch.float64),
                               None, 1e-12, False))
    torch.testing.assert_close(theta.grad, 3 * torch.arange(6.0, dtype=torch.float64))
    assert g.grad is None  # the perturbation is a constant (Sharp-MAML eq. 10)
