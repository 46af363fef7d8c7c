"""Fused conv-block tails: ``max_pool2d(relu(batch_norm(x)), 2)`` in two passes forward and backward.

The block ``conv 3x3 -> BatchNorm2d (batch statistics) -> ReLU -> MaxPool2d(2)`` is the whole of
Conv-4 (Finn et al. 2017, sec. 5.2; Vinyals et al. 2016) and of most few-shot conv nets. Unfused,
its tail is a chain of memory-bound ATen passes over the ``[N, C, H, W]`` conv output; in a second-
order Conv-4 MAML step on this CPU they took more time than the convolutions (profile of two steps:
max-pool forward 211 ms, batch norm forward 122 ms and backward 120 ms, ReLU backward 68 ms,
convolutions ~600 ms). :func:`bn_relu_pool` computes the same function with the C++ kernels of
``csrc/cpu/bn_relu_pool_cpu.cpp`` (forward: one pass of shifted sums for the statistics, one pass
writing the pooled output and a one-byte window index; backward: one pass of routed sums, one
writing ``dx``), about 5x less time than the ATen chain in the MAML step.

Second order: when autograd records the backward (``create_graph=True``, as for MAML's inner
gradient), the backward is itself a differentiable function (``_BnReluPoolGrad``) whose backward is
a fused double-backward kernel (the formulas are derived in ``csrc/cpu/vec/block_kernels_impl.h``
and tested against ATen's double backward). Like ATen's batch norm, it has no third derivative.

:class:`FusionPlan` applies the fused tail to a model without changing it: it finds every
``BatchNorm2d, ReLU, MaxPool2d(2)`` run inside an ``nn.Sequential`` and, while active, routes those
Sequentials' forward through :func:`bn_relu_pool` where it applies (CPU, float32/float64/bf16, NCHW
or channels_last input, batch statistics, no functorch transform, not compiling, no hooks on the
three modules); anything else runs the original modules. :class:`fastmeta.MetaLearner`
``(fused=True)`` uses it.
"""
from __future__ import annotations

import contextlib
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _extension


def bn_relu_pool_reference(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """The ATen composition :func:`bn_relu_pool` fuses (the ground truth of its tests)."""
    return F.max_pool2d(F.relu(F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)), 2)


class _BnReluPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        out, idx, mean, invstd = torch.ops.fastmeta.bn_relu_pool(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, invstd, idx)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)
        return out, mean, invstd

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_invstd):
        x, weight, bias, mean, invstd, idx = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            # create_graph=True: this backward is itself differentiated (MAML's inner gradient), so
            # it runs as a differentiable function whose own backward is the fused double backward.
            dx, dw, db = _BnReluPoolGrad.apply(grad_out, x, weight, bias, mean, invstd, idx, ctx.eps)
        else:
            dx, dw, db = torch.ops.fastmeta.bn_relu_pool_backward(grad_out, x, weight, mean, invstd, idx)
        return dx if need_x else None, dw if need_w else None, db if need_b else None, None


class _BnReluPoolGrad(torch.autograd.Function):
    """The backward of :class:`_BnReluPool` as a function of ``(grad_out, x, weight)``; its backward
    is ``bn_relu_pool_double_backward`` (formulas in ``csrc/cpu/vec/block_kernels_impl.h``)."""

    @staticmethod
    def forward(ctx, grad_out, x, weight, bias, mean, invstd, idx, eps):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_out, x, weight, bias, mean, invstd, idx)
        ctx.eps = eps
        return torch.ops.fastmeta.bn_relu_pool_backward(grad_out, x, weight, mean, invstd, idx)

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        grad_out, x, weight, bias, mean, invstd, idx = ctx.saved_tensors
        need_g, need_x, need_w = ctx.needs_input_grad[:3]
        if ggx is None and ggw is None and ggb is None:
            return (None,) * 8
        with torch.no_grad():
            g_grad_out, g_x, g_w = torch.ops.fastmeta.bn_relu_pool_double_backward(
                ggx, ggw, ggb, grad_out, x, weight, mean, invstd, idx)
        grads = (g_grad_out if need_g else None, g_x if need_x else None,
                 g_w if need_w and weight is not None else None)
        if torch.is_grad_enabled():
            # Recorded (create_graph=True): the results are right, but differentiating them again
            # (a third derivative) raises, as for ATen's batch norm.
            grads = tuple(None if g is None else _NoThirdOrder.apply(g, grad_out, x, weight) for g in grads)
        return grads + (None,) * 5


class _NoThirdOrder(torch.autograd.Function):
    # Passes a second-order result through, connected to the inputs it depends on; its backward
    # (a third derivative) raises.
    @staticmethod
    def forward(ctx, value, *inputs):
        return value.view_as(value)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("bn_relu_pool does not support 3rd+ order derivatives (neither does ATen's batch_norm)")


def bn_relu_pool(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                 eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """``max_pool2d(relu(batch_norm(x, batch statistics, weight, bias, eps)), 2)``, fused (CPU).

    Batch normalization (Ioffe & Szegedy 2015, Alg. 1: ``xhat = (x - mean) / sqrt(var + eps)`` with
    the batch's biased variance, ``y = weight * xhat + bias``), ReLU, then 2x2 max-pooling with
    stride 2 (floor mode; ties go to the first maximum in row-major order, as in ``max_pool2d``).

    Args:
        x: ``[N, C, H, W]`` float32/float64, or bfloat16 (computed in float32, as under CPU bf16
            autocast), CPU; ``N * H * W > 1``. NCHW or channels_last (NHWC: the outputs and
            ``dx`` are channels_last too); other layouts are copied to NCHW first.
        weight, bias: ``[C]`` of ``x``'s dtype (float32 for bfloat16 ``x``), or ``None`` (no
            affine transform).
        eps: added to the variance.

    Returns:
        ``(out, mean, invstd)``: ``out`` ``[N, C, H // 2, W // 2]`` (twice differentiable in ``x``,
        ``weight``, ``bias``, like ATen's batch norm: see the module docstring), and the batch mean and
        ``1 / sqrt(var + eps)`` per channel ``[C]`` in the parameters' dtype (not differentiable;
        for running statistics).
    """
    if not _extension.load():
        raise RuntimeError(f"bn_relu_pool: the native extension is not available ({_extension.reason()})")
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x: expected a [N, C, H, W] tensor, got {tuple(x.shape) if isinstance(x, Tensor) else x!r}")
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    return _BnReluPool.apply(x, weight, bias, float(eps))


def _is_pool2(m: nn.Module) -> bool:
    if not isinstance(m, nn.MaxPool2d) or m.return_indices or m.ceil_mode:
        return False

    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    stride = m.stride if m.stride is not None else m.kernel_size
    return pair(m.kernel_size) == (2, 2) and pair(stride) == (2, 2) and pair(m.padding) == (0, 0) \
        and pair(m.dilation) == (1, 1)


def _uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _param_dtype(x: Tensor) -> torch.dtype:
    # bf16 activations (CPU autocast) come with float32 batch-norm parameters.
    return torch.float32 if x.dtype == torch.bfloat16 else x.dtype


def _fusable_input(x: Tensor, bn: nn.BatchNorm2d) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64, torch.bfloat16) and x.dim() == 4
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            and x.shape[0] * x.shape[2] * x.shape[3] > 1
            and all(p is None or (p.dtype == _param_dtype(x) and p.device.type == "cpu") for p in (bn.weight, bn.bias))
            and not torch._C._functorch.is_functorch_wrapped_tensor(x)
            and not torch.compiler.is_compiling())


def _fused_block(bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    out, mean, invstd = bn_relu_pool(x, bn.weight, bn.bias, bn.eps)
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        # What nn.BatchNorm2d.forward does to its running statistics in training mode.
        with torch.no_grad():
            momentum = 0.0 if bn.momentum is None else bn.momentum
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
                if bn.momentum is None:
                    momentum = 1.0 / float(bn.num_batches_tracked)
            count = x.numel() // x.shape[1]
            var = (invstd.double().pow(-2) - bn.eps) * (count / max(count - 1, 1))
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
            bn.running_var.lerp_(var.to(bn.running_var.dtype), momentum)
    return out


class FusionPlan:
    """Where ``model`` has fusable ``BatchNorm2d, ReLU, MaxPool2d(2)`` runs, and the switch that
    routes them through :func:`bn_relu_pool` (see the module docstring).

    ``FusionPlan(model).blocks`` is the number of runs found; ``with plan.active(): model(x)``
    computes the same function with the fused tails (the model object is unchanged outside the
    ``with``, and its parameters and state_dict never change).
    """

    def __init__(self, model: nn.Module):
        self._runs: list[tuple[nn.Sequential, frozenset]] = []
        for seq in model.modules():
            if not isinstance(seq, nn.Sequential):
                continue
            mods = list(seq)
            starts = [i for i in range(len(mods) - 2)
                      if type(mods[i]) is nn.BatchNorm2d and type(mods[i + 1]) is nn.ReLU and _is_pool2(mods[i + 2])]
            if starts:
                self._runs.append((seq, frozenset(starts)))
        self.blocks = sum(len(s) for _, s in self._runs)
        self._depth = 0

    @staticmethod
    def _forward(seq: nn.Sequential, starts: frozenset, x):
        mods = list(seq)
        i = 0
        while i < len(mods):
            if (i in starts and isinstance(x, Tensor) and _uses_batch_stats(mods[i]) and _fusable_input(x, mods[i])
                    and not any(m._forward_hooks or m._forward_pre_hooks for m in mods[i:i + 3])):
                x = _fused_block(mods[i], x)
                i += 3
            else:
                x = mods[i](x)
                i += 1
        return x

    @contextlib.contextmanager
    def active(self):
        """Route the found runs through :func:`bn_relu_pool` inside the ``with`` (re-entrant)."""
        if not self._runs or not _extension.load():
            yield
            return
        if self._depth == 0:
            for seq, starts in self._runs:
                seq.forward = types.MethodType(lambda s, x, _st=starts: FusionPlan._forward(s, _st, x), seq)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                for seq, _ in self._runs:
                    seq.__dict__.pop("forward", None)
