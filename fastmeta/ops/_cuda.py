"""The ``cuda`` backend: CUDA kernels of ``_C_cuda`` (``csrc/cuda/<op>_kernel.cu``).

The CUDA kernels are registered under the same ``torch.ops.fastmeta.<op>`` schemas as the C++ CPU
kernels (CUDA dispatch key), so the ``cpp`` backend's thin wrappers serve both: the dispatcher
picks the kernel by the tensors' device. Compiled here (nvcc, sm_80/sm_90) but never run on a GPU in
this project's CI. Whether the library can run on a given device is answered by
:mod:`fastmeta.ops._cuda_support` (which ``_backend`` asks without importing this module).
"""

from __future__ import annotations

from . import _cpp
from ._backend import OPS, register

BACKEND = "cuda"
for _op in OPS:
    register(_op, BACKEND)(getattr(_cpp, _op))
