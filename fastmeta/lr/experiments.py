"""Empirical learning-rate experiments behind the advisor's plots and the README figures.

* :func:`linear_regression_map` -- 2LR sec. 5.1: single-task linear regression, the same data
  for the inner and the outer step, steepest GD, converge/diverge map over (alpha, beta).
* :func:`maml_ab_map` -- 2LR sec. 5.2/5.3 (Fig. 4): final training loss of MAML + SGD(beta) over
  a grid of (alpha, beta), diverged cells marked.
* :func:`beta_divergence_boundary` -- bisection for the largest non-diverging beta at one alpha.
* :func:`alpha_sweep` -- post-adaptation loss on held-out tasks versus alpha (Zou Table 2 style).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..algorithms import MAML
from ..learner import MetaLearner
from ..tasks import TaskBatch


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


# ---------------------------------------------------------------------------------------- sec. 5.1
@dataclass
class LinearRegressionMap:
    """Result of :func:`linear_regression_map`.

    alphas ``[A]``, betas ``[B]``; loss ``[A, B]`` final one-step MAML training loss
    ``L(theta - alpha grad L(theta))``; start_loss and final_plain ``[A, B]`` the plain loss
    ``L(theta)`` before/after; diverged ``[A, B]`` (non-finite, or ``L(theta)`` grew);
    hessian ``[2, 2]`` and eigenvalues ``[2]`` of the (exactly quadratic) loss; x, y the data.
    """

    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray
    final_plain: np.ndarray
    start_loss: float
    diverged: np.ndarray
    hessian: torch.Tensor
    eigenvalues: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor


def linear_regression_map(alphas: Sequence[float], betas: Sequence[float], iters: int = 500, n_points: int = 20,
                          slope: Optional[float] = None, bias: Optional[float] = None, seed: int = 0,
                          theta0: Sequence[float] = (0.0, 0.0)) -> LinearRegressionMap:
    """2LR sec. 5.1: regress ``y = s x + b`` (s, b ~ U[0, 5] unless given, x ~ U[-5, 5], ``n_points``
    points) with the model ``theta_0 x + theta_1`` and the MSE loss, one inner step, the same data
    for inner and outer step, and steepest GD with rate beta for ``iters`` iterations from
    ``theta0``. All grid cells run at once as a batch of independent parameter vectors, with the
    MAML gradient taken by autograd through the inner step (float64).

    The loss is exactly quadratic with Hessian ``H = 2 mean([x, 1][x, 1]^T)``, so
    :func:`fastmeta.lr.stability.beta_c_exact` predicts the map exactly.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(2 + n_points, generator=g, dtype=torch.float64)
    s = 5 * float(u[0]) if slope is None else float(slope)
    b = 5 * float(u[1]) if bias is None else float(bias)
    x = -5 + 10 * u[2:]
    y = s * x + b
    al = torch.as_tensor(np.asarray(alphas, dtype=np.float64))
    be = torch.as_tensor(np.asarray(betas, dtype=np.float64))
    A, B = al.numel(), be.numel()
    a_cell = al.repeat_interleave(B)[:, None]
    b_cell = be.repeat(A)[:, None]
    theta = torch.tensor(theta0, dtype=torch.float64).expand(A * B, 2).clone()

    def loss(th):  # [C, 2] -> [C]
        return ((th[:, :1] * x + th[:, 1:] - y) ** 2).mean(1)

    start = float(loss(theta[:1])[0])
    alive = torch.ones(A * B, dtype=torch.bool)
    # Converging cells reach subnormal residuals, which are ~100x slower on CPU: flush them.
    flush = torch.set_flush_denormal(True)
    try:
        for _ in range(iters):
            th = theta.detach().requires_grad_()
            (gi,) = torch.autograd.grad(loss(th).sum(), th, create_graph=True)
            (gm,) = torch.autograd.grad(loss(th - a_cell * gi).sum(), th)
            theta = theta - b_cell * gm
            alive &= theta.abs().max(1).values < 1e150   # False for inf and NaN too
            # park blown-up cells at 0 (they stay marked): NaN/inf arithmetic is ~50x slower on CPU
            theta = torch.where(alive[:, None], theta, torch.zeros_like(theta))
    finally:
        if flush:
            torch.set_flush_denormal(False)
    with torch.no_grad():
        th = theta.clone()
        gi = 2 * torch.stack([((th[:, :1] * x + th[:, 1:] - y) * x).mean(1), (th[:, :1] * x + th[:, 1:] - y).mean(1)], 1)
        final_maml = loss(th - a_cell * gi)
        final_plain = loss(th)
    diverged = ~alive | ~torch.isfinite(final_plain) | (final_plain > start)
    feats = torch.stack([x, torch.ones_like(x)], 1)
    H = 2 * feats.T @ feats / n_points
    return LinearRegressionMap(al.numpy(), be.numpy(), final_maml.view(A, B).numpy(), final_plain.view(A, B).numpy(),
                               start, diverged.view(A, B).numpy(), H, torch.linalg.eigvalsh(H).flip(0), x, y)


# ---------------------------------------------------------------------------------------- MAML runs
@dataclass
class RunResult:
    """One MAML + SGD(beta) training run: per-step mean post-adaptation (query) losses, whether
    it diverged, and the model after training (``None`` if diverged)."""

    losses: list
    diverged: bool
    model: Optional[nn.Module] = None

    @property
    def final(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return float("inf") if self.diverged else float(np.mean(tail))


def train_maml(model: nn.Module, batches: Sequence[TaskBatch], alpha: float, beta: float, loss_fn="mse",
               strategy: str = "vmap", div_factor: float = 2.0, keep_model: bool = False) -> RunResult:
    """Train a *copy* of ``model`` with ``MAML(alpha)`` (one inner step, second order) and plain
    ``SGD(lr=beta)`` on the meta-gradient (mean over tasks), one step per batch.

    Diverged (2LR sec. 5's "diverged losses"): a non-finite loss or meta-gradient at any step, or
    a final post-adaptation loss on ``batches[0]`` (a fixed probe, so batch-to-batch noise does
    not count) above ``div_factor`` times its value before training.
    """
    m = copy.deepcopy(model)
    learner = MetaLearner(m, MAML(alpha), loss_fn=loss_fn, strategy=strategy)
    opt = torch.optim.SGD(m.parameters(), lr=beta)
    probe = batches[0]
    start = learner.evaluate(probe).loss
    losses = []
    for batch in batches:
        opt.zero_grad()
        try:
            r = learner.step(batch)
        except FloatingPointError:
            return RunResult(losses, True)
        losses.append(r.loss)
        opt.step()
    try:
        end = learner.evaluate(probe).loss
    except FloatingPointError:
        end = float("inf")
    res = RunResult(losses, not (math.isfinite(end) and end <= div_factor * start))
    if keep_model and not res.diverged:
        res.model = m
    return res


@dataclass
class ABMap:
    """Result of :func:`maml_ab_map`: alphas ``[A]``, betas ``[B]``, final training loss ``[A, B]``
    (``inf`` where diverged), diverged ``[A, B]``."""

    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray
    diverged: np.ndarray
    info: dict = field(default_factory=dict)


def maml_ab_map(model: nn.Module, batches: Sequence[TaskBatch], alphas: Sequence[float], betas: Sequence[float],
                loss_fn="mse", strategy: str = "vmap", div_factor: float = 2.0, progress: bool = True) -> ABMap:
    """2LR Fig. 4: the final training loss of :func:`train_maml` for every (alpha, beta) cell, all
    from the same initial ``model`` and the same sequence of ``batches`` (so cells differ only in
    the learning rates). Shows a tqdm bar over cells when ``progress``."""
    A, B = len(alphas), len(betas)
    loss = np.full((A, B), np.inf)
    div = np.zeros((A, B), dtype=bool)
    cells = [(i, j) for i in range(A) for j in range(B)]
    for i, j in _progress(cells, len(cells), "alpha-beta map", progress):
        r = train_maml(model, batches, float(alphas[i]), float(betas[j]), loss_fn, strategy, div_factor)
        loss[i, j], div[i, j] = r.final, r.diverged
    return ABMap(np.asarray(alphas, dtype=float), np.asarray(betas, dtype=float), loss, div)


def beta_divergence_boundary(model: nn.Module, batches: Sequence[TaskBatch], alpha: float, beta_lo: float,
                             beta_hi: float, steps: int = 8, loss_fn="mse", strategy: str = "vmap",
                             div_factor: float = 2.0, progress: bool = True) -> tuple[float, float, list]:
    """Bisection (in log beta) for the divergence boundary of beta at fixed alpha.

    ``beta_lo`` must not diverge and ``beta_hi`` must diverge (both are checked first, and the
    interval is widened by 4x up to 6 times if not). Returns ``(last stable beta, first diverging
    beta, probes)``; the boundary lies between the two (ratio ``(hi/lo)^(1/2^steps)``)."""
    probes = []

    def diverges(b):
        d = train_maml(model, batches, alpha, b, loss_fn, strategy, div_factor).diverged
        probes.append((b, d))
        return d

    for _ in range(6):
        if not diverges(beta_lo):
            break
        beta_lo /= 4
    else:
        raise ValueError(f"beta_lo: every probed beta down to {beta_lo:.3g} diverges at alpha={alpha:.3g}")
    for _ in range(6):
        if diverges(beta_hi):
            break
        beta_lo, beta_hi = beta_hi, beta_hi * 4
    else:
        raise ValueError(f"beta_hi: no probed beta up to {beta_hi:.3g} diverges at alpha={alpha:.3g}")
    for _ in _progress(range(steps), steps, f"beta boundary @ alpha={alpha:.3g}", progress):
        mid = math.sqrt(beta_lo * beta_hi)
        if diverges(mid):
            beta_hi = mid
        else:
            beta_lo = mid
    return beta_lo, beta_hi, probes


@dataclass
class AlphaSweep:
    """Result of :func:`alpha_sweep`: alphas ``[A]``; post-adaptation (``post``) and
    pre-adaptation (``pre``) mean query loss on held-out tasks after meta-training at each alpha
    (``nan`` where training diverged); ``train`` the final training loss."""

    alphas: np.ndarray
    post: np.ndarray
    pre: np.ndarray
    train: np.ndarray
    beta: float


def alpha_sweep(model: nn.Module, batches: Sequence[TaskBatch], test_batch: TaskBatch, alphas: Sequence[float],
                beta: float, loss_fn="mse", strategy: str = "vmap", progress: bool = True) -> AlphaSweep:
    """Meta-train with each alpha (same init, batches and beta), then score held-out tasks:
    post-adaptation loss (one inner step with the same alpha, as Zou follows Finn et al. in using
    the same alpha for training and testing) and the loss before adaptation."""
    A = len(alphas)
    post, pre, train = np.full(A, np.nan), np.full(A, np.nan), np.full(A, np.nan)
    for i in _progress(range(A), A, "alpha sweep", progress):
        a = float(alphas[i])
        r = train_maml(model, batches, a, beta, loss_fn, strategy, keep_model=True)
        train[i] = r.final
        if r.model is None:
            continue
        ev = MetaLearner(r.model, MAML(a), loss_fn=loss_fn, strategy=strategy)
        post[i] = ev.evaluate(test_batch).loss
        with torch.no_grad():
            out = torch.stack([r.model(x) for x in test_batch.query_x])
            fn = ev.loss_fn
            pre[i] = float(fn(out.reshape(-1, *out.shape[2:]), test_batch.query_y.reshape(-1, *test_batch.query_y.shape[2:])))
    return AlphaSweep(np.asarray(alphas, dtype=float), post, pre, train, beta)
