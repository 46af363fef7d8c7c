"""Fallah et al.'s adaptive meta step size beta_k = c / L~(w) (eqs. 16-17; Theorems 4.12, 4.15, 4.17)."""
from __future__ import annotations

from typing import Union

import torch

from .._checks import positive_float
from ..evaluation import Evaluator
from ..params import ParamLayout
from ..tasks import TaskBatch
from ._shared import per_task_grads
from .base import Algorithm

# Theorem 4.12 (MAML): beta = beta~/12; 4.15 (FO-MAML): /18; 4.17 (HF-MAML): /25.
DEFAULT_C = {"maml": 1.0 / 12.0, "fomaml": 1.0 / 18.0, "hfmaml": 1.0 / 25.0}


class FallahStepSize:
    """The meta step size of Fallah et al. (2020), eqs. 16-17:

        L~(w)  = 4 L + 2 rho alpha * mean_{j in B'} || grad f_j(w; D_beta^j) ||      (eq. 16)
        beta_k = c / L~(w_k)                                                          (eq. 17)

    where ``B'`` is a batch of tasks drawn independently of the meta-batch, ``D_beta^j`` a data
    batch of task j (fastmeta uses the support set of each task in the batch you pass), the
    gradient is w.r.t. all meta-parameters at ``w`` itself (no inner step), L the gradient
    Lipschitz constant and rho the Hessian Lipschitz constant of the task losses
    (Assumptions 4.3, 4.4), alpha the inner learning rate.

    Args:
        L, rho, inner_lr: the constants above (> 0).
        c: a float > 0, or an algorithm (name or instance) whose theorem's constant to use:
            ``"maml"`` 1/12 (Thm 4.12), ``"fomaml"`` 1/18 (Thm 4.15), ``"hfmaml"`` 1/25 (Thm 4.17).
            Any other algorithm may be used with an explicit c (default 1/12).

    Usable with any algorithm: call :meth:`for_learner` (or :meth:`__call__`) on an independent
    task batch each step and set the optimizer's learning rate with :meth:`apply`::

        beta = FallahStepSize(L=10.0, rho=1.0, inner_lr=0.01, c="hfmaml")
        lr = beta.for_learner(learner, tasks.sample(10))
        beta.apply(opt, lr)      # then learner.step(batch); opt.step() (plain SGD matches the paper)
    """

    def __init__(self, L: float, rho: float, inner_lr: float, c: Union[float, str, Algorithm] = "maml"):
        self.L = positive_float(L, "L")
        self.rho = positive_float(rho, "rho")
        self.inner_lr = positive_float(inner_lr, "inner_lr")
        if isinstance(c, Algorithm):
            c = DEFAULT_C.get(c.name, DEFAULT_C["maml"])
        elif isinstance(c, str):
            if c not in DEFAULT_C:
                raise ValueError(f"c: expected a float or one of {sorted(DEFAULT_C)}, got {c!r}")
            c = DEFAULT_C[c]
        self.c = positive_float(c, "c")

    def task_grad_norms(self, ev: Evaluator, layout: ParamLayout, theta: torch.Tensor,
                        batch: TaskBatch) -> torch.Tensor:
        """``[T]``: ``||grad f_j(w; D_beta^j)||`` over all P meta-parameters, D_beta = support set."""
        adapted, shared = layout.split(theta.detach())
        norms = []
        for b in ev.chunks(batch):
            _, g = per_task_grads(ev, adapted, shared, b.support_x, b.support_y)
            norms.append(g.pow(2).sum(1).sqrt())
        return torch.cat(norms)

    def L_tilde(self, grad_norms: torch.Tensor) -> float:
        """Eq. 16 from per-task gradient norms ``[T]``."""
        return 4.0 * self.L + 2.0 * self.rho * self.inner_lr * float(grad_norms.mean())

    def __call__(self, ev: Evaluator, layout: ParamLayout, theta: torch.Tensor, batch: TaskBatch) -> float:
        """beta_k = c / L~(theta) (eq. 17) on the independent task batch ``batch``."""
        return self.c / self.L_tilde(self.task_grad_norms(ev, layout, theta, batch))

    def for_learner(self, learner, batch: TaskBatch) -> float:
        """beta_k for a :class:`fastmeta.MetaLearner`'s current model."""
        ev = learner.evaluator(batch)
        return self(ev, learner.layout, learner.layout.flatten(learner.model), batch)

    @staticmethod
    def apply(optimizer: torch.optim.Optimizer, lr: float) -> None:
        """Set every parameter group's learning rate to ``lr``."""
        for group in optimizer.param_groups:
            group["lr"] = lr

    def __repr__(self) -> str:
        return f"FallahStepSize(L={self.L}, rho={self.rho}, inner_lr={self.inner_lr}, c={self.c})"
