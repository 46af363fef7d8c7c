"""The cpp backend's inner loops (csrc/cpu/vec/) on every instruction set this CPU runs, and with
and without non-temporal (streaming) stores. The main op tests run whichever ISA the dispatcher
picks and never reach the streaming path at their sizes; here both are forced."""
import pytest
import torch

from fastmeta import _extension, ops
from fastmeta.testing import RowCase, as_float64, assert_oracle_close, make_rows, make_vector, row_cases

if not _extension.available():  # only when opted out (FASTMETA_NO_EXT=1); else tests/conftest.py stops the run
    pytest.skip(f"native extension unavailable: {_extension.reason()}", allow_module_level=True)

from fastmeta import _C  # noqa: E402

ISAS = _C.build_info()["cpu_isas_supported"].split(",")
CASES = [c for c in row_cases() if c.t in (1, 8) or c.zero_row or c.noncontiguous]


@pytest.fixture(params=["cached", "streamed"])
def stream(request):
    # Threshold 0: every output is written with non-temporal stores; a huge one: never.
    old = _C._set_stream_threshold_bytes(0 if request.param == "streamed" else 1 << 62)
    try:
        yield request.param
    finally:
        _C._set_stream_threshold_bytes(old)


def _cpp(fn, *args, **kwargs):
    with ops.use_backend("cpp"):
        return fn(*args, **kwargs)


def _ref(fn, *args, **kwargs):
    with ops.use_backend("reference"):
        return fn(*args, **kwargs)


def test_isa_hooks_report_and_reject():
    assert ISAS[-1] == "default"
    assert _C._cpu_isa() in ISAS
    assert _C.build_info()["cpu_isa"] == _C._cpu_isa()
    assert not _C._set_cpu_isa("avx9000")
    if "avx2" not in ISAS:
        assert not _C._set_cpu_isa("avx2")  # never runs an instruction set the CPU lacks
    assert _C._set_cpu_isa("default") and _C._cpu_isa() == "default"
    _C._set_cpu_isa("")
    assert _C._cpu_isa() == ISAS[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_row_kernels_match_reference(isa, stream, case):
    g = make_rows(case, seed=0)
    theta = make_vector(case.d, case.dtype, noncontiguous=case.noncontiguous)
    theta_rows = make_rows(RowCase(case.t, case.d, case.dtype, noncontiguous=case.noncontiguous), seed=1)
    mask = ops.swp_mask((case.t, case.d), 0.5, seed=3, dtype=case.dtype)
    radius = torch.linspace(0.01, 0.3, case.t, dtype=case.dtype)
    what = f"{isa} {stream} {case.id}"
    for args, kw in [((theta, g, 0.05), {}), ((theta_rows, g, radius, mask), {}),
                     ((theta_rows, g, 0.1), {"global_norm": True})]:
        out = _cpp(ops.sam_perturb, *args, **kw)
        # compared on the perturbation out - theta, the quantity the kernel computes
        assert_oracle_close(out, _ref(ops.sam_perturb, *args, **kw),
                            _ref(ops.sam_perturb, *as_float64(*args), **kw), base=args[0], what=what)
        if case.zero_row and "global_norm" not in kw:
            assert torch.equal(out[0], args[0] if args[0].dim() == 1 else args[0][0])
    # a norm summed in another order: up to ~log2(D) ulps apart (test_row_norm.py)
    assert_oracle_close(_cpp(ops.row_norm, g), _ref(ops.row_norm, g), _ref(ops.row_norm, g.double()), ulps=16,
                        what=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 7, 1029, 40_003])
def test_streamed_and_cached_stores_round_identically(isa, dtype, d):
    # Streaming changes only how the output is stored, never the arithmetic (mul then add, no FMA):
    # results must be bit-identical, at every alignment of the row starts (odd D shifts them).
    g = make_rows(RowCase(5, d, dtype), seed=0)
    theta = make_vector(d, dtype)
    outs = []
    for threshold in (1 << 62, 0):
        old = _C._set_stream_threshold_bytes(threshold)
        try:
            outs.append(_cpp(ops.sam_perturb, theta, g, 0.05))
        finally:
            _C._set_stream_threshold_bytes(old)
    assert torch.equal(outs[0], outs[1])


def test_isas_agree_to_rounding():
    if len(ISAS) < 2:
        pytest.skip("only the baseline instruction set runs here")
    g = make_rows(RowCase(8, 4099, torch.float32), seed=0)
    theta = make_vector(4099, torch.float32)
    outs = {}
    for name in ISAS:
        assert _C._set_cpu_isa(name)
        try:
            outs[name] = (_cpp(ops.sam_perturb, theta, g, 0.05), _cpp(ops.row_norm, g))
        finally:
            _C._set_cpu_isa("")
    a, b = outs[ISAS[0]], outs["default"]
    # Same lanes, same block order: only the vector width changes which partial sums pair up.
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-7)
