"""Meta-SGD: per-entry inner learning rates meta-learned with the weights (Li et al. 2017), and the
meta-gradient routine shared with MAML++ (:mod:`.mamlpp`): learned rate tensors, optional
per-step query-loss weights."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..evaluation import Evaluator, inner_loop
from ..evaluation.inner_optim import InnerOptimizer, InnerOptimizerSpec, make_inner_optimizer
from ..params import ParamLayout
from ..profiling import annotate
from ..tasks import TaskBatch
from .base import Algorithm, MetaResult


def learned_rates_meta_grad(ev: Evaluator, layout: ParamLayout, theta: torch.Tensor, batch: TaskBatch,
                            leaves: Sequence[torch.Tensor], make_lr: Callable[[list], object], steps: int,
                            second_order: bool, optimizer: Optional[InnerOptimizer] = None,
                            step_weights: Optional[Sequence[float]] = None) -> MetaResult:
    """Mean over tasks of ``d/d(theta, leaves) sum_k c_k L(theta_k; D'_m)``, ``[P + R]``.

    ``theta_k`` is the k-th iterate of the inner loop on the support set with rates
    ``make_lr(leaves)`` (anything ``inner_loop`` takes as ``lr``, built from the learned tensors
    ``leaves``, so that they are differentiated through every step) and ``optimizer``.
    ``step_weights``: ``c_1..c_K`` (MAML++'s multi-step loss); ``None``: ``c_K = 1`` alone. Without
    ``second_order`` the inner loss gradients are constants (first order); the rates still get
    their gradient through the update, ``d theta_{k+1} / d alpha = -d_k``.
    Returns the flat gradient ``[P]`` of theta followed by each leaf's, flattened, in order;
    ``query_loss``/``query_out`` are those after the last step.
    """
    theta = theta.detach().requires_grad_()
    # Fresh leaves: gradients are returned in MetaResult.grad, never accumulated into .grad here.
    leaves = [p.detach().requires_grad_() for p in leaves]
    if step_weights is not None and len(step_weights) != steps:
        raise ValueError(f"step_weights: expected {steps} weights, got {len(step_weights)}")

    def task_pass(b: TaskBatch):
        adapted, shared = layout.split(theta)
        with annotate("inner"):
            w, its = inner_loop(ev, adapted, shared, b.support_x, b.support_y, make_lr(leaves), steps,
                                create_graph=second_order, structured=True, optimizer=optimizer,
                                keep_iterates=step_weights is not None)
        with annotate("outer"):
            q, out = ev.losses(w, shared, b.query_x, b.query_y, return_outputs=True)
            if step_weights is None:
                obj = q.sum()
            else:
                obj = step_weights[-1] * q.sum()
                # its[k] is the iterate after k steps (its[0] = theta): query losses at theta_1..theta_{K-1}.
                for k in range(1, steps):
                    if step_weights[k - 1] != 0:
                        obj = obj + step_weights[k - 1] * ev.losses(its[k], shared, b.query_x, b.query_y).sum()
            grads = torch.autograd.grad(obj, [theta, *leaves])
        return torch.cat([g.reshape(-1) for g in grads]), q.detach(), out.detach()

    g, q, out = ev.over_tasks(task_pass, batch)
    return MetaResult(g, q, out)


def as_parameter(current: Optional[nn.Parameter], shape: tuple, fill: float, layout: ParamLayout) -> nn.Parameter:
    """``current`` moved to the layout's dtype/device if it has ``shape`` (kept: a rate loaded from a
    checkpoint before binding survives it), else a new Parameter of ``shape`` filled with ``fill``."""
    if current is not None and tuple(current.shape) == tuple(shape):
        if current.dtype != layout.dtype or current.device != layout.device:
            current.data = current.data.to(layout.device, layout.dtype)
        return current
    return nn.Parameter(torch.full(shape, fill, dtype=layout.dtype, device=layout.device))


def load_rates(current: Optional[nn.Parameter], value, key: str, shape: Optional[tuple]) -> nn.Parameter:
    """``value`` copied into ``current`` in place (optimizers keep referring to it), or a new
    Parameter if unbound. ``ValueError`` naming ``state_dict`` for a non-tensor or a wrong shape."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise ValueError(f"state_dict: {key!r} must be a floating-point tensor, got {type(value).__name__}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"state_dict: {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if current is not None and current.shape == value.shape:
        with torch.no_grad():
            current.copy_(value)
        return current
    return nn.Parameter(value.detach().clone())


class MetaSGD(Algorithm):
    """Meta-SGD (Li, Zhou, Chen, Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot
    Learning", eq. 1 and Alg. 1): the inner step uses a learned rate per adapted entry,

        theta'_m = theta - alpha o grad L(theta; D_m)               (alpha [D], o: elementwise)

    and (theta, alpha) are meta-learned together on ``mean_m L(theta'_m; D'_m)``: the
    meta-gradient is ``[P + D]``, theta's ``[P]`` then alpha's ``[D]`` (mean over tasks).
    ``inner_steps > 1`` repeats the step with the same alpha. ``first_order=True`` holds the inner
    gradients constant (FO-MAML-style), and alpha still gets ``-grad L(theta; D_m) o
    grad L(theta'_m; D'_m)`` through the update. ``inner_optimizer`` (e.g. ``InnerAdam()``): alpha
    multiplies the optimizer's direction instead of the gradient.

    alpha is an ``nn.Parameter`` ``[D]`` over the adapted rows (``ParamLayout`` order), made by
    :meth:`bind` (``MetaLearner`` calls it) filled with ``inner_lr``; :meth:`meta_grad` binds
    lazily if it was not called. The alpha values may become zero or negative by meta-training,
    as in the paper (no constraint is applied).
    """

    name = "metasgd"

    def __init__(self, inner_lr: float, inner_steps: int = 1, first_order: bool = False,
                 inner_optimizer: InnerOptimizerSpec = None):
        super().__init__(inner_lr, inner_steps)
        self.first_order = bool(first_order)
        self.inner_optimizer = make_inner_optimizer(inner_optimizer)
        self._alpha: Optional[nn.Parameter] = None

    @property
    def alpha(self) -> Optional[nn.Parameter]:
        """The learned rates ``[D]`` (``None`` before :meth:`bind`)."""
        return self._alpha

    def bind(self, layout: ParamLayout, model: Optional[nn.Module] = None) -> None:
        self._alpha = as_parameter(self._alpha, (layout.D,), self.inner_lr, layout)

    def meta_parameters(self) -> list[nn.Parameter]:
        return [] if self._alpha is None else [self._alpha]

    def state_dict(self) -> dict:
        return {} if self._alpha is None else {"alpha": self._alpha.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        extra = set(state) - {"alpha"}
        if extra or "alpha" not in state:
            raise ValueError(f"state_dict: MetaSGD expects the key 'alpha', got {sorted(state)}")
        a = state["alpha"]
        if isinstance(a, torch.Tensor) and a.dim() != 1:
            raise ValueError(f"state_dict: 'alpha' must be [D], got shape {tuple(a.shape)}")
        self._alpha = load_rates(self._alpha, a, "alpha", None if self._alpha is None else tuple(self._alpha.shape))

    def _bound(self, layout: ParamLayout) -> nn.Parameter:
        if self._alpha is None:
            self.bind(layout)
        elif self._alpha.shape != (layout.D,):
            raise ValueError(f"layout: MetaSGD's rates are bound to D={self._alpha.shape[0]} adapted entries, "
                             f"this layout has D={layout.D}; call bind(layout, model) for the new model")
        elif self._alpha.dtype != layout.dtype or self._alpha.device != layout.device:
            self.bind(layout)
        return self._alpha

    def meta_grad(self, ev: Evaluator, layout: ParamLayout, theta: torch.Tensor, batch: TaskBatch) -> MetaResult:
        alpha = self._bound(layout)
        return learned_rates_meta_grad(ev, layout, theta, batch, [alpha], lambda leaves: leaves[0],
                                       self.inner_steps, not self.first_order, self.inner_optimizer)

    def adapt_rates(self, layout: ParamLayout, steps: int):
        return self._bound(layout).detach()
