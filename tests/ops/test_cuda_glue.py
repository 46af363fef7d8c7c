"""The raw CUDA kernels' argument checks (csrc/cuda/cuda_glue.cpp), on a machine without a GPU.

The CUDA kernels are reached through the dispatcher with CPU tensors (``redispatch`` to the CUDA key):
the glue checks shapes and dtypes before devices, so a bad shape gets the same error naming the
argument as the CPU kernel, and good shapes reach the device check ("must be a CUDA tensor").
Also: the library's own build facts (``torch.ops.fastmeta_cuda.build_info``)."""

import json

import pytest
import torch

from fastmeta import _extension

pytestmark = pytest.mark.skipif(not _extension.cuda_library_loaded(),
                                reason=f"CUDA library not loaded: {_extension.cuda_reason()}")

T, D = 3, 5
f32 = dict(dtype=torch.float32)


def _on_cuda_kernel(op: str, *args):
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    return getattr(torch.ops.fastmeta, op).default.redispatch(keys, *args)


def _on_cpu_kernel(op: str, *args):
    return getattr(torch.ops.fastmeta, op).default(*args)


g = torch.randn(T, D)
theta = torch.randn(D)
ones = torch.ones(T)
CASES = [
    # (op, args, the argument the error must name); the CPU kernel refuses every case too
    ("row_norm", (torch.randn(D),), "g"),
    ("row_norm", (torch.ones(T, D, dtype=torch.int64),), "g"),
    ("sam_perturb", (theta, torch.randn(T), ones, None, 1e-12, False), "g"),
    ("sam_perturb", (torch.randn(D + 1), g, ones, None, 1e-12, False), "theta"),
    ("sam_perturb", (torch.randn(T + 1, D), g, ones, None, 1e-12, False), "theta"),
    ("sam_perturb", (theta.double(), g, ones, None, 1e-12, False), "theta"),
    ("sam_perturb", (theta, g, torch.ones(T + 1), None, 1e-12, False), "radius"),
    ("sam_perturb", (theta, g, ones, torch.ones(T, D + 1), 1e-12, False), "mask"),
    ("fd_hvp_points", (theta, torch.randn(D), ones), "v"),
    ("fd_hvp_points", (torch.randn(T + 1, D), g, ones), "theta"),
    ("fd_hvp_points", (theta.double(), g, ones), "theta"),
    ("fd_hvp_points", (theta, g, torch.ones(T - 1)), "delta"),
    ("fd_hvp_combine", (g, torch.randn(T + 1, D), g, ones, 0.5, True), "g_plus"),
    ("fd_hvp_combine", (g, g, torch.randn(T, D + 1), ones, 0.5, True), "g_minus"),
    ("fd_hvp_combine", (g, g.double(), g, ones, 0.5, True), "g_plus"),
    ("fd_hvp_combine", (g, g, g, torch.ones(T + 1), 0.5, False), "delta"),
    ("fd_hvp_combine", (torch.randn(D), torch.randn(D), torch.randn(D), ones, 0.5, True), "g_o"),
    ("sds_select", (g, torch.randn(T + 1, D), 2), "loss_perturbed"),
    ("sds_select", (g, g.double(), 2), "loss_perturbed"),
    ("sds_select", (g, g, D + 1), "k"),
    ("swp_mask", (torch.empty(T, D).T, 0.5, 1, False), "out"),
    ("swp_mask", (torch.empty(T, D), 1.5, 1, False), "keep_prob"),
]


@pytest.mark.parametrize("op,args,name", CASES, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_cuda_kernel_checks_shapes_like_the_cpu_kernel(op, args, name):
    with pytest.raises(RuntimeError, match=rf"\b{name}\b") as cuda_err:
        _on_cuda_kernel(op, *args)
    assert "CUDA tensor" not in str(cuda_err.value), "a shape error must come before the device check"
    with pytest.raises(RuntimeError):
        _on_cpu_kernel(op, *args)


GOOD = [
    ("row_norm", (g,), "g"),
    ("sam_perturb", (theta, g, ones, torch.ones(T, D), 1e-12, True), "g"),
    ("fd_hvp_points", (theta, g, ones), "v"),
    ("fd_hvp_combine", (g, g, g, ones, 0.5, True), "g_o"),
    ("fd_hvp_combine", (torch.empty(0, D), torch.empty(0, D), torch.empty(0, D), torch.ones(0), 0.5, True), "g_o"),
    ("sds_select", (g, g, 2), "loss_clean"),
    ("swp_mask", (torch.empty(T, D), 0.5, 1, False), "out"),
]


@pytest.mark.parametrize("op,args,name", GOOD, ids=[f"{c[0]}-{i}" for i, c in enumerate(GOOD)])
def test_cuda_kernel_refuses_cpu_operands(op, args, name):
    with pytest.raises(RuntimeError, match=rf"{name} must be a CUDA tensor"):
        _on_cuda_kernel(op, *args)


def test_cuda_library_build_info():
    info = json.loads(torch.ops.fastmeta_cuda.build_info())
    assert info["cuda_runtime"] >= 11000
    assert info["archs"] and all(a >= 800 for a in info["archs"]), info  # sm_80 and up (CMakeLists.txt)
    status = _extension.build_status()
    if status.get("nvcc_version"):
        major, minor = (int(x) for x in status["nvcc_version"].split(".")[:2])
        assert (info["cuda_runtime"] // 1000, info["cuda_runtime"] % 1000 // 10) == (major, minor)
