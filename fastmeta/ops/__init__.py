"""Fused ops on task rows (``[T, D]``) and conv-block tails (``bn_relu_pool``), with reference /
cpp / triton / cuda backends.

Every row op is a ``torch.library`` custom op (namespace ``fastmeta_ops``: autograd, fake tensors
and ``torch.compile`` work) whose body asks :mod:`fastmeta.ops._backend` which backend runs it. The
raw native kernels are the ops ``torch.ops.fastmeta.*`` of the optional C++/CUDA extension;
``bn_relu_pool`` (reference and cpp only) asks ``_backend`` first and runs the native ops
``fastmeta::bn_relu_pool*`` directly, with fake kernels and autograd formulas registered on them.

    from fastmeta import ops
    with ops.use_backend("reference"):      # or FASTMETA_BACKEND=reference
        out = ops.sam_perturb(theta, g, 0.05)
"""

from ._backend import (
    BACKENDS,
    NOT_IMPLEMENTED,
    OPS,
    BackendUnavailableError,
    available_backends,
    resolve,
    support_table,
    unavailable_reason,
    use_backend,
)
from .bn_relu_pool import bn_relu_pool
from .fd_hvp_combine import fd_hvp_combine
from .fd_hvp_points import fd_hvp_points
from .row_norm import row_norm
from .sam_perturb import sam_perturb
from .sds_select import sds_k, sds_mask, sds_select
from .swp_mask import swp_mask

from . import reference as _reference  # noqa: F401,E402  (registers the reference backend)
from . import _cpp  # noqa: F401,E402  (cheap: availability is checked lazily)

__all__ = [
    "row_norm", "sam_perturb", "fd_hvp_points", "fd_hvp_combine", "swp_mask", "sds_select", "sds_mask",
    "sds_k", "bn_relu_pool", "use_backend", "available_backends", "support_table", "unavailable_reason",
    "resolve", "BackendUnavailableError", "BACKENDS", "OPS", "NOT_IMPLEMENTED",
]
