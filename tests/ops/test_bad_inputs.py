"""Bad inputs raise ValueError naming the offending argument (checked in the public wrappers)."""

import pytest
import torch

from fastmeta import ops

T, D = 3, 5
g = torch.randn(T, D)
theta = torch.randn(D)
f64 = torch.randn(T, D, dtype=torch.float64)
meta = torch.empty(T, D, device="meta")

CASES = [
    ("row_norm rank", lambda: ops.row_norm(torch.randn(D)), "g"),
    ("row_norm int", lambda: ops.row_norm(torch.ones(T, D, dtype=torch.int64)), "g"),
    ("sam g rank", lambda: ops.sam_perturb(theta, torch.randn(2, T, D), 0.1), "g"),
    ("sam g [D] without global", lambda: ops.sam_perturb(theta, torch.randn(D), 0.1), "g"),
    ("sam theta rank", lambda: ops.sam_perturb(torch.randn(1, 1, D), g, 0.1), "theta"),
    ("sam theta D", lambda: ops.sam_perturb(torch.randn(D + 1), g, 0.1), "theta"),
    ("sam theta T", lambda: ops.sam_perturb(torch.randn(T + 1, D), g, 0.1), "theta"),
    ("sam negative radius", lambda: ops.sam_perturb(theta, g, -0.1), "radius"),
    ("sam negative radius tensor", lambda: ops.sam_perturb(theta, g, torch.tensor([0.1, -0.1, 0.1])), "radius"),
    ("sam radius T", lambda: ops.sam_perturb(theta, g, torch.ones(T + 1)), "radius"),
    ("sam radius global", lambda: ops.sam_perturb(theta, g, torch.ones(T), global_norm=True), "radius"),
    ("sam mixed dtype", lambda: ops.sam_perturb(theta.double(), g, 0.1), "theta"),
    ("sam mixed device", lambda: ops.sam_perturb(theta, meta, 0.1), "theta"),
    ("sam mask shape", lambda: ops.sam_perturb(theta, g, 0.1, torch.ones(T, D + 1)), "mask"),
    ("sam mask dtype", lambda: ops.sam_perturb(theta, g, 0.1, torch.ones(T, D, dtype=torch.float64)), "mask"),
    ("sam eps", lambda: ops.sam_perturb(theta, g, 0.1, eps=0.0), "eps"),
    ("points v rank", lambda: ops.fd_hvp_points(theta, theta, 0.1), "v"),
    ("points theta T", lambda: ops.fd_hvp_points(torch.randn(T + 1, D), g, 0.1), "theta"),
    ("points zero delta", lambda: ops.fd_hvp_points(theta, g, 0.0), "delta"),
    ("points negative delta tensor", lambda: ops.fd_hvp_points(theta, g, torch.tensor([1.0, -1.0, 1.0])), "delta"),
    ("points delta T", lambda: ops.fd_hvp_points(theta, g, torch.ones(T - 1)), "delta"),
    ("points mixed dtype", lambda: ops.fd_hvp_points(theta, f64, 0.1), "theta"),
    ("combine T mismatch", lambda: ops.fd_hvp_combine(g, torch.randn(T + 1, D), g, 0.1, 0.5), "g_plus"),
    ("combine rank", lambda: ops.fd_hvp_combine(g, g, theta, 0.1, 0.5), "g_minus"),
    ("combine mixed dtype", lambda: ops.fd_hvp_combine(g, f64, g, 0.1, 0.5), "g_plus"),
    ("combine mixed device", lambda: ops.fd_hvp_combine(g, g, meta, 0.1, 0.5), "g_minus"),
    ("combine negative delta", lambda: ops.fd_hvp_combine(g, g, g, -1e-3, 0.5), "delta"),
    ("combine reduce", lambda: ops.fd_hvp_combine(g, g, g, 1e-3, 0.5, reduce="sum"), "reduce"),
    ("sds shapes", lambda: ops.sds_select(g, torch.randn(T + 1, D), 0.5), "loss_perturbed"),
    ("sds rank", lambda: ops.sds_select(theta, theta, 0.5), "loss_clean"),
    ("sds mixed dtype", lambda: ops.sds_select(g, f64, 0.5), "loss_perturbed"),
    ("sds ratio", lambda: ops.sds_select(g, g, 1.5), "ratio"),
    ("swp keep_prob", lambda: ops.swp_mask((T, D), 0.0, seed=0), "keep_prob"),
    ("bn_relu_pool x rank", lambda: ops.bn_relu_pool(torch.randn(3, 6, 6)), "x"),
    # Non-finite values in tensor radii/steps and a NaN inner_lr would make every row inf/NaN.
    ("sam inf radius tensor", lambda: ops.sam_perturb(theta, g, torch.tensor([0.1, float("inf"), 0.1])), "radius"),
    ("sam nan radius tensor", lambda: ops.sam_perturb(theta, g, torch.tensor([0.1, float("nan"), 0.1])), "radius"),
    ("points inf delta tensor", lambda: ops.fd_hvp_points(theta, g, torch.tensor([1.0, float("inf"), 1.0])), "delta"),
    ("combine inf delta tensor", lambda: ops.fd_hvp_combine(g, g, g, torch.full((T,), float("inf")), 0.5), "delta"),
    ("combine nan inner_lr", lambda: ops.fd_hvp_combine(g, g, g, 1e-3, float("nan")), "inner_lr"),
    ("combine inf inner_lr", lambda: ops.fd_hvp_combine(g, g, g, 1e-3, float("inf")), "inner_lr"),
]


@pytest.mark.parametrize("fn,name", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_names_argument(fn, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        fn()
