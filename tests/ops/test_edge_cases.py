"""One semantics on every backend for NaN inputs and zero tasks (T = 0).

* A NaN in a gradient row makes that row's norm NaN; ``sam_perturb`` then propagates it (the
  reference's ``clamp_min`` keeps NaN, so ``max(norm, eps)`` must not pick eps), never a finite
  perturbation that hides the NaN.
* The mean over zero tasks is NaN, as ``torch.mean`` of an empty tensor; every other op returns
  its empty result.

The cuda backend cannot run here; its kernels implement the same (csrc/cuda/sam_perturb_kernel.cu:
``norm < eps ? eps : norm``; fd_hvp_combine_kernel.cu writes NaN for T = 0).
"""

import pytest
import torch

from fastmeta import ops
from fastmeta.testing import require_backend

T, D = 3, 1030


@pytest.fixture(params=["reference", "cpp", "triton", "cuda"])
def any_backend(request):
    return request.param


def _grads(dtype):
    g = torch.randn(T, D, dtype=dtype, generator=torch.Generator().manual_seed(0))
    g[1, 517] = float("nan")
    return g


def _same(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.equal(out.isnan(), ref.isnan()), f"NaN at {out.isnan().nonzero().tolist()[:5]} vs reference " \
                                                   f"{ref.isnan().nonzero().tolist()[:5]}"
    torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("global_norm", [False, True])
def test_sam_perturb_propagates_a_nan_norm(any_backend, run_on, dtype, global_norm):
    require_backend(any_backend, "sam_perturb")
    g = _grads(dtype)
    theta = torch.zeros(D, dtype=dtype)
    ref = run_on("reference", ops.sam_perturb, theta, g, 0.05, global_norm=global_norm)
    assert ref[1].isnan().all() and (ref.isnan().all() if global_norm else not ref[0].isnan().any())
    _same(run_on(any_backend, ops.sam_perturb, theta, g, 0.05, global_norm=global_norm), ref)
    mask = torch.ones(T, D, dtype=dtype)
    _same(run_on(any_backend, ops.sam_perturb, theta, g, 0.05, mask, global_norm=global_norm),
          run_on("reference", ops.sam_perturb, theta, g, 0.05, mask, global_norm=global_norm))


def test_row_norm_of_a_nan_row_is_nan(any_backend, run_on):
    require_backend(any_backend, "row_norm")
    g = _grads(torch.float32)
    _same(run_on(any_backend, ops.row_norm, g), run_on("reference", ops.row_norm, g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fd_hvp_combine_mean_over_zero_tasks_is_nan(any_backend, run_on, dtype):
    require_backend(any_backend, "fd_hvp_combine")
    empty = torch.empty(0, D, dtype=dtype)
    ref = run_on("reference", ops.fd_hvp_combine, empty, empty, empty, 1e-2, 0.1)
    assert ref.shape == (D,) and ref.isnan().all()  # torch.mean of nothing
    out = run_on(any_backend, ops.fd_hvp_combine, empty, empty, empty, 1e-2, 0.1)
    assert out.shape == (D,) and out.dtype == dtype and out.isnan().all(), out[:8]
    none = run_on(any_backend, ops.fd_hvp_combine, empty, empty, empty, 1e-2, 0.1, reduce="none")
    assert none.shape == (0, D)


def test_every_op_on_zero_tasks(any_backend, run_on):
    require_backend(any_backend, "row_norm")
    empty = torch.empty(0, D)
    theta = torch.randn(D)
    assert run_on(any_backend, ops.row_norm, empty).shape == (0,)
    for global_norm in (False, True):
        assert run_on(any_backend, ops.sam_perturb, theta, empty, 0.1, global_norm=global_norm).shape == (0, D)
    assert run_on(any_backend, ops.fd_hvp_points, theta, empty, 0.1).shape == (0, D)
    assert run_on(any_backend, ops.sds_select, empty, empty, 0.5).shape == (0, D // 2)
    assert run_on(any_backend, ops.swp_mask, (0, D), 0.5, seed=1).shape == (0, D)
