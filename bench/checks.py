"""Gradient checks: before an implementation is timed, its meta-gradient is compared with the plain
per-task loop's on a fixed seed, so a fast wrong result is reported as wrong, never timed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from oracle import rel_err
from peers import make_plain
from workloads import Workload

# Relative error against the float64 plain loop that counts as "the same meta-gradient". Exact
# implementations land at 1e-15..1e-12 (summation order only).
GRAD_TOL = 1e-9
BF16_TOL = dict(rel_err=0.3, cos=0.98)


def check_gradient(wl: Workload, make, first_order: bool, bf16: bool = False, tasks: int = 2) -> dict:
    """Compare one implementation's meta-gradient with the plain loop's on a fixed seed.

    Exact implementations are checked in float64 (rel. error < ``GRAD_TOL``). A bf16 mode cannot
    run in float64, so it is checked against the float64 plain loop with the bf16 tolerances
    ``BF16_TOL``: bf16 keeps 8 mantissa bits (~4e-3 per rounding), and a second-order Conv-4
    meta-gradient through four batch norms measured 0.10-0.20 relative error (cosine ~0.99) here.
    That only says the direction is right; bf16's usefulness is judged by meta-test accuracy.
    Returns ``{"ok", "rel_err", "cos", "tol", "dtype"}``.
    """
    wl = wl.extra.get("check_twin", wl)  # large networks are checked on their float64-affordable twin
    n = min(tasks, wl.meta_batch)
    ref = make_plain(wl, wl.model(torch.float64), wl.batch(torch.float64, num_tasks=n), first_order)()
    if make is make_plain:
        # The bench's own loop is the oracle: check it against the tests' independently written one
        # (tests/reference.py) rather than against itself.
        from fastmeta.params import ParamLayout
        from oracle import flat, reference as tests_reference
        from workloads import loss_of
        m64, b64 = wl.model(torch.float64), wl.batch(torch.float64, num_tasks=n)
        names = [k for k, _ in m64.named_parameters()]
        ref = flat(tests_reference.maml_meta_grad(m64, b64, loss_of(wl), wl.inner_lr, 1, names, first_order),
                   ParamLayout(m64, "all"))
    dtype = torch.float32 if bf16 else torch.float64
    got = make(wl, wl.model(dtype), wl.batch(dtype, num_tasks=n), first_order)()
    err = rel_err(got.double(), ref)
    tol = BF16_TOL["rel_err"] if bf16 else GRAD_TOL
    cos = float(F.cosine_similarity(got.double(), ref, dim=0))
    ok = bool(math.isfinite(err) and err < tol and (not bf16 or cos > BF16_TOL["cos"]))
    return dict(ok=ok, rel_err=err, cos=cos, tol=tol, dtype=str(dtype).replace("torch.", ""))
