"""MAML (second order) and first-order MAML on task rows."""
from __future__ import annotations

import torch

from ..evaluation import Evaluator, inner_loop
from ..params import ParamLayout
from ..profiling import annotate
from ..tasks import TaskBatch
from .base import Algorithm, MetaResult


class MAML(Algorithm):
    """Model-Agnostic Meta-Learning (Finn et al. 2017; Sharp-MAML Alg. 2; Fallah et al. eq. 5).

    Per task m, the inner loop (Sharp-MAML eq. 9, repeated ``inner_steps`` times)

        theta'_m = theta - alpha * grad L(theta; D_m)                       (support set, D_in)

    and the meta-gradient is the mean over tasks of the gradient of the query loss through the
    inner loop (Fallah eq. 5 without the 1/n sum convention):

        grad F(theta) = mean_m (I - alpha * H_m(theta)) grad L(theta'_m; D'_m)   (one step)

    computed by differentiating through the inner gradients (``create_graph=True``).
    ``first_order=True`` drops the Hessian terms (Fallah eq. 8, same as :class:`FOMAML`).

    Shapes: task rows ``[T, D]``; meta-gradient ``[P]`` (mean over tasks).
    """

    name = "maml"

    def __init__(self, inner_lr: float, inner_steps: int = 1, first_order: bool = False):
        super().__init__(inner_lr, inner_steps)
        self.first_order = bool(first_order)

    def meta_grad(self, ev: Evaluator, layout: ParamLayout, theta: torch.Tensor, batch: TaskBatch) -> MetaResult:
        theta = theta.detach().requires_grad_()

        def task_pass(b: TaskBatch):
            adapted, shared = layout.split(theta)
            with annotate("inner"):
                w, _ = inner_loop(ev, adapted, shared, b.support_x, b.support_y,
                                  self.inner_lr, self.inner_steps, create_graph=not self.first_order,
                                  structured=True)
            with annotate("outer"):
                q, out = ev.losses(w, shared, b.query_x, b.query_y, return_outputs=True)
                (g,) = torch.autograd.grad(q.sum(), theta)
            return g, q.detach(), out.detach()

        g, q, out = ev.over_tasks(task_pass, batch)
        return MetaResult(g, q, out)


class FOMAML(MAML):
    """First-order MAML (Fallah et al. eq. 8): the query gradient at the adapted parameters,
    ``mean_m grad L(theta'_m; D'_m)``, with the inner gradients held constant."""

    name = "fomaml"

    def __init__(self, inner_lr: float, inner_steps: int = 1):
        super().__init__(inner_lr, inner_steps, first_order=True)
