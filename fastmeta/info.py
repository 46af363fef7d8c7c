"""``python -m fastmeta.info``: versions, how the native extension was built (or why not), and the
op x backend table with the reason for every unavailable cell."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _table(device: str) -> list[str]:
    from .ops import _backend

    table = _backend.support_table(device)
    lines = [f"op x backend on {device} ('ok' = runs; otherwise the reason):"]
    width = max(len(op) for op in table)
    for op, cells in table.items():
        for i, (backend, reason) in enumerate(cells.items()):
            head = op.ljust(width) if i == 0 else " " * width
            lines.append(f"  {head}  {backend:<9} {'ok' if reason is None else reason}")
    return lines


def _cuda_line(info: dict) -> str:
    # "loaded (...)", "not built: <the build's one-line reason>" or "not loaded: <why>".
    reason = info["cuda_library_reason"]
    if info["cuda_library_loaded"]:
        return f"loaded ({reason}; nvcc {info.get('nvcc_version') or 'version not recorded'})"
    return reason if reason.startswith("not built") else f"not loaded: {reason}"


def report() -> str:
    import torch

    from . import _extension
    from .ops import _backend

    lines = [
        f"python          {sys.version.split()[0]} ({platform.machine()})",
        f"torch           {torch.__version__} (CUDA runtime {torch.version.cuda}, "
        f"GPU available: {torch.cuda.is_available()}), threads {torch.get_num_threads()}",
        f"triton          {_version('triton')} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')})",
        f"fastmeta        {_version('fastmeta')}",
        f"FASTMETA_BACKEND={os.environ.get(_backend.ENV_VAR, '') or '(unset)'}",
        "",
    ]
    info = _extension.build_info()
    lines.append(f"native extension fastmeta._C: {'loaded' if info['extension_loaded'] else 'NOT available'}"
                 f" ({info['extension_reason']})")
    for key in ("torch_version", "compiler", "cxx_standard", "cxx11_abi", "openmp", "cpu_isa",
                "cpu_isas_supported", "stream_threshold_bytes"):
        if key in info:
            lines.append(f"  {key:<22} {info[key]}")
    lines.append(f"CUDA kernels library: {_cuda_line(info)}")
    status = info["build_status"]
    if status:
        parts = [f"ext={status.get('ext')} ({status.get('ext_reason', '')})", f"cuda={status.get('cuda')}"]
        if "nvcc_version" in status:  # older records lack these keys
            parts.append(f"nvcc {status['nvcc_version'] or 'not used'}"
                         f" (torch built for CUDA {status.get('torch_cuda')})")
        if "cmake" in status:
            parts.append(f"cmake {status['cmake']}")
        lines.append("build record: " + "; ".join(parts))
    if info["cuda_library_loaded"]:
        registered = [op for op in _backend.OPS
                      if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmeta::{op}", "CUDA")]
        lines.append(f"  CUDA kernels registered for: {', '.join(registered)} (compiled, not run: no GPU here)"
                     if not torch.cuda.is_available() else f"  CUDA kernels registered for: {', '.join(registered)}")
    lines.append("")
    lines.append(f"available backends on cpu: {', '.join(_backend.available_backends('cpu'))}")
    lines += _table("cpu")
    lines.append("")
    lines += _table("cuda")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
