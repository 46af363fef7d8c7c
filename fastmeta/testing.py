"""Shared test helpers for the fused ops: case generators and tolerance rules.

Used by ``tests/ops`` and ``bench/bench_ops.py`` (so benchmarks check their outputs with the same
rule as the tests). The tolerance rule follows flash-attention's tests: a kernel's error against a
float64 oracle may be at most ``factor`` (2) times the error of the same-precision *reference*
implementation against that oracle, plus a few ulps of slack for ops whose reference is exact.
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


def assert_oracle_close(out: Tensor, ref: Tensor, oracle: Tensor, factor: float = 2.0, ulps: float = 16.0,
                        what: str = "") -> None:
    """Flash-attention rule: ``max|out - oracle| <= factor * max|ref - oracle| + ulps * eps * scale``.

    ``out`` is the kernel's result, ``ref`` the reference implementation in the same dtype, ``oracle``
    the reference in float64 on float64-converted inputs. The ulps term (scale = max|oracle|, at
    least 1) covers exact ops, and float64 inputs, where the reference *is* the oracle (zero error),
    so a kernel summing in another order (a few ulps per reduction) must still pass.
    """
    assert out.shape == oracle.shape, f"{what}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    if out.numel() == 0:
        return
    assert not bool(torch.isnan(out).any()) or bool(torch.isnan(oracle).any()), f"{what}: NaN in output"
    eps = torch.finfo(out.dtype).eps
    scale = max(1.0, float(oracle.double().abs().max()))
    ref_err = float((ref.double() - oracle.double()).abs().max())
    tol = factor * ref_err + ulps * eps * scale
    err = float((out.double() - oracle.double()).abs().max())
    assert err <= tol, (f"{what}: max error {err:.3e} vs float64 oracle exceeds {factor} x reference error "
                        f"{ref_err:.3e} + {ulps} ulps ({tol:.3e}); {first_mismatch(out, oracle, tol)}")


def seeds(n: int, start: int = 0) -> Iterator[int]:
    return iter(range(start, start + n))


def require_backend(backend: str, op: str, device: str = "cpu") -> None:
    """pytest.skip with the backend's own reason when ``backend`` cannot run ``op`` here."""
    import pytest

    from .ops import _backend

    reason = _backend.unavailable_reason(op, backend, device)
    if reason is not None:
        pytest.skip(f"{backend}/{op}: {reason}")
