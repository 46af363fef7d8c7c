"""MAML (second order) and first-order MAML on task rows."""
from __future__ import annotations

from typing import Optional

import torch

from ..evaluation import Evaluator, inner_loop
from ..evaluation.inner_optim import InnerOptimizerSpec, make_inner_optimizer
from ..params import ParamLayout
from ..profiling import annotate
from ..tasks import TaskBatch
from .base import Algorithm, MetaResult
from .recompute import check_recompute, recompute_meta_grad


class MAML(Algorithm):
    """Model-Agnostic Meta-Learning (Finn et al. 2017; Sharp-MAML Alg. 2; Fallah et al. eq. 5).

    Per task m, the inner loop (Sharp-MAML eq. 9, repeated ``inner_steps`` times)

        theta'_m = theta - alpha * grad L(theta; D_m)                       (support set, D_in)

    and the meta-gradient is the mean over tasks of the gradient of the query loss through the
    inner loop (Fallah eq. 5 without the 1/n sum convention):

        grad F(theta) = mean_m (I - alpha * H_m(theta)) grad L(theta'_m; D'_m)   (one step)

    computed by differentiating through the inner gradients (``create_graph=True``).
    ``first_order=True`` drops the Hessian terms (Fallah eq. 8, same as :class:`FOMAML`).

    ``recompute=True`` bounds the memory (docs/memory.md): the inner loop keeps only its iterates
    and the meta-backward rebuilds one inner step's graph at a time, in reverse -- same
    meta-gradient to round-off, peak memory independent of ``inner_steps``, about one extra
    forward and backward per inner step. ``recompute_chunk``: tasks per recomputed chunk (``None``:
    the strategy's chunks, one task for ``loop``, all for ``vmap``/``bmm``).

    ``inner_optimizer`` (``InnerSGD(momentum=...)``, ``InnerAdam(...)``, ``"sgd"``/``"adam"`` or a
    dict; see :mod:`fastmeta.evaluation.inner_optim`): the inner step becomes
    ``theta_{k+1} = theta_k - alpha d_k`` with torch.optim's SGD-momentum / Adam direction ``d_k``,
    differentiated through the optimizer state (per task row). Also used by :meth:`adapt`.

    Shapes: task rows ``[T, D]``; meta-gradient ``[P]`` (mean over tasks).
    """

    name = "maml"

    def __init__(self, inner_lr: float, inner_steps: int = 1, first_order: bool = False,
                 recompute: bool = False, recompute_chunk: Optional[int] = None,
                 inner_optimizer: InnerOptimizerSpec = None):
        super().__init__(inner_lr, inner_steps)
        self.first_order = bool(first_order)
        # Differentiable inner update rule (InnerSGD momentum, InnerAdam; docs/algorithms.md).
        self.inner_optimizer = make_inner_optimizer(inner_optimizer)
        if recompute and self.inner_optimizer is not None:
            raise ValueError("inner_optimizer: recompute=True supports plain SGD inner steps only")
        self.recompute, self.recompute_chunk = check_recompute(recompute, recompute_chunk, self.first_order)

    def meta_grad(self, ev: Evaluator, layout: ParamLayout, theta: torch.Tensor, batch: TaskBatch) -> MetaResult:
        if self.recompute:
            return recompute_meta_grad(ev, layout, theta, batch, self.inner_lr, self.inner_steps,
                                       self.recompute_chunk)
        theta = theta.detach().requires_grad_()

        def task_pass(b: TaskBatch):
            adapted, shared = layout.split(theta)
            with annotate("inner"):
                w, _ = inner_loop(ev, adapted, shared, b.support_x, b.support_y,
                                  self.inner_lr, self.inner_steps, create_graph=not self.first_order,
                                  structured=True, optimizer=self.inner_optimizer)
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

    def __init__(self, inner_lr: float, inner_steps: int = 1, inner_optimizer: InnerOptimizerSpec = None):
        super().__init__(inner_lr, inner_steps, first_order=True, inner_optimizer=inner_optimizer)
