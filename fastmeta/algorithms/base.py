"""What every algorithm returns, and the pieces they share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .._checks import positive_float, positive_int
from ..evaluation import Evaluator, inner_loop
from ..params import ParamLayout
from ..tasks import TaskBatch


@dataclass
class MetaResult:
    """One meta-gradient evaluation.

    grad: ``[P]`` flat meta-gradient, the **mean** over the T tasks (papers that sum over tasks
        differ from this by a factor T, which folds into the meta learning rate).
    query_loss: ``[T]`` post-adaptation query losses (at the unperturbed meta-parameters).
    query_out: ``[T, N_q, ...]`` post-adaptation query outputs (for accuracy).
    extras: algorithm-specific diagnostics (e.g. HF-MAML's deltas).
    """

    grad: torch.Tensor
    query_loss: torch.Tensor
    query_out: torch.Tensor
    extras: Optional[dict] = None


class Algorithm:
    """Base class: an inner loop of ``inner_steps`` SGD steps with rate ``inner_lr`` (alpha)."""

    name = "algorithm"

    def __init__(self, inner_lr: float, inner_steps: int = 1):
        self.inner_lr = positive_float(inner_lr, "inner_lr")
        self.inner_steps = positive_int(inner_steps, "inner_steps")

    def meta_grad(self, ev: Evaluator, layout: ParamLayout, theta: torch.Tensor, batch: TaskBatch) -> MetaResult:
        raise NotImplementedError

    def adapt(self, ev: Evaluator, layout: ParamLayout, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
              steps: Optional[int] = None) -> torch.Tensor:
        """Adapted rows ``[T, D]`` after ``steps`` (default: ``inner_steps``; an int >= 1) inner steps on
        ``(x, y)`` (meta-test time: no graph)."""
        steps = self.inner_steps if steps is None else positive_int(steps, "steps")
        adapted, shared = layout.split(theta.detach())
        w, _ = inner_loop(ev, adapted, shared, x, y, self.inner_lr, steps, create_graph=False)
        return w.detach()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
