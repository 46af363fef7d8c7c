"""``fd_hvp_points``: the points of a central finite-difference Hessian-vector product (Fallah eqs. 9, 11)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _validate

__all__ = ["fd_hvp_points"]


@torch.library.custom_op("fastmeta_ops::fd_hvp_points", mutates_args=())
def _fd_hvp_points_op(theta: Tensor, v: Tensor, delta: Tensor) -> Tensor:
    return _backend.get_impl("fd_hvp_points", v.device)(theta, v, delta)


@_fd_hvp_points_op.register_fake
def _(theta, v, delta):
    return v.new_empty((2 * v.shape[0], v.shape[1]))


def _setup_context(ctx, inputs, output):
    theta, v, delta = inputs
    ctx.theta_dim = theta.dim()
    ctx.save_for_backward(v, delta)


def _backward(ctx, grad: Tensor):
    v, delta = ctx.saved_tensors
    t = v.shape[0]
    g_plus, g_minus = grad[:t], grad[t:]
    grad_theta = grad_v = grad_delta = None
    if ctx.needs_input_grad[0]:
        grad_theta = g_plus + g_minus if ctx.theta_dim == 2 else (g_plus + g_minus).sum(dim=0)
    diff = g_plus - g_minus
    if ctx.needs_input_grad[1]:
        grad_v = delta[:, None] * diff
    if ctx.needs_input_grad[2]:
        grad_delta = (diff * v).sum(dim=1)
    return grad_theta, grad_v, grad_delta


_fd_hvp_points_op.register_autograd(_backward, setup_context=_setup_context)


def fd_hvp_points(theta: Tensor, v: Tensor, delta: float | Tensor) -> Tensor:
    """Evaluation points of a central finite-difference HVP, ready for one batched gradient call.

    HF-MAML (Fallah et al. 2020, eqs. 9 and 11) approximates ``H_t v_t`` by
    ``(grad f(theta + delta_t v_t) - grad f(theta - delta_t v_t)) / (2 delta_t)``; this op makes the
    ``2T`` points in one pass so the model is evaluated once on all of them (see
    :func:`fd_hvp_combine` for the other half). A finite difference is an approximation, never exact;
    on ReLU/max-pool nets in float32 it can be far off (docs/design.md).

    Args:
        theta: ``[D]`` (shared) or ``[T, D]`` per-task parameters.
        v: ``[T, D]`` directions (Fallah: the query gradient at the adapted parameters).
        delta: step, a float > 0 or a ``[T]`` tensor of per-task steps (all > 0).

    Returns:
        ``[2T, D]``: rows ``theta + delta_t v_t`` for ``t < T``, then ``theta - delta_t v_t``.
        Differentiable in theta, v and delta.
    """
    _validate.tensor(v, "v", (2,))
    _validate.tensor(theta, "theta", (1, 2))
    _validate.same_device_dtype(v, "v", theta, "theta")
    t, d = v.shape
    _validate.same_size(theta.shape[-1], d, "theta", "D (last dim) vs v")
    if theta.dim() == 2:
        _validate.same_size(theta.shape[0], t, "theta", "T (first dim) vs v")
    delta_t = _validate.per_task(delta, "delta", t, v, positive=True)
    return _backend.call("fd_hvp_points", _fd_hvp_points_op, v.device, theta, v, delta_t)
