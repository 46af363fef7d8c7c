"""torch.compile(fullgraph=True) through the public functions on CPU (cold compiles cost ~15 s
each, so there is exactly one compiled function covering three ops)."""

import torch

from fastmeta import ops


def test_compile_fullgraph_sharp_and_hf_step():
    def step(theta, g, g_o, g_p, g_m):
        perturbed = ops.sam_perturb(theta, g, 0.05)
        norms = ops.row_norm(perturbed)
        meta = ops.fd_hvp_combine(g_o, g_p, g_m, 1e-2, 0.1)
        return perturbed.sum(0) * 2 + meta, norms

    torch.manual_seed(0)
    theta = torch.randn(33)
    rows = [torch.randn(4, 33) for _ in range(4)]
    rows[0][1] = 0  # a zero gradient row inside the compiled graph
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    got = compiled(theta, *rows)
    with ops.use_backend("reference"):
        want = step(theta, *rows)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.isnan(got[0]).any()
