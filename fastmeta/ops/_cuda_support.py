"""Whether the ``cuda`` backend's library (``_C_cuda``) can run on a given CUDA device
(``_backend`` asks :func:`device_reason` once the library is loaded and a CUDA device exists):

* the device's compute capability must be at least the lowest architecture nvcc compiled for: a
  T4 (7.5), V100 (7.0) or RTX 20xx (7.5) would otherwise fail at the first launch with "no kernel
  image is available for execution on the device". Higher capabilities run the sm_80 code (8.x) or
  the embedded PTX (CMake's ``80 90`` architectures carry both SASS and PTX).
* the CUDA version the library was compiled with (nvcc's toolkit) must fit torch's CUDA runtime: the
  same major version (a library built for CUDA 12 does not run on torch's CUDA 13 runtime), and a
  minor version no newer than torch's (CUDA's minor-version compatibility runs older builds on a
  newer runtime, not the reverse).
"""

from __future__ import annotations

import json

import torch

# What CMakeLists.txt compiles for; used when the library cannot say (built before it recorded it).
DEFAULT_ARCHS = ((8, 0), (9, 0))


def library_build_info() -> dict:
    """``{"cuda_runtime": 13000, "archs": [800, 900]}`` from the loaded library (``{}`` if it cannot say)."""
    try:
        return json.loads(torch.ops.fastmeta_cuda.build_info())
    except (AttributeError, RuntimeError, ValueError):
        return {}


def built_cuda_version(info: dict | None = None) -> str | None:
    """The CUDA version (``"13.0"``) the library was compiled with: its headers' ``CUDART_VERSION``,
    else the build record's nvcc version, else None."""
    info = library_build_info() if info is None else info
    runtime = info.get("cuda_runtime")
    if isinstance(runtime, int) and runtime > 0:
        return f"{runtime // 1000}.{runtime % 1000 // 10}"
    from .. import _extension

    return _extension.build_status().get("nvcc_version") or None


def built_archs(info: dict | None = None) -> tuple[tuple[int, int], ...]:
    """Compute capabilities nvcc compiled for, e.g. ``((8, 0), (9, 0))``."""
    info = library_build_info() if info is None else info
    archs = info.get("archs")
    if isinstance(archs, list) and archs and all(isinstance(a, int) for a in archs):
        return tuple(sorted({(a // 100, a % 100 // 10) for a in archs}))
    return DEFAULT_ARCHS


def _version(v: str) -> tuple[int, int]:
    major, _, minor = v.partition(".")
    return int(major), int(minor.partition(".")[0] or 0)


def capability_reason(capability: tuple[int, int], archs: tuple[tuple[int, int], ...]) -> str | None:
    """None if a device of ``capability`` runs kernels compiled for ``archs``, else why not."""
    lowest = min(archs)
    if tuple(capability) >= lowest:
        return None
    built = ", ".join(f"sm_{major}{minor}" for major, minor in archs)
    return (f"not supported because compute capability {capability[0]}.{capability[1]} < {lowest[0]}.{lowest[1]} "
            f"(kernels built for {built})")


def version_reason(built: str | None, torch_cuda: str | None) -> str | None:
    """None if a library compiled with CUDA ``built`` runs under torch's CUDA ``torch_cuda``, else why not.
    Unknown versions are not held against the library (nothing to compare)."""
    if not built or not torch_cuda:
        return None
    b, t = _version(built), _version(torch_cuda)
    if b[0] == t[0] and b[1] <= t[1]:
        return None
    return (f"not supported because _C_cuda was compiled with CUDA {built} (nvcc) but torch runs CUDA {torch_cuda}: "
            f"rebuild with a CUDA {t[0]}.x toolkit no newer than {torch_cuda} (CUDA_HOME=...)")


def device_reason(index: int) -> str | None:
    """None if the loaded library can run on CUDA device ``index``, else why not."""
    info = library_build_info()
    reason = version_reason(built_cuda_version(info), torch.version.cuda)
    if reason is not None:
        return reason
    return capability_reason(torch.cuda.get_device_capability(index), built_archs(info))
