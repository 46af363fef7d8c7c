import pytest
import torch

from fastmeta import ops
from fastmeta.testing import RowCase, as_float64, assert_oracle_close, make_rows, row_cases

from fastmeta.testing import require_backend as require

CASES = row_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_row_norm_matches_reference(backend, run_on, case):
    require(backend, "row_norm")
    g = make_rows(case, scale=3.0)
    out = run_on(backend, ops.row_norm, g)
    ref = run_on("reference", ops.row_norm, g)
    oracle = run_on("reference", ops.row_norm, *as_float64(g))
    # a sum of D squares in another order (blocks, vector lanes, threads) differs by up to ~log2(D)
    # ulps of the norm; it is the whole budget for float64, where the reference is the oracle
    assert_oracle_close(out, ref, oracle, ulps=16, what=f"{backend} {case.id}")
    if case.zero_row:
        assert out[0].item() == 0.0


def test_row_norm_known_values(every_backend, run_on):
    require(every_backend, "row_norm")
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]])
    assert run_on(every_backend, ops.row_norm, g).tolist() == [5.0, 0.0, 1.0]


def test_row_norm_long_rows_two_stage(every_backend, run_on):
    # T=2 rows of 50,000: fewer rows than 4x threads forces the split-D (two-stage) path in cpp.
    require(every_backend, "row_norm")
    g = torch.full((2, 50_000), 0.5, dtype=torch.float64)
    g[1] *= 2
    out = run_on(every_backend, ops.row_norm, g)
    expected = torch.tensor([0.5 * 50_000**0.5, 1.0 * 50_000**0.5], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["reference", "cpp", "triton"])
def test_row_norm_gradcheck_and_opcheck(name, run_on):
    require(name, "row_norm")
    g = make_rows(RowCase(3, 5, torch.float64)).requires_grad_()
    with ops.use_backend(name):
        assert torch.autograd.gradcheck(ops.row_norm, (g,))
        torch.library.opcheck(torch.ops.fastmeta_ops.row_norm.default, (g.detach().clone().requires_grad_(),))


def test_row_norm_zero_row_gradient_is_zero(every_backend, run_on):
    require(every_backend, "row_norm")
    g = torch.zeros(2, 4, dtype=torch.float64)
    g[1] = 1.0
    g.requires_grad_()
    with ops.use_backend(every_backend):
        ops.row_norm(g).sum().backward()
    assert torch.equal(g.grad[0], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(g.grad[1], torch.full((4,), 0.5, dtype=torch.float64))
