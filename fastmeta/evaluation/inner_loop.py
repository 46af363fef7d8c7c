"""The inner loop every algorithm adapts with: SGD steps on task rows through an :class:`Evaluator`."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .evaluator import Evaluator, task_rows

GradHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
GradAt = Callable[[int, torch.Tensor], tuple]


def inner_loop(ev: Evaluator, rows: torch.Tensor, shared: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               lr: float, steps: int, create_graph: bool, grad_hook: Optional[GradHook] = None,
               grad_at: Optional[GradAt] = None, structured: bool = False):
    """``steps`` SGD steps ``w <- w - lr * grad L(w; x, y)`` on task rows (MAML inner loop, Sharp-MAML eq. 9).

    Returns the adapted rows ``[T, D]`` and the list of iterates ``[w_0, ..., w_{steps-1}]``
    (each ``[T, D]``) at which the steps were taken. Without ``create_graph`` the gradients are
    constants, which is first-order MAML (Fallah eq. 8).

    Two hooks change where or what the step uses, for algorithms built on this loop:

    * ``grad_at(k, w_k) -> (point [T, D], x, y)``: take step k's gradient at ``point`` on ``(x, y)``
      instead of at ``w_k`` on the whole support set (Sharp-MAML eq. 22: the SAM-perturbed point
      ``w_k + eps_k``; ESAM's SDS: a subset of the samples). The step still starts from ``w_k``.
    * ``grad_hook(k, w_k, g_k) -> g``: replace the gradient (e.g. mask it to the adapted entries).

    ``structured=True`` is for callers that only pass the adapted weights on to
    :meth:`Evaluator.losses`/:meth:`Evaluator.forward`: on the ``bmm`` strategy (and without hooks)
    the loop then runs on per-parameter task tensors ``{name: [T, ...]}`` and returns those instead
    of the rows, and no iterates. Same updates and values; the autograd graph loses the split of
    the rows and its concatenating backward (~5% of a second-order sine MLP step). Other
    strategies return rows.
    """
    if structured and grad_hook is None and grad_at is None and ev.strategy == "bmm":
        return _inner_loop_params(ev, rows, shared, x, y, lr, steps, create_graph), []
    T = x.shape[0]
    w = task_rows(rows, T) if rows.dim() == 1 else rows
    iterates = []
    for k in range(steps):
        iterates.append(w)
        point, xk, yk = (w, x, y) if grad_at is None else grad_at(k, w)
        _, g = ev.grads(point, shared, xk, yk, create_graph=create_graph)
        if grad_hook is not None:
            g = grad_hook(k, w, g)
        w = w - lr * g
    return w, iterates


def _inner_loop_params(ev: Evaluator, rows: torch.Tensor, shared: Optional[torch.Tensor], x: torch.Tensor,
                       y: torch.Tensor, lr: float, steps: int, create_graph: bool) -> dict:
    # inner_loop on {name: [T, ...]} tensors (see its structured=True). Same updates, same values.
    T = x.shape[0]
    params = ev.layout.named_adapted(rows)
    if rows.dim() == 1:
        params = {n: p.expand(T, *p.shape) for n, p in params.items()}
    with torch.enable_grad():
        for _ in range(steps):
            ps = [p if p.requires_grad else p.detach().requires_grad_() for p in params.values()]
            loss = ev.losses(dict(zip(params, ps)), shared, x, y)
            gs = torch.autograd.grad(loss.sum(), ps, create_graph=create_graph)
            params = {n: p - lr * g for n, p, g in zip(params, ps, gs)}
    return params
