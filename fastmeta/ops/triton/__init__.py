"""The ``triton`` backend: Triton kernels for the fused ops (one file per op).

Imported only when the triton backend is first used (``fastmeta.ops._backend``). On this project's
CI the kernels run on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before
Python starts); they are written for CUDA GPUs but were interpreted here, never run on a GPU.
Each launch happens inside the body of a ``torch.library.custom_op`` with a ``register_fake``
(``fastmeta/ops/<op>.py``), so the kernels are opaque to ``torch.compile`` and ``opcheck``; it runs
under the tensors' device guard, with a grid from ``_launch`` (within CUDA's limits for any T and D)
and int64 offsets. ``tests/ops/test_triton_gpu.py`` runs them at the GPU block sizes with scalar
arguments typed as a GPU launch types them.
"""

from . import fd_hvp_combine, fd_hvp_points, row_norm, sam_perturb, sds_select, swp_mask  # noqa: F401

UNSUPPORTED: dict[str, str] = {}
