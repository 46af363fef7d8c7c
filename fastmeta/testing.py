"""Shared test helpers for the fused ops: case generators and tolerance rules.

Used by ``tests/ops`` and ``bench/bench_ops.py`` (so benchmarks check their outputs with the same
rule as the tests). The tolerance rule (:func:`oracle_tolerance`) follows flash-attention's tests:
a kernel's error against a float64 oracle, measured on the quantity that matters, may be at most
``factor`` (2) times the error of the same-precision *reference* implementation against that
oracle, plus a few ulps of the stored output for ops whose reference is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

# Sizes straddling block multiples (1024, 4096/8192 element blocks), T = 1 included.
CASE_T = (1, 3, 8)
CASE_D = (1, 7, 1023, 1024, 1025, 4099)
DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class RowCase:
    """One ``[T, D]`` case: sizes, dtype, whether row 0 is zero, whether inputs are non-contiguous."""

    t: int
    d: int
    dtype: torch.dtype = torch.float32
    zero_row: bool = False
    noncontiguous: bool = False

    @property
    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"T{self.t}-D{self.d}-{dt}{'-zero' if self.zero_row else ''}{'-strided' if self.noncontiguous else ''}"


def row_cases(ts=CASE_T, ds=CASE_D, dtypes=DTYPES) -> list[RowCase]:
    """The full grid plus zero-row and non-contiguous variants (kept small: they reuse sizes)."""
    cases = [RowCase(t, d, dt) for t in ts for d in ds for dt in dtypes]
    cases += [RowCase(3, 1025, dt, zero_row=True) for dt in dtypes]
    cases += [RowCase(1, 7, torch.float32, zero_row=True)]
    cases += [RowCase(3, 1025, dt, noncontiguous=True) for dt in dtypes]
    cases += [RowCase(8, 4099, torch.float32, zero_row=True, noncontiguous=True)]
    return cases


def make_rows(case: RowCase, seed: int = 0, scale: float = 1.0, device: str | torch.device = "cpu",
              zero: bool | None = None) -> Tensor:
    """A random ``[T, D]`` tensor for ``case``: row 0 zeroed if ``zero_row``; a transposed view
    (non-contiguous, stride (1, T)) if ``noncontiguous``."""
    gen = torch.Generator().manual_seed(seed)
    if case.noncontiguous:
        x = (torch.randn(case.d, case.t, generator=gen, dtype=torch.float64) * scale).to(case.dtype).T
    else:
        x = (torch.randn(case.t, case.d, generator=gen, dtype=torch.float64) * scale).to(case.dtype)
    if case.zero_row if zero is None else zero:
        x[0] = 0
    x = x.to(device)
    assert x.is_contiguous() != case.noncontiguous or case.t == 1 or case.d == 1
    return x


def make_vector(d: int, dtype: torch.dtype, seed: int = 1, noncontiguous: bool = False) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    if noncontiguous:
        return torch.randn(2 * d, generator=gen, dtype=torch.float64).to(dtype)[::2]
    return torch.randn(d, generator=gen, dtype=torch.float64).to(dtype)


def as_float64(*xs):
    return tuple(x.double() if isinstance(x, Tensor) and x.is_floating_point() else x for x in xs)


def first_mismatch(actual: Tensor, expected: Tensor, tol: Tensor | float) -> str:
    """Human-readable first index where ``|actual - expected| > tol`` (Liger's verbose allclose)."""
    err = (actual.double() - expected.double()).abs()
    bad = ~(err <= tol)
    if not bool(bad.any()):
        return "no mismatch"
    idx = tuple(int(i) for i in bad.nonzero()[0])
    tol_at = tol[idx] if isinstance(tol, Tensor) and tol.dim() > 0 else tol
    return (f"{int(bad.sum())}/{bad.numel()} elements differ; first at {idx}: actual {actual[idx].item()!r}, "
            f"expected {expected[idx].item()!r}, |diff| {err[idx].item():.3e} > tol {float(tol_at):.3e}")


def oracle_tolerance(ref: Tensor, oracle: Tensor, factor: float = 2.0, ulps: float = 2.0,
                     base: Tensor | None = None, stored: Tensor | None = None) -> float:
    """The one tolerance rule of the op tests: ``factor * max|q(ref) - q(oracle)| + ulps * eps * S``.

    ``q(x) = x - base`` when ``base`` is given (the quantity that matters, e.g. ``sam_perturb``'s
    perturbation ``eps = out - theta``: its entries are ~1e-3 while theta's are ~1, so a tolerance
    taken on ``theta + eps`` would let a 0.5% error in ``eps`` pass), else ``q(x) = x``.

    * ``factor * max|q(ref) - q(oracle)|``: the flash-attention rule. ``ref`` is the reference
      implementation run in the kernel's own dtype, ``oracle`` the reference in float64 on
      float64-converted inputs; the error the same-precision reference makes is what the dtype
      costs, and a kernel may make at most ``factor`` times that.
    * ``ulps * eps * S``, ``S = max|stored|`` (default: ``max|oracle|``, no floor): the rounding of
      the stored output itself, which the reference can escape by chance on a small case, and the
      whole budget where the reference *is* the oracle (float64 inputs: zero reference error), so a
      kernel summing in another order (a few ulps per reduction) still passes. Ops that amplify
      input rounding (a difference quotient) pass a larger ``ulps`` with the factor stated.
    """
    o64 = oracle.double()
    q_ref, q_oracle = ref.double(), o64
    if base is not None:
        b = base.double()
        q_ref, q_oracle = q_ref - b, q_oracle - b
    eps = torch.finfo(ref.dtype).eps
    scale = float((o64 if stored is None else stored.double()).abs().max()) if o64.numel() else 0.0
    return factor * float((q_ref - q_oracle).abs().max()) + ulps * eps * scale


def assert_oracle_close(out: Tensor, ref: Tensor, oracle: Tensor, factor: float = 2.0, ulps: float = 2.0,
                        what: str = "", base: Tensor | None = None) -> None:
    """``max|q(out) - q(oracle)| <= oracle_tolerance(ref, oracle, factor, ulps, base)``.

    ``out`` is the kernel's result, ``ref`` the reference implementation in the same dtype, ``oracle``
    the reference in float64 on float64-converted inputs; ``base`` (broadcastable to ``out``) makes
    the compared quantity ``x - base`` (see :func:`oracle_tolerance`, the rule and its terms).
    """
    assert out.shape == oracle.shape, f"{what}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    if out.numel() == 0:
        return
    assert not bool(torch.isnan(out).any()) or bool(torch.isnan(oracle).any()), f"{what}: NaN in output"
    tol = oracle_tolerance(ref, oracle, factor, ulps, base)
    q_out, q_oracle = out.double(), oracle.double()
    if base is not None:
        q_out, q_oracle = q_out - base.double(), q_oracle - base.double()
    err = float((q_out - q_oracle).abs().max())
    quantity = "x - base" if base is not None else "x"
    assert err <= tol, (f"{what}: max error of {quantity} {err:.3e} vs float64 oracle exceeds {factor} x reference "
                        f"error + {ulps} ulps of the output ({tol:.3e}); {first_mismatch(q_out, q_oracle, tol)}")


def seeds(n: int, start: int = 0) -> Iterator[int]:
    return iter(range(start, start + n))


def cpu_unavailable_reason(backend: str) -> str | None:
    """Why ``backend`` runs none of the ops on CPU tensors here; None when it runs at least one."""
    from .ops import _backend

    reasons = [_backend.unavailable_reason(op, backend, "cpu") for op in _backend.OPS]
    return None if any(r is None for r in reasons) else next(r for r in reasons if r is not None)


def require_backend(backend: str, op: str, device: str = "cpu") -> None:
    """pytest.skip with the backend's own reason when ``backend`` cannot run ``op`` here."""
    import pytest

    from .ops import _backend

    reason = _backend.unavailable_reason(op, backend, device)
    if reason is not None:
        pytest.skip(f"{backend}/{op}: {reason}")
