"""Loss landscapes along filter-normalized random directions (Li et al. 2018; Sharp-MAML Fig. 1, Fig. 4).

``loss_landscape`` evaluates the loss on a 1-D line ``theta + a d1`` or a 2-D grid
``theta + a d1 + b d2`` (``a, b`` in ``[-span, span]``), where ``d1, d2`` are Gaussian directions
rescaled *filter by filter* to the norms of the model's own filters (Li et al. 2018, sec. 4), so
that landscapes of differently scaled networks are comparable. The objective is either the MAML
objective ``L(theta'_m(theta); D'_m)`` (Fig. 1 left, Fig. 4) or the plain loss ``L(theta; D'_m)``
(the ERM view of Fig. 1 right); see :mod:`fastmeta.analysis._objective`.

Batching: every (grid point, task) pair is one row of a ``[G * T, P]`` matrix, so a chunk of
``G`` grid points runs as one meta-batch through the :class:`~fastmeta.evaluation.Evaluator` (one
vmapped call, or one per-task loop whose gradients come from a single backward).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..params import ParamLayout
from ..tasks import TaskBatch
from ..metrics import accuracy as task_accuracy
from ._objective import (Target, as_target, check_batch, check_post_adaptation, repeat_tasks, row_objective,
                         timed_choice)

NORMALIZATIONS = ("filter", "layer", "none")


def filter_normalize(direction: torch.Tensor, theta: torch.Tensor, layout: ParamLayout,
                     normalization: str = "filter", ignore_biasbn: bool = True) -> torch.Tensor:
    """Rescale a direction ``[P]`` to the scale of ``theta`` ``[P]`` (Li et al. 2018, eq. before Fig. 2).

    ``"filter"``: for every parameter tensor with >= 2 dims and every filter ``i`` along dim 0
    (conv output channel, linear output unit), ``d_i <- d_i / ||d_i|| * ||theta_i||``.
    ``"layer"``: the same per whole tensor. ``"none"``: unchanged.
    1-D tensors (biases, batch-norm affine parameters) are set to zero when ``ignore_biasbn``
    (Li et al.'s ``--xignore biasbn`` default for plots), else copied from ``theta`` (their
    "one filter per scalar" rule). A zero direction filter stays zero (no division by zero).
    Returns a new ``[P]`` tensor; ``layout`` gives the tensor boundaries in flat order.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization: expected one of {NORMALIZATIONS}, got {normalization!r}")
    if direction.shape != (layout.P,) or theta.shape != (layout.P,):
        raise ValueError(f"direction: expected shape ({layout.P},) like theta, got {tuple(direction.shape)} and {tuple(theta.shape)}")
    out = direction.clone()
    if normalization == "none":
        return out
    for s in layout.slots:
        d = out[s.offset: s.offset + s.numel].view(s.shape)
        w = theta[s.offset: s.offset + s.numel].view(s.shape)
        if len(s.shape) <= 1:
            if ignore_biasbn:
                d.zero_()
            else:
                d.copy_(w)
        elif normalization == "filter":
            dn = d.reshape(s.shape[0], -1).norm(dim=1)
            wn = w.reshape(s.shape[0], -1).norm(dim=1)
            scale = torch.where(dn > 0, wn / dn.clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(dn))
            d.mul_(scale.view(-1, *([1] * (len(s.shape) - 1))))
        else:
            dn, wn = d.norm(), w.norm()
            d.mul_(wn / dn if dn > 0 else 0.0)
    return out


def random_directions(layout: ParamLayout, theta: torch.Tensor, n: int = 1, seed: Optional[int] = 0,
                      normalization: str = "filter", ignore_biasbn: bool = True) -> torch.Tensor:
    """``n`` filter-normalized Gaussian directions ``[n, P]`` around ``theta`` ``[P]`` (Li et al. 2018).

    The raw Gaussian draw depends only on ``seed`` and ``P`` (drawn in float64 on the CPU), so two
    checkpoints of one architecture get the *same* raw directions, each rescaled to its own
    filters -- which is what makes overlaid 1-D curves comparable.
    """
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"directions: expected a positive int, got {n!r}")
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    raw = torch.randn(n, layout.P, generator=gen, dtype=torch.float64).to(theta.device, theta.dtype)
    return torch.stack([filter_normalize(raw[i], theta, layout, normalization, ignore_biasbn) for i in range(n)])


@dataclass
class Landscape:
    """A 1-D or 2-D loss landscape.

    coords: ``[S]`` grid coordinates along each direction (same for both axes), ``-span..span``.
    loss: ``[S]`` (1-D) or ``[S, S]`` (2-D, ``loss[i, j]`` at ``theta + coords[i] d1 + coords[j] d2``),
        the mean over the batch's tasks. per_task: ``[S, T]`` or ``[S, S, T]``.
    accuracy / per_task_accuracy: same shapes (classification only, else None).
    directions: ``[k, P]`` the (normalized) directions used. center_loss: objective at ``theta``.
    """

    coords: torch.Tensor
    loss: torch.Tensor
    per_task: torch.Tensor
    accuracy: Optional[torch.Tensor]
    per_task_accuracy: Optional[torch.Tensor]
    directions: torch.Tensor
    center_loss: float
    post_adaptation: bool
    normalization: str
    strategy: str


def loss_landscape(learner, batch: TaskBatch, directions: int = 1, steps: int = 21, span: float = 1.0,
                   normalization: str = "filter", post_adaptation: bool = True, seed: Optional[int] = 0,
                   direction_vectors: Optional[torch.Tensor] = None, ignore_biasbn: bool = True,
                   grid_chunk: Optional[int] = None, progress: bool = False, strategy: Optional[str] = None,
                   loss_fn=None, inner_lr: Optional[float] = None, inner_steps: Optional[int] = None,
                   adapt="all") -> Landscape:
    """Loss on a line (``directions=1``) or grid (``2``) around the meta-parameters ``theta`` ``[P]``.

    Args:
        learner: a :class:`~fastmeta.MetaLearner` (its loss, adapted parameters, inner rate and
            steps are used) or an ``nn.Module`` (then ``loss_fn``, ``adapt``, ``inner_lr``,
            ``inner_steps`` say the same things).
        batch: T tasks; the landscape is the mean over them (``per_task`` keeps each).
        directions: 1 or 2 filter-normalized random directions (Li et al. 2018), drawn from ``seed``.
        steps: grid points per axis (odd keeps ``theta`` itself on the grid).
        span: the grid covers ``[-span, span]`` in units of the normalized directions (> 0).
        normalization: ``"filter"`` (Li et al.), ``"layer"`` or ``"none"``.
        post_adaptation: True: the MAML objective ``L(theta'_m(theta); D'_m)`` (Sharp-MAML eq. 2,
            plain SGD inner loop); False: the plain loss ``L(theta; D'_m)``.
        direction_vectors: optional ``[k, P]`` directions to use as given (no normalization).
        grid_chunk: grid points per batched call (rows = grid_chunk * T); default ``max(1, 64 // T)``.
        progress: show a tqdm bar over grid points.
        strategy: evaluation strategy override (``"auto"`` times both on the first chunk).

    Nothing here needs gradients with respect to ``theta``: the inner-loop gradients are taken
    as constants (first-order graph only), and query losses run without autograd.
    """
    tg = as_target(learner, loss_fn, inner_lr, inner_steps, adapt, strategy)
    check_batch(tg, batch)
    check_post_adaptation(tg, post_adaptation)
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if not (isinstance(span, (int, float)) and math.isfinite(span) and span > 0):
        raise ValueError(f"span: expected a positive finite number, got {span!r}")
    if direction_vectors is not None:
        dv = direction_vectors
        if not isinstance(dv, torch.Tensor) or dv.dim() != 2 or dv.shape[0] not in (1, 2) or dv.shape[1] != tg.P:
            shape = tuple(dv.shape) if isinstance(dv, torch.Tensor) else type(dv).__name__
            raise ValueError(f"direction_vectors: expected [1 or 2, {tg.P}] for this model (P = {tg.P}), got {shape}; "
                             "directions from a model of another architecture do not apply")
        dirs = dv.to(tg.theta.device, tg.theta.dtype)
    else:
        if directions not in (1, 2):
            raise ValueError(f"directions: expected 1 or 2, got {directions!r}")
        dirs = random_directions(tg.layout, tg.theta, directions, seed, normalization, ignore_biasbn)
    k = dirs.shape[0]
    T = batch.num_tasks
    if grid_chunk is None:
        grid_chunk = max(1, 64 // T)
    if not (isinstance(grid_chunk, int) and grid_chunk >= 1):
        raise ValueError(f"grid_chunk: expected an int >= 1, got {grid_chunk!r}")

    coords = torch.linspace(-span, span, steps, dtype=torch.float64)
    if k == 1:
        coeffs = coords[:, None]
    else:
        a, b = torch.meshgrid(coords, coords, indexing="ij")
        coeffs = torch.stack([a.reshape(-1), b.reshape(-1)], 1)
    coeffs = coeffs.to(tg.theta.device, tg.theta.dtype)
    n_pts = coeffs.shape[0]

    def chunk_eval(ev, sl: slice):
        pts = tg.theta + coeffs[sl] @ dirs                  # [G, P]
        G = pts.shape[0]
        rows = pts.repeat_interleave(T, 0)                  # [G*T, P], row g*T + t = (point g, task t)
        data = [repeat_tasks(t, G) for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)]
        with torch.no_grad():  # the inner loop re-enables autograd for its own gradients only
            loss, out = row_objective(tg, ev, rows, *data, post_adaptation, create_graph=False, return_outputs=True)
        acc = task_accuracy(out, data[3]).view(G, T) if tg.classification else None
        return loss.detach().view(G, T), acc

    losses, accs = [], []
    bar = tqdm(total=n_pts, desc=f"landscape {k}-D ({'post-adaptation' if post_adaptation else 'plain'})",
               disable=not progress, leave=False)
    ev = None
    for start in range(0, n_pts, grid_chunk):
        sl = slice(start, min(n_pts, start + grid_chunk))
        if ev is None:
            ev, (l, a) = timed_choice(tg, lambda e: chunk_eval(e, sl))
        else:
            l, a = chunk_eval(ev, sl)
        losses.append(l)
        accs.append(a)
        bar.update(sl.stop - sl.start)
    bar.close()

    shape = (steps,) * k
    per_task = torch.cat(losses).view(*shape, T)
    per_acc = torch.cat(accs).view(*shape, T) if tg.classification else None
    # The objective at theta itself, computed exactly (the grid may not contain the origin).
    with torch.no_grad():
        center = row_objective(tg, ev, tg.theta.expand(T, -1), batch.support_x, batch.support_y, batch.query_x,
                               batch.query_y, post_adaptation)
    return Landscape(coords.to(tg.theta.dtype), per_task.mean(-1), per_task,
                     None if per_acc is None else per_acc.mean(-1), per_acc, dirs,
                     float(center.detach().mean()), post_adaptation, normalization if direction_vectors is None else "given",
                     ev.strategy)
