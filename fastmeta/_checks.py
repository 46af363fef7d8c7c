"""Argument validators shared across the package: each raises ``ValueError`` whose message starts
with the argument's name and says what was expected, before any expensive work starts."""
from __future__ import annotations

import math
from typing import Optional

from .tasks import TaskBatch


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def positive_float(value, name: str) -> float:
    """``value`` as a float, if it is a number > 0 (NaN is rejected)."""
    if not _is_number(value) or not value > 0:
        raise ValueError(f"{name}: expected a float > 0, got {value!r}")
    return float(value)


def nonnegative_float(value, name: str) -> float:
    """``value`` as a float, if it is a number >= 0 (NaN is rejected)."""
    if not _is_number(value) or not value >= 0:
        raise ValueError(f"{name}: expected a float >= 0, got {value!r}")
    return float(value)


def positive_finite(value, name: str) -> float:
    """``value`` as a float, if it is a finite number > 0."""
    if not _is_number(value) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return float(value)


def unit_fraction(value, name: str) -> Optional[float]:
    """``None``, or ``value`` as a float in ``(0, 1]``."""
    if value is None:
        return None
    if not _is_number(value) or not (0.0 < value <= 1.0):
        raise ValueError(f"{name}: expected None or a float in (0, 1], got {value!r}")
    return float(value)


def positive_int(value, name: str) -> int:
    """``value``, if it is an int >= 1 (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return value


def check_batch(batch, layout) -> None:
    """``batch`` is a :class:`~fastmeta.TaskBatch` on the layout's device, with inputs of its dtype."""
    if not isinstance(batch, TaskBatch):
        raise ValueError(f"batch: expected a fastmeta.TaskBatch, got {type(batch).__name__}")
    if batch.device != layout.device:
        raise ValueError(f"batch: is on {batch.device} but the model is on {layout.device}")
    if batch.support_x.is_floating_point() and batch.support_x.dtype != layout.dtype:
        raise ValueError(f"batch: inputs are {batch.support_x.dtype} but the model is {layout.dtype}")
