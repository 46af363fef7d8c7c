"""Loader for fastmeta's optional native extension.

``fastmeta._C`` (pybind11 module) holds the op schemas and the C++ CPU kernels; ``_C_cuda*.so`` (a
separate shared library, loaded with ``torch.ops.load_library``) registers CUDA kernels for the same
schemas. Both are optional: every op has a pure-PyTorch reference, and importing fastmeta never fails
because the extension is missing. ``FASTMETA_NO_EXT=1`` at run time keeps the extension unloaded
(as it skips the build at install time); ``FASTMETA_NO_CUDA=1`` keeps the CUDA library unloaded.
Why the extension is or is not there is kept in ``_build_status.json`` (written by setup.py) and shown
by ``python -m fastmeta.info``.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Optional

_PKG_DIR = Path(__file__).resolve().parent
_STATUS_FILE = _PKG_DIR / "_build_status.json"
_lock = threading.Lock()
_state: dict = {"loaded": None, "reason": "not loaded yet", "cuda_loaded": False, "cuda_reason": "not loaded yet"}


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def build_status() -> dict:
    """What setup.py recorded at build time (empty dict if it never ran, e.g. a source checkout)."""
    try:
        return json.loads(_STATUS_FILE.read_text())
    except (OSError, ValueError):
        return {}


def _build_reason(default: str) -> str:
    status = build_status()
    if not status:
        return f"{default}; no build record (package not built with setup.py: pip install --no-build-isolation -e .)"
    if status.get("ext") != "built":
        return f"native build {status.get('ext')}: {status.get('ext_reason', '?')}"
    return default


def _cuda_not_built() -> str:
    """Why there is no ``_C_cuda*.so``: the build record's one-line reason (setup.py builds the CUDA
    library on its own, so its failure is recorded without costing the CPU module)."""
    status = build_status()
    if not status:
        return "not built (no build record)"
    if status.get("cuda") == "built":
        return "not built: no _C_cuda*.so beside the package, although the build record says it was built"
    return f"not built: {status.get('cuda_reason', 'no reason recorded')}"


def _load_cuda_library() -> None:
    if _truthy("FASTMETA_NO_CUDA"):
        _state["cuda_reason"] = "disabled by FASTMETA_NO_CUDA=1"
        return
    libs = sorted(_PKG_DIR.glob("_C_cuda*.so"))
    if not libs:
        _state["cuda_reason"] = _cuda_not_built()
        return
    import torch

    try:
        torch.ops.load_library(str(libs[0]))
    except (OSError, RuntimeError) as exc:
        _state["cuda_reason"] = f"{libs[0].name} failed to load: {exc}"
        return
    _state["cuda_loaded"] = True
    _state["cuda_reason"] = f"loaded {libs[0].name}"


def load() -> bool:
    """Load the native extension (idempotent, thread-safe). Returns whether the CPU kernels are available."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    with _lock:
        if _state["loaded"] is not None:
            return _state["loaded"]
        if _truthy("FASTMETA_NO_EXT"):
            _state.update(loaded=False, reason="disabled by FASTMETA_NO_EXT=1",
                          cuda_reason="disabled by FASTMETA_NO_EXT=1")
            return False
        import torch  # noqa: F401  (libc10 / libtorch_cpu must be loaded before _C)

        try:
            from . import _C  # noqa: F401
        except ImportError as exc:
            _state.update(loaded=False, reason=_build_reason(f"fastmeta._C not importable: {exc}"),
                          cuda_reason="needs fastmeta._C (the op schemas)")
            return False
        _state.update(loaded=True, reason="loaded")
        _load_cuda_library()
        return True


def opted_out() -> bool:
    """Whether the extension is absent by the user's choice: ``FASTMETA_NO_EXT=1`` now, or at build
    time (the build record then says the build was skipped for it)."""
    if _truthy("FASTMETA_NO_EXT"):
        return True
    status = build_status()
    return status.get("ext") == "skipped" and "FASTMETA_NO_EXT" in str(status.get("ext_reason", ""))


def available() -> bool:
    """Whether the C++ CPU kernels (``torch.ops.fastmeta.*``) can be used."""
    return load()


def reason() -> str:
    """Why the extension is not available ("loaded" when it is)."""
    load()
    return _state["reason"]


def cuda_library_loaded() -> bool:
    """Whether ``_C_cuda`` (CUDA kernels for the same schemas) was loaded. Never needs a GPU to be True."""
    load()
    return bool(_state["cuda_loaded"])


def cuda_reason() -> str:
    load()
    return _state["cuda_reason"]


def nvcc_version() -> Optional[str]:
    """The CUDA version of the nvcc that compiled ``_C_cuda`` (e.g. ``"13.0"``), from the build record;
    ``None`` when no toolkit was used or its version could not be read. Compare with
    ``torch.version.cuda``: kernels from a newer toolkit than the driver supports cannot launch."""
    return build_status().get("nvcc_version")


def build_info() -> dict:
    """``fastmeta._C.build_info()`` (when loaded) merged with the build record and load state.

    ``nvcc_version``: see :func:`nvcc_version`. ``cuda_config``: what became of the CUDA library at
    build time (``"<built|failed|skipped>: <reason>"``), from the build record."""
    info: dict = {}
    if load():
        from . import _C

        info.update(_C.build_info())
    status = build_status()
    info["nvcc_version"] = status.get("nvcc_version")
    if status:
        info["cuda_config"] = f"{status.get('cuda', '?')}: {status.get('cuda_reason', 'no reason recorded')}"
    info["extension_loaded"] = bool(_state["loaded"])
    info["extension_reason"] = _state["reason"]
    info["cuda_library_loaded"] = bool(_state["cuda_loaded"])
    info["cuda_library_reason"] = _state["cuda_reason"]
    info["build_status"] = status
    return info
