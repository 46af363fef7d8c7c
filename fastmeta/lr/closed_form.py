"""Closed-form ERM and MAML solutions of mixed linear regression (Zou eq. 3.1) and the average
fast-adaptation distance F_t (Zou Definition 1), for experiments and tests.

Setting (Zou sec. 2): task i has features ``Phi_i: [K, d]``, targets ``y_i = Phi_i a_i`` (eq. 2.1),
loss ``l(w) = (1/K) ||Phi_i w - y_i||^2`` and one inner step
``w'_i = w - (2 alpha / K) Phi_i^T (Phi_i w - y_i)`` (eq. 2.5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from .alpha import _check_features


def _as_alpha(alpha) -> tuple[torch.Tensor, bool]:
    a = torch.as_tensor(alpha, dtype=torch.float64)
    scalar = a.dim() == 0
    a = a.reshape(-1)
    if a.numel() == 0 or not torch.isfinite(a).all():
        raise ValueError(f"alpha: expected finite float(s), got {alpha!r}")
    return a, scalar


def _targets(phi: torch.Tensor, optima, targets) -> torch.Tensor:
    N, K, d = phi.shape
    if (optima is None) == (targets is None):
        raise ValueError("optima/targets: give exactly one (task optima a [N, d] or targets y [N, K])")
    if optima is not None:
        a = torch.as_tensor(optima).double()
        if a.shape != (N, d):
            raise ValueError(f"optima: expected shape [N={N}, d={d}], got {tuple(a.shape)}")
        return (phi @ a.unsqueeze(-1)).squeeze(-1)
    y = torch.as_tensor(targets).double()
    if y.shape != (N, K):
        raise ValueError(f"targets: expected shape [N={N}, K={K}], got {tuple(y.shape)}")
    return y


def maml_solution(features: torch.Tensor, alpha, optima: Optional[torch.Tensor] = None,
                  targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Global minimizer ``w_m(alpha)`` of the empirical one-step MAML risk (Zou eq. 2.5, eq. 3.1).

    With ``P_i = I - (2 alpha / K) Phi_i Phi_i^T`` the post-step residual of task i is
    ``P_i (Phi_i w - y_i) = C_i w - P_i y_i``, ``C_i = P_i Phi_i = Phi_i (I - (2 alpha/K) Phi_i^T Phi_i)``,
    so the normal equations give ``w_m = (sum_i C_i^T C_i)^{-1} sum_i C_i^T P_i y_i``, which is
    eq. 3.1's ``(sum C^T C)^{-1} sum C^T C a_i`` for ``y_i = Phi_i a_i``. ``alpha = 0`` is ERM.

    ``sum_i C_i^T C_i = A1 - 2c A2 + c^2 A3`` with ``A_p = sum_i S_i^p``, ``c = 2 alpha / K``, and the
    right-hand side likewise, so a whole alpha grid costs one d x d solve per alpha.

    Args:
        features: ``[N, K, d]``; alpha: float or 1-D grid ``[A]``; optima ``[N, d]`` or targets ``[N, K]``.
    Returns:
        ``[d]`` for a scalar alpha, ``[A, d]`` for a grid (float64).
    """
    phi = _check_features("features", features, min_tasks=1)
    y = _targets(phi, optima, targets)
    a, scalar = _as_alpha(alpha)
    K = phi.shape[1]
    s1 = phi.transpose(1, 2) @ phi                    # S_i       [N, d, d]
    s2 = s1 @ s1
    A1, A2, A3 = s1.sum(0), s2.sum(0), (s2 @ s1).sum(0)
    r = phi.transpose(1, 2) @ y.unsqueeze(-1)         # Phi^T y   [N, d, 1]
    b1 = r.sum(0).squeeze(-1)                         # sum Phi^T y
    b2 = (s1 @ r).sum(0).squeeze(-1)                  # sum S Phi^T y
    b3 = (s2 @ r).sum(0).squeeze(-1)                  # sum S^2 Phi^T y
    # C^T P y = (I - cS) Phi^T (I - c Phi Phi^T) y = Phi^T y - 2c S Phi^T y + c^2 S^2 Phi^T y
    c = (2 * a / K).view(-1, 1, 1)
    lhs = A1 - 2 * c * A2 + c ** 2 * A3               # [A, d, d]: sum (I - cS) S (I - cS)
    rhs = b1 - 2 * c[..., 0] * b2 + c[..., 0] ** 2 * b3   # [A, d]
    w = torch.linalg.solve(lhs, rhs.unsqueeze(-1)).squeeze(-1)
    return w[0] if scalar else w


def fast_adaptation_distance(w0: torch.Tensor, features: torch.Tensor, optima: torch.Tensor,
                             eta: float, steps: int) -> torch.Tensor:
    """Zou Definition 1, eq. 3.6: ``F_t(w0) = E_T ||w^t_T - a_T||^2`` for ``t = 0..steps``.

    ``w^t_T`` takes t gradient steps of size ``eta`` on the task loss
    ``(1/K) ||Phi_T w - Phi_T a_T||^2`` from ``w0`` (gradient ``(2/K) Phi^T Phi (w - a)``); the
    expectation is the mean over the given tasks (``features [N, K, d]``, ``optima [N, d]``).
    Returns ``[steps + 1]`` (float64). ``w0`` is ``[d]`` (or ``[B, d]`` -> ``[B, steps + 1]``).
    """
    phi = _check_features("features", features, min_tasks=1)
    N, K, d = phi.shape
    a = torch.as_tensor(optima).double()
    if a.shape != (N, d):
        raise ValueError(f"optima: expected shape [N={N}, d={d}], got {tuple(a.shape)}")
    w0 = torch.as_tensor(w0).double()
    if w0.shape[-1] != d or w0.dim() > 2:
        raise ValueError(f"w0: expected shape [d={d}] or [B, d], got {tuple(w0.shape)}")
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"steps: expected an int >= 0, got {steps!r}")
    s = phi.transpose(1, 2) @ phi                     # [N, d, d]
    e = (w0.unsqueeze(-2) - a)                        # [..., N, d]: w - a_T
    out = [e.pow(2).sum(-1).mean(-1)]
    for _ in range(steps):
        e = e - (2 * eta / K) * (s @ e.unsqueeze(-1)).squeeze(-1)
        out.append(e.pow(2).sum(-1).mean(-1))
    return torch.stack(out, -1)


@dataclass
class ClosedFormSolutions:
    """ERM / MAML minimizers of mixed linear regression and their fast-adaptation distances.

    w_erm: ``[d]``; w_maml: ``[d]`` (or ``[A, d]`` for an alpha grid); F_erm, F_maml:
    ``[steps + 1]`` (``[A, steps + 1]``) values of F_t on the evaluation tasks, or ``None``.
    """

    alpha: Union[float, torch.Tensor]
    w_erm: torch.Tensor
    w_maml: torch.Tensor
    F_erm: Optional[torch.Tensor] = None
    F_maml: Optional[torch.Tensor] = None


def closed_form_solutions(features: torch.Tensor, optima: torch.Tensor, alpha,
                          eval_features: Optional[torch.Tensor] = None, eval_optima: Optional[torch.Tensor] = None,
                          eta: float = 1e-5, steps: int = 0) -> ClosedFormSolutions:
    """ERM and MAML minimizers (Zou eq. 3.1) fitted on ``features [N, K, d]`` / ``optima [N, d]``,
    and, if evaluation tasks are given, F_t (Def. 1) of both for ``t = 0..steps`` with step ``eta``
    (Zou H.3 uses eta = 1e-5 and alpha = 1e-4 for the F_t experiment).

    ``w_r = (sum S_i)^{-1} sum S_i a_i``; ``w_m(alpha) = (sum C_i^T C_i)^{-1} sum C_i^T C_i a_i``,
    ``C_i = Phi_i (I - (2 alpha / K) S_i)``. See :func:`maml_solution`.
    """
    w_r = maml_solution(features, 0.0, optima=optima)
    w_m = maml_solution(features, alpha, optima=optima)
    F_r = F_m = None
    if (eval_features is None) != (eval_optima is None):
        raise ValueError("eval_features/eval_optima: give both or neither")
    if eval_features is not None:
        F_r = fast_adaptation_distance(w_r, eval_features, eval_optima, eta, steps)
        F_m = fast_adaptation_distance(w_m, eval_features, eval_optima, eta, steps)
    return ClosedFormSolutions(alpha, w_r, w_m, F_r, F_m)
