"""What every algorithm returns, and the pieces they share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .._checks import positive_float, positive_int
from ..evaluation import Evaluator, inner_loop
from ..evaluation.inner_optim import InnerOptimizer
from ..params import ParamLayout
from ..tasks import TaskBatch


@dataclass
class MetaResult:
    """One meta-gradient evaluation.

    grad: ``[P + R]`` flat meta-gradient, the **mean** over the T tasks (papers that sum over tasks
        differ from this by a factor T, which folds into the meta learning rate): the model's ``[P]``
        followed by the flat gradients of :meth:`Algorithm.meta_parameters` in order (``R`` their
        total numel; ``R = 0`` for algorithms without learned tensors).
    query_loss: ``[T]`` post-adaptation query losses (at the unperturbed meta-parameters).
    query_out: ``[T, N_q, ...]`` post-adaptation query outputs (for accuracy).
    extras: algorithm-specific diagnostics (e.g. HF-MAML's deltas).
    """

    grad: torch.Tensor
    query_loss: torch.Tensor
    query_out: torch.Tensor
    extras: Optional[dict] = None


class Algorithm:
    """Base class: an inner loop of ``inner_steps`` SGD steps with rate ``inner_lr`` (alpha).

    Algorithms with learned tensors of their own (Meta-SGD's and MAML++'s inner rates) create them
    in :meth:`bind`, list them in :meth:`meta_parameters` (their gradients follow the model's in
    :attr:`MetaResult.grad`) and save them with :meth:`state_dict`.
    """

    name = "algorithm"
    # The inner update rule (None: plain SGD steps); algorithms that take ``inner_optimizer`` set it.
    inner_optimizer: Optional[InnerOptimizer] = None

    def __init__(self, inner_lr: float, inner_steps: int = 1):
        self.inner_lr = positive_float(inner_lr, "inner_lr")
        self.inner_steps = positive_int(inner_steps, "inner_steps")

    def bind(self, layout: ParamLayout, model: nn.Module) -> None:
        """Create the algorithm's learned tensors for ``layout`` (``MetaLearner`` calls this once).
        Default: nothing to create."""

    def meta_parameters(self) -> list[nn.Parameter]:
        """The learned tensors meta-trained with the model, in :attr:`MetaResult.grad` order."""
        return []

    def state_dict(self) -> dict:
        """The learned tensors and schedule counters, as plain tensors and numbers."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`. ``ValueError`` naming ``state_dict`` for keys this algorithm has not."""
        if state:
            raise ValueError(f"state_dict: {type(self).__name__} has no learned state, got keys {sorted(state)}")

    def meta_grad(self, ev: Evaluator, layout: ParamLayout, theta: torch.Tensor, batch: TaskBatch) -> MetaResult:
        raise NotImplementedError

    def adapt_rates(self, layout: ParamLayout, steps: int):
        """The inner rates :meth:`adapt` uses for ``steps`` steps (see ``inner_loop``'s ``lr``): ``inner_lr``."""
        return self.inner_lr

    def adapt(self, ev: Evaluator, layout: ParamLayout, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
              steps: Optional[int] = None) -> torch.Tensor:
        """Adapted rows ``[T, D]`` after ``steps`` (default: ``inner_steps``; an int >= 1) inner steps on
        ``(x, y)`` (meta-test time: no graph), with the algorithm's rates and inner optimizer."""
        steps = self.inner_steps if steps is None else positive_int(steps, "steps")
        adapted, shared = layout.split(theta.detach())
        w, _ = inner_loop(ev, adapted, shared, x, y, self.adapt_rates(layout, steps), steps, create_graph=False,
                          optimizer=self.inner_optimizer)
        return w.detach()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
