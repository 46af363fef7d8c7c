"""Differentiable inner optimizers: SGD with momentum and Adam as the inner loop's update rule.

An inner optimizer turns the step-k gradient ``g_k`` of each task into an update direction ``d_k``
(same shape) with its own per-task state (buffers ``[T, D]`` on task rows, ``[T, *shape]`` per
parameter on the ``bmm`` path); the inner loop then steps ``w_{k+1} = w_k - lr_k * d_k``. The
formulas are those of ``torch.optim.SGD`` and ``torch.optim.Adam`` (PyTorch 2.x documentation,
"Algorithm" boxes), written out-of-place so that autograd differentiates through them: with
``create_graph=True`` the meta-gradient is exact through the optimizer state (second order); with
first-order MAML the loss gradients ``g_k`` are constants but the optimizer's own arithmetic (weight
decay ``lambda w``, the state recursion) is still differentiated exactly.

Optimizers are stateless objects (hyperparameters only); the state lives in the inner loop, one
per call, so one optimizer object can serve every task, chunk and strategy.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch

from .._checks import nonnegative_float, positive_float


class InnerOptimizer:
    """An inner-loop update rule. Subclasses implement :meth:`direction`.

    ``direction(k, w, g, state) -> (d, state)``: the direction ``d`` (shape of ``w``) for step k
    (0-based) from the iterate ``w`` and its loss gradient ``g``, given the state returned by the
    previous step (``None`` at k = 0). Called once per tensor (the task rows ``[T, D]``, or each
    per-parameter tensor ``[T, *shape]`` on the ``bmm`` path): every rule here is elementwise.
    """

    name = "inner_optimizer"

    def direction(self, k: int, w: torch.Tensor, g: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def config(self) -> dict:
        """The hyperparameters as plain values (``make_inner_optimizer(opt.config())`` rebuilds it)."""
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)


class InnerSGD(InnerOptimizer):
    """``torch.optim.SGD``'s rule as a differentiable inner update (per task, elementwise):

        g_k  <- g_k + lambda w_k                                   (weight_decay lambda)
        b_0   = g_0;  b_k = mu b_{k-1} + (1 - tau) g_k  (k >= 1)    (momentum mu, dampening tau)
        d_k   = g_k + mu b_k  (nesterov)  or  b_k                   (d_k = g_k when mu = 0)
        w_{k+1} = w_k - lr d_k

    Same argument checks as ``torch.optim.SGD`` (nesterov needs momentum > 0 and zero dampening).
    """

    name = "sgd"

    def __init__(self, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        self.momentum = nonnegative_float(momentum, "momentum")
        self.dampening = nonnegative_float(dampening, "dampening")
        self.weight_decay = nonnegative_float(weight_decay, "weight_decay")
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov: expected a bool, got {nesterov!r}")
        if nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("nesterov: needs momentum > 0 and dampening == 0 (as torch.optim.SGD)")
        self.nesterov = nesterov

    def direction(self, k, w, g, state):
        if self.weight_decay:
            g = g + self.weight_decay * w
        if not self.momentum:
            return g, None
        buf = g if state is None else self.momentum * state + (1.0 - self.dampening) * g
        return (g + self.momentum * buf if self.nesterov else buf), buf


class InnerAdam(InnerOptimizer):
    """``torch.optim.Adam``'s rule (L2 weight decay, not AdamW) as a differentiable inner update:

        g_k  <- g_k + lambda w_k
        m_k   = b1 m_{k-1} + (1 - b1) g_k,   v_k = b2 v_{k-1} + (1 - b2) g_k^2     (m_{-1} = v_{-1} = 0)
        d_k   = (m_k / (1 - b1^{k+1})) / (sqrt(v_k) / sqrt(1 - b2^{k+1}) + eps)
        w_{k+1} = w_k - lr d_k

    eps sits outside the square root, as in ``torch.optim.Adam``. Where ``v_k = 0`` (every gradient
    of that entry so far exactly zero, e.g. a dead ReLU unit or a weight on an all-zero input),
    autograd's ``d sqrt(v)/dv = 1/(2 sqrt(v))`` is infinite and multiplies a zero, giving NaN in the
    meta-gradient (``torch.optim.Adam(differentiable=True)`` and ``higher`` share this). There,
    ``m_k = 0`` too and the direction ``m/(sqrt(v)+eps)`` is smooth in ``g`` with derivative
    ``(1-b1)/((1-b1^{k+1}) eps)`` through ``m`` alone; so the square root here is taken as
    ``where(v > 0, sqrt(where(v > 0, v, 1)), 0)``: same values, derivative 0 at ``v = 0`` (finite,
    and exactly the true derivative of the direction, since its coefficient ``m`` is zero there).
    """

    name = "adam"

    def __init__(self, betas: tuple = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
                raise ValueError(f"betas: beta{i + 1} must be a float in [0, 1), got {b!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = positive_float(eps, "eps")
        self.weight_decay = nonnegative_float(weight_decay, "weight_decay")

    def direction(self, k, w, g, state):
        b1, b2 = self.betas
        if self.weight_decay:
            g = g + self.weight_decay * w
        if state is None:  # m_{-1} = v_{-1} = 0: skip the zero terms (same values)
            m, v = (1.0 - b1) * g, (1.0 - b2) * (g * g)
        else:
            m, v = b1 * state[0] + (1.0 - b1) * g, b2 * state[1] + (1.0 - b2) * (g * g)
        bc1, bc2 = 1.0 - b1 ** (k + 1), 1.0 - b2 ** (k + 1)
        pos = v > 0
        root = torch.where(pos, torch.where(pos, v, 1.0).sqrt(), 0.0)
        return (m / bc1) / (root / math.sqrt(bc2) + self.eps), (m, v)


INNER_OPTIMIZERS = {"sgd": InnerSGD, "adam": InnerAdam}

InnerOptimizerSpec = Union[None, str, dict, InnerOptimizer]


def make_inner_optimizer(spec: InnerOptimizerSpec) -> Optional[InnerOptimizer]:
    """An inner optimizer from ``spec``: ``None`` (plain SGD steps, the MAML inner loop), an
    :class:`InnerOptimizer`, a name (``"sgd"``, ``"adam"``: default hyperparameters) or a dict
    ``{"name": ..., **hyperparameters}`` (what :meth:`InnerOptimizer.config` returns).
    ``TypeError``/``ValueError`` naming ``inner_optimizer`` otherwise."""
    if spec is None or isinstance(spec, InnerOptimizer):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise TypeError(f"inner_optimizer: expected None, 'sgd', 'adam', a dict or an InnerOptimizer, "
                        f"got {type(spec).__name__}")
    kw = dict(spec)
    name = kw.pop("name", None)
    if name not in INNER_OPTIMIZERS:
        raise ValueError(f"inner_optimizer: unsupported inner optimizer {name!r}; choose from {sorted(INNER_OPTIMIZERS)}")
    if "betas" in kw and isinstance(kw["betas"], list):
        kw["betas"] = tuple(kw["betas"])
    try:
        return INNER_OPTIMIZERS[name](**kw)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise TypeError(f"inner_optimizer: {e}") from e
        raise
