"""Optimal inner (adaptation) learning rate alpha* (Zou, Liu & Li, "Unraveling MAML via the
adaptation learning rate"; cited below as "Zou").

Loss convention, which fixes every constant in this module
-----------------------------------------------------------
Zou's per-task loss is the *mean* squared error without a 1/2,

    l(w; Phi, y) = (1/K) ||Phi w - y||^2,      Phi: [K, d] features, y: [K] targets,

which is what eq. 2.5's inner step says: w' = w - (2 alpha / K) Phi^T (Phi w - y) is exactly
``w - alpha * grad l``. This is also fastmeta's ``"mse"`` loss (``F.mse_loss``, mean reduction),
so the alpha* below is directly an ``inner_lr`` for ``fastmeta.MAML(..., loss_fn="mse")`` on a
(linearised) regression model. With a ``0.5 * MSE`` loss the gradient halves and alpha* doubles.

Derivation of eq. 3.3 (Theorem 1) with that convention. One inner step maps the residual
``Phi w - y`` to ``P (Phi w - y)`` with ``P = I - (2 alpha / K) Phi Phi^T``; for realizable targets
``y = Phi a`` the post-adaptation residual is ``C(alpha)(w - a)`` with
``C(alpha) = Phi (I - (2 alpha / K) S)``, ``S = Phi^T Phi`` (eq. 3.1). As N -> inf the MAML minimizer
tends to E[a] = 0 (Assumption 1), and the average risk tends to (B.6)

    L_apx(alpha) = sigma_a^2 / K * E tr C^T C
                 = sigma_a^2 / K * (tr E[S] - (4 alpha / K) tr E[S^2] + (4 alpha^2 / K^2) tr E[S^3]),

a parabola in alpha whose minimizer is

    alpha*_lim = K tr E[S^2] / (2 tr E[S^3])                                        (eq. 3.3)

so the factor 2 in the denominator is the 2 of the loss's gradient (eq. 2.5's 2 alpha / K), and K
is the per-task sample count that the loss averages over.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def _check_features(name: str, f, min_tasks: int = 2) -> torch.Tensor:
    if not isinstance(f, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape [N, K, d], got {type(f).__name__}")
    if f.dim() != 3:
        raise ValueError(f"{name}: expected shape [N tasks, K samples, d features], got {tuple(f.shape)}")
    if f.shape[0] < min_tasks:
        raise ValueError(f"{name}: need at least {min_tasks} tasks to estimate an expectation over tasks, "
                         f"got {f.shape[0]} (shape {tuple(f.shape)})")
    if f.shape[1] < 1 or f.shape[2] < 1:
        raise ValueError(f"{name}: has an empty sample or feature dimension, shape {tuple(f.shape)}")
    if not f.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {f.dtype}")
    if not torch.isfinite(f).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return f.double()


def alpha_star(features_train: torch.Tensor, features_val: Optional[torch.Tensor] = None) -> float:
    """Zou Theorem 1, eq. 3.3 (and Corollary 2, eq. H.6 with a train/validation split): the
    adaptation rate minimizing the limiting (N -> inf) average population risk of one-step MAML.

    Args:
        features_train: ``[N, K1, d]`` per-task feature matrices ``Phi(u_i)`` of the data the inner
            step uses (N >= 2 tasks, K1 samples, d features).
        features_val: optional ``[N, K2, d]`` features ``Phi(t_i)`` of each task's validation
            (query) data, same tasks and d. ``None`` means train = validation (eq. 3.3).

    Returns:
        ``alpha*_lim`` (float), for the loss ``(1/K1) ||Phi w - y||^2`` (see the module docstring):

        * eq. 3.3:  ``K sum_i tr(S_i^2) / (2 sum_i tr(S_i^3))``, ``S_i = Phi_i^T Phi_i``;
        * eq. H.6:  ``K1 sum_i tr(S_ui S_ti) / (2 sum_i tr(S_ui S_ti S_ui))``.

        H.6 derivation: the validation residual after one step on u is ``C^(alpha)(w - a)`` with
        ``C^ = Phi(t)(I - (2 alpha / K1) S_u)`` (H.2); ``E tr C^T C^ = tr E[S_t]
        - (4 alpha / K1) tr E[S_u S_t] + (4 alpha^2 / K1^2) tr E[S_u S_t S_u]`` (H.4), minimized at
        H.6. Sums over tasks estimate the expectations (the common 1/N cancels).

    The traces are computed through the small ``[K2, K1]`` cross-Gram ``A = Phi_t Phi_u^T``:
    ``tr(S_u S_t) = ||A||_F^2`` and ``tr(S_u S_t S_u) = ||A Phi_u||_F^2``, so the cost is
    ``O(N K1 K2 d)`` and d may be large (e.g. neural-tangent features, Zou H.16-H.17).
    Computed in float64.
    """
    fu = _check_features("features_train", features_train)
    if features_val is None:
        ft = fu
    else:
        ft = _check_features("features_val", features_val)
        if ft.shape[0] != fu.shape[0] or ft.shape[2] != fu.shape[2]:
            raise ValueError(f"features_val: expected [N={fu.shape[0]}, K2, d={fu.shape[2]}] to match features_train, "
                             f"got {tuple(ft.shape)}")
    k1 = fu.shape[1]
    a = ft @ fu.transpose(1, 2)                      # [N, K2, K1]
    num = a.pow(2).sum()                             # sum_i tr(S_u S_t)
    den = (a @ fu).pow(2).sum()                      # sum_i tr(S_u S_t S_u)
    if not den > 0:
        raise ValueError("features_train: all features are zero (tr E[S^3] = 0); alpha* is undefined")
    return float(k1 * num / (2 * den))


@dataclass(frozen=True)
class OverparamAlphaStar:
    """Zou H.14 (``h14``) and its cheap form H.15 (``h15``), with the feature variance used."""

    h14: float
    h15: float
    sigma2: float


def alpha_star_overparam(features: torch.Tensor, n_tasks: int, k_shot: int) -> OverparamAlphaStar:
    """Zou Appendix H.2: alpha* for an overparameterized linear(ised) model (``N K << d``).

    Args:
        features: ``[M, K, d]`` per-task features Psi (e.g. neural-tangent features
            ``grad_w f(w_init, x)``, H.16-H.17), M >= 2 sampled tasks.
        n_tasks: N, the number of training tasks the inner step normalizes over.
        k_shot: K, samples per task.

    Returns ``OverparamAlphaStar(h14, h15, sigma2)``:

    * H.14: ``alpha*_est = N K E tr (Psi^T Psi)^2 / (2 E tr (Psi^T Psi)^3)``. In H.8 the inner
      step is normalized over all N K samples, ``w' = w - (2 alpha / NK) Psi_all^T (Psi_all w - y)``,
      so ``C^T C = S - (4 alpha / NK) S^2 + (4 alpha^2 / N^2 K^2) S^3`` (H.13) and minimizing
      ``E tr C^T C`` (the upper bound H.11-H.12) gives H.14, the same parabola as eq. 3.3 with K
      replaced by N K. Traces go through the ``[K, K]`` Gram matrix (cheap for large d).
    * H.15: ``1 / (2 N K sigma~^2)``, ``sigma~^2`` the variance of all feature entries (H.17:
      ``sigma = Psi_all.std()``; population variance here). This is the paper's shortcut; it is
      not an identity with H.14 (H.14 for near-orthogonal rows of squared norm ``d sigma~^2`` gives
      ``N K / (2 d sigma~^2)``), so expect the two to differ by a data-dependent factor.
    """
    f = _check_features("features", features)
    if not (isinstance(n_tasks, int) and n_tasks >= 1):
        raise ValueError(f"n_tasks: expected an int >= 1, got {n_tasks!r}")
    if not (isinstance(k_shot, int) and k_shot >= 1):
        raise ValueError(f"k_shot: expected an int >= 1, got {k_shot!r}")
    g = f @ f.transpose(1, 2)                        # [M, K, K]: tr(S^p) = tr(G^p)
    num = g.pow(2).sum()
    den = (g @ g * g).sum()                          # tr(G^3) = sum((G G) * G) for symmetric G
    sigma2 = float(f.var(correction=0))
    if not den > 0 or sigma2 <= 0:
        raise ValueError("features: all features are zero or constant; alpha* is undefined")
    nk = n_tasks * k_shot
    return OverparamAlphaStar(h14=float(nk * num / (2 * den)), h15=1.0 / (2 * nk * sigma2), sigma2=sigma2)


def alpha_star_range(n_tasks: int, k_shot: int, d: int, n_obs: Optional[int] = None,
                     feature_range: tuple[float, float] = (0.0, 1.0)) -> tuple[float, float]:
    """Zou H.18-H.25: the heuristic range of alpha* for deep networks, ``(low, high)``.

    H.18 merges eq. 3.3 (``K >= d``) and H.15 (``N K << d``) into
    ``alpha* = 1 / (2 min(N K, d) sigma~^2)`` and bounds the feature variance for features
    bounded in ``[m, M]`` (``feature_range``; the paper assumes ``[0, 1]``):

    * Popoviciu (H.20-H.24): ``sigma~^2 <= (M - m)^2 / 4``       -> ``low = 2 / (min(NK, d) (M-m)^2)``
    * Szokefalvi Nagy (H.25): ``sigma~^2 >= (M - m)^2 / (2 n~)``  -> ``high = n~ / (min(NK, d) (M-m)^2)``

    Args:
        n_tasks: N, training tasks per step (fastmeta's CLI uses the meta-batch size).
        k_shot: K, samples per task.
        d: model size (number of adapted parameters).
        n_obs: n~, the number of observations the variance is taken over. The paper does not
            pin it down; default ``N * K`` (the rows of ``Psi_all``, H.17).
        feature_range: ``(m, M)`` bounds of the feature entries.

    A heuristic: Nagy's bound needs m, M to be the sample's own extremes, and the d scaling in
    H.18 is the paper's; use it as a search interval, not as a guarantee.
    """
    for name, v in (("n_tasks", n_tasks), ("k_shot", k_shot), ("d", d)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    n_obs = n_tasks * k_shot if n_obs is None else n_obs
    if not (isinstance(n_obs, int) and n_obs >= 1):
        raise ValueError(f"n_obs: expected an int >= 1, got {n_obs!r}")
    lo_f, hi_f = feature_range
    width = float(hi_f) - float(lo_f)
    if not width > 0:
        raise ValueError(f"feature_range: expected (m, M) with M > m, got {feature_range!r}")
    m = min(n_tasks * k_shot, d)
    return 2.0 / (m * width ** 2), n_obs / (m * width ** 2)


class OnlineAlphaStar:
    """Online alpha* for an ANIL head (Zou H.3, "deep classification"), smoothed by a buffer.

    Each :meth:`update` takes the penultimate (head-input) features of one support set,
    normalizes every sample's feature vector to unit norm (``F = (F_1/||F_1||, ...)``), takes
    ``sigma^2`` = the variance of the normalized feature entries (the "mean of the covariance":
    the average of the per-feature variances plus the spread of the feature means, i.e. the
    variance over all entries as in H.17's ``Psi_all.std()``), and forms

        alpha* = 1 / (2 * ways * shots * sigma^2)                                     (H.15 with N K -> ways * shots)

    then ``buffer <- momentum * buffer + (1 - momentum) * alpha*`` (the paper's 0.9 / 0.1). The
    first update initializes the buffer with the first estimate (no bias towards 0).

    Args:
        momentum: buffer momentum in [0, 1).
    """

    def __init__(self, momentum: float = 0.9):
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise ValueError(f"momentum: expected a float in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.value: Optional[float] = None
        self.last: Optional[float] = None
        self.updates = 0

    @staticmethod
    def estimate(features: torch.Tensor, ways: int, shots: int) -> float:
        """One-batch alpha* from features ``[n, h]`` or ``[T, n, h]`` (n = ways * shots samples)."""
        if not isinstance(features, torch.Tensor) or features.dim() not in (2, 3):
            raise ValueError(f"features: expected [n, h] or [T, n, h] penultimate features, got "
                             f"{getattr(features, 'shape', type(features).__name__)}")
        if not (isinstance(ways, int) and ways >= 1):
            raise ValueError(f"ways: expected an int >= 1, got {ways!r}")
        if not (isinstance(shots, int) and shots >= 1):
            raise ValueError(f"shots: expected an int >= 1, got {shots!r}")
        f = features.detach().double()
        if not torch.isfinite(f).all():
            raise ValueError("features: contains NaN or inf")
        f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        sigma2 = float(f.var(correction=0))
        if not sigma2 > 0:
            raise ValueError("features: normalized features have zero variance; alpha* is undefined")
        return 1.0 / (2 * ways * shots * sigma2)

    def update(self, features: torch.Tensor, ways: int, shots: int) -> float:
        """Fold one support set's features into the buffer; returns the buffered alpha*."""
        a = self.estimate(features, ways, shots)
        self.last = a
        self.value = a if self.value is None else self.momentum * self.value + (1 - self.momentum) * a
        self.updates += 1
        return self.value

    def __float__(self) -> float:
        if self.value is None:
            raise ValueError("OnlineAlphaStar: no update yet")
        return self.value


def tangent_features(model: torch.nn.Module, x: torch.Tensor, adapt="all") -> torch.Tensor:
    """Neural-tangent features (Zou H.16-H.17) of each task's inputs: ``Psi_t = d f(w, x_t) / d w``
    at the model's current parameters, ``[T, K * out, D]`` for inputs ``x [T, K, ...]`` (outputs
    flattened per task; D = number of adapted parameters, see :class:`fastmeta.ParamLayout`).

    Linearising ``f`` around ``w`` makes one MAML step on the MSE loss exactly Zou's linear
    setting, so ``alpha_star(tangent_features(model, support_x))`` is eq. 3.3 for the linearised
    model (the support labels do not enter eq. 3.3).
    """
    from torch.func import functional_call, jacrev, vmap

    from ..params import ParamLayout

    layout = ParamLayout(model, adapt)
    theta = layout.flatten(model)
    adapted, shared = layout.split(theta)

    def f(row, xt):
        return functional_call(model, layout.named(row, shared), (xt,)).reshape(-1)

    return vmap(jacrev(f), in_dims=(None, 0))(adapted, x).detach()
