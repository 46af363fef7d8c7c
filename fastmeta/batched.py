"""The one place where the model is evaluated per task.

Everything an algorithm needs from the model is one of three calls on task rows:

* :meth:`Evaluator.losses` -- per-task losses ``[T]`` (or per-sample ``[T, N]``) at rows ``[T, D]``;
* :meth:`Evaluator.grads` -- per-task losses ``[T]`` and gradients ``[T, D]``, optionally
  differentiable (``create_graph=True``) for second-order meta-gradients;
* :meth:`Evaluator.over_tasks` -- run a per-task computation over the meta-batch in the
  strategy's chunks and sum its results.

Two strategies sit behind those calls (DESIGN.md has the measurements that make both necessary):

``"vmap"``
    ``torch.func.vmap`` over ``functional_call``: one batched call for all T tasks. Wins where
    per-op launch cost dominates (small MLPs: 3.2 ms vs 18-22 ms for the loop on sine 1-40-40-1).
``"loop"``
    a per-task Python loop, one task per chunk. Wins for conv nets on this CPU, where a task's
    activations stay in cache and weights are not grouped (Conv-4: 1.3-1.4 s vs 2.2 s for vmap).

**The batch-norm trap.** In torch 2.13/2.14 the second-order gradient through ``F.batch_norm``
under ``vmap`` is silently wrong by ~0.5% (pytorch/functorch#534). Under ``vmap`` fastmeta
therefore intercepts ``F.batch_norm`` with a ``TorchFunctionMode`` and computes it from composite
ops (mean, biased var, rsqrt, affine): exact, any user model, same parameter names. Running
statistics are not updated under ``vmap`` (meta-learning models normally use batch statistics,
as fastmeta's Conv-4 does); use ``strategy="loop"`` if you need them updated.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.overrides import TorchFunctionMode

from .params import ParamLayout
from .tasks import TaskBatch

STRATEGIES = ("auto", "vmap", "loop")

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
    return loss_fn, loss_fn in (F.cross_entropy, F.nll_loss)


def _batch_norm_composite(input, running_mean, running_var, weight=None, bias=None,
                          training=False, momentum=0.1, eps=1e-5):
    # Same math as F.batch_norm (biased variance, eps inside the rsqrt), from ops whose
    # double-backward is correct under vmap.
    dims = [0] + list(range(2, input.dim()))
    shape = [1, -1] + [1] * (input.dim() - 2)
    if training or running_mean is None:
        mean = input.mean(dims, keepdim=True)
        var = input.var(dims, correction=0, keepdim=True)
    else:
        mean, var = running_mean.view(shape), running_var.view(shape)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


def _instance_norm_composite(input, running_mean=None, running_var=None, weight=None, bias=None,
                             use_input_stats=True, momentum=0.1, eps=1e-5):
    dims = list(range(2, input.dim()))
    shape = [1, -1] + [1] * (input.dim() - 2)
    if use_input_stats or running_mean is None:
        mean = input.mean(dims, keepdim=True)
        var = input.var(dims, correction=0, keepdim=True)
    else:
        mean, var = running_mean.view(shape), running_var.view(shape)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


class CompositeNorm(TorchFunctionMode):
    """Replace ``F.batch_norm`` / ``F.instance_norm`` by composite ops (see the module docstring)."""

    _REPLACE = {F.batch_norm: _batch_norm_composite, F.instance_norm: _instance_norm_composite}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        impl = self._REPLACE.get(func, func)
        return impl(*args, **(kwargs or {}))


class ChannelsLast(TorchFunctionMode):
    """Run every ``conv2d`` with input and weight in ``torch.channels_last`` (NHWC) memory format.

    oneDNN's NHWC convolution kernels (and their backward) are faster on this CPU than NCHW;
    converting inside the call keeps any user model unchanged. The conversion is a differentiable
    copy, so gradients (including second order) are exactly those of the NCHW convolution.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d and len(args) >= 2 and args[0].dim() == 4:
            x, w, *rest = args
            args = (x.contiguous(memory_format=torch.channels_last),
                    w.contiguous(memory_format=torch.channels_last), *rest)
        return func(*args, **kwargs)


def _with_speed_modes(forward):
    """Wrap :meth:`Evaluator.forward` in the evaluator's opt-in CPU speed modes.

    ``bf16``: the model runs under ``torch.autocast(dtype=bfloat16)`` (convolutions and matmuls in
    bf16 on AVX-512-bf16/AMX units) while the task rows, the inner SGD updates and every gradient
    stay float32 (float32 master weights); outputs are cast back to float32 so losses and the
    meta-gradient sums are float32. ``channels_last``: see :class:`ChannelsLast` (loop strategy;
    under vmap convolutions become grouped convolutions whose layout vmap chooses).
    """
    @functools.wraps(forward)
    def wrapped(self, rows, shared, x):
        cl, bf16 = getattr(self, "channels_last", False), getattr(self, "bf16", False)
        if not (cl or bf16):
            return forward(self, rows, shared, x)
        with ChannelsLast() if cl and self.strategy == "loop" else contextlib.nullcontext():
            with torch.autocast(self.layout.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = forward(self, rows, shared, x)
        return out.to(self.layout.dtype) if bf16 and out.is_floating_point() else out

    return wrapped


class Evaluator:
    """Evaluates ``model`` at task rows with one strategy (``"vmap"`` or ``"loop"``).

    Args:
        model: the ``nn.Module``; its parameters are never modified here.
        layout: the :class:`ParamLayout` (adapted rows ``[T, D]``, shared ``[P - D]``).
        loss_fn: a functional loss accepting ``reduction=`` (``F.cross_entropy``, ``F.mse_loss``).
        strategy: ``"vmap"`` or ``"loop"``.
        channels_last: opt-in CPU speed mode: convolutions in NHWC memory format (exact; loop
            strategy only). See :class:`ChannelsLast`.
        bf16: opt-in CPU speed mode: bf16 autocast with float32 master weights and float32
            meta-gradient accumulation (approximate: ~1e-2 relative gradient error). Needs
            float32 parameters.
    """

    def __init__(self, model: nn.Module, layout: ParamLayout, loss_fn: LossFn, strategy: str, *,
                 channels_last: bool = False, bf16: bool = False):
        if strategy not in ("vmap", "loop"):
            raise ValueError(f"strategy: expected 'vmap' or 'loop', got {strategy!r}")
        if not isinstance(channels_last, bool):
            raise ValueError(f"channels_last: expected a bool, got {channels_last!r}")
        if not isinstance(bf16, bool):
            raise ValueError(f"bf16: expected a bool, got {bf16!r}")
        if bf16 and layout.dtype != torch.float32:
            raise ValueError(f"bf16: needs float32 parameters (they are the float32 master weights), got {layout.dtype}")
        self.model, self.layout, self.loss_fn, self.strategy = model, layout, loss_fn, strategy
        self.channels_last, self.bf16 = channels_last, bf16
        # The composite-norm mode routes every torch call of the forward through Python, which
        # costs more than the whole forward of a small MLP: enter it only for models that have
        # batch/instance-norm modules (the only callers of F.batch_norm / F.instance_norm in torch).
        self._norm_mode = CompositeNorm if any(
            isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm))
            for m in model.modules()) else contextlib.nullcontext

    # ------------------------------------------------------------------ forward
    @_with_speed_modes
    def forward(self, rows: torch.Tensor, shared: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Model outputs ``[T, N, ...]`` for task rows ``[T, D]`` (or ``[D]``, broadcast) on ``x`` ``[T, N, ...]``.

        ``shared`` is ``[P-D]`` (one value for all tasks) or ``[T, P-D]`` (per task).
        """
        T = x.shape[0]
        if rows.dim() == 1:
            rows = rows.expand(T, -1)
        if rows.shape[0] != T:
            raise ValueError(f"rows: has {rows.shape[0]} task rows but x has {T} tasks")
        model, layout = self.model, self.layout
        # Per-task shared values ``[T, P-D]`` (one copy of the non-adapted parameters per task
        # row) let a caller get per-task gradients w.r.t. the shared parameters from one backward
        # (HF-MAML's finite differences of the shared gradient, per-task gradient norms).
        per_task_shared = shared is not None and shared.dim() == 2
        if per_task_shared and shared.shape[0] != T:
            raise ValueError(f"shared: has {shared.shape[0]} per-task rows but x has {T} tasks")
        if self.strategy == "loop":
            return torch.stack([functional_call(model, layout.named(rows[t], shared[t] if per_task_shared else shared),
                                                (x[t],)) for t in range(T)])

        if per_task_shared:
            def one_shared(row, sh, xt):
                return functional_call(model, layout.named(row, sh), (xt,))

            with self._norm_mode():
                return vmap(one_shared, in_dims=(0, 0, 0), randomness="different")(rows, shared, x)

        def one(row, xt):
            return functional_call(model, layout.named(row, shared), (xt,))

        with self._norm_mode():
            return vmap(one, in_dims=(0, 0), randomness="different")(rows, x)

    def losses(self, rows: torch.Tensor, shared: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               per_sample: bool = False, return_outputs: bool = False):
        """Per-task mean losses ``[T]`` (``per_sample=True``: ``[T, N]``); with outputs if asked."""
        out = self.forward(rows, shared, x)
        T, N = y.shape[0], y.shape[1]
        flat = self.loss_fn(out.reshape(T * N, *out.shape[2:]), y.reshape(T * N, *y.shape[2:]), reduction="none")
        per = flat.reshape(T, N, -1).mean(-1)
        loss = per if per_sample else per.mean(1)
        return (loss, out) if return_outputs else loss

    def grads(self, rows: torch.Tensor, shared: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
              create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-task losses ``[T]`` and gradients ``[T, D]`` w.r.t. the adapted rows.

        With ``create_graph=True`` the gradients are differentiable (second-order MAML);
        otherwise they are constants. ``rows`` ``[D]`` is broadcast to all tasks.
        """
        T = x.shape[0]
        if rows.dim() == 1:
            rows = rows.expand(T, -1)
        with torch.enable_grad():
            if not rows.requires_grad:
                rows = rows.detach().requires_grad_()
            loss = self.losses(rows, shared, x, y)
            (g,) = torch.autograd.grad(loss.sum(), rows, create_graph=create_graph)
        return (loss if create_graph else loss.detach()), g

    # ------------------------------------------------------------------ task chunks
    def chunks(self, batch: TaskBatch) -> list[TaskBatch]:
        """The sub-batches one pass runs on: all tasks at once (vmap) or one task each (loop)."""
        if self.strategy == "vmap":
            return [batch]
        return [batch.select(t) for t in range(batch.num_tasks)]

    def over_tasks(self, fn: Callable[[TaskBatch], tuple], batch: TaskBatch):
        """Run ``fn(sub_batch) -> (grad_sum [P], *per_task tensors)`` over the chunks.

        Returns the mean gradient over all T tasks (meta-gradients average over tasks, not sum)
        and the per-task tensors concatenated along dim 0. One chunk's graph is freed before the
        next is built, which is what keeps the loop strategy at one task's memory.
        """
        total, extras = None, None
        for sub in self.chunks(batch):
            g, *rest = fn(sub)
            total = g if total is None else total + g
            extras = [[r] for r in rest] if extras is None else [e + [r] for e, r in zip(extras, rest)]
        extras = [torch.cat(e) for e in (extras or [])]
        return (total / batch.num_tasks, *extras)


def inner_loop(ev: Evaluator, rows: torch.Tensor, shared: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               lr: float, steps: int, create_graph: bool,
               grad_hook: Optional[Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]] = None
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``steps`` SGD steps ``w <- w - lr * grad L(w; x, y)`` on task rows (MAML inner loop, Sharp-MAML eq. 9).

    Returns the adapted rows ``[T, D]`` and the list of iterates ``[w_0, ..., w_{steps-1}]``
    (each ``[T, D]``) at which the inner gradients were taken. ``grad_hook(k, w_k, g_k)`` may
    replace the gradient (Sharp-MAML_low's SAM step). Without ``create_graph`` the gradients are
    constants, which is first-order MAML (Fallah eq. 8).
    """
    T = x.shape[0]
    w = rows.expand(T, -1) if rows.dim() == 1 else rows
    iterates = []
    for k in range(steps):
        iterates.append(w)
        _, g = ev.grads(w, shared, x, y, create_graph=create_graph)
        if grad_hook is not None:
            g = grad_hook(k, w, g)
        w = w - lr * g
    return w, iterates
