"""``bn_relu_pool``: the conv-block tail ``max_pool2d(leaky_relu(batch_norm(x), slope), 2)``, fused,
with its backward and double backward; ``slope = 0`` is ReLU, ``pool=False`` drops the pool.

The block ``conv 3x3 -> BatchNorm2d (batch statistics) -> ReLU -> MaxPool2d(2)`` is the whole of
Conv-4 (Finn et al. 2017, sec. 5.2; Vinyals et al. 2016) and of most few-shot conv nets. Unfused,
its tail is a chain of memory-bound ATen passes over the ``[N, C, H, W]`` conv output; in a second-
order Conv-4 MAML step on this CPU they took more time than the convolutions (profile of two steps:
max-pool forward 211 ms, batch norm forward 122 ms and backward 120 ms, ReLU backward 68 ms,
convolutions ~600 ms). The ``cpp`` backend computes the same function with the C++ kernels of
``csrc/cpu/bn_relu_pool_cpu.cpp`` (forward: one pass of shifted sums for the statistics, one pass
writing the pooled output and a one-byte window index; backward: one pass of routed sums, one
writing ``dx``), about 5x less time than the ATen chain in the MAML step. The ``reference`` backend
is that ATen chain (:func:`fastmeta.ops.reference.bn_relu_pool`); triton and cuda have no kernel.

The activation may be a LeakyReLU (``negative_slope >= 0``; ResNet-12, Lee et al. 2019, uses 0.1)
and the pool optional: a ResNet-12 block is ``conv-BN-LeakyReLU`` twice without a pool, then
``conv-BN``, the shortcut add, ``LeakyReLU`` and the pool. A non-negative slope keeps the activation
non-decreasing, so the pooled maximum is the activation of the window's maximum and the window
index of ReLU's kernels still routes the gradient (scaled by the slope where ``z <= 0``).

The three native ops ``fastmeta::bn_relu_pool``, ``bn_relu_pool_backward`` and
``bn_relu_pool_double_backward`` (schemas in ``csrc/registration.cpp``) get their fake kernels and
autograd formulas here, once the extension is loaded (:func:`native_ops`): the forward's backward
is ``bn_relu_pool_backward``; when autograd records that backward (``create_graph=True``, as for
MAML's inner gradient), its own backward is the fused closed-form ``bn_relu_pool_double_backward``
(formulas derived in ``csrc/cpu/vec/block_kernels_impl.h``, tested against ATen's double
backward). Like ATen's batch norm there is no third derivative: differentiating the double
backward raises. ``mean``, ``invstd`` and the window index are not differentiable.

:func:`fastmeta.nn.fuse_conv_blocks` routes a model's ``BatchNorm2d -> ReLU/LeakyReLU -> [MaxPool2d(2)]``
chains through :func:`bn_relu_pool` (the ``fused=True`` speed mode of :class:`fastmeta.MetaLearner`).
"""

from __future__ import annotations

import math
import threading
from typing import Optional

import torch
from torch import Tensor

from .. import _extension
from . import _backend

__all__ = ["bn_relu_pool", "native_ops"]

NO_THIRD_ORDER = "bn_relu_pool does not support 3rd+ order derivatives (neither does ATen's batch_norm)"
# at::ScalarType's names, as the C++ kernels print them: the Python checks say what the kernels say.
_DTYPE_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16"}

_lock = threading.Lock()
_lib: Optional[torch.library.Library] = None


def param_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``weight``/``bias`` (and ``mean``/``invstd``) must have for ``x``: bf16 activations
    (CPU autocast's conv output) come with float32 batch-norm parameters."""
    return torch.float32 if x.dtype == torch.bfloat16 else x.dtype


def _layout(x: Tensor) -> torch.memory_format:
    # The kernels' rule: NHWC when channels_last and not also NCHW-contiguous (C == 1 or H == W == 1).
    nhwc = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if nhwc else torch.contiguous_format


# ------------------------------------------------------------------------------ fake kernels
def _out_shape(x, pool):
    n, c, h, w = x.shape
    return (n, c, h // 2, w // 2) if pool else (n, c, h, w)


def _fake_forward(x, weight, bias, eps, negative_slope=0.0, pool=True):
    c = x.shape[1]
    fmt, pooled = _layout(x), _out_shape(x, pool)
    out = torch.empty(pooled, dtype=x.dtype, device=x.device, memory_format=fmt)
    idx = torch.empty(pooled, dtype=torch.uint8, device=x.device, memory_format=fmt)
    return out, idx, x.new_empty((c,), dtype=param_dtype(x)), x.new_empty((c,), dtype=param_dtype(x))


def _fake_backward(grad_out, x, weight, mean, invstd, idx, negative_slope=0.0, pool=True):
    c = x.shape[1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_layout(x))
    return dx, x.new_empty((c,), dtype=param_dtype(x)), x.new_empty((c,), dtype=param_dtype(x))


def _fake_double_backward(ggx, ggw, ggb, grad_out, x, weight, mean, invstd, idx, negative_slope=0.0, pool=True):
    # NCHW results whatever x's layout (the double backward works channel by channel).
    return (grad_out.new_empty(grad_out.shape, dtype=x.dtype), x.new_empty(x.shape),
            x.new_empty((x.shape[1],), dtype=param_dtype(x)))


# ------------------------------------------------------------------------------ autograd formulas
def _forward_setup(ctx, inputs, output):
    x, weight, _bias, _eps, ctx.slope, ctx.pool = inputs
    _out, idx, mean, invstd = output
    ctx.mark_non_differentiable(idx, mean, invstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, mean, invstd, idx)


def _forward_grad(ctx, grad_out, _grad_idx, _grad_mean, _grad_invstd):
    if grad_out is None:  # only mean/invstd were used: nothing flows back
        return None, None, None, None, None, None
    x, weight, mean, invstd, idx = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    # Under create_graph=True this call is recorded, and its formula below is the double backward.
    dx, dw, db = torch.ops.fastmeta.bn_relu_pool_backward(grad_out, x, weight, mean, invstd, idx, ctx.slope, ctx.pool)
    return dx if need_x else None, dw if need_w else None, db if need_b else None, None, None, None


def _backward_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs[:6])  # grad_out, x, weight, mean, invstd, idx
    ctx.slope, ctx.pool = inputs[6:]


def _backward_grad(ctx, ggx, ggw, ggb):
    # The derivative of (dx, dweight, dbias) w.r.t. (grad_out, x, weight), applied to (ggx, ggw, ggb).
    if ggx is None and ggw is None and ggb is None:
        return (None,) * 8
    grad_out, x, weight, mean, invstd, idx = ctx.saved_tensors
    need_g, need_x, need_w = ctx.needs_input_grad[:3]
    g_grad_out, g_x, g_w = torch.ops.fastmeta.bn_relu_pool_double_backward(
        ggx, ggw, ggb, grad_out, x, weight, mean, invstd, idx, ctx.slope, ctx.pool)
    return (g_grad_out if need_g else None, g_x if need_x else None, g_w if need_w else None) + (None,) * 5


def _double_backward_grad(ctx, *grads):
    # Recorded when the double backward itself runs with create_graph=True; reached only by a third
    # derivative, which (as for ATen's batch norm) is not supported: a clear error, not a wrong value.
    raise RuntimeError(NO_THIRD_ORDER)


def native_ops():
    """``torch.ops.fastmeta``, with the fake kernels and autograd formulas of the three
    ``bn_relu_pool`` ops registered (once, on the first call). Loads the native extension; raises
    ``RuntimeError`` if it is not available."""
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                if not _extension.load():
                    raise RuntimeError(f"bn_relu_pool: the native extension is not available ({_extension.reason()})")
                lib = torch.library.Library("fastmeta", "FRAGMENT")
                for name, fake in (("bn_relu_pool", _fake_forward), ("bn_relu_pool_backward", _fake_backward),
                                   ("bn_relu_pool_double_backward", _fake_double_backward)):
                    torch.library.register_fake(f"fastmeta::{name}", fake, lib=lib)
                torch.library.register_autograd("fastmeta::bn_relu_pool", _forward_grad, setup_context=_forward_setup,
                                                lib=lib)
                torch.library.register_autograd("fastmeta::bn_relu_pool_backward", _backward_grad,
                                                setup_context=_backward_setup, lib=lib)
                torch.library.register_autograd("fastmeta::bn_relu_pool_double_backward", _double_backward_grad,
                                                lib=lib)
                _lib = lib
    return torch.ops.fastmeta


# ------------------------------------------------------------------------------ public function
@torch.compiler.assume_constant_result
def _traced_backend(device_type: str) -> str:
    # Under torch.compile the backend is chosen once, at trace time (dynamo cannot trace the
    # extension's lazy, locked loading); the native ops are then traced through their fake kernels.
    name = _backend.resolve("bn_relu_pool", device_type)
    if name == "cpp":
        native_ops()
    return name


def _check(x, weight, bias, eps, negative_slope, pool) -> None:
    # What the C++ kernels check (same messages, RuntimeError), here so every backend rejects the same.
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x: expected a [N, C, H, W] tensor, got {tuple(x.shape) if isinstance(x, Tensor) else x!r}")
    # bool is an int, not a float: True as a slope is a mistake, not 1.0.
    if (not isinstance(negative_slope, (int, float)) or isinstance(negative_slope, bool)
            or not math.isfinite(negative_slope) or negative_slope < 0):
        raise ValueError(f"negative_slope: expected a finite float >= 0 (0: ReLU), got {negative_slope!r}")
    if not isinstance(pool, bool):
        raise ValueError(f"pool: expected a bool, got {pool!r}")
    # ATen's batch norm raises for eps <= 0 in training mode: the cpp backend must reject it too.
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a finite float > 0, got {eps!r}")
    if x.dtype not in _DTYPE_NAMES:
        raise RuntimeError(f"bn_relu_pool: x must be float32, float64 or bfloat16, got {x.dtype}")
    n, c, h, w = x.shape
    if n * h * w <= 1:
        raise RuntimeError(f"bn_relu_pool: batch statistics need more than one value per channel, "
                           f"got x {tuple(x.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, Tensor) or p.dim() != 1 or p.shape[0] != c:
            got = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
            raise RuntimeError(f"bn_relu_pool: {name} must be [C] = [{c}], got {got}")
        if p.dtype != param_dtype(x):
            raise RuntimeError(f"bn_relu_pool: {name} must be {_DTYPE_NAMES[param_dtype(x)]} for x of dtype "
                               f"{_DTYPE_NAMES[x.dtype]}, got {_DTYPE_NAMES.get(p.dtype, p.dtype)}")
        if p.device != x.device:
            raise RuntimeError(f"bn_relu_pool: {name} is on {p.device} but x is on {x.device}")


def bn_relu_pool(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                 eps: float = 1e-5, negative_slope: float = 0.0, pool: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``max_pool2d(leaky_relu(batch_norm(x, batch statistics, weight, bias, eps), negative_slope), 2)``,
    fused (CPU); without the ``max_pool2d`` when ``pool`` is False.

    Batch normalization (Ioffe & Szegedy 2015, Alg. 1: ``xhat = (x - mean) / sqrt(var + eps)`` with
    the batch's biased variance, ``z = weight * xhat + bias``), the activation ``a(z) = z`` for
    ``z > 0`` and ``negative_slope * z`` otherwise (ReLU for 0), then, with ``pool``, 2x2
    max-pooling with stride 2 (floor mode; ties go to the first maximum in row-major order, as in
    ``max_pool2d``).

    Args:
        x: ``[N, C, H, W]`` float32/float64, or bfloat16 (computed in float32, as under CPU bf16
            autocast); ``N * H * W > 1``. NCHW or channels_last (NHWC: the outputs and ``dx`` are
            channels_last too); other layouts are copied to NCHW first. CPU tensors run the C++
            kernels (``cpp`` backend); without the extension, or on CUDA, the ATen reference runs.
        weight, bias: ``[C]`` of ``x``'s dtype (float32 for bfloat16 ``x``), or ``None`` (no
            affine transform).
        eps: added to the variance.
        negative_slope: the LeakyReLU slope, a finite float >= 0 (0: ReLU; ResNet-12: 0.1).
        pool: 2x2 max-pool after the activation (True) or not.

    Returns:
        ``(out, mean, invstd)``: ``out`` ``[N, C, H // 2, W // 2]`` (``[N, C, H, W]`` without the
        pool; twice differentiable in ``x``,
        ``weight``, ``bias``, like ATen's batch norm: see the module docstring), and the batch mean and
        ``1 / sqrt(var + eps)`` per channel ``[C]`` in the parameters' dtype (not differentiable;
        for running statistics).

    Raises:
        ValueError: ``x`` is not a 4-d tensor, ``eps`` is not a finite number > 0,
        ``negative_slope`` is not a finite number >= 0, or ``pool`` is not a bool. RuntimeError: a dtype, ``[C]`` shape or device that
        does not fit (the message names the argument), or a single value per channel.
    """
    _check(x, weight, bias, eps, negative_slope, pool)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    if torch.compiler.is_compiling():
        impl = _backend._impls["bn_relu_pool"][_traced_backend(x.device.type)]
    else:
        impl = _backend.get_impl("bn_relu_pool", x.device)
    return impl(x, weight, bias, float(eps), float(negative_slope), pool)
