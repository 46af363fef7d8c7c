"""Batched Lanczos: the top eigenvalues of T symmetric operators at once, from products with
``[T, D]`` blocks of vectors (one Hessian-vector product call per iteration for all tasks)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class LanczosResult:
    """eigenvalues ``[T, k]`` (descending, float64), residuals ``[T, k]`` (Ritz residual norms
    ``|beta_m s_m|``, an upper bound on each eigenvalue's distance to the spectrum), iterations
    run, and ``sizes [T]``: Krylov dimension per task (smaller than ``iterations`` after an exact
    breakdown, i.e. when the task's Krylov space was exhausted)."""

    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    iterations: int
    sizes: torch.Tensor
    converged: bool


def _tridiag(alphas: torch.Tensor, betas: torch.Tensor, m: int) -> torch.Tensor:
    T = alphas.shape[0]
    M = torch.zeros(T, m, m, dtype=torch.float64, device=alphas.device)
    idx = torch.arange(m, device=alphas.device)
    M[:, idx, idx] = alphas[:, :m]
    if m > 1:
        M[:, idx[:-1], idx[1:]] = betas[:, : m - 1]
        M[:, idx[1:], idx[:-1]] = betas[:, : m - 1]
    return M


def _ritz(alphas, betas, sizes, m, k):
    """Top-k Ritz values and residual bounds per task from the first ``min(m, size_t)`` steps."""
    T = alphas.shape[0]
    vals = torch.full((T, k), float("nan"), dtype=torch.float64)
    res = torch.full((T, k), float("inf"), dtype=torch.float64)
    for t in range(T):
        n = int(min(m, sizes[t]))
        ev, evec = torch.linalg.eigh(_tridiag(alphas[t: t + 1], betas[t: t + 1], n)[0])
        order = torch.argsort(ev, descending=True)[:k]
        j = order.numel()
        vals[t, :j] = ev[order]
        # after an exact breakdown the Krylov space is invariant and the Ritz values are exact
        tail = betas[t, n - 1] if int(sizes[t]) > m else torch.tensor(0.0, dtype=torch.float64)
        res[t, :j] = (tail * evec[-1, order]).abs()
    return vals, res


def lanczos_topk(matvec: Callable[[torch.Tensor], torch.Tensor], T: int, D: int, k: int,
                 max_iter: Optional[int] = None, tol: float = 1e-8, dtype=torch.float64, device="cpu",
                 seed: int = 0, check_every: int = 5) -> LanczosResult:
    """Top-k (largest algebraic) eigenvalues of T symmetric ``D x D`` operators.

    ``matvec(V)`` maps ``[T, D]`` to ``[T, D]`` (row t multiplied by operator t), e.g. per-task
    Hessian-vector products. Lanczos with full re-orthogonalization (twice, "twice is enough"),
    started from a seeded Gaussian vector per task; Ritz values come from the float64 tridiagonal
    matrix. Stops when every task's top-k residual bound ``|beta_m s_m,i|`` is below
    ``tol * max(|theta_1|, tiny)``, or after ``max_iter`` (default ``min(D, max(4k, 60))``)
    iterations. Eigenvalues of multiplicity > 1 appear once (a Krylov space holds one copy);
    if a task has fewer than k distinct eigenvalues the rest of its row is NaN.

    Memory: the basis is ``[T, max_iter + 1, D]`` in ``dtype``.
    """
    if k < 1:
        raise ValueError(f"k: expected >= 1, got {k}")
    m_max = min(D, max(4 * k, 60)) if max_iter is None else min(int(max_iter), D)
    if m_max < 1:
        raise ValueError(f"max_iter: expected >= 1, got {max_iter}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(T, D, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    q = q / q.norm(dim=-1, keepdim=True)
    Q = torch.zeros(T, m_max + 1, D, dtype=dtype, device=device)
    alphas = torch.zeros(T, m_max, dtype=torch.float64)
    betas = torch.zeros(T, m_max, dtype=torch.float64)
    sizes = torch.full((T,), m_max + 1, dtype=torch.long)  # m_max + 1: no breakdown (yet)
    active = torch.ones(T, dtype=torch.bool)
    vals = res = None
    m = 0
    for j in range(m_max):
        Q[:, j] = q
        w = matvec(q)
        if not torch.isfinite(w).all():
            bad = (~torch.isfinite(w)).any(-1).nonzero().flatten().tolist()
            raise FloatingPointError(f"non-finite operator products for tasks {bad[:8]}")
        w = w.to(dtype)
        a = (w * q).sum(-1)
        alphas[:, j] = a.double().cpu()
        w = w - a[:, None] * q
        if j > 0:
            w = w - betas[:, j - 1].to(dtype=dtype, device=device)[:, None] * Q[:, j - 1]
        basis = Q[:, : j + 1]
        for _ in range(2):
            w = w - torch.einsum("tjd,tj->td", basis, torch.einsum("tjd,td->tj", basis, w))
        b = w.norm(dim=-1)
        scale = alphas[:, : j + 1].abs().max(dim=1).values.clamp_min(1e-300)
        broke = active & (b.double().cpu() <= 1e-10 * scale)
        for t in broke.nonzero().flatten().tolist():
            sizes[t] = j + 1
        active &= ~broke
        betas[:, j] = torch.where(active, b.double().cpu(), torch.zeros_like(betas[:, j]))
        q = torch.where(active.to(device)[:, None], w / b.clamp_min(1e-300)[:, None], torch.zeros_like(w))
        m = j + 1
        if m == m_max or not active.any() or (m >= k and m % check_every == 0):
            vals, res = _ritz(alphas, betas, sizes, m, k)
            top = vals[:, 0].abs().clamp_min(1e-300)
            done = (res <= tol * top[:, None]) | torch.isnan(vals)
            if bool(done.all()) or not active.any():
                return LanczosResult(vals, res, m, torch.minimum(sizes, torch.tensor(m)), True)
    return LanczosResult(vals, res, m, torch.minimum(sizes, torch.tensor(m)), False)
