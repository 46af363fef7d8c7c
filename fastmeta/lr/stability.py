"""Local-convergence bounds on MAML's two learning rates from Hessian eigenvalues (the ICLR 2020
submission "Role of Two Learning Rates in Convergence of MAML", cited as "2LR").

The paper's model (2LR sec. 3): one inner step, the same data for the inner and the outer loss,
steepest gradient descent with meta rate beta. Near a minimum theta* with Hessian H, the one-step
MAML loss ``L~(theta) = L(theta - alpha grad L(theta))`` is approximated by the negative gradient
penalty ``L - (alpha/2) |g|^2`` (2LR eqs. 3-5; the "2" lost in the PDF of eq. 5 is fixed by eq. 4,
whose gradient is ``g - alpha H g``, and by App. B eq. 32), whose Hessian is
``H - alpha (T g + H^2)`` (eq. 35); dropping ``T g`` (App. C) leaves ``H - alpha H^2`` with
eigenvalues ``lambda_i - alpha lambda_i^2``. Hence

* eq. 10-11: theta* stays a minimum iff ``lambda_i - alpha lambda_i^2 > 0`` for all i, i.e.
  ``alpha < alpha_c = 1 / lambda_max(H)``;
* eq. 16-18: GD on that quadratic converges iff ``|1 - beta (lambda_i - alpha lambda_i^2)| < 1``,
  i.e. ``beta < beta_c(alpha) = min_i 2 / (lambda_i - alpha lambda_i^2)``;
* multi-task, eq. 23 and 26: the same bounds with the minimum taken over tasks too.
  fastmeta's meta-objective is the *mean* over tasks (as in the paper's experiments, sec. 5), and
  ``lambda_max(mean_t A_t) <= max_t lambda_max(A_t)`` (Weyl), so eq. 26 is a valid sufficient
  condition for the mean; for a *sum* over T tasks beta would have to be divided by T.

**The exact quadratic case** (offered as ``curve="exact"``). If L is exactly quadratic,
``L(theta) = 1/2 e^T H e`` with ``e = theta - theta*``, then ``grad L = H e`` and
``theta - alpha grad L - theta* = (I - alpha H) e``, so the one-step MAML loss is exactly

    L~(theta) = 1/2 e^T (I - alpha H) H (I - alpha H) e,  Hessian  H~ = H (I - alpha H)^2,

(H and I - alpha H commute). GD with rate beta maps ``e <- (I - beta H~) e``; in H's eigenbasis
each component is multiplied by ``1 - beta lambda (1 - alpha lambda)^2`` every step. Since
``lambda (1 - alpha lambda)^2 >= 0`` for ``lambda >= 0``, the iteration diverges exactly when
``beta lambda (1 - alpha lambda)^2 > 2`` for some eigenvalue lambda (with a nonzero initial
component), i.e. ``beta > beta_c^exact(alpha) = min_i 2 / (lambda_i (1 - alpha lambda_i)^2)``.
Compared with the paper: ``beta_c^exact / beta_c^paper = 1 / (1 - alpha lambda)`` for the same
eigenvalue, so the paper's curve is conservative for ``alpha < 1/lambda`` (by a factor that grows
to infinity as alpha -> 1/lambda), and for ``alpha > alpha_c`` the exact loss is still convex
(H~ is PSD): the paper's alpha_c is where *its* approximation breaks, not where GD diverges.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from ..evaluation import Evaluator, resolve_loss
from ..params import Adapt, ParamLayout
from ..tasks import TaskBatch
from .lanczos import LanczosResult, lanczos_topk

CURVES = ("paper", "exact")
HVPS = ("autograd", "finite_difference")


def _eigs_array(eigenvalues) -> np.ndarray:
    e = eigenvalues.detach().cpu().double().numpy() if isinstance(eigenvalues, torch.Tensor) else np.asarray(eigenvalues, dtype=np.float64)
    if e.ndim == 1:
        e = e[None]
    if e.ndim != 2 or e.size == 0:
        raise ValueError(f"eigenvalues: expected [k] or [T, k], got shape {e.shape}")
    return e


def beta_c_paper(eigenvalues, alpha) -> Union[float, np.ndarray]:
    """2LR eqs. 18-19 / 26: ``min over tasks and i of 2 / (lambda_i - alpha lambda_i^2)`` over the
    eigenvalues with ``lambda_i - alpha lambda_i^2 > 0`` (``inf`` if none). NaN entries (missing
    eigenvalues) are ignored. ``alpha`` scalar or array (-> array of the same shape)."""
    e = _eigs_array(eigenvalues).reshape(-1)
    e = e[np.isfinite(e)]
    a = np.asarray(alpha, dtype=np.float64)
    f = e[None, :] - a.reshape(-1, 1) * e[None, :] ** 2
    with np.errstate(divide="ignore"):
        b = np.where(f > 0, 2.0 / np.where(f > 0, f, 1.0), np.inf).min(axis=1, initial=np.inf)
    return float(b[0]) if a.ndim == 0 else b.reshape(a.shape)


def beta_c_exact(eigenvalues, alpha) -> Union[float, np.ndarray]:
    """Exact divergence threshold for a quadratic loss (module docstring):
    ``min over tasks and i with lambda_i > 0 of 2 / (lambda_i (1 - alpha lambda_i)^2)``."""
    e = _eigs_array(eigenvalues).reshape(-1)
    e = e[np.isfinite(e) & (e > 0)]
    a = np.asarray(alpha, dtype=np.float64)
    f = e[None, :] * (1 - a.reshape(-1, 1) * e[None, :]) ** 2
    with np.errstate(divide="ignore"):
        b = np.where(f > 0, 2.0 / np.where(f > 0, f, 1.0), np.inf).min(axis=1, initial=np.inf)
    return float(b[0]) if a.ndim == 0 else b.reshape(a.shape)


@dataclass
class StabilityBounds:
    """Result of :func:`stability_bounds` (or :func:`bounds_from_eigenvalues`).

    Attributes:
        eigenvalues: ``[T, k]`` top-k Hessian eigenvalues per task, descending (float64).
        alpha_c: ``1 / max_{t,i} lambda`` (2LR eq. 11 / 23).
        curve: ``"paper"`` (eqs. 18-19 / 26) or ``"exact"`` (quadratic case) for :meth:`beta_c`.
        recommended_alpha: ``alpha_margin * alpha_c`` -- the paper's guideline "alpha close to
            alpha_c", backed off by the safety margin because the bound holds at the current
            parameters only and sharpness usually grows in training.
        recommended_beta: ``beta_margin * beta_c(recommended_alpha)``.
        residuals, lanczos_iterations, converged, hvp: how the eigenvalues were obtained.
    """

    eigenvalues: torch.Tensor
    alpha_c: float
    curve: str = "paper"
    alpha_margin: float = 0.5
    beta_margin: float = 0.5
    recommended_alpha: float = float("nan")
    recommended_beta: float = float("nan")
    residuals: Optional[torch.Tensor] = None
    lanczos_iterations: int = 0
    converged: bool = True
    hvp: str = "given"
    info: dict = field(default_factory=dict)

    def beta_c(self, alpha, curve: Optional[str] = None):
        """beta_c(alpha) over the computed eigenvalues (``curve`` overrides ``self.curve``)."""
        curve = curve or self.curve
        if curve not in CURVES:
            raise ValueError(f"curve: expected one of {CURVES}, got {curve!r}")
        return (beta_c_paper if curve == "paper" else beta_c_exact)(self.eigenvalues, alpha)

    def beta_c_lower(self, alpha) -> float:
        """A guaranteed lower bound on the paper's beta_c(alpha) over the *whole* spectrum.

        Only the top-k eigenvalues are known; every other eigenvalue lies below the smallest
        computed one, ``lambda_k``. ``f(lambda) = lambda - alpha lambda^2`` increases up to
        ``lambda = 1/(2 alpha)`` where it peaks at ``1/(4 alpha)``. So if ``lambda_k <= 1/(2 alpha)``
        for every task, no unknown eigenvalue beats ``lambda_k`` and :meth:`beta_c` is exact;
        otherwise the bound is ``min(beta_c, 8 alpha)`` (``2 / (1/(4 alpha))``).
        """
        b = beta_c_paper(self.eigenvalues, alpha)
        if float(alpha) <= 0:
            return b
        lam_k = np.nanmin(_eigs_array(self.eigenvalues), axis=1)
        if np.any(lam_k > 1.0 / (2.0 * float(alpha))):
            b = min(b, 8.0 * float(alpha))
        return b

    @property
    def recommended(self) -> tuple[float, float]:
        """The recommended ``(alpha, beta)`` pair."""
        return self.recommended_alpha, self.recommended_beta

    @property
    def lambda_max(self) -> float:
        return 1.0 / self.alpha_c

    def summary(self) -> str:
        e = _eigs_array(self.eigenvalues)
        return (f"lambda_max {self.lambda_max:.4g} over {e.shape[0]} tasks (top-{e.shape[1]} per task, "
                f"{self.hvp} HVPs, {self.lanczos_iterations} Lanczos steps{'' if self.converged else ', NOT converged'}); "
                f"alpha_c = {self.alpha_c:.4g}; recommended alpha = {self.alpha_margin:g} * alpha_c = "
                f"{self.recommended_alpha:.4g}, beta = {self.beta_margin:g} * beta_c({self.curve}) = {self.recommended_beta:.4g}")


def bounds_from_eigenvalues(eigenvalues, curve: str = "paper", alpha_margin: float = 0.5,
                            beta_margin: float = 0.5, **extra) -> StabilityBounds:
    """alpha_c, beta_c(alpha) and the recommendation from given eigenvalues ``[T, k]`` (or ``[k]``).

    Raises ``ValueError`` naming ``eigenvalues`` if any is non-finite or none is positive.
    """
    e = torch.as_tensor(eigenvalues, dtype=torch.float64)
    if e.dim() == 1:
        e = e[None]
    if e.dim() != 2 or e.numel() == 0:
        raise ValueError(f"eigenvalues: expected [k] or [T, k], got shape {tuple(e.shape)}")
    if not torch.isfinite(e).all():
        raise ValueError(f"eigenvalues: contain NaN or inf ({int((~torch.isfinite(e)).sum())} of {e.numel()}); "
                         "the loss or its Hessian is non-finite at these parameters")
    lam_max = float(e.max())
    if not lam_max > 0:
        raise ValueError(f"eigenvalues: no positive eigenvalue (max {lam_max:.3g}); the point is not near a "
                         "minimum, so the local-convergence bounds do not apply")
    if curve not in CURVES:
        raise ValueError(f"curve: expected one of {CURVES}, got {curve!r}")
    for name, v in (("alpha_margin", alpha_margin), ("beta_margin", beta_margin)):
        if not (isinstance(v, (int, float)) and 0 < v <= 1):
            raise ValueError(f"{name}: expected a float in (0, 1], got {v!r}")
    e = e.sort(dim=1, descending=True).values
    res = StabilityBounds(e, 1.0 / lam_max, curve, float(alpha_margin), float(beta_margin), **extra)
    res.recommended_alpha = alpha_margin / lam_max
    res.recommended_beta = beta_margin * float(res.beta_c(res.recommended_alpha))
    return res


def task_hvp_operator(ev: Evaluator, rows: torch.Tensor, shared: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                      method: str = "autograd", delta: Optional[float] = None):
    """A ``matvec(V [T, D]) -> [T, D]`` of per-task Hessian-vector products ``H_t v_t`` of the
    per-task losses at ``rows [T, D]`` (tasks are independent, so one call covers all T).

    ``"autograd"``: builds the differentiable gradients ``[T, D]`` once (``ev.grads`` with
    ``create_graph=True``); each product is one double-backward, ``grad(<g, V>, rows)``.
    ``"finite_difference"``: ``(g(w + delta v) - g(w - delta v)) / (2 delta)`` per row, both
    gradients from one batched ``ev.grads`` call on ``2T`` rows. Approximate: error O(delta^2)
    for smooth losses, but on ReLU / max-pool nets the two points can straddle activation kinks
    (measured: 0.2-60x the HVP's size in float32, docs/design.md); prefer float64 models for it.
    """
    if method not in HVPS:
        raise ValueError(f"hvp: expected one of {HVPS}, got {method!r}")
    T = rows.shape[0]
    if method == "autograd":
        w = rows.detach().clone().requires_grad_()
        _, g = ev.grads(w, shared, x, y, create_graph=True)
        if not torch.isfinite(g).all():
            raise FloatingPointError("non-finite gradients")

        def matvec(v):
            (h,) = torch.autograd.grad(g, w, grad_outputs=v.to(g.dtype), retain_graph=True)
            return h.detach()

        return matvec
    if delta is None:
        delta = 1e-5 if rows.dtype == torch.float64 else 1e-3
    w0 = rows.detach()
    x2 = torch.cat([x, x])
    y2 = torch.cat([y, y])

    def matvec(v):
        v = v.to(w0.dtype)
        _, g = ev.grads(torch.cat([w0 + delta * v, w0 - delta * v]), shared, x2, y2, create_graph=False)
        return ((g[:T] - g[T:]) / (2 * delta)).detach()

    return matvec


def stability_bounds(model: nn.Module, batch: TaskBatch, loss_fn="mse", k: int = 10, adapt: Adapt = "all",
                     strategy: str = "vmap", hvp: str = "autograd", fd_delta: Optional[float] = None,
                     on: str = "support", curve: str = "paper", alpha_margin: float = 0.5, beta_margin: float = 0.5,
                     max_iter: Optional[int] = None, tol: float = 1e-6, seed: int = 0) -> StabilityBounds:
    """alpha_c and beta_c(alpha) for MAML at the model's current parameters (2LR eqs. 11, 18-19, 23, 26).

    For each of the T tasks in ``batch``, the top-k eigenvalues of the Hessian ``[D, D]`` of the
    task's loss (on its support set, ``on="support"``, the data the inner step uses -- the
    paper's analysis uses the same data inner and outer; or ``on="query"``) with respect to the
    adapted parameters (``adapt``: ``"all"`` = MAML, ``"head"`` = ANIL) are computed by batched
    Lanczos (:func:`~fastmeta.lr.lanczos.lanczos_topk`) on per-task Hessian-vector products
    ``[T, D]`` -- autograd double-backward (``hvp="autograd"``) or finite differences of
    gradients (``hvp="finite_difference"``, ``fd_delta``; cheaper in memory for large models,
    approximate). Then

    * ``alpha_c = 1 / max_{t,i} lambda_{t,i}``                                  (eq. 11 / 23)
    * ``beta_c(alpha) = min_{t,i: lambda - alpha lambda^2 > 0} 2 / (lambda - alpha lambda^2)``
      (eqs. 18-19 / 26; ``curve="exact"``: ``2 / (lambda (1 - alpha lambda)^2)``, the exact
      quadratic-case threshold derived in the module docstring)
    * recommendation (2LR sec. 5.3 guideline: alpha near alpha_c first, then beta below
      beta_c(alpha)) with safety margins: ``alpha = alpha_margin * alpha_c`` and
      ``beta = beta_margin * beta_c(alpha)``. With ``alpha_margin <= 0.5`` the paper's beta_c at
      the recommended alpha is set by lambda_max alone (``1/(2 alpha) >= lambda_max``), so it
      does not depend on the eigenvalues Lanczos did not compute.

    beta is the meta learning rate of plain SGD on the mean-over-tasks meta-loss (fastmeta's
    convention); the paper's App. E shows the bounds do not carry over to Adam.

    Args:
        model: the ``nn.Module`` (its parameters are not modified).
        batch: a :class:`TaskBatch` of T tasks.
        loss_fn: ``"mse"``, ``"cross_entropy"`` or a functional loss accepting ``reduction=``.
        k: eigenvalues per task. max_iter, tol, seed: Lanczos controls.
        strategy: ``"vmap"``, ``"loop"`` or ``"bmm"`` (see :mod:`fastmeta.evaluation`).

    Returns:
        :class:`StabilityBounds` with ``alpha_c``, callable ``beta_c(alpha)``, ``eigenvalues [T, k]``
        and ``recommended = (alpha, beta)``.

    Raises:
        ValueError naming ``model`` if it has no adapted parameters, ``batch`` if it is not a
        TaskBatch, ``eigenvalues`` if they are non-finite (a NaN/inf loss or Hessian).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(batch, TaskBatch):
        raise ValueError(f"batch: expected a fastmeta.TaskBatch, got {type(batch).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model: has no adapted parameters (no parameter with requires_grad=True); "
                         "stability bounds need the Hessian w.r.t. the parameters the inner loop adapts")
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    if on not in ("support", "query"):
        raise ValueError(f"on: expected 'support' or 'query', got {on!r}")
    if hvp not in HVPS:
        raise ValueError(f"hvp: expected one of {HVPS}, got {hvp!r}")
    if curve not in CURVES:
        raise ValueError(f"curve: expected one of {CURVES}, got {curve!r}")
    layout = ParamLayout(model, adapt)
    if layout.D == 0:
        raise ValueError("model: has no adapted parameters")
    fn, _ = resolve_loss(loss_fn)
    ev = Evaluator(model, layout, fn, strategy)
    theta = layout.flatten(model)
    adapted, shared = layout.split(theta)
    x, y = (batch.support_x, batch.support_y) if on == "support" else (batch.query_x, batch.query_y)
    T = x.shape[0]
    rows = adapted.expand(T, -1)
    try:
        matvec = task_hvp_operator(ev, rows, shared, x, y, hvp, fd_delta)
        lz: LanczosResult = lanczos_topk(matvec, T, layout.D, min(k, layout.D), max_iter=max_iter, tol=tol,
                                         dtype=layout.dtype, device=layout.device, seed=seed)
    except FloatingPointError as e:
        raise ValueError(f"eigenvalues: Hessian-vector products are non-finite ({e}); check batch for NaN/inf "
                         "and the model's parameters") from None
    eigs = lz.eigenvalues
    # A task with fewer than k distinct eigenvalues (exhausted Krylov space) has NaN tail entries;
    # repeating its smallest found eigenvalue changes neither alpha_c nor any min over eigenvalues.
    eigs = torch.where(torch.isnan(eigs), torch.nan_to_num(eigs, nan=float("inf")).min(1, keepdim=True).values, eigs)
    return bounds_from_eigenvalues(eigs, curve, alpha_margin, beta_margin, residuals=lz.residuals,
                                   lanczos_iterations=lz.iterations, converged=lz.converged, hvp=hvp,
                                   info=dict(T=T, D=layout.D, on=on, k=k))
