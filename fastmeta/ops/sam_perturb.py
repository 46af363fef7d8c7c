"""``sam_perturb``: the normalized SAM ascent step on task rows (Sharp-MAML eqs. 11 and 13, SAM eq. 8a)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _backend, _validate

__all__ = ["sam_perturb"]


@torch.library.custom_op("fastmeta_ops::sam_perturb", mutates_args=())
def _sam_perturb_op(theta: Tensor, g: Tensor, radius: Tensor, mask: Optional[Tensor], eps: float,
                    global_norm: bool) -> Tensor:
    return _backend.get_impl("sam_perturb", g.device)(theta, g, radius, mask, eps, global_norm)


@_sam_perturb_op.register_fake
def _(theta, g, radius, mask, eps, global_norm):
    return g.new_empty(g.shape)


def _setup_context(ctx, inputs, output):
    ctx.theta_dim = inputs[0].dim()


def _backward(ctx, grad: Tensor):
    # The perturbation is a constant (SAM; Sharp-MAML eq. 10): d out / d theta = I, nothing else.
    grad_theta = grad if ctx.theta_dim == 2 else grad.sum(dim=0)
    return grad_theta, None, None, None, None, None


_sam_perturb_op.register_autograd(_backward, setup_context=_setup_context)


def sam_perturb(theta: Tensor, g: Tensor, radius: float | Tensor, mask: Tensor | None = None,
                eps: float = 1e-12, global_norm: bool = False) -> Tensor:
    """SAM perturbation of task rows: ``theta + radius * (g*mask) / max(||g*mask||, eps)``.

    Per-task inner-loop perturbation (Sharp-MAML eq. 11: ``eps_t = alpha_low g_t / ||g_t||``) uses the
    norm of each row; the upper-level perturbation of Sharp-MAML eq. 13 normalizes the meta-gradient
    over *all* parameters: ``global_norm=True``. ESAM's stochastic weight perturbation (SWP) passes a
    :func:`swp_mask` as ``mask``.

    Args:
        theta: ``[D]`` (broadcast to every task) or ``[T, D]`` parameters.
        g: ``[T, D]`` per-task gradients; with ``global_norm=True`` also ``[D]``.
        radius: the SAM radius (``alpha`` in Sharp-MAML), a python float >= 0 or a ``[T]`` tensor of
            per-task radii (a single radius with ``global_norm``).
        mask: optional, same shape as ``g``: 0/1 keep mask or already rescaled values (bool is cast).
        eps: the norm is clamped to ``max(norm, eps)``: a zero row gives a zero perturbation, never NaN.
        global_norm: take one norm over all elements of ``g`` instead of one per row.

    Returns:
        ``[T, D]`` perturbed parameters (``[D]`` if ``g`` and ``theta`` are ``[D]``), dtype of ``g``.
        Gradient flows to ``theta`` as the identity; the perturbation (``g``, ``mask``, ``radius``) is
        held constant, as in SAM and Sharp-MAML eq. 10.
    """
    _validate.tensor(g, "g", (1, 2) if global_norm else (2,))
    _validate.tensor(theta, "theta", (1, 2))
    _validate.same_device_dtype(g, "g", theta, "theta")
    vector_in = g.dim() == 1
    if vector_in and theta.dim() != 1:
        raise ValueError(f"theta must be [D] when g is [D], got shape {tuple(theta.shape)}")
    g2 = g[None] if vector_in else g
    t, d = g2.shape
    _validate.same_size(theta.shape[-1], d, "theta", "D (last dim) vs g")
    if theta.dim() == 2:
        _validate.same_size(theta.shape[0], t, "theta", "T (first dim) vs g")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise ValueError(f"mask must be a tensor or None, got {type(mask).__name__}")
        if mask.shape != g.shape:
            raise ValueError(f"mask must have g's shape {tuple(g.shape)}, got {tuple(mask.shape)}")
        _validate.same_device_dtype(g, "g", mask, "mask", check_dtype=mask.dtype != torch.bool)
        mask = (mask.to(g.dtype) if mask.dtype == torch.bool else mask).reshape(g2.shape)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    if global_norm and isinstance(radius, Tensor) and radius.numel() != 1:
        raise ValueError(f"radius must be a single value with global_norm=True, got shape {tuple(radius.shape)}")
    radius_t = _validate.per_task(radius, "radius", t, g2, positive=False)
    out = _backend.call("sam_perturb", _sam_perturb_op, g.device, theta, g2, radius_t, mask, float(eps),
                        bool(global_norm))
    return out[0] if vector_in else out
