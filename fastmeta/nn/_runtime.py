"""The run-time half of conv-block fusion: which module chains the fused op computes, and running
one chain (a *site*) fused or, where the op would not compute the same thing, as its modules.

A chain is ``BatchNorm2d -> ReLU/LeakyReLU -> [MaxPool2d(2)]`` (exact types; a LeakyReLU with
``negative_slope >= 0``: :func:`fastmeta.ops.bn_relu_pool` needs a non-decreasing activation).
Both finders (the ``nn.Sequential`` walk of :class:`~fastmeta.nn.FusedSequential` and the torch.fx
trace of ``fastmeta/nn/_trace.py``) hand their chains to :func:`run_chain`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.bn_relu_pool import bn_relu_pool, param_dtype


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def is_pool2(m) -> bool:
    """``MaxPool2d`` with a 2x2 window, stride 2, no padding/dilation, floor mode, no indices."""
    if not isinstance(m, nn.MaxPool2d) or m.return_indices or m.ceil_mode:
        return False
    stride = m.stride if m.stride is not None else m.kernel_size
    return _pair(m.kernel_size) == (2, 2) and _pair(stride) == (2, 2) and _pair(m.padding) == (0, 0) \
        and _pair(m.dilation) == (1, 1)


def slope_of(m) -> Optional[float]:
    """The activation's negative slope (0 for ``nn.ReLU``), or None if ``m`` is not a fusable one."""
    if type(m) is nn.ReLU:
        return 0.0
    if type(m) is nn.LeakyReLU:
        s = m.negative_slope
        if isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s >= 0:
            return float(s)
    return None


def is_bn(m) -> bool:
    return type(m) is nn.BatchNorm2d


def uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def fusable_input(x, bn: nn.BatchNorm2d) -> bool:
    # The functorch test first: a layout query on a batched tensor raises inside vmap.
    return (isinstance(x, Tensor) and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(x)
            and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64, torch.bfloat16) and x.dim() == 4
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            and x.shape[0] * x.shape[2] * x.shape[3] > 1
            and all(p is None or (p.dtype == param_dtype(x) and p.device.type == "cpu") for p in (bn.weight, bn.bias)))


def has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def fused_block(bn: nn.BatchNorm2d, x: Tensor, negative_slope: float, pool: bool) -> Tensor:
    """One fused call, updating ``bn``'s running statistics as ``nn.BatchNorm2d.forward`` does."""
    out, mean, invstd = bn_relu_pool(x, bn.weight, bn.bias, bn.eps, negative_slope, pool)
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            momentum = 0.0 if bn.momentum is None else bn.momentum
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
                if bn.momentum is None:
                    momentum = 1.0 / float(bn.num_batches_tracked)
            count = x.numel() // x.shape[1]
            var = (invstd.double().pow(-2) - bn.eps) * (count / max(count - 1, 1))  # unbiased, as BatchNorm2d
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
            bn.running_var.lerp_(var.to(bn.running_var.dtype), momentum)
    return out


def run_chain(bn: nn.BatchNorm2d, act: nn.Module, pool: Optional[nn.Module], x) -> Tensor:
    """``pool(act(bn(x)))`` (``act(bn(x))`` without a pool): fused where :func:`bn_relu_pool` computes
    the same thing (batch statistics, a CPU float32/float64/bfloat16 4-d input with parameters of
    the matching dtype, no functorch transform, not compiling, no hook on the modules) and is the
    faster (not for a channels_last input without a pool), else the modules themselves."""
    slope = slope_of(act)
    # Without a pool on a channels_last input the fused kernel is slower than ATen's channels_last
    # batch norm + activation (measured 0.5-0.9x forward + backward at C = 64..160): run the modules.
    unpooled_nhwc = pool is None and isinstance(x, Tensor) and not x.is_contiguous()
    if (slope is not None and not unpooled_nhwc and uses_batch_stats(bn) and fusable_input(x, bn)
            and not (has_hooks(bn) or has_hooks(act) or (pool is not None and has_hooks(pool)))):
        return fused_block(bn, x, slope, pool is not None)
    y = act(bn(x))
    return pool(y) if pool is not None else y


def sequential_chain(mods: list, i: int) -> int:
    """Length (3 with a pool, 2 without, 0: no chain) of the chain starting at ``mods[i]``."""
    if not (is_bn(mods[i]) and i + 1 < len(mods) and slope_of(mods[i + 1]) is not None):
        return 0
    return 3 if i + 2 < len(mods) and is_pool2(mods[i + 2]) else 2
