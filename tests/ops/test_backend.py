"""Dispatch: precedence (context > env > device default), explicit choices never fall back, the
op x backend table, the CUDA kernel registrations, and cold imports without the extension/triton."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmeta import _extension, ops
from fastmeta.ops import _backend
from fastmeta.testing import cpu_unavailable_reason

ROOT = Path(__file__).resolve().parents[2]


def test_default_cpu_backend_prefers_cpp():
    expected = "cpp" if _extension.available() else "reference"
    assert ops.resolve("sam_perturb", "cpu") == expected


def test_context_beats_env(monkeypatch):
    monkeypatch.setenv("FASTMETA_BACKEND", "reference")
    assert ops.resolve("row_norm", "cpu") == "reference"
    if _extension.available():
        with ops.use_backend("cpp"):
            assert ops.resolve("row_norm", "cpu") == "cpp"
            with ops.use_backend("reference"):
                assert ops.resolve("row_norm", "cpu") == "reference"
            assert ops.resolve("row_norm", "cpu") == "cpp"
    assert ops.resolve("row_norm", "cpu") == "reference"


def test_env_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTMETA_BACKEND", "fortran")
    with pytest.raises(ValueError, match="FASTMETA_BACKEND"):
        ops.row_norm(torch.ones(2, 2))
    with pytest.raises(ValueError, match="use_backend"):
        with ops.use_backend("fortran"):
            pass


def test_explicit_backend_that_cannot_run_raises_with_reason(monkeypatch):
    with ops.use_backend("cuda"):
        with pytest.raises(ops.BackendUnavailableError, match="cuda.*CUDA tensors"):
            ops.row_norm(torch.ones(2, 2))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with ops.use_backend("triton"):
        with pytest.raises(ops.BackendUnavailableError, match="TRITON_INTERPRET|triton is not installed"):
            ops.sam_perturb(torch.ones(2), torch.ones(2, 2), 0.1)


def test_which_backend_ran_is_the_chosen_one(monkeypatch):
    calls = []
    original = _backend._impls["row_norm"]["reference"]
    monkeypatch.setitem(_backend._impls["row_norm"], "reference", lambda g: calls.append(1) or original(g))
    with ops.use_backend("reference"):
        ops.row_norm(torch.ones(2, 3))
    assert calls == [1]


def test_custom_op_layer_is_skipped_only_when_nothing_needs_it(monkeypatch):
    """Without autograd the public op calls the backend impl directly; with it, through the custom op
    (whose autograd formula then runs: d out / d theta = I summed over the broadcast rows)."""
    module = importlib.import_module("fastmeta.ops.sam_perturb")  # the package re-exports the function
    entered = []
    original = module._sam_perturb_op
    monkeypatch.setattr(module, "_sam_perturb_op", lambda *a: entered.append(1) or original(*a))
    theta, g = torch.randn(5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    direct = ops.sam_perturb(theta, g, 0.1)
    assert entered == []
    with torch.no_grad():
        ops.sam_perturb(theta.requires_grad_(), g, 0.1)
    assert entered == []
    out = ops.sam_perturb(theta, g, 0.1)
    assert entered == [1]
    torch.testing.assert_close(out.detach(), direct, rtol=0, atol=0)
    out.sum().backward()
    torch.testing.assert_close(theta.grad, torch.full_like(theta, 3.0))


def test_resolution_is_cached_but_follows_the_context_and_env(monkeypatch):
    monkeypatch.delenv("FASTMETA_BACKEND", raising=False)
    first = ops.resolve("row_norm", "cpu")
    with ops.use_backend("reference"):
        assert ops.resolve("row_norm", "cpu") == "reference"
    monkeypatch.setenv("FASTMETA_BACKEND", "reference")
    assert ops.resolve("row_norm", torch.device("cpu")) == "reference"
    monkeypatch.delenv("FASTMETA_BACKEND")
    assert ops.resolve("row_norm", "cpu") == first


def test_support_table_has_a_reason_for_every_unavailable_cell():
    table = ops.support_table("cpu")
    assert set(table) == set(_backend.OPS)
    for op, cells in table.items():
        assert set(cells) == set(_backend.BACKENDS)
        assert cells["reference"] is None
        assert cells["cuda"]  # never runnable on CPU tensors, and says why
    assert "reference" in ops.available_backends("cpu")


def test_info_command_prints_table():
    out = subprocess.run([sys.executable, "-m", "fastmeta.info"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "op x backend on cpu" in out.stdout and "sds_select" in out.stdout
    assert "native extension" in out.stdout


@pytest.mark.skipif(not _extension.cuda_library_loaded(), reason=f"CUDA library not loaded: {_extension.cuda_reason()}")
def test_cuda_kernels_registered_for_every_op():
    # Every op the table does not mark "not implemented" for cuda (bn_relu_pool: CPU only).
    for op in _backend.OPS:
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmeta::{op}", "CUDA")
        assert has_cuda == ((op, "cuda") not in _backend.NOT_IMPLEMENTED), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmeta::{op}", "CPU"), op


COLD = r"""
import sys
{block}
import torch, fastmeta
from fastmeta import ops, _extension
assert not _extension.available(), "extension should be blocked"
print("REASON:", _extension.reason())
assert ops.resolve("sam_perturb", "cpu") == "reference"
g = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
out = ops.sam_perturb(torch.zeros(2), g, 1.0)
assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.0, 0.0]])), out
assert ops.row_norm(g).tolist() == [5.0, 0.0]
assert ops.sds_select(torch.zeros(1, 3), torch.tensor([[1.0, 3.0, 2.0]]), 0.67).tolist() == [[1, 2]]
assert sys.modules.get("triton") is None or {allow_triton}
print("TRITON:", ops.unavailable_reason("row_norm", "triton", "cpu"))
"""


@pytest.mark.parametrize("how", ["env", "hidden-module"])
def test_cold_import_without_extension_or_triton(how):
    if how == "env":
        block, env = "", {"FASTMETA_NO_EXT": "1"}
    else:  # an unimportable _C and no triton at all, as on a machine where neither was installed
        block = "sys.modules['fastmeta._C'] = None\nsys.modules['triton'] = None"
        env = {}
    env = {**os.environ, "TRITON_INTERPRET": "1", **env}
    env.pop("FASTMETA_BACKEND", None)
    code = COLD.format(block=block, allow_triton=how == "env")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    if how == "env":
        assert "FASTMETA_NO_EXT" in out.stdout
    else:
        assert "not importable" in out.stdout
        assert "TRITON: importing" in out.stdout or "not installed" in out.stdout


def test_cuda_backend_answers_per_device_compute_capability(monkeypatch):
    """cuda:0 an H100 (9.0), cuda:1 a T4 (7.5): the kernels (sm_80, sm_90) run on the first only; a T4
    must get the reason, not "no kernel image is available" at the first launch."""
    if not _extension.cuda_library_loaded():
        pytest.skip(f"CUDA library not loaded: {_extension.cuda_reason()}")
    capability = {0: (9, 0), 1: (7, 5)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: capability[1 if i is None else int(i)])
    monkeypatch.setattr(torch.version, "cuda", _cuda_version_built() or torch.version.cuda)
    monkeypatch.setattr(_backend, "_resolved", {})
    assert ops.unavailable_reason("row_norm", "cuda", "cuda:0") is None
    reason = ops.unavailable_reason("row_norm", "cuda", "cuda:1")
    assert reason is not None and "compute capability 7.5 < 8.0" in reason and "sm_80" in reason, reason
    assert ops.unavailable_reason("row_norm", "cuda", "cuda") == reason  # the current device, cuda:1
    assert "no CUDA device cuda:2" in ops.unavailable_reason("row_norm", "cuda", "cuda:2")
    with ops.use_backend("cuda"):
        assert ops.resolve("row_norm", torch.device("cuda", 0)) == "cuda"
        with pytest.raises(ops.BackendUnavailableError, match=r"cuda:1.*compute capability 7\.5"):
            ops.resolve("row_norm", torch.device("cuda", 1))


def _cuda_version_built():
    from fastmeta.ops import _cuda_support as _cuda

    return _cuda.built_cuda_version()


def test_cuda_capability_and_version_rules():
    from fastmeta.ops import _cuda_support as _cuda

    archs = ((8, 0), (9, 0))
    assert _cuda.capability_reason((7, 5), archs) == \
        "not supported because compute capability 7.5 < 8.0 (kernels built for sm_80, sm_90)"
    assert "7.0 < 8.0" in _cuda.capability_reason((7, 0), archs)
    for ok in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)):
        assert _cuda.capability_reason(ok, archs) is None, ok
    assert _cuda.version_reason("13.0", "13.0") is None
    assert _cuda.version_reason("12.4", "12.8") is None  # older minor: CUDA minor-version compatibility
    assert "compiled with CUDA 12.4 (nvcc) but torch runs CUDA 13.0" in _cuda.version_reason("12.4", "13.0")
    assert "13.2" in _cuda.version_reason("13.2", "13.0")  # newer than torch's runtime
    assert _cuda.version_reason(None, "13.0") is None and _cuda.version_reason("13.0", None) is None


@pytest.mark.skipif(not _extension.cuda_library_loaded(), reason=f"CUDA library not loaded: {_extension.cuda_reason()}")
def test_cuda_library_reports_what_it_was_built_with():
    from fastmeta.ops import _cuda_support as _cuda

    assert _cuda.built_archs() == ((8, 0), (9, 0))  # CMakeLists.txt: CMAKE_CUDA_ARCHITECTURES 80 90
    built = _cuda.built_cuda_version()
    assert built and built == (_extension.build_status().get("nvcc_version") or built)


@pytest.mark.parametrize("backend_name", _backend.BACKENDS)
def test_backend_runs_here_or_is_skipped_once(backend_name):
    """One line per backend: a backend that cannot run on CPU here has its cases deselected at
    collection (tests/ops/conftest.py) and reports its reason once, here."""
    reason = cpu_unavailable_reason(backend_name)
    if reason is not None:
        assert backend_name not in ops.available_backends("cpu")
        pytest.skip(f"{backend_name} backend cannot run on CPU here, its cases are deselected: {reason}")
    assert any(backend_name in ops.available_backends("cpu", op) for op in _backend.OPS)
