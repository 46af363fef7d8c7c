"""The inner loop every algorithm adapts with: gradient steps on task rows through an :class:`Evaluator`."""
from __future__ import annotations

import numbers
from typing import Callable, Optional, Sequence, Union

import torch

from .evaluator import Evaluator, task_rows
from .inner_optim import InnerOptimizer

GradHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
GradAt = Callable[[int, torch.Tensor], tuple]
Rate = Union[float, torch.Tensor]
# A rate for every step (float, [D] or [T, D]), or one per step.
Rates = Union[Rate, Sequence[Rate]]


def inner_loop(ev: Evaluator, rows: torch.Tensor, shared: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               lr: Rates, steps: int, create_graph: bool, grad_hook: Optional[GradHook] = None,
               grad_at: Optional[GradAt] = None, structured: bool = False,
               optimizer: Optional[InnerOptimizer] = None, keep_iterates: bool = False):
    """``steps`` steps ``w_{k+1} = w_k - lr_k * d_k`` on task rows (MAML inner loop, Sharp-MAML eq. 9).

    ``d_k = grad L(w_k; x, y)`` (plain SGD), or what ``optimizer`` makes of it (an
    :class:`~fastmeta.evaluation.inner_optim.InnerOptimizer`: momentum, Adam; its state is per task
    row and differentiable). ``lr`` (alpha) is

    * a float: one rate for every entry and step (MAML);
    * a tensor ``[D]`` over the adapted entries, shared by the tasks, or ``[T, D]`` per task row:
      an elementwise rate, ``w - alpha o d`` (Meta-SGD, Li et al. 2017 eq. 1); a tensor that
      requires grad (learned rates) stays in the graph, so the result is differentiable in it;
    * a list/tuple of ``steps`` such values, one per step (MAML++'s per-step rates).

    Returns the adapted rows ``[T, D]`` and the list of iterates ``[w_0, ..., w_{steps-1}]``
    (each ``[T, D]``) at which the steps were taken. Without ``create_graph`` the gradients are
    constants, which is first-order MAML (Fallah eq. 8); the rates and the optimizer's arithmetic
    are still differentiated.

    Two hooks change where or what the step uses, for algorithms built on this loop:

    * ``grad_at(k, w_k) -> (point [T, D], x, y)``: take step k's gradient at ``point`` on ``(x, y)``
      instead of at ``w_k`` on the whole support set (Sharp-MAML eq. 22: the SAM-perturbed point
      ``w_k + eps_k``; ESAM's SDS: a subset of the samples). The step still starts from ``w_k``.
    * ``grad_hook(k, w_k, g_k) -> g``: replace the gradient (e.g. mask it to the adapted entries).

    ``structured=True`` is for callers that only pass the adapted weights on to
    :meth:`Evaluator.losses`/:meth:`Evaluator.forward`: on the ``bmm`` strategy (and without hooks)
    the loop then runs on per-parameter task tensors ``{name: [T, ...]}`` and returns those instead
    of the rows, and no iterates unless ``keep_iterates`` (then as such dicts; MAML++'s multi-step
    loss evaluates the query loss at each). Rates ``[D]``/``[T, D]`` are split into the same
    per-parameter shapes by the layout. Same updates and values; the autograd graph loses the
    split of the rows and its concatenating backward (~5% of a second-order sine MLP step). Other
    strategies return rows.

    ``ValueError`` naming ``lr`` for a rate tensor of the wrong shape, dtype or device or a per-step
    list of the wrong length; ``TypeError`` naming ``optimizer`` for something else than an
    InnerOptimizer.
    """
    T = x.shape[0]
    rates = step_rates(lr, steps, ev.layout.D, T, ev.layout.dtype, ev.layout.device)
    if optimizer is not None and not isinstance(optimizer, InnerOptimizer):
        raise TypeError(f"optimizer: expected a fastmeta InnerOptimizer (InnerSGD, InnerAdam), got {type(optimizer).__name__}")
    if structured and grad_hook is None and grad_at is None and ev.strategy == "bmm":
        return _inner_loop_params(ev, rows, shared, x, y, rates, steps, create_graph, optimizer, keep_iterates)
    w = task_rows(rows, T) if rows.dim() == 1 else rows
    iterates = []
    state = None
    for k in range(steps):
        iterates.append(w)
        point, xk, yk = (w, x, y) if grad_at is None else grad_at(k, w)
        _, g = ev.grads(point, shared, xk, yk, create_graph=create_graph)
        if grad_hook is not None:
            g = grad_hook(k, w, g)
        if optimizer is not None:
            g, state = optimizer.direction(k, w, g, state)
        w = w - rates[k] * g
    return w, iterates


def step_rates(lr: Rates, steps: int, D: int, T: int, dtype: torch.dtype, device: torch.device) -> list:
    """``lr`` checked and expanded to one rate per step (floats stay floats, tensors stay as given).
    ``ValueError`` naming ``lr`` (see :func:`inner_loop`)."""
    if isinstance(lr, (list, tuple)):
        if len(lr) != steps:
            raise ValueError(f"lr: a per-step list needs one rate per inner step ({steps}), got {len(lr)}")
        return [_rate(r, D, T, dtype, device, f"lr[{k}]") for k, r in enumerate(lr)]
    return [_rate(lr, D, T, dtype, device, "lr")] * steps


def _rate(r, D: int, T: int, dtype, device, name: str) -> Rate:
    if isinstance(r, torch.Tensor):
        if r.dim() == 0:
            shape_ok = True
        else:
            shape_ok = tuple(r.shape) in ((D,), (T, D))
        if not shape_ok:
            raise ValueError(f"{name}: a rate tensor must be a scalar, [D]=[{D}] over the adapted entries or "
                             f"[T, D]=[{T}, {D}] per task row, got shape {tuple(r.shape)}")
        if r.dtype != dtype or r.device != device:
            raise ValueError(f"{name}: rate tensor is {r.dtype} on {r.device}, the parameters are {dtype} on {device}")
        return r
    if isinstance(r, bool) or not isinstance(r, numbers.Real):
        raise ValueError(f"{name}: expected a float or a rate tensor, got {type(r).__name__}")
    return float(r)


def _inner_loop_params(ev: Evaluator, rows: torch.Tensor, shared: Optional[torch.Tensor], x: torch.Tensor,
                       y: torch.Tensor, rates: list, steps: int, create_graph: bool,
                       optimizer: Optional[InnerOptimizer], keep_iterates: bool) -> tuple[dict, list]:
    # inner_loop on {name: [T, ...]} tensors (see its structured=True). Same updates, same values.
    T = x.shape[0]
    params = ev.layout.named_adapted(rows)
    if rows.dim() == 1:
        params = {n: p.expand(T, *p.shape) for n, p in params.items()}
    # Each distinct rate tensor is split into per-parameter views once ([D] -> [*shape] broadcasts
    # against [T, *shape]; [T, D] -> [T, *shape]); Meta-SGD's one rate serves every step.
    split: dict[int, dict] = {}
    for r in rates:
        if isinstance(r, torch.Tensor) and r.dim() > 0 and id(r) not in split:
            split[id(r)] = ev.layout.named_adapted(r)
    iterates = []
    states = dict.fromkeys(params)
    with torch.enable_grad():
        for k in range(steps):
            if keep_iterates:
                iterates.append(params)
            ps = [p if p.requires_grad else p.detach().requires_grad_() for p in params.values()]
            loss = ev.losses(dict(zip(params, ps)), shared, x, y)
            gs = torch.autograd.grad(loss.sum(), ps, create_graph=create_graph)
            r = rates[k]
            named_r = split.get(id(r)) if isinstance(r, torch.Tensor) else None
            new = {}
            for n, p, g in zip(params, ps, gs):
                if optimizer is not None:
                    g, states[n] = optimizer.direction(k, p, g, states[n])
                new[n] = p - (named_r[n] if named_r is not None else r) * g
            params = new
    return params, iterates
