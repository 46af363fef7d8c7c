"""Argument checks shared by the public op wrappers: every error is a ValueError naming the argument."""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64)


def tensor(x: object, name: str, ndims: tuple[int, ...]) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in ndims:
        shapes = " or ".join({0: "a scalar", 1: "[D]", 2: "[T, D]"}.get(n, f"{n}-d") for n in ndims)
        raise ValueError(f"{name} must be {shapes}, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got {x.dtype}")
    return x


def same_device_dtype(ref: Tensor, ref_name: str, x: Tensor, name: str, check_dtype: bool = True) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device} (mixed devices)")
    if check_dtype and x.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype} (mixed dtypes)")


def same_size(a: int, b: int, name: str, what: str) -> None:
    if a != b:
        raise ValueError(f"{name}: {what} mismatch ({a} vs {b})")


def per_task(value: object, name: str, t: int, like: Tensor, positive: bool) -> Tensor:
    """A python float or a [T] (or 1-element) tensor -> a [T] tensor of like's dtype/device.

    ``positive`` demands > 0 (delta divides); otherwise >= 0 (a zero radius is a no-op perturbation).
    Tensor values are checked on the host only for CPU tensors (no device sync for CUDA ones).
    """
    bad = (lambda v: not v > 0) if positive else (lambda v: not v >= 0)
    rule = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise ValueError(f"{name} must be a float or a [T] tensor, got {type(value).__name__}")
    if not isinstance(value, Tensor):
        if bad(float(value)) or not math.isfinite(float(value)):
            raise ValueError(f"{name} must be finite and {rule}, got {value}")
        return torch.full((t,), float(value), dtype=like.dtype, device=like.device)
    if value.dim() > 1 or value.numel() not in (1, t):
        raise ValueError(f"{name} must be a float or a [T] tensor with T={t}, got shape {tuple(value.shape)}")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but the data is on {like.device} (mixed devices)")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {value.dtype}")
    # min() propagates NaN, and NaN fails both comparisons: rejected too; max() catches +inf (an
    # infinite radius or step makes every row inf/NaN). Two reductions, one host read.
    if value.device.type == "cpu" and value.numel() and not _is_fake(value):
        v = value.detach()
        lo, hi = torch.stack([v.min(), v.max()]).tolist()
        if bad(lo) or not math.isfinite(hi):
            raise ValueError(f"{name} must be finite and {rule} everywhere, got {value.tolist()}")
    return value.to(like.dtype).reshape(-1).expand(t)


def _is_fake(x: Tensor) -> bool:
    # Under torch.compile tracing the values are unknown: skip value checks (shapes still checked).
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(x, FakeTensor) or torch.compiler.is_compiling()


def unit_interval(value: object, name: str) -> float:
    """A float in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a float in (0, 1], got {type(value).__name__}")
    if not (0.0 < float(value) <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return float(value)
