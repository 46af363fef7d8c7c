"""Generalization gap: meta-train vs meta-test post-adaptation accuracy and loss (Sharp-MAML sec. 5.3).

Sharp-MAML sec. 5.3 reports the "generalization error" of Sharp-MAML_both vs MAML on
Mini-Imagenet (34.58% vs 37.46%, 5-way 1-shot) -- the drop from meta-train to meta-test accuracy.
Here both sides are measured the same way as ``MetaLearner.evaluate``: adapt on each task's
support set with the learner's own algorithm, score its query set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union


from ..learner import EvalResult, MetaLearner
from ..tasks import TaskBatch


@dataclass
class GeneralizationGap:
    """Meta-train and meta-test summaries and their differences.

    accuracy_gap = train accuracy - test accuracy; loss_gap = test loss - train loss (both
    positive when the meta-model generalizes worse to new tasks). The ``*_ci95`` half-widths of the
    gaps combine the two independent task samples: ``sqrt(ci_train^2 + ci_test^2)`` (each side is
    ``1.96 * std / sqrt(n)`` over its tasks, the normal approximation).
    """

    train: EvalResult
    test: EvalResult
    loss_gap: float
    loss_gap_ci95: float
    accuracy_gap: Optional[float]
    accuracy_gap_ci95: Optional[float]

    def __str__(self) -> str:
        s = f"meta-train {self.train}; meta-test {self.test}; loss gap {self.loss_gap:.4f} ± {self.loss_gap_ci95:.4f}"
        if self.accuracy_gap is not None:
            s += f"; accuracy gap {100 * self.accuracy_gap:.2f}% ± {100 * self.accuracy_gap_ci95:.2f}%"
        return s


TaskSpec = Union[TaskBatch, Sequence[TaskBatch], object]


def _evaluate(learner: MetaLearner, tasks: TaskSpec, num_tasks: Optional[int], chunk: int,
              steps: Optional[int], name: str) -> EvalResult:
    if isinstance(tasks, TaskBatch):
        batches = [tasks]
    elif hasattr(tasks, "sample"):
        if not (isinstance(num_tasks, int) and num_tasks >= 1):
            raise ValueError(f"num_tasks: a task sampler for {name} needs num_tasks >= 1, got {num_tasks!r}")
        batches = [tasks.sample(min(chunk, num_tasks - s)) for s in range(0, num_tasks, chunk)]
    elif isinstance(tasks, (list, tuple)) and tasks and all(isinstance(b, TaskBatch) for b in tasks):
        batches = list(tasks)
    else:
        raise ValueError(f"{name}: expected a TaskBatch, a list of TaskBatch, or a sampler with .sample(n), "
                         f"got {type(tasks).__name__}")
    return EvalResult.concat([learner.evaluate(b, steps=steps) for b in batches])


def generalization_gap(learner: MetaLearner, train_tasks: TaskSpec, test_tasks: TaskSpec,
                       num_tasks: Optional[int] = None, chunk: int = 50,
                       steps: Optional[int] = None) -> GeneralizationGap:
    """Meta-train vs meta-test post-adaptation loss/accuracy with 95% confidence intervals.

    Args:
        learner: a :class:`~fastmeta.MetaLearner` (adaptation uses its algorithm's ``adapt``).
        train_tasks, test_tasks: a :class:`~fastmeta.TaskBatch`, a list of them, or a sampler
            with ``.sample(n) -> TaskBatch`` (e.g. ``TaskSource(cfg).train`` / ``.test``), from
            which ``num_tasks`` tasks are drawn in chunks of ``chunk``.
        steps: inner steps at evaluation (default: the algorithm's).
    """
    if not isinstance(learner, MetaLearner):
        raise ValueError(f"learner: expected a fastmeta.MetaLearner, got {type(learner).__name__}")
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
    tr = _evaluate(learner, train_tasks, num_tasks, chunk, steps, "train_tasks")
    te = _evaluate(learner, test_tasks, num_tasks, chunk, steps, "test_tasks")
    acc_gap = acc_ci = None
    if tr.accuracy is not None and te.accuracy is not None:
        acc_gap = tr.accuracy - te.accuracy
        acc_ci = math.sqrt(tr.accuracy_ci95 ** 2 + te.accuracy_ci95 ** 2)
    return GeneralizationGap(tr, te, te.loss - tr.loss, math.sqrt(tr.loss_ci95 ** 2 + te.loss_ci95 ** 2),
                             acc_gap, acc_ci)
