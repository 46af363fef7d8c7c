"""``fd_hvp_combine``: the HF-MAML meta-gradient from finite-difference gradients (Fallah eqs. 10-11)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _backend, _validate

__all__ = ["fd_hvp_combine"]


@torch.library.custom_op("fastmeta_ops::fd_hvp_combine", mutates_args=())
def _fd_hvp_combine_op(g_o: Tensor, g_plus: Tensor, g_minus: Tensor, delta: Tensor, inner_lr: float,
                       mean: bool) -> Tensor:
    return _backend.get_impl("fd_hvp_combine", g_o.device)(g_o, g_plus, g_minus, delta, inner_lr, mean)


@_fd_hvp_combine_op.register_fake
def _(g_o, g_plus, g_minus, delta, inner_lr, mean):
    return g_o.new_empty(g_o.shape[1:] if mean else g_o.shape)


def _setup_context(ctx, inputs, output):
    g_o, g_plus, g_minus, delta, inner_lr, mean = inputs
    ctx.inner_lr, ctx.mean = inner_lr, mean
    ctx.save_for_backward(g_plus, g_minus, delta)


def _backward(ctx, grad: Tensor):
    g_plus, g_minus, delta = ctx.saved_tensors
    t = g_plus.shape[0]
    per_task = grad.expand(t, -1) / t if ctx.mean else grad
    coef = -ctx.inner_lr / (2 * delta)
    grad_plus = coef[:, None] * per_task
    grad_delta = None
    if ctx.needs_input_grad[3]:
        grad_delta = (per_task * (g_plus - g_minus)).sum(dim=1) * (ctx.inner_lr / (2 * delta * delta))
    return per_task, grad_plus, -grad_plus, grad_delta, None, None


_fd_hvp_combine_op.register_autograd(_backward, setup_context=_setup_context)


def fd_hvp_combine(g_o: Tensor, g_plus: Tensor, g_minus: Tensor, delta: float | Tensor, inner_lr: float,
                   reduce: str = "mean") -> Tensor:
    """HF-MAML meta-gradient in one pass over the three gradient matrices.

    Fallah et al. (2020) eqs. 10-11: per task,
    ``(I - alpha H_t) g_o,t ~= g_o,t - alpha (g_plus,t - g_minus,t) / (2 delta_t)`` where
    ``g_plus/minus`` are gradients at :func:`fd_hvp_points` and ``g_o`` is the outer (query) gradient.
    The meta-gradient **averages over tasks** (mean, not the papers' sum).

    Args:
        g_o, g_plus, g_minus: ``[T, D]`` each, one dtype and device.
        delta: the finite-difference step used for the points, float > 0 or ``[T]`` tensor.
        inner_lr: the inner step size alpha.
        reduce: ``"mean"`` -> ``[D]`` meta-gradient; ``"none"`` -> ``[T, D]`` per-task terms.

    Returns:
        ``[D]`` (mean over tasks) or ``[T, D]``. Linear in all tensors, differentiable.
    """
    _validate.tensor(g_o, "g_o", (2,))
    for name, x in (("g_plus", g_plus), ("g_minus", g_minus)):
        _validate.tensor(x, name, (2,))
        _validate.same_device_dtype(g_o, "g_o", x, name)
        if x.shape != g_o.shape:
            raise ValueError(f"{name} must have g_o's shape {tuple(g_o.shape)} ([T, D]), got {tuple(x.shape)}")
    if reduce not in ("mean", "none"):
        raise ValueError(f"reduce must be 'mean' or 'none', got {reduce!r}")
    if isinstance(inner_lr, bool) or not isinstance(inner_lr, (int, float)):
        raise ValueError(f"inner_lr must be a float, got {type(inner_lr).__name__}")
    if not math.isfinite(inner_lr):
        raise ValueError(f"inner_lr must be finite, got {inner_lr}")
    delta_t = _validate.per_task(delta, "delta", g_o.shape[0], g_o, positive=True)
    return _backend.call("fd_hvp_combine", _fd_hvp_combine_op, g_o.device, g_o, g_plus, g_minus, delta_t,
                         float(inner_lr), reduce == "mean")
