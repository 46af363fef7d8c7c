"""Per-task metrics and their confidence intervals, one definition for the learner, the training
loop and the analysis tools."""
from __future__ import annotations

import math

import torch


def accuracy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-task accuracy ``[T]`` (float64) from logits ``[T, N, C]`` and integer labels ``[T, N]``."""
    return (out.argmax(-1) == y).to(torch.float64).mean(1)


def ci95(x: torch.Tensor) -> float:
    """Half-width of the normal-approximation 95% confidence interval of the mean of ``x`` ``[T]``:
    ``1.96 * std / sqrt(T)`` with the unbiased standard deviation; NaN for fewer than two values."""
    n = x.numel()
    return float(1.96 * x.double().std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
