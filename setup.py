"""Build script for fastmeta: the pure-PyTorch package plus an optional native extension.

    pip install --no-build-isolation -e .      # editable; torch must already be installed

The native part is built by CMake (CMakeLists.txt) in two independent builds: ``fastmeta._C``
(pybind11 module: op schemas and C++ CPU kernels) and, when a CUDA toolkit is found,
``fastmeta/_C_cuda.so`` (torch-free .cu kernels for sm_80/sm_90 plus device-generic glue). The CUDA
build is optional: when its configure, compile or link fails, the CPU module is still built and the
reason is recorded as one line. Environment switches:

    FASTMETA_NO_EXT=1    skip the native build entirely (pure PyTorch)
    FASTMETA_NO_CUDA=1   skip the CUDA library
    CUDA_HOME=...        toolkit location (default /usr/local/cuda); nvcc must be at $CUDA_HOME/bin/nvcc
    MAX_JOBS=N           parallel compile jobs per build (default: CPU count)
    FASTMETA_BUILD_DIR   CPU build directory (default build/cmake-pyXY; the CUDA one gets "-cuda" appended)

A failed native build never fails the install: the pure-PyTorch package is installed and the reason
is written to ``fastmeta/_build_status.json`` (with nvcc's CUDA version, for the run-time comparison
with ``torch.version.cuda``), which ``python -m fastmeta.info`` shows.
torch is deliberately not a build requirement (it would pin the torch the build uses); build without
isolation so the installed torch is the one compiled against.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
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
    """Return (toolkit root, why not). The root must hold bin/nvcc and include/cuda_runtime_api.h."""
    if _truthy("FASTMETA_NO_CUDA"):
        return None, "FASTMETA_NO_CUDA=1 at build time"
    candidates = [c for c in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda") if c]
    for c in candidates:
        root = Path(c)
        if (root / "bin" / "nvcc").exists() and (root / "include" / "cuda_runtime_api.h").exists():
            return str(root), ""
    return None, f"no CUDA toolkit (looked for bin/nvcc + include/cuda_runtime_api.h in {candidates})"


def nvcc_version(nvcc: str) -> tuple[str | None, str]:
    """``("13.0", "")`` from ``nvcc --version`` ("... release 13.0, V13.0.88"), or ``(None, why)``.

    Recorded so that the runtime can compare the toolkit the kernels were compiled with against
    ``torch.version.cuda`` (a newer toolkit than the driver supports fails at the first launch)."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{nvcc} --version: {type(exc).__name__}: {exc}"
    m = re.search(r"release (\d+\.\d+)", out.stdout)
    if out.returncode != 0 or m is None:
        return None, f"{nvcc} --version (exit {out.returncode}): {one_line(out.stdout + out.stderr)}"
    return m.group(1), ""


def one_line(text: str, limit: int = 300) -> str:
    """The gist of a tool's failure output as one printable line of at most ``limit`` characters.

    Build records and ``python -m fastmeta.info`` show one line per part; the full output stays in
    the build log. The first error paragraph ("CMake Error ...", "... error: ...", "nvcc fatal")
    is kept, else the last non-empty line."""
    lines = [ln.strip() for ln in text.splitlines()]
    start = next((i for i, ln in enumerate(lines) if re.search(r"\berror\b|\bfatal\b", ln, re.IGNORECASE)), None)
    if start is None:
        picked = [ln for ln in lines if ln][-1:]
    else:
        # CMake: "CMake Error at /long/path/Module.cmake:149 (message):" -> "...at Module.cmake:149".
        picked = [re.sub(r"^(CMake Error at )\S*/", r"\1", lines[start])]
        for ln in lines[start + 1:]:
            if (not ln and len(picked) > 1) or ln.startswith("Call Stack"):
                break  # the end of the error's own paragraph
            if ln:
                picked.append(ln)
    flat = re.sub(r"\s+", " ", " ".join(picked))
    flat = "".join(ch if ch.isprintable() and ord(ch) < 128 else "?" for ch in flat).strip()
    if not flat:
        return "(no output)"
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Builds the CMake project; never raises: failures are recorded in _build_status.json.

    Two independent CMake builds from the same CMakeLists.txt, each in its own build directory:
    ``FASTMETA_PART=cpu`` (``fastmeta._C``, the schemas and CPU kernels) and, when a CUDA toolkit is
    found, ``FASTMETA_PART=cuda`` (``_C_cuda``). They run side by side; a failure of the CUDA part
    (configure, compile or link) is recorded as one line and never touches the CPU part."""

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
                self._native_build(out_dir, status)
            except Exception as exc:  # noqa: BLE001 - any failure must leave a pure-PyTorch install
                status.update(ext="failed", ext_reason=f"{type(exc).__name__}: {exc}")
                status.setdefault("cuda", "failed")
                status.setdefault("cuda_reason", "not attempted: the native build failed before it")
        status_path = out_dir / STATUS_FILE
        status_path.write_text(json.dumps(status, indent=2) + "\n")
        print(f"fastmeta native build: ext={status['ext']} cuda={status['cuda']}"
              f" ({one_line(status.get('ext_reason', ''))}; {status.get('cuda_reason', '')})", file=sys.stderr)
        self._produced += [p for pat in NATIVE_GLOBS for p in out_dir.glob(pat)]

    def _native_build(self, out_dir: Path, status: dict) -> None:
        """Build both parts, recording into ``status`` as it goes (so that a CPU failure keeps the
        CUDA part's outcome); raises when the CPU module cannot be built."""
        if _truthy("FASTMETA_FORCE_BUILD_FAILURE"):  # lets tests exercise the failure path
            raise RuntimeError("FASTMETA_FORCE_BUILD_FAILURE=1")
        import torch  # imported here: only the native build needs it

        try:
            import pybind11
        except ImportError as exc:
            raise RuntimeError("pybind11 is not installed (pip install pybind11)") from exc
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found on PATH (pip install cmake)")
        # Persistent build directories (not pip's throw-away temp dir) make rebuilds incremental.
        default = ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}"
        base = Path(os.environ.get("FASTMETA_BUILD_DIR", default)).resolve()
        common = cmake_common_args(out_dir)
        status.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                      cxx11_abi=int(torch._C._GLIBCXX_USE_CXX11_ABI), cmake=_cmake_version(cmake))

        cuda_home, why_not = _find_cuda_home()
        status.update(nvcc=None, nvcc_version=None)
        cuda_result: dict = {}
        cuda_thread = None
        if cuda_home is None:
            status.update(cuda="skipped", cuda_reason=why_not)
        else:
            nvcc = f"{cuda_home}/bin/nvcc"
            version, why = nvcc_version(nvcc)
            status.update(nvcc=nvcc, nvcc_version=version)
            if why:
                status["nvcc_version_reason"] = why
            cuda_args = common + cuda_cmake_args(cuda_home)
            env = dict(os.environ, CUDA_HOME=cuda_home)
            # Side by side with the CPU part: each is mostly one long compile against torch's headers.
            cuda_thread = threading.Thread(
                target=lambda: cuda_result.update(_build_cuda_part(cmake, base.with_name(base.name + "-cuda"),
                                                                   cuda_args, env, out_dir, nvcc, version)))
            cuda_thread.start()
        try:
            status.update(_build_cpu_part(cmake, base, common + [
                "-DFASTMETA_PART=cpu", f"-DPython_EXECUTABLE={sys.executable}",
                f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"], out_dir))
        finally:
            if cuda_thread is not None:
                cuda_thread.join()
                status.update(cuda_result or {"cuda": "failed", "cuda_reason": "CUDA build: no result (crashed)"})

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


def cmake_common_args(out_dir: Path) -> list[str]:
    """CMake arguments both parts share: torch's include and library directories, its C++ ABI (read
    from torch, never hard-coded) and version, where the libraries go, and the generator."""
    import torch
    from torch.utils import cpp_extension

    include_dirs = [d for d in cpp_extension.include_paths() if Path(d).exists()]
    args = [
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DFASTMETA_TORCH_INCLUDE_DIRS={';'.join(include_dirs)}",
        f"-DFASTMETA_TORCH_LIBRARY_DIR={Path(torch.__file__).parent / 'lib'}",
        f"-DFASTMETA_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-DFASTMETA_TORCH_VERSION={torch.__version__}",
        f"-DFASTMETA_OUTPUT_DIR={out_dir}",
    ]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    return args


def cuda_cmake_args(cuda_home: str) -> list[str]:
    """The CUDA part's own arguments (its build directory is separate from the CPU part's)."""
    return ["-DFASTMETA_PART=cuda", f"-DCMAKE_CUDA_COMPILER={cuda_home}/bin/nvcc", f"-DCUDAToolkit_ROOT={cuda_home}"]


def _cmake_version(cmake: str) -> str:
    try:
        out = subprocess.run([cmake, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return f"{cmake} (version unknown)"
    m = re.search(r"version (\S+)", out)
    return f"{m.group(1) if m else '?'} ({cmake})"


def _cmake(cmake: str, build_dir: Path, args: list[str], env: dict | None = None):
    """Configure, then build with ``MAX_JOBS`` jobs; returns (configure, build or None) results."""
    build_dir.mkdir(parents=True, exist_ok=True)
    configure = subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir)] + args, cwd=build_dir, env=env,
                               capture_output=True, text=True)
    if configure.returncode != 0:
        return configure, None
    jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
    build = subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], cwd=build_dir, env=env,
                           capture_output=True, text=True)
    return configure, build


def _build_cpu_part(cmake: str, build_dir: Path, args: list[str], out_dir: Path) -> dict:
    t0 = time.time()
    log = build_dir / "build.log"
    configure, build = _cmake(cmake, build_dir, args)
    output = configure.stdout + configure.stderr + (build.stdout + build.stderr if build else "")
    log.write_text(output)
    seconds = round(time.time() - t0, 1)
    if build is None:
        raise RuntimeError(f"CMake configure failed: {one_line(configure.stdout + configure.stderr)} (log {log})")
    if not (any(out_dir.glob("_C.*.so")) or (out_dir / "_C.so").exists()):
        raise RuntimeError(f"compile/link failed: {one_line(build.stdout + build.stderr)} (log {log})")
    return {"ext": "built", "ext_reason": f"built in {seconds} s", "build_seconds": seconds, "build_log": str(log)}


def _build_cuda_part(cmake: str, build_dir: Path, args: list[str], env: dict, out_dir: Path, nvcc: str,
                     version: str | None) -> dict:
    """Never raises: whatever goes wrong becomes ``cuda="failed"`` with one line of reason."""
    t0 = time.time()
    log = build_dir / "build.log"
    try:
        configure, build = _cmake(cmake, build_dir, args, env)
        log.write_text(configure.stdout + configure.stderr + (build.stdout + build.stderr if build else ""))
        if build is None:
            # A failed configure can leave a cache (e.g. a compiler CMake rejected) that would make
            # the next attempt fail the same way: start the next one clean.
            shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)
            (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
            return {"cuda": "failed", "cuda_log": str(log), "cuda_reason":
                    f"CUDA configure failed: {one_line(configure.stdout + configure.stderr)} (log {log})"}
    except Exception as exc:  # noqa: BLE001 - the CUDA part must never cost the CPU extension
        return {"cuda": "failed", "cuda_reason": f"CUDA build: {type(exc).__name__}: {one_line(str(exc))}"}
    if not any(out_dir.glob("_C_cuda*.so")):
        return {"cuda": "failed", "cuda_log": str(log),
                "cuda_reason": f"CUDA compile/link failed: {one_line(build.stdout + build.stderr)} (log {log})"}
    return {"cuda": "built", "cuda_log": str(log), "cuda_seconds": round(time.time() - t0, 1),
            "cuda_reason": f"compiled for sm_80, sm_90 with {nvcc} (CUDA {version or 'version unknown'})"}


if __name__ == "__main__":  # pip's setuptools backend runs this file as __main__; tests import the helpers
    setup(
        ext_modules=[CMakeExtension("fastmeta._C")],
        cmdclass={"build_ext": CMakeBuild},
    )
