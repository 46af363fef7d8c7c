"""What :class:`~fastmeta.MetaLearner` returns, and the finiteness checks on a meta-gradient."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .algorithms.base import MetaResult
from .metrics import ci95


@dataclass
class StepResult:
    """What :meth:`MetaLearner.step` returns: mean post-adaptation query loss (and accuracy)."""

    loss: float
    accuracy: Optional[float] = None
    per_task_loss: Optional[torch.Tensor] = None


@dataclass
class EvalResult:
    """Meta-test summary over T tasks: means and 95% confidence half-widths (1.96 * std / sqrt(T))."""

    loss: float
    loss_ci95: float
    accuracy: Optional[float]
    accuracy_ci95: Optional[float]
    num_tasks: int
    per_task_loss: torch.Tensor
    per_task_accuracy: Optional[torch.Tensor]

    @classmethod
    def from_tasks(cls, loss: torch.Tensor, accuracy: Optional[torch.Tensor] = None) -> "EvalResult":
        """The summary of per-task losses ``[T]`` (and accuracies ``[T]``)."""
        return cls(float(loss.mean()), ci95(loss), None if accuracy is None else float(accuracy.mean()),
                   None if accuracy is None else ci95(accuracy), loss.numel(), loss, accuracy)

    @classmethod
    def concat(cls, results: Sequence["EvalResult"]) -> "EvalResult":
        """One summary over the tasks of several results (e.g. chunks of a long meta-test)."""
        if not results:
            raise ValueError("results: expected at least one EvalResult")
        accs = [r.per_task_accuracy for r in results if r.per_task_accuracy is not None]
        return cls.from_tasks(torch.cat([r.per_task_loss for r in results]), torch.cat(accs) if accs else None)

    def __str__(self) -> str:
        s = f"loss {self.loss:.4f} ± {self.loss_ci95:.4f}"
        if self.accuracy is not None:
            s += f", accuracy {100 * self.accuracy:.2f}% ± {100 * self.accuracy_ci95:.2f}%"
        return s + f" (95% CI over {self.num_tasks} tasks)"


def finiteness(res: MetaResult) -> torch.Tensor:
    # Two reductions: any NaN/inf in either tensor makes the sum non-finite. A sum of finite values
    # can still overflow (float32 near 3e38): check_finite's element-wise diagnosis then finds
    # nothing and the result stands.
    return res.grad.sum() + res.query_loss.sum()


def check_finite(res: MetaResult, total: float) -> None:
    """``FloatingPointError`` naming the tasks whose query loss is not finite, or the meta-gradient;
    ``total`` is the host value of :func:`finiteness` (the element-wise reads happen only when it
    is not finite)."""
    if math.isfinite(total):
        return
    bad = ~torch.isfinite(res.query_loss)
    if bad.any():
        raise FloatingPointError(
            f"loss: non-finite query loss for tasks {bad.nonzero().flatten().tolist()[:8]} "
            f"(values {res.query_loss[bad][:4].tolist()}); lower inner_lr or the meta learning rate")
    if not torch.isfinite(res.grad).all():
        raise FloatingPointError("loss: the meta-gradient is non-finite; lower inner_lr or the meta learning rate")
