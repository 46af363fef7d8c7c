"""The native build: fastmeta._C imports, reports how it was built, and its row_norm kernel runs;
a failing CUDA part never costs the CPU module.

A missing extension stops the test run (tests/conftest.py) unless the user opted out of it with
FASTMETA_NO_EXT=1 (now, or at build time); only then do the installed-extension tests skip.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmeta import _extension


@pytest.fixture(scope="module")
def ext():
    if not _extension.load():
        msg = f"native extension not available: {_extension.reason()}"
        if not _extension.opted_out() or os.environ.get("FASTMETA_REQUIRE_EXT") == "1":
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


# ---------------------------------------------------------------- the CUDA part is optional
# setup.py configures and builds the CUDA library on its own (FASTMETA_PART=cuda, its own build
# directory); whatever goes wrong there is recorded as one line and never costs fastmeta._C.

ROOT = Path(__file__).resolve().parents[1]


def _setup_script():
    """setup.py's helpers, without running setup() (it only runs as __main__)."""
    spec = importlib.util.spec_from_file_location("fastmeta_setup_script", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _broken_toolkit(root: Path) -> Path:
    """A CUDA toolkit whose nvcc reports a version and compiles nothing, so CMake's CUDA configure fails."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime_api.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text('#!/bin/sh\ncase "$*" in *--version*) echo "Cuda compilation tools, release 13.0, V13.0.88";'
                    ' exit 0;; esac\necho "nvcc fatal   : broken on purpose" >&2\nexit 1\n')
    nvcc.chmod(0o755)
    return root


def _oldest_cmake() -> tuple[tuple[int, ...], str] | None:
    # The install that runs the rest of the suite used the first cmake on PATH; the builds below
    # use the oldest one on PATH (here the system's 3.25 beside pip's 4.x), where CUDA configure
    # problems show first (3.25 knows no nvcc flag for the CUDA20 dialect).
    found = {}
    for d in os.environ.get("PATH", "").split(os.pathsep):
        exe = Path(d) / "cmake"
        if exe.is_file() and os.access(exe, os.X_OK) and exe.resolve() not in found:
            out = subprocess.run([str(exe), "--version"], capture_output=True, text=True).stdout
            m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
            if m:
                found[exe.resolve()] = (tuple(int(x) for x in m.groups()), str(exe))
    return min(found.values()) if found else None


def test_failure_reasons_are_one_line(tmp_path):
    setup_script = _setup_script()
    cmake_325 = ('CMake Error in CMakeLists.txt:\n  Target "_C_cuda" requires the language dialect "CUDA20" .  But the'
                 ' current\n  compiler "NVIDIA" does not support this, or CMake does not know the flags\n'
                 '  to enable it.\n\n\nCMake Generate step failed.  Build files cannot be regenerated correctly.\n')
    line = setup_script.one_line(cmake_325)
    assert "\n" not in line and 'dialect "CUDA20"' in line and "to enable it." in line and "Generate" not in line
    cmake_at = ("-- The CUDA compiler identification is unknown\nCMake Error at /usr/share/cmake-3.25/Modules/"
                "CMakeDetermineCUDACompiler.cmake:603 (message):\n  Compiling the CUDA compiler identification source"
                " file failed.\nCall Stack (most recent call first):\n  CMakeLists.txt:99 (enable_language)\n")
    assert setup_script.one_line(cmake_at) == ("CMake Error at CMakeDetermineCUDACompiler.cmake:603 (message): "
                                               "Compiling the CUDA compiler identification source file failed.")
    assert len(setup_script.one_line("error: " + "x" * 1000)) == 300
    nvcc = _broken_toolkit(tmp_path / "cuda") / "bin" / "nvcc"
    assert setup_script.nvcc_version(str(nvcc)) == ("13.0", "")
    version, why = setup_script.nvcc_version(str(tmp_path / "missing" / "nvcc"))
    assert version is None and "FileNotFoundError" in why


def test_cuda_part_configures_with_the_oldest_cmake(tmp_path):
    # CMake 3.25 + nvcc 13 failed in the generate step ("CUDA20 dialect"): the .cu files are
    # torch-free and are compiled as C++17. Configure only (~4 s): the compile is the CI install's.
    nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    cmake = _oldest_cmake()
    if not nvcc.exists() or cmake is None:
        pytest.skip(f"needs nvcc ({nvcc}) and cmake on PATH")
    setup_script = _setup_script()
    args = setup_script.cmake_common_args(tmp_path / "out") + setup_script.cuda_cmake_args(str(nvcc.parents[1]))
    r = subprocess.run([cmake[1], "-S", str(ROOT), "-B", str(tmp_path / "build")] + args,
                       capture_output=True, text=True)
    assert r.returncode == 0, f"cmake {cmake[0]}: CUDA configure failed: {setup_script.one_line(r.stdout + r.stderr)}"


@pytest.mark.slow
def test_cuda_configure_failure_keeps_the_cpu_extension(tmp_path):
    # A full build of a scratch copy (~25 s of CPU) with a toolkit whose nvcc cannot compile: the
    # CUDA configure fails, fastmeta._C is still built and loads, and fastmeta.info says why the
    # CUDA library is missing, in one line.
    cmake = _oldest_cmake()
    if cmake is None:
        pytest.skip("no cmake on PATH")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "CMakeLists.txt", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "_build_status.json")
    shutil.copytree(ROOT / "csrc", src / "csrc", ignore=ignore)
    shutil.copytree(ROOT / "fastmeta", src / "fastmeta", ignore=ignore)
    toolkit = _broken_toolkit(tmp_path / "cuda")
    env = {k: v for k, v in os.environ.items() if k not in ("FASTMETA_NO_EXT", "FASTMETA_NO_CUDA", "CUDA_PATH",
                                                            "FASTMETA_FORCE_BUILD_FAILURE")}
    env.update(CUDA_HOME=str(toolkit), FASTMETA_BUILD_DIR=str(tmp_path / "build"), MAX_JOBS="2",
               PATH=os.pathsep.join([str(Path(cmake[1]).parent), env.get("PATH", "")]))
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src, env=env,
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    record = json.loads((src / "fastmeta" / "_build_status.json").read_text())
    assert record["ext"] == "built", f"cmake {cmake[0]}: {record}"
    assert record["cuda"] == "failed" and record["cuda_reason"].startswith("CUDA configure failed: "), record
    assert "\n" not in record["cuda_reason"], record["cuda_reason"]
    assert record["nvcc_version"] == "13.0"
    assert list((src / "fastmeta").glob("_C.*.so")) and not list((src / "fastmeta").glob("_C_cuda*.so"))
    info = subprocess.run([sys.executable, "-c", "import fastmeta, fastmeta.info as i; print(fastmeta.__file__);"
                           "print(i.report())"], cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr[-2000:]
    assert info.stdout.splitlines()[0].startswith(str(src)), info.stdout.splitlines()[0]
    assert "native extension fastmeta._C: loaded" in info.stdout, info.stdout
    assert "CUDA kernels library: not built: CUDA configure failed: " in info.stdout, info.stdout


# ---------------------------------------------------------------- a broken build is loud
_BLOCK_EXT = """import sys


class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "fastmeta._C":
            raise ImportError("fastmeta._C blocked by test_build.py")
        return None


sys.meta_path.insert(0, _Block())
"""


def _pytest_without_ext(tmp_path, **env_extra):
    """``pytest tests/test_build.py::test_build_info`` in a fresh process where ``fastmeta._C``
    cannot be imported (a sitecustomize on PYTHONPATH blocks it), as after a broken build."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_BLOCK_EXT)
    env = {k: v for k, v in os.environ.items() if k not in ("FASTMETA_NO_EXT", "FASTMETA_REQUIRE_EXT")}
    env.update(PYTHONPATH=os.pathsep.join([str(site)] + [p for p in [env.get("PYTHONPATH")] if p]), **env_extra)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-rs",
           "tests/test_build.py::test_build_info"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_missing_extension_stops_the_run_unless_opted_out(tmp_path):
    loud = _pytest_without_ext(tmp_path)
    out = loud.stdout + loud.stderr
    assert loud.returncode == pytest.ExitCode.USAGE_ERROR, out[-3000:]
    assert "native extension fastmeta._C is missing" in out and "blocked by test_build.py" in out
    assert "FASTMETA_NO_EXT=1" in out  # says how to opt out
    quiet = _pytest_without_ext(tmp_path, FASTMETA_NO_EXT="1")
    out = quiet.stdout + quiet.stderr
    assert quiet.returncode == pytest.ExitCode.OK and "1 skipped" in out, out[-3000:]


def test_opting_out_is_explicit(monkeypatch):
    monkeypatch.delenv("FASTMETA_NO_EXT", raising=False)
    monkeypatch.setattr(_extension, "build_status", lambda: {"ext": "failed", "ext_reason": "CMake Error"})
    assert not _extension.opted_out()
    monkeypatch.setattr(_extension, "build_status", lambda: {})  # never built: not a choice either
    assert not _extension.opted_out()
    monkeypatch.setattr(_extension, "build_status",
                        lambda: {"ext": "skipped", "ext_reason": "FASTMETA_NO_EXT=1 at build time"})
    assert _extension.opted_out()
    monkeypatch.setattr(_extension, "build_status", lambda: {})
    monkeypatch.setenv("FASTMETA_NO_EXT", "1")
    assert _extension.opted_out()
