"""What the analysis tools evaluate: one objective on rows of full meta-parameter vectors.

Landscapes and sharpness need the loss at many *different* meta-parameter vectors ``Theta``
(grid points, perturbed points, one per task). fastmeta's :class:`~fastmeta.evaluation.Evaluator`
already evaluates many rows of adapted parameters at once, but it shares one vector of
non-adapted ("shared") parameters across rows. Here every row must be a whole ``Theta`` ``[P]``,
so the analysis uses a second layout in which *all* meta-parameters are row entries, in the
learner's own flat order (adapted first, then shared), and restricts the inner loop to the
adapted entries with a gradient mask. ``Theta`` vectors therefore mean the same thing here and
in the learner, and for MAML (everything adapted) the mask is skipped.

The two objectives, for task m with support set D_m and query set D'_m (Sharp-MAML eqs. 1-2):

* ``post_adaptation=True``: the MAML objective ``L(theta'_m(theta); D'_m)`` with
  ``theta'_m = theta - alpha * grad L(theta; D_m)`` repeated ``inner_steps`` times (eq. 2 / 9 with
  no perturbation), i.e. plain SGD adaptation with the checkpoint's inner rate, whatever SAM
  variant trained it, so that landscapes of MAML and Sharp-MAML checkpoints are comparable;
* ``post_adaptation=False``: the plain (ERM-view) loss ``L(theta; D'_m)``, on the query set so
  that the two views differ only by the adaptation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .. import _checks
from ..evaluation import STRATEGIES, Evaluator, candidate_strategies, inner_loop, resolve_loss, time_strategies
from ..learner import MetaLearner
from ..params import ParamLayout
from ..tasks import TaskBatch


@dataclass
class Target:
    """A model with everything needed to evaluate its meta-objective on rows ``[R, P]``."""

    model: nn.Module
    layout: ParamLayout          # the learner's layout: Theta = [adapted D | shared P-D]
    full: ParamLayout            # same flat order, every entry a row entry (D = P)
    mask: Optional[torch.Tensor]  # [P] 1 on adapted entries, None when everything adapts
    loss_fn: Callable
    classification: bool
    inner_lr: Optional[float]
    inner_steps: int
    strategy: str
    theta: torch.Tensor          # [P] current meta-parameters (detached)

    @property
    def P(self) -> int:
        return self.layout.P


def as_target(obj, loss_fn=None, inner_lr: Optional[float] = None, inner_steps: Optional[int] = None,
              adapt="all", strategy: Optional[str] = None) -> Target:
    """Build a :class:`Target` from a :class:`MetaLearner` or a bare ``nn.Module``.

    For a learner, the loss, adapted parameters, inner rate/steps and strategy are its own
    (``inner_lr`` / ``inner_steps`` / ``strategy`` override them). For a module, ``loss_fn``
    (default cross-entropy), ``adapt`` and ``inner_lr`` (needed for the MAML objective) are used.
    """
    if isinstance(obj, MetaLearner):
        model, layout = obj.model, obj.layout
        fn, cls = obj.loss_fn, obj.classification
        lr = inner_lr if inner_lr is not None else getattr(obj.algorithm, "inner_lr", None)
        k = inner_steps if inner_steps is not None else getattr(obj.algorithm, "inner_steps", 1)
        strat = strategy or obj.chosen_strategy or obj.strategy
    elif isinstance(obj, nn.Module):
        model = obj
        layout = ParamLayout(model, adapt)
        fn, cls = resolve_loss(loss_fn)
        lr, k = inner_lr, (inner_steps if inner_steps is not None else 1)
        strat = strategy or "auto"
    else:
        raise ValueError(f"learner: expected a fastmeta.MetaLearner or an nn.Module, got {type(obj).__name__}")
    if lr is not None:
        lr = _checks.positive_float(lr, "inner_lr")
    _checks.positive_int(k, "inner_steps")
    if strat not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strat!r}")
    full = layout if not layout.shared else ParamLayout(model, adapt=layout.adapted + layout.shared)
    mask = None
    if layout.shared:
        mask = torch.zeros(layout.P, dtype=layout.dtype, device=layout.device)
        mask[: layout.D] = 1
    return Target(model, layout, full, mask, fn, cls, None if lr is None else float(lr), k, strat,
                  layout.flatten(model))


def check_batch(tg: Target, batch: TaskBatch) -> None:
    _checks.check_batch(batch, tg.layout)


def check_post_adaptation(tg: Target, post_adaptation: bool) -> None:
    if post_adaptation and tg.inner_lr is None:
        raise ValueError("inner_lr: post_adaptation=True (the MAML objective) needs the inner learning rate; "
                         "pass inner_lr=... or a MetaLearner")


def evaluator(tg: Target, strategy: str) -> Evaluator:
    return Evaluator(tg.model, tg.full, tg.loss_fn, strategy)


def repeat_tasks(t: torch.Tensor, times: int) -> torch.Tensor:
    """``[T, ...] -> [times * T, ...]``, row ``g * T + t`` holding task ``t``."""
    return t.repeat(times, *([1] * (t.dim() - 1))) if times > 1 else t


def row_objective(tg: Target, ev: Evaluator, rows: torch.Tensor, sx, sy, qx, qy, post_adaptation: bool,
                  create_graph: bool = False, return_outputs: bool = False):
    """Per-row objective ``[R]`` at full meta-parameter rows ``[R, P]`` on per-row task data ``[R, N, ...]``.

    ``post_adaptation``: ``L(theta'_r; D'_r)`` after ``inner_steps`` SGD steps on ``D_r`` restricted to
    the adapted entries (Sharp-MAML eq. 2); else ``L(theta_r; D'_r)``. ``create_graph=True`` keeps
    the inner gradients differentiable, so ``d objective / d rows`` is the exact (second-order)
    MAML gradient; otherwise the result is meant for evaluation only.
    """
    empty = rows.new_zeros(0)
    if post_adaptation:
        hook = None if tg.mask is None else (lambda k, w, g: g * tg.mask)
        rows, _ = inner_loop(ev, rows, empty, sx, sy, tg.inner_lr, tg.inner_steps, create_graph=create_graph,
                             grad_hook=hook)
    return ev.losses(rows, empty, qx, qy, return_outputs=return_outputs)


def timed_choice(tg: Target, run: Callable[[Evaluator], object]):
    """``(evaluator, result)``: under ``strategy="auto"`` run ``run`` with each strategy (``bmm`` only for
    models that qualify) and keep the fastest (its result is reused, so the measurement costs the
    extra evaluations only); else just run."""
    if tg.strategy != "auto":
        ev = evaluator(tg, tg.strategy)
        try:
            return ev, run(ev)
        except RuntimeError as e:  # shape/dtype mismatches surface here as torch RuntimeErrors
            raise ValueError(f"batch: the model cannot evaluate this batch: {e}") from e
    choice = time_strategies(candidate_strategies(tg.model), lambda name: evaluator(tg, name), run,
                             warmup=False, max_rounds=1)
    if choice.strategy is None:
        raise ValueError(f"batch: the model cannot evaluate this batch with any strategy: {choice.errors}")
    return choice.evaluator, choice.result
