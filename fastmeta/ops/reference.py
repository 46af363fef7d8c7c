"""Reference implementations of the fused ops: plain PyTorch, written for clarity, any device.

These are the oracle every backend is tested against. Arguments are already validated and
normalized by the public wrappers (``fastmeta/ops/<op>.py``): ``g``/``v`` are ``[T, D]``, ``theta`` is
``[D]`` or ``[T, D]``, ``radius``/``delta`` are ``[T]`` tensors of the data dtype; ``bn_relu_pool``'s
``x`` is ``[N, C, H, W]`` (NCHW or channels_last) with ``[C]`` weight/bias of the parameter dtype.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import register

# The op module, not the function that fastmeta.ops re-exports under the same name: its keep rule.
swp = importlib.import_module(f"{__package__}.swp_mask")

BACKEND = "reference"


@register("row_norm", BACKEND)
def row_norm(g: Tensor) -> Tensor:
    """``[T, D] -> [T]``: L2 norm of each task row."""
    return torch.linalg.vector_norm(g, dim=1)


@register("sam_perturb", BACKEND)
def sam_perturb(theta: Tensor, g: Tensor, radius: Tensor, mask: Tensor | None, eps: float,
                global_norm: bool) -> Tensor:
    """``theta + radius_t * (g*mask)_t / max(||g*mask||, eps)``; the norm per row, or over all of g."""
    gm = g if mask is None else g * mask
    if global_norm:
        norm = torch.linalg.vector_norm(gm).expand(g.shape[0])
    else:
        norm = torch.linalg.vector_norm(gm, dim=1)
    scale = radius / norm.clamp_min(eps)
    return theta + scale[:, None] * gm


@register("fd_hvp_points", BACKEND)
def fd_hvp_points(theta: Tensor, v: Tensor, delta: Tensor) -> Tensor:
    """``[2T, D]``: rows ``theta + delta_t v_t`` (t < T), then ``theta - delta_t v_t``."""
    step = delta[:, None] * v
    return torch.cat([theta + step, theta - step], dim=0)


@register("fd_hvp_combine", BACKEND)
def fd_hvp_combine(g_o: Tensor, g_plus: Tensor, g_minus: Tensor, delta: Tensor, inner_lr: float,
                   mean: bool) -> Tensor:
    """Per task ``g_o - inner_lr (g_plus - g_minus) / (2 delta_t)``; averaged over tasks if ``mean``."""
    per_task = g_o - inner_lr * (g_plus - g_minus) / (2 * delta[:, None])
    return per_task.mean(dim=0) if mean else per_task


def _int64(u: int) -> int:
    """The int64 with the bits of the uint64 ``u``."""
    return u - 2**64 if u >= 2**63 else u


def _shift_right(z: Tensor, k: int) -> Tensor:
    """Logical right shift of the uint64 bits held in int64 ``z`` (torch's ``>>`` is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(z: Tensor) -> Tensor:
    """splitmix64 on int64 tensors holding uint64 bits: + and * wrap mod 2**64 in two's complement,
    which gives the same bits as uint64 arithmetic (torch has few uint64 kernels, fewer on CUDA)."""
    z = z + _int64(swp.SPLITMIX64_GAMMA)
    z = (z ^ _shift_right(z, 30)) * _int64(swp.SPLITMIX64_MUL1)
    z = (z ^ _shift_right(z, 27)) * _int64(swp.SPLITMIX64_MUL2)
    return z ^ _shift_right(z, 31)


@register("swp_mask", BACKEND)
def swp_mask(rows: int, cols: int, keep_prob: float, seed: int, rescale: bool, device: torch.device,
             dtype: torch.dtype) -> Tensor:
    """Element-wise Bernoulli(keep_prob) mask ``[rows, cols]``: element i is kept when
    ``(splitmix64(splitmix64(seed) + i) >> 11) < ceil(keep_prob * 2**53)`` (``fastmeta/ops/swp_mask.py``)."""
    index = torch.arange(rows * cols, dtype=torch.int64, device=device)
    h = _splitmix64(index + _int64(swp.splitmix64(seed)))
    keep = _shift_right(h, 11) < swp.keep_threshold(keep_prob)
    fill = 1.0 / keep_prob if rescale else 1.0
    return (keep.to(dtype) * fill).reshape(rows, cols)


@register("sds_select", BACKEND)
def sds_select(loss_clean: Tensor, loss_perturbed: Tensor, k: int) -> Tensor:
    """Per row the ``k`` indices of largest ``loss_perturbed - loss_clean`` (stable: ties by lower index)."""
    increase = loss_perturbed - loss_clean
    return torch.sort(increase, dim=1, descending=True, stable=True).indices[:, :k].contiguous()


@register("bn_relu_pool", BACKEND)
def bn_relu_pool(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, negative_slope: float = 0.0,
                 pool: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``max_pool2d(leaky_relu(batch_norm(x, batch statistics), negative_slope), 2)`` (no pool when
    ``pool`` is False; ``relu`` for slope 0): the ATen composition the cpp kernels fuse.

    ``out`` is differentiable twice through ATen's own formulas (and, like them, not a third time);
    ``mean`` and ``invstd = 1 / sqrt(biased var + eps)`` per channel ``[C]`` are computed aside, in
    the parameter dtype (float32 for bfloat16 ``x``), and are not differentiable.
    """
    z = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    out = F.relu(z) if negative_slope == 0 else F.leaky_relu(z, negative_slope)
    if pool:
        out = F.max_pool2d(out, 2)
    with torch.no_grad():
        xs = x.float() if x.dtype == torch.bfloat16 else x
        var, mean = torch.var_mean(xs, dim=(0, 2, 3), correction=0)
        invstd = torch.rsqrt(var + eps)
    return out, mean, invstd
