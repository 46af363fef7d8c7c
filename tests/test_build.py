"""The native build: fastmeta._C imports, reports how it was built, and its row_norm kernel runs.

Skips (with the recorded reason) when the extension was not built, unless FASTMETA_REQUIRE_EXT=1
(CI sets it), in which case a missing extension is a failure.
"""

import os

import pytest
import torch

from fastmeta import _extension


@pytest.fixture(scope="module")
def ext():
    if not _extension.load():
        msg = f"native extension not available: {_extension.reason()}"
        if os.environ.get("FASTMETA_REQUIRE_EXT") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    from fastmeta import _C

    return _C


def test_build_info(ext):
    info = ext.build_info()
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["cxx_standard"] == "C++20"
    assert info["cxx11_abi"] == bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    assert info["openmp"], "built without OpenMP: at::parallel_for would run on one thread"
    merged = _extension.build_info()
    assert merged["extension_loaded"] is True
    assert merged["build_status"].get("ext") == "built"


def test_row_norm_kernel_runs(ext):
    g = torch.randn(5, 3000, dtype=torch.float64)
    torch.testing.assert_close(torch.ops.fastmeta.row_norm(g), torch.linalg.vector_norm(g, dim=1))
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastmeta::row_norm", "CPU")


def test_cuda_library_state_is_explained(ext):
    if _extension.cuda_library_loaded():
        assert torch._C._dispatch_has_kernel_for_dispatch_key("fastmeta::row_norm", "CUDA")
    else:
        assert _extension.cuda_reason()
