"""Sharpness (Sharp-MAML eq. 7) by projected gradient ascent; k = 1 is SAM's closed form (eq. 8a).

    S_alpha(theta) = max_{||eps||_2 <= alpha} L(theta + eps) - L(theta)             (eq. 7)

Ascent (normalized gradient steps of length ``step_size`` = alpha by default, projected back onto
the ball; ``eps_0 = 0``):

    g_j       = grad L(theta + eps_j)
    eps_{j+1} = Proj_{||.|| <= alpha}( eps_j + step_size * g_j / ||g_j|| )

With one step and ``step_size = alpha`` this is exactly SAM's perturbation
``eps = alpha * g / ||g||`` (eq. 8a). With more steps the iterates converge to a KKT point of the
trust-region problem (for a quadratic, to its maximizer when it is unique; the tests check this
against the secular-equation solution). Every iterate is feasible, so the reported value -- the
largest increase seen, including eps = 0 -- is a lower bound on eq. 7 that tightens with ``steps``.

``L`` is the mean over the batch's tasks of either the MAML objective ``L(theta'_m(theta); D'_m)``
(gradients through the inner loop, second order) or the plain loss ``L(theta; D'_m)``; with
``per_task=True`` every task gets its own eps_m (task rows ``[T, P]``) and its own sharpness.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..tasks import TaskBatch
from ._objective import as_target, check_batch, check_post_adaptation, row_objective, timed_choice


@dataclass
class Sharpness:
    """Result of :func:`sharpness`.

    value: eq. 7 estimate (the mean over tasks when ``per_task``): the largest
        ``L(theta + eps_j) - L(theta)`` over the visited ``eps_0 = 0, ..., eps_k``.
    last: the increase at the final ``eps_k`` (k = 1: at SAM's eps of eq. 8a).
    first_order: SAM's first-order (Taylor) estimate ``alpha * ||grad L(theta)||``.
    loss: ``L(theta)``. eps: ``[P]`` (or ``[T, P]`` per task) the final perturbation.
    per_task: ``[T]`` per-task values when ``per_task`` (else None).
    history: ``[k + 1]`` increases at ``eps_0..eps_k`` (mean over tasks when ``per_task``).
    """

    value: float
    last: float
    first_order: float
    loss: float
    radius: float
    steps: int
    post_adaptation: bool
    eps: torch.Tensor
    per_task: Optional[torch.Tensor]
    history: torch.Tensor


def _project(eps: torch.Tensor, radius: float) -> torch.Tensor:
    n = eps.norm(dim=-1, keepdim=True)
    return eps * torch.where(n > radius, radius / n.clamp_min(torch.finfo(eps.dtype).tiny), torch.ones_like(n))


def sharpness(learner, batch: TaskBatch, radius: float, steps: int = 1, post_adaptation: bool = True,
              per_task: bool = False, step_size: Optional[float] = None, strategy: Optional[str] = None,
              loss_fn=None, inner_lr: Optional[float] = None, inner_steps: Optional[int] = None,
              adapt="all") -> Sharpness:
    """Sharpness of eq. 7 at the learner's meta-parameters ``theta`` ``[P]`` on ``batch``.

    Args:
        learner: a :class:`~fastmeta.MetaLearner` or an ``nn.Module`` (then ``loss_fn``,
            ``inner_lr``, ``inner_steps``, ``adapt`` describe it, as in :func:`loss_landscape`).
        radius: alpha > 0, the radius of the Euclidean ball over all P meta-parameters.
        steps: k >= 1 projected ascent steps (k gradient evaluations + 1 loss evaluation).
            k = 1 gives SAM's eps (eq. 8a).
        post_adaptation: True: the MAML objective (second-order gradients through the inner loop);
            False: the plain loss on the query sets.
        per_task: one eps_m per task (rows ``[T, P]``) instead of one eps for the mean loss.
        step_size: ascent step length (default: ``radius``, which makes k = 1 equal SAM).
    """
    tg = as_target(learner, loss_fn, inner_lr, inner_steps, adapt, strategy)
    check_batch(tg, batch)
    check_post_adaptation(tg, post_adaptation)
    if isinstance(radius, bool) or not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius: expected a positive finite number, got {radius!r}")
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    eta = float(radius if step_size is None else step_size)
    if not (math.isfinite(eta) and eta > 0):
        raise ValueError(f"step_size: expected a positive finite number, got {step_size!r}")
    radius = float(radius)
    T = batch.num_tasks
    E = T if per_task else 1
    data = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)

    def objective(ev, eps: torch.Tensor, grad: bool):
        """``(values [E], grads [E, P] or None)`` at theta + eps (eps ``[E, P]``)."""
        with torch.enable_grad() if grad else torch.no_grad():
            if grad:
                eps = eps.detach().requires_grad_()
            rows = tg.theta + eps
            rows = rows.expand(T, -1) if E == 1 else rows
            loss = row_objective(tg, ev, rows, *data, post_adaptation, create_graph=grad and post_adaptation)
            val = loss.mean(0, keepdim=True) if E == 1 else loss
            if not grad:
                return val.detach(), None
            (g,) = torch.autograd.grad(val.sum(), eps)
        return val.detach(), g

    eps = tg.theta.new_zeros(E, tg.P)
    ev, (f0, g) = timed_choice(tg, lambda e: objective(e, eps, True))
    first_order = radius * g.norm(dim=-1)
    incs = [torch.zeros_like(f0)]
    for j in range(steps):
        if j > 0:
            f, g = objective(ev, eps, True)
            incs.append(f - f0)
        gn = g.norm(dim=-1, keepdim=True)
        # A zero gradient row does not move (no NaN), as in fastmeta's SAM convention.
        eps = _project(eps + eta * g / gn.clamp_min(torch.finfo(g.dtype).tiny), radius)
    f, _ = objective(ev, eps, False)
    incs.append(f - f0)
    hist = torch.stack(incs)                                  # [k + 1, E]
    best = hist.max(0).values                                 # [E]
    return Sharpness(
        value=float(best.mean()), last=float(hist[-1].mean()), first_order=float(first_order.mean()),
        loss=float(f0.mean()), radius=radius, steps=steps, post_adaptation=post_adaptation,
        eps=eps[0] if E == 1 else eps, per_task=best if per_task else None, history=hist.mean(1))
