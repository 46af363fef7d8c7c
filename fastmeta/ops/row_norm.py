"""``row_norm``: L2 norm of each task row, ``[T, D] -> [T]``."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _validate

__all__ = ["row_norm"]


@torch.library.custom_op("fastmeta_ops::row_norm", mutates_args=())
def _row_norm_op(g: Tensor) -> Tensor:
    return _backend.get_impl("row_norm", g.device)(g)


@_row_norm_op.register_fake
def _(g: Tensor) -> Tensor:
    return g.new_empty(g.shape[0])


def _setup_context(ctx, inputs, output):
    (g,) = inputs
    ctx.save_for_backward(g, output)


def _backward(ctx, grad: Tensor):
    g, norm = ctx.saved_tensors
    # d||g_t|| / dg_t = g_t / ||g_t||; a zero row has a zero (sub)gradient, never NaN.
    safe = torch.where(norm > 0, grad / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(norm))
    return safe[:, None] * g


_row_norm_op.register_autograd(_backward, setup_context=_setup_context)


def row_norm(g: Tensor) -> Tensor:
    """L2 norm of every task row.

    Args:
        g: ``[T, D]`` task rows (e.g. per-task gradients), float32 or float64, any strides.

    Returns:
        ``[T]`` norms ``||g_t||_2``, same dtype. Differentiable (the gradient of a zero row is 0).
    """
    _validate.tensor(g, "g", (2,))
    return _backend.call("row_norm", _row_norm_op, g.device, g)
