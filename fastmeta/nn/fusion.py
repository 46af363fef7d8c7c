"""``fuse_conv_blocks``: a model whose ``BatchNorm2d, ReLU, MaxPool2d(2)`` runs go through the fused
:func:`fastmeta.ops.bn_relu_pool`, sharing every parameter, buffer and submodule with the original.

The transform is explicit: ``fused = fuse_conv_blocks(model)`` returns a new module object and never
mutates ``model`` or any of its children. Only the modules on the path from the root to each
``nn.Sequential`` holding a fusable run are new, shallow copies (same class, same attributes, the same
parameter/buffer tensors and hook dictionaries, their own ``_modules``/``_parameters``/``_buffers``
dicts); each such Sequential becomes a :class:`FusedSequential` over the same child modules. So
parameter names are unchanged (``torch.func.functional_call(fused, {name: tensor}, x)`` takes the
model's names), ``getattr(fused, name)`` reaches every child under the model's names, running
statistics are updated in the model's own buffers, and hooks registered on the model's modules fire.

A run (exact types: ``nn.BatchNorm2d``, ``nn.ReLU``, ``nn.MaxPool2d`` with a 2x2 window, stride 2, no
padding/dilation, floor mode, no indices) is fused at run time only where :func:`bn_relu_pool`
computes the same thing: the BatchNorm uses batch statistics (training mode, or no running
statistics), the input is a CPU float32/float64/bfloat16 NCHW or channels_last tensor with the
parameters in the matching dtype, no functorch transform (``vmap``, ``grad``) is active, nothing is
being compiled, and none of the three modules has a hook (forward, forward-pre or backward: they must
see the modules run). Anything else runs the original modules.

Caveat of the shallow copies: a copied module keeps its own ``training`` flag (its children, shared,
follow ``model.train()``/``model.eval()``). That matters only for a container whose own
``forward`` reads ``self.training``; call ``train()``/``eval()`` on the fused module, or fuse again.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _extension
from ..ops.bn_relu_pool import bn_relu_pool, param_dtype

__all__ = ["fuse_conv_blocks", "count_fusable", "FusedSequential"]


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _is_pool2(m: nn.Module) -> bool:
    if not isinstance(m, nn.MaxPool2d) or m.return_indices or m.ceil_mode:
        return False
    stride = m.stride if m.stride is not None else m.kernel_size
    return _pair(m.kernel_size) == (2, 2) and _pair(stride) == (2, 2) and _pair(m.padding) == (0, 0) \
        and _pair(m.dilation) == (1, 1)


def _is_run(mods: list, i: int) -> bool:
    """Whether ``mods[i:i + 3]`` is ``BatchNorm2d, ReLU, MaxPool2d(2)`` (exact types)."""
    return (type(mods[i]) is nn.BatchNorm2d and i + 2 < len(mods) and type(mods[i + 1]) is nn.ReLU
            and _is_pool2(mods[i + 2]))


def _uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _fusable_input(x: Tensor, bn: nn.BatchNorm2d) -> bool:
    return (not torch.compiler.is_compiling()
            and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64, torch.bfloat16) and x.dim() == 4
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            and x.shape[0] * x.shape[2] * x.shape[3] > 1
            and all(p is None or (p.dtype == param_dtype(x) and p.device.type == "cpu") for p in (bn.weight, bn.bias))
            and not torch._C._functorch.is_functorch_wrapped_tensor(x))


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


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


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` whose ``BatchNorm2d, ReLU, MaxPool2d(2)`` runs run as one
    :func:`~fastmeta.ops.bn_relu_pool` call where it applies (see the module docstring), and as the
    original modules otherwise. Built by :func:`fuse_conv_blocks`; the runs are found at each call
    (one type test per module), so slicing or editing it keeps it correct."""

    def forward(self, input):
        mods = list(self._modules.values())
        x, i = input, 0
        while i < len(mods):
            m = mods[i]
            if (_is_run(mods, i) and isinstance(x, Tensor) and _uses_batch_stats(m) and _fusable_input(x, m)
                    and not any(_has_hooks(h) for h in mods[i:i + 3])):
                x = _fused_block(m, x)
                i += 3
            else:
                x = m(x)
                i += 1
        return x


_fused_classes: dict[type, type] = {nn.Sequential: FusedSequential}


def _fused_class(cls: type) -> type:
    # A Sequential subclass (that keeps Sequential's forward) stays an instance of its class.
    if cls not in _fused_classes:
        _fused_classes[cls] = type(f"Fused{cls.__name__}", (FusedSequential, cls), {"__module__": __name__})
    return _fused_classes[cls]


def _runs(m: nn.Module) -> int:
    """Fusable runs in ``m``'s own forward: an ``nn.Sequential`` (or a subclass keeping its forward)."""
    if not isinstance(m, FusedSequential) and (
            not isinstance(m, nn.Sequential) or type(m).forward is not nn.Sequential.forward):
        return 0
    mods, i, n = list(m._modules.values()), 0, 0
    while i < len(mods):
        if _is_run(mods, i):
            n, i = n + 1, i + 3
        else:
            i += 1
    return n


def count_fusable(model: nn.Module) -> int:
    """Number of ``BatchNorm2d, ReLU, MaxPool2d(2)`` runs in ``nn.Sequential`` containers of ``model``
    that :func:`fuse_conv_blocks` routes through the fused op (of a fused model: the runs it routes).
    Structural: each run still falls back to the original modules when its input does not qualify."""
    return sum(_runs(m) for m in model.modules())


def _shallow_copy(m: nn.Module, cls: type) -> nn.Module:
    new = cls.__new__(cls)
    new.__dict__.update(m.__dict__)
    for key in ("_modules", "_parameters", "_buffers"):
        new.__dict__[key] = type(m.__dict__[key])(m.__dict__[key])
    return new


def _rebuild(m: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    if id(m) in memo:  # a module reachable twice stays one module
        return memo[id(m)]
    replaced = {}
    for name, child in m._modules.items():
        if child is not None:
            new_child = _rebuild(child, memo)
            if new_child is not child:
                replaced[name] = new_child
    fuse_here = not isinstance(m, FusedSequential) and _runs(m) > 0
    if not replaced and not fuse_here:
        new = m
    else:
        new = _shallow_copy(m, _fused_class(type(m)) if fuse_here else type(m))
        new._modules.update(replaced)
    memo[id(m)] = new
    return new


def fuse_conv_blocks(model: nn.Module) -> nn.Module:
    """``model`` with its ``BatchNorm2d, ReLU, MaxPool2d(2)`` runs fused (see the module docstring).

    Args:
        model: any ``nn.Module``; runs are found inside ``nn.Sequential`` containers (exact
            ``nn.Sequential`` or subclasses that keep its ``forward``) at any depth.

    Returns:
        A new module computing the same function (float32 results differ from ATen's by rounding,
        ~1e-6 relative; float64 to ~1e-14), sharing every parameter, buffer and submodule of
        ``model`` under the same names; ``model`` itself when nothing can be fused (no run, or
        the native extension is not available). ``model`` is never modified.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not _extension.available() or count_fusable(model) == 0:
        return model
    return _rebuild(model, {})
