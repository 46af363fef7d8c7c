"""Torch-function modes an evaluator runs the model under, and the opt-in CPU speed modes.

**The batch-norm trap.** In torch 2.13/2.14 the second-order gradient through ``F.batch_norm``
under ``vmap`` is silently wrong by ~0.5% (pytorch/functorch#534). Under ``vmap`` the evaluator
therefore runs the model in :class:`CompositeNorm`, which computes batch and instance norm from
composite ops (mean, biased var, rsqrt, affine): exact, any user model, same parameter names.
Running statistics are not updated under ``vmap`` (meta-learning models normally use batch
statistics); use ``strategy="loop"`` if you need them updated.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _normalize(input, dims, running_mean, running_var, weight, bias, use_input_stats: bool, eps: float):
    # Same math as ATen's batch/instance norm (biased variance, eps inside the rsqrt), from ops
    # whose double backward is correct under vmap. ``dims``: the dimensions the statistics reduce.
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


def _batch_norm_composite(input, running_mean, running_var, weight=None, bias=None,
                          training=False, momentum=0.1, eps=1e-5):
    dims = [0] + list(range(2, input.dim()))
    return _normalize(input, dims, running_mean, running_var, weight, bias, training, eps)


def _instance_norm_composite(input, running_mean=None, running_var=None, weight=None, bias=None,
                             use_input_stats=True, momentum=0.1, eps=1e-5):
    dims = list(range(2, input.dim()))
    return _normalize(input, dims, running_mean, running_var, weight, bias, use_input_stats, eps)


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


def with_speed_modes(forward):
    """Wrap :meth:`Evaluator.forward` in the evaluator's opt-in CPU speed modes.

    ``bf16``: the model runs under ``torch.autocast(dtype=bfloat16)`` (convolutions and matmuls in
    bf16 on AVX-512-bf16/AMX units) while the task rows, the inner SGD updates and every gradient
    stay float32 (float32 master weights); outputs are cast back to float32 so losses and the
    meta-gradient sums are float32. ``channels_last``: see :class:`ChannelsLast` (loop strategy;
    under vmap convolutions become grouped convolutions whose layout vmap chooses). ``fused`` needs
    no mode: the evaluator runs a fused copy of the model (:func:`fastmeta.nn.fuse_conv_blocks`)
    through ``functional_call`` with the model's parameter names; its chains fall back to the
    original modules under ``vmap`` (and so under :class:`CompositeNorm`), fused in the loop strategy.
    """
    @functools.wraps(forward)
    def wrapped(self, rows, shared, x):
        cl, bf16 = self.channels_last, self.bf16
        if not (cl or bf16):
            return forward(self, rows, shared, x)
        with ChannelsLast() if cl and self.strategy == "loop" else contextlib.nullcontext():
            with torch.autocast(self.layout.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = forward(self, rows, shared, x)
        return out.to(self.layout.dtype) if bf16 and out.is_floating_point() else out

    return wrapped
