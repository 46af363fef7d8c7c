"""Meta-testing a learner on many fresh tasks: post-adaptation loss (and accuracy) with 95%
confidence intervals, and the loss of the meta-parameters before adaptation."""
from __future__ import annotations

from typing import Optional

import torch
from tqdm.auto import tqdm

from .._checks import positive_int
from ..learner import EvalResult, MetaLearner


def evaluate_tasks(learner: MetaLearner, sampler, n_tasks: int, chunk: int = 50, steps: Optional[int] = None,
                   progress: bool = False) -> EvalResult:
    """Meta-test on ``n_tasks`` (an int >= 1) fresh tasks from ``sampler`` (in chunks of
    ``chunk`` to bound memory), adapting with ``steps`` inner steps (an int >= 1; None: the
    algorithm's)."""
    positive_int(n_tasks, "n_tasks")
    positive_int(chunk, "chunk")
    if steps is not None:
        positive_int(steps, "steps")
    return EvalResult.concat([learner.evaluate(sampler.sample(min(chunk, n_tasks - start)), steps=steps)
                              for start in tqdm(range(0, n_tasks, chunk), desc="meta-test", disable=not progress,
                                                leave=False)])


def pre_adaptation_loss(learner: MetaLearner, sampler, n_tasks: int) -> float:
    """Query loss of the meta-parameters themselves (no inner step), mean over ``n_tasks`` tasks."""
    positive_int(n_tasks, "n_tasks")
    b = sampler.sample(n_tasks)
    ev = learner.evaluator(b)
    theta = learner.layout.flatten(learner.model)
    adapted, shared = learner.layout.split(theta)
    with torch.no_grad():
        return float(ev.losses(adapted, shared, b.query_x, b.query_y).mean())
