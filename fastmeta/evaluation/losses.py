"""Which loss an evaluator applies, and how it reduces to per-task (or per-sample) values."""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[..., torch.Tensor]


def resolve_loss(loss_fn) -> tuple[LossFn, bool]:
    """``(fn, is_classification)`` from what a user passes as ``loss_fn``.

    * a name: ``"cross_entropy"``/``"ce"`` (classification) or ``"mse"``;
    * a functional loss taking ``reduction=`` (``F.cross_entropy``, ``F.mse_loss``, ...): used as is;
    * a torch loss module (``nn.CrossEntropyLoss(label_smoothing=0.1)``, ``nn.MSELoss()``, ...): the
      functional form with the module's options where that is the same function, else the module
      itself as a per-task loss (below);
    * any other callable ``loss(output [N, ...], target [N, ...]) -> scalar``: a :class:`PerTaskLoss`,
      evaluated once per task (under ``torch.vmap`` when it traces, else a loop over tasks).

    ``ValueError`` naming ``loss_fn`` for an unknown name or a non-callable.
    """
    if loss_fn in ("cross_entropy", "ce", None):
        return F.cross_entropy, True
    if loss_fn in ("mse", "mse_loss"):
        return F.mse_loss, False
    if isinstance(loss_fn, str):
        raise ValueError(f"loss_fn: unknown name {loss_fn!r}; use 'cross_entropy', 'mse' or a callable")
    if isinstance(loss_fn, PerTaskLoss):
        return loss_fn, loss_fn.classification
    if isinstance(loss_fn, nn.Module):
        return _from_module(loss_fn)
    if not callable(loss_fn):
        raise ValueError(f"loss_fn: expected a name or a callable, got {type(loss_fn).__name__}")
    if _takes_reduction(loss_fn):
        return loss_fn, _kind(loss_fn) in CLASSIFICATION_LOSSES
    return PerTaskLoss(loss_fn), False


def _takes_reduction(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: assume the plain (out, y) form
        return False
    return "reduction" in params


def _kind(fn):
    """The functional behind ``functools.partial`` wrappers (what the shape rules are keyed on)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def _from_module(m: nn.Module) -> tuple[LossFn, bool]:
    # A module whose per-sample losses averaged over the task equal its own "mean" reduction maps
    # onto the functional form (which the strategies batch over tasks). Class weights or a
    # non-negative ignore_index change what "mean" divides by, and other reductions change the
    # per-task value: those keep the module's own semantics, one task at a time.
    classification = isinstance(m, (nn.CrossEntropyLoss, nn.NLLLoss))
    if getattr(m, "reduction", "mean") == "mean" and getattr(m, "weight", None) is None:
        if type(m) is nn.MSELoss:
            return F.mse_loss, False
        if type(m) is nn.L1Loss:
            return F.l1_loss, False
        if type(m) is nn.SmoothL1Loss:
            return functools.partial(F.smooth_l1_loss, beta=m.beta), False
        if type(m) is nn.HuberLoss:
            return functools.partial(F.huber_loss, delta=m.delta), False
        if type(m) is nn.BCEWithLogitsLoss:
            return functools.partial(F.binary_cross_entropy_with_logits, pos_weight=m.pos_weight), False
        if type(m) is nn.CrossEntropyLoss and m.ignore_index < 0:
            return functools.partial(F.cross_entropy, label_smoothing=m.label_smoothing), True
        if type(m) is nn.NLLLoss and m.ignore_index < 0:
            return F.nll_loss, True
    return PerTaskLoss(m, classification), classification


class PerTaskLoss:
    """A loss ``fn(output [N, ...], target [N, ...]) -> scalar`` applied to each task separately.

    ``__call__(out [T, N, ...], y [T, N, ...]) -> [T]``: under ``torch.vmap`` over the task dim when
    ``fn`` traces (one batched call), else a Python loop over tasks (the value is the same). There
    are no per-sample values: algorithms that need them (ESAM's SDS) ask for a loss taking
    ``reduction='none'``. ``ValueError`` naming ``loss_fn`` if ``fn`` does not return one scalar.
    """

    def __init__(self, fn, classification: bool = False):
        self.fn, self.classification = fn, classification
        self._vmap_ok: Optional[bool] = None

    def _one(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        v = self.fn(out, y)
        if not isinstance(v, torch.Tensor) or v.dim() != 0:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"loss_fn: must return a scalar tensor for one task's outputs, got {shape}")
        return v

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._vmap_ok is not False:
            try:
                per = torch.vmap(self._one)(out, y)
                self._vmap_ok = True
                return per
            except ValueError:
                raise
            except Exception:  # noqa: BLE001 - a loss vmap cannot trace runs task by task
                if self._vmap_ok:
                    raise
                self._vmap_ok = False
        return torch.stack([self._one(out[t], y[t]) for t in range(out.shape[0])])

    def __repr__(self) -> str:
        return f"PerTaskLoss({self.fn!r})"


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
    kind = _kind(loss_fn)
    if kind in ELEMENTWISE_LOSSES:
        expected = out.shape
    elif kind in CLASSIFICATION_LOSSES:
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
    if isinstance(loss_fn, PerTaskLoss):
        if per_sample:
            raise ValueError(f"loss_fn: this algorithm needs per-sample losses, which {loss_fn.fn!r} does not "
                             "give; pass a loss that accepts reduction='none' (e.g. F.cross_entropy)")
        return loss_fn(out, y)
    if _kind(loss_fn) in ELEMENTWISE_LOSSES:
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
