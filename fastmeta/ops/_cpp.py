"""The ``cpp`` backend: C++ CPU kernels of the native extension (``csrc/cpu/<op>_cpu.cpp``).

Each function calls the raw native op ``torch.ops.fastmeta.<op>`` (CPU dispatch key). Availability
(extension loaded, CPU tensors) is decided by ``_backend``; importing this module needs nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _extension
from ._backend import register
from .bn_relu_pool import native_ops as _bn_relu_pool_ops

BACKEND = "cpp"


def _native():
    _extension.load()  # idempotent: one dict lookup once loaded
    return torch.ops.fastmeta


@register("row_norm", BACKEND)
def row_norm(g: Tensor) -> Tensor:
    return _native().row_norm(g)


@register("sam_perturb", BACKEND)
def sam_perturb(theta: Tensor, g: Tensor, radius: Tensor, mask: Tensor | None, eps: float,
                global_norm: bool) -> Tensor:
    return _native().sam_perturb(theta, g, radius, mask, eps, global_norm)


@register("fd_hvp_points", BACKEND)
def fd_hvp_points(theta: Tensor, v: Tensor, delta: Tensor) -> Tensor:
    return _native().fd_hvp_points(theta, v, delta)


@register("fd_hvp_combine", BACKEND)
def fd_hvp_combine(g_o: Tensor, g_plus: Tensor, g_minus: Tensor, delta: Tensor, inner_lr: float,
                   mean: bool) -> Tensor:
    return _native().fd_hvp_combine(g_o, g_plus, g_minus, delta, inner_lr, mean)


@register("swp_mask", BACKEND)
def swp_mask(rows: int, cols: int, keep_prob: float, seed: int, rescale: bool, device: torch.device,
             dtype: torch.dtype) -> Tensor:
    out = torch.empty(rows, cols, device=device, dtype=dtype)
    _native().swp_mask(out, keep_prob, seed, rescale)
    return out


@register("sds_select", BACKEND)
def sds_select(loss_clean: Tensor, loss_perturbed: Tensor, k: int) -> Tensor:
    return _native().sds_select(loss_clean, loss_perturbed, k)


@register("bn_relu_pool", BACKEND)
def bn_relu_pool(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, negative_slope: float,
                 pool: bool) -> tuple[Tensor, Tensor, Tensor]:
    # The native op itself carries the autograd formulas (registered by native_ops()); with grad
    # off its Autograd kernel redispatches straight to the C++ kernel.
    out, _idx, mean, invstd = _bn_relu_pool_ops().bn_relu_pool(x, weight, bias, eps, negative_slope, pool)
    return out, mean, invstd
