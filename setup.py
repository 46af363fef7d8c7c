"""Build script for fastmeta: the pure-PyTorch package plus an optional native extension.

    pip install --no-build-isolation -e .      # editable; torch must already be installed

The native part is built by CMake (CMakeLists.txt): ``fastmeta._C`` (pybind11 module: op schemas and
C++ CPU kernels) and, when a CUDA toolkit is found, ``fastmeta/_C_cuda.so`` (torch-free .cu kernels for
sm_80/sm_90 plus device-generic glue). Environment switches:

    FASTMETA_NO_EXT=1    skip the native build entirely (pure PyTorch)
    FASTMETA_NO_CUDA=1   skip the CUDA library
    CUDA_HOME=...        toolkit location (default /usr/local/cuda); nvcc must be at $CUDA_HOME/bin/nvcc
    MAX_JOBS=N           parallel compile jobs (default: CPU count)

A failed native build never fails the install: the pure-PyTorch package is installed and the reason
is written to ``fastmeta/_build_status.json``, which ``python -m fastmeta.info`` shows.
torch is deliberately not a build requirement (it would pin the torch the build uses); build without
isolation so the installed torch is the one compiled against.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
STATUS_FILE = "_build_status.json"
NATIVE_GLOBS = ("_C.*.so", "_C.so", "_C_cuda.so", "_C_cuda.*.so", STATUS_FILE)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home() -> tuple[str | None, str]:
    """Return (toolkit root, reason). The root must hold bin/nvcc and include/cuda_runtime_api.h."""
    if _truthy("FASTMETA_NO_CUDA"):
        return None, "skipped: FASTMETA_NO_CUDA=1"
    candidates = [c for c in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda") if c]
    for c in candidates:
        root = Path(c)
        if (root / "bin" / "nvcc").exists() and (root / "include" / "cuda_runtime_api.h").exists():
            return str(root), f"requested: toolkit at {root}"
    return None, f"skipped: no CUDA toolkit (looked for bin/nvcc + include/cuda_runtime_api.h in {candidates})"


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Builds the CMake project; never raises: failures are recorded in _build_status.json."""

    def run(self) -> None:
        self._produced: list[Path] = []
        old_inplace, self.inplace = self.inplace, False
        for ext in self.extensions:
            self.build_extension(ext)
        self.inplace = old_inplace
        if old_inplace:
            self.copy_extensions_to_source()

    def _package_build_dir(self) -> Path:
        return Path(self.get_ext_fullpath("fastmeta._C")).resolve().parent

    def build_extension(self, ext: Extension) -> None:
        out_dir = self._package_build_dir()
        out_dir.mkdir(parents=True, exist_ok=True)
        for pattern in NATIVE_GLOBS:
            for old in out_dir.glob(pattern):
                old.unlink()
        status: dict = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "python": sys.version.split()[0]}
        if _truthy("FASTMETA_NO_EXT"):
            status.update(ext="skipped", ext_reason="FASTMETA_NO_EXT=1 at build time",
                          cuda="skipped", cuda_reason="FASTMETA_NO_EXT=1 at build time")
        else:
            try:
                status.update(self._cmake_build(out_dir))
            except Exception as exc:  # noqa: BLE001 - any failure must leave a pure-PyTorch install
                status.update(ext="failed", ext_reason=f"{type(exc).__name__}: {exc}",
                              cuda="failed", cuda_reason="native build failed before CUDA")
        status_path = out_dir / STATUS_FILE
        status_path.write_text(json.dumps(status, indent=2) + "\n")
        print(f"fastmeta native build: ext={status['ext']} cuda={status['cuda']}"
              f" ({status.get('ext_reason', '')}; {status.get('cuda_reason', '')})", file=sys.stderr)
        self._produced += [p for pat in NATIVE_GLOBS for p in out_dir.glob(pat)]

    def _cmake_build(self, out_dir: Path) -> dict:
        if _truthy("FASTMETA_FORCE_BUILD_FAILURE"):  # lets tests exercise the failure path
            raise RuntimeError("FASTMETA_FORCE_BUILD_FAILURE=1")
        import torch  # imported here: only the native build needs it
        from torch.utils import cpp_extension

        try:
            import pybind11
        except ImportError as exc:
            raise RuntimeError("pybind11 is not installed (pip install pybind11)") from exc
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found on PATH (pip install cmake)")
        cuda_home, cuda_reason = _find_cuda_home()
        # A persistent build directory (not pip's throw-away temp dir) makes rebuilds incremental.
        build_temp = Path(os.environ.get("FASTMETA_BUILD_DIR", ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}")).resolve()
        build_temp.mkdir(parents=True, exist_ok=True)
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        include_dirs = [d for d in cpp_extension.include_paths() if Path(d).exists()]
        args = [
            cmake, "-S", str(ROOT), "-B", str(build_temp),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFASTMETA_TORCH_INCLUDE_DIRS={';'.join(include_dirs)}",
            f"-DFASTMETA_TORCH_LIBRARY_DIR={Path(torch.__file__).parent / 'lib'}",
            f"-DFASTMETA_CXX11_ABI={abi}",
            f"-DFASTMETA_TORCH_VERSION={torch.__version__}",
            f"-DFASTMETA_OUTPUT_DIR={out_dir}",
            f"-DFASTMETA_CUDA={'ON' if cuda_home else 'OFF'}",
            f"-DFASTMETA_CUDA_CONFIG={cuda_reason}",
        ]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        if cuda_home:
            args += [f"-DCMAKE_CUDA_COMPILER={cuda_home}/bin/nvcc", f"-DCUDAToolkit_ROOT={cuda_home}"]
        env = dict(os.environ)
        if cuda_home:
            env["CUDA_HOME"] = cuda_home
        t0 = time.time()
        log = build_temp / "build.log"
        configure = subprocess.run(args, cwd=build_temp, env=env, capture_output=True, text=True)
        if configure.returncode != 0 and cuda_home:
            # A broken CUDA toolchain must not cost the CPU extension: reconfigure without it.
            cuda_reason = "failed: CMake CUDA configure: " + _tail(configure.stderr, 8)
            shutil.rmtree(build_temp)
            build_temp.mkdir(parents=True)
            args = [a for a in args if not a.startswith(("-DFASTMETA_CUDA", "-DCMAKE_CUDA", "-DCUDAToolkit"))]
            args += ["-DFASTMETA_CUDA=OFF", f"-DFASTMETA_CUDA_CONFIG={cuda_reason}"]
            cuda_home = None
            configure = subprocess.run(args, cwd=build_temp, env=env, capture_output=True, text=True)
        if configure.returncode != 0:
            log.write_text(configure.stdout + configure.stderr)
            raise RuntimeError(f"CMake configure failed (log {log}):\n{_tail(configure.stderr)}")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        build_cmd = [cmake, "--build", str(build_temp), "-j", jobs]
        # Keep going past a failing CUDA target so the CPU module still gets built.
        build_cmd += ["--", "-k", "0"] if "Ninja" in args else ["--", "-k"]
        build = subprocess.run(build_cmd, cwd=build_temp, env=env, capture_output=True, text=True)
        log.write_text(configure.stdout + configure.stderr + build.stdout + build.stderr)
        seconds = round(time.time() - t0, 1)
        ext_built = any(out_dir.glob("_C.*.so")) or (out_dir / "_C.so").exists()
        cuda_built = any(out_dir.glob("_C_cuda*.so"))
        status: dict = {"build_seconds": seconds, "build_log": str(log), "torch": torch.__version__,
                        "cxx11_abi": abi}
        if not ext_built:
            raise RuntimeError(f"compile/link failed (log {log}):\n{_tail(build.stdout + build.stderr)}")
        status.update(ext="built", ext_reason=f"built in {seconds} s")
        if cuda_built:
            status.update(cuda="built", cuda_reason=f"compiled for sm_80, sm_90 with {cuda_home}/bin/nvcc")
        elif cuda_home:
            status.update(cuda="failed", cuda_reason=f"CUDA library failed to build (log {log}):\n"
                          + _tail(build.stdout + build.stderr, 12))
        else:
            status.update(cuda="skipped", cuda_reason=cuda_reason)
        return status

    def copy_extensions_to_source(self) -> None:
        build_py = self.get_finalized_command("build_py")
        src_dir = Path(build_py.get_package_dir("fastmeta")).resolve()
        for pattern in NATIVE_GLOBS:  # stale libraries from an earlier build must not be loaded
            for old in src_dir.glob(pattern):
                old.unlink()
        for p in self._produced:
            if p.exists():
                shutil.copy2(p, src_dir / p.name)

    def get_outputs(self) -> list[str]:
        return [str(p) for p in getattr(self, "_produced", []) if p.exists()]

    def get_output_mapping(self) -> dict[str, str]:
        return {}


setup(
    ext_modules=[CMakeExtension("fastmeta._C")],
    cmdclass={"build_ext": CMakeBuild},
)
