import os

# Triton reads this when its kernels are defined, i.e. at import: set it before anything imports
# triton (the README/CI command also sets it in the environment).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (`-n 2`, the README command) each worker is one process on a 2-core machine:
# two workers x two OpenMP threads oversubscribe the cores (measured 10x slower steps), so a worker
# uses one thread. Must happen before torch is imported to reach OpenMP.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # in case torch was imported before this file (see above)

SHARED_OMNIGLOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"


def missing_extension_error() -> str | None:
    """Why the test run must stop: the native extension is missing although nobody opted out of it.

    Without this check a broken local build would skip every cpp case (test_cpu_isa.py,
    test_build.py, the cpp backend's op cases) and look like a green run. Opting out is explicit:
    ``FASTMETA_NO_EXT=1`` now, or at install time (the build record then says ``skipped``). None
    when the run may go on.
    """
    from fastmeta import _extension

    if _extension.available() or _extension.opted_out():
        return None
    return (f"the native extension fastmeta._C is missing: {_extension.reason()}.\n"
            "Build it (pip install --no-build-isolation -e .; see docs/building.md), or run the tests without "
            "it on purpose with FASTMETA_NO_EXT=1 (its cpp cases are then deselected).")


def pytest_configure(config):
    error = missing_extension_error()
    if error is not None:
        raise pytest.UsageError(error)


@pytest.fixture(scope="session")
def omniglot_zips():
    """The real Omniglot subsets shipped beside the project (never part of the package)."""
    zips = sorted(SHARED_OMNIGLOT.glob("images_background_small*.zip"))
    if len(zips) < 2:
        pytest.skip(f"Omniglot subsets not found in {SHARED_OMNIGLOT}")
    return zips


@pytest.fixture(scope="session")
def omniglot_dir(omniglot_zips, tmp_path_factory):
    """The same subsets unpacked into the standard directory layout."""
    out = tmp_path_factory.mktemp("omniglot")
    for z in omniglot_zips:
        with zipfile.ZipFile(z) as zf:
            zf.extractall(out)
    return [out / z.stem for z in omniglot_zips]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def omniglot_data(omniglot_zips):
    """The merged subsets, loaded once per session."""
    from fastmeta.data import Omniglot

    return Omniglot(omniglot_zips)


@pytest.fixture(params=["avx2", "default"])
def isa(request):
    """Force the instruction set of the C++ kernels' inner loops (csrc/cpu/vec/) for one test;
    skipped where the extension is missing or the CPU does not support it."""
    from fastmeta import _extension

    if not _extension.available():
        pytest.skip(f"native extension unavailable: {_extension.reason()}")
    from fastmeta import _C

    if request.param not in _C.build_info()["cpu_isas_supported"].split(","):
        pytest.skip(f"{request.param}: not supported by this CPU")
    assert _C._set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        _C._set_cpu_isa("")
