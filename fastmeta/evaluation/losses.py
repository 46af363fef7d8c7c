"""Which loss an evaluator applies, and how it reduces to per-task (or per-sample) values."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[..., torch.Tensor]


def resolve_loss(loss_fn) -> tuple[LossFn, bool]:
    """``(fn(output, target, reduction=...), is_classification)`` from a name or a callable."""
    if loss_fn in ("cross_entropy", "ce", None):
        return F.cross_entropy, True
    if loss_fn in ("mse", "mse_loss"):
        return F.mse_loss, False
    if isinstance(loss_fn, str):
        raise ValueError(f"loss_fn: unknown name {loss_fn!r}; use 'cross_entropy', 'mse' or a callable")
    if isinstance(loss_fn, nn.Module):
        raise ValueError("loss_fn: pass a functional loss that takes reduction=... (e.g. F.cross_entropy), not a module")
    if not callable(loss_fn):
        raise ValueError(f"loss_fn: expected a name or a callable, got {type(loss_fn).__name__}")
    return loss_fn, loss_fn in CLASSIFICATION_LOSSES


# Losses computed element by element (any shape, no class dimension): applied to [T, N, ...] outputs
# directly. Cross-entropy is not one (it reads dim 1 as the classes).
ELEMENTWISE_LOSSES = (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.binary_cross_entropy_with_logits)


CLASSIFICATION_LOSSES = (F.cross_entropy, F.nll_loss)


def target_mismatch(loss_fn: LossFn, out: torch.Tensor, y: torch.Tensor) -> Optional[str]:
    """Why targets ``y`` ``[T, N, ...]`` do not fit outputs ``out`` ``[T, N, ...]`` sample by sample
    (``None`` if they do, or if ``loss_fn`` is a callable whose shape rules are unknown).

    A mismatch would not fail: the loss would broadcast, e.g. an MSE target ``[T, N]`` against an
    output ``[T, N, 1]`` gives an ``[N, N]`` loss per task, and under vmap/bmm an ``[T*N, T*N]`` one
    mixing targets across tasks.
    """
    if loss_fn in ELEMENTWISE_LOSSES:
        expected = out.shape
    elif loss_fn in CLASSIFICATION_LOSSES:
        # Class indices drop the class dim (dim 2 of [T, N, C, ...]); class probabilities keep it.
        expected = out.shape if y.is_floating_point() else out.shape[:2] + out.shape[3:]
    else:
        return None
    if y.shape[1:] == expected[1:]:
        return None
    return (f"targets of shape {tuple(y.shape[1:])} per task do not fit the model's outputs "
            f"{tuple(out.shape[1:])} per task (expected targets {tuple(expected[1:])}; the loss would broadcast)")


def task_losses(loss_fn: LossFn, out: torch.Tensor, y: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """Per-task mean losses ``[T]`` (``per_sample=True``: ``[T, N]``) of outputs ``[T, N, ...]``
    against targets ``[T, N, ...]`` (``ValueError`` naming ``y`` where an element-wise loss would
    broadcast them: :func:`target_mismatch`)."""
    if loss_fn in ELEMENTWISE_LOSSES:
        if out.shape != y.shape:
            raise ValueError(f"y: {target_mismatch(loss_fn, out, y) or f'targets {tuple(y.shape)} vs outputs {tuple(out.shape)}'}")
        # Element-wise losses take [T, N, ...] as they are: no reshapes (and no view nodes for
        # them on every backward), one reduction.
        per = loss_fn(out, y, reduction="none")
        dims = tuple(range(2 if per_sample else 1, per.dim()))
        return per.mean(dims) if dims else per
    T, N = y.shape[0], y.shape[1]
    flat = loss_fn(out.reshape(T * N, *out.shape[2:]), y.reshape(T * N, *y.shape[2:]), reduction="none")
    # The task mean in one reduction (equal weights, so the mean over N*k elements equals the
    # mean over samples of the per-sample means): one autograd node fewer on the
    # double-backward path of every MAML step.
    return flat.reshape(T, N, -1).mean(-1) if per_sample else flat.reshape(T, -1).mean(1)
