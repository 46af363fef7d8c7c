"""A task family whose MAML learning-rate answers are known in closed form (helpers for tests/lr).

Tasks: y = s x + b on inputs x, model theta = (w, c) -> w x + c (``nn.Linear(1, 1)``, float64), the
MSE loss L_t(theta) = (1/K) ||X theta - y_t||^2 with X = [x, 1] ([K, 2]), the same data for the
inner and the outer step (support = query, the setting of the two-learning-rates paper, "2LR").

* Every task's loss is exactly quadratic with Hessian H_t = (2/K) X_t^T X_t.
* One inner step maps the residual to P_t (X_t theta - y_t), P_t = I - (2 alpha / K) X_t X_t^T
  (Zou eq. 2.5), so the one-step MAML loss is (1/K) ||P_t (X_t theta - y_t)||^2, a quadratic with
  Hessian Ht~ = (2/K) (P_t X_t)^T (P_t X_t) = H_t (I - alpha H_t)^2.
* fastmeta's meta-loss is the mean over tasks: its Hessian is mean_t Ht~, its minimizer the least-
  squares solution of the stacked P_t X_t (Zou eq. 3.1), and plain GD with rate beta on it moves
  theta_n - theta* = (I - beta mean_t Ht~)^n (theta_0 - theta*).
* With ``shared_x`` every task has the same X (only the targets differ): all Ht~ are equal, and GD
  diverges exactly when beta lambda (1 - alpha lambda)^2 > 2 for an eigenvalue lambda of H
  (2LR eqs. 16-18 with the exact quadratic, not the paper's first-order approximation).
"""
import numpy as np
import torch
from torch import nn

from fastmeta.tasks import TaskBatch


class LinearFamily:
    """``sample(T)`` -> TaskBatch of T tasks with K points each; slopes s ~ 3 + spread U(-1, 1),
    intercepts b ~ 2 + spread U(-1, 1) (far from the zero initialisation, so training moves the
    loss by decades); x ~ U(-5, 5), one draw for all tasks if ``shared_x`` else one per task."""

    def __init__(self, K=12, shared_x=True, spread=0.1, seed=0):
        self.gen = torch.Generator().manual_seed(seed)
        self.K, self.shared_x, self.spread = K, shared_x, spread
        self.x = torch.rand(K, generator=self.gen, dtype=torch.float64) * 10 - 5

    def sample(self, T):
        if self.shared_x:
            x = self.x.expand(T, -1)
        else:
            x = torch.rand(T, self.K, generator=self.gen, dtype=torch.float64) * 10 - 5
        u = torch.rand(T, 2, generator=self.gen, dtype=torch.float64) * 2 - 1
        s = 3 + self.spread * u[:, :1]
        b = 2 + self.spread * u[:, 1:]
        y = s * x + b
        x, y = x[..., None].contiguous(), y[..., None].contiguous()
        return TaskBatch(x, y, x.clone(), y.clone())


def zero_linear(w=0.0, c=0.0):
    """``nn.Linear(1, 1)`` (float64) with weight w and bias c (default: zero, far from every task)."""
    m = nn.Linear(1, 1).double()
    with torch.no_grad():
        m.weight.fill_(w)
        m.bias.fill_(c)
    return m


def params(model):
    return torch.cat([model.weight.detach().reshape(-1), model.bias.detach().reshape(-1)])


def design(batch):
    """X_t = [x, 1]: ``[T, K, 2]``; targets ``[T, K]``."""
    x = batch.support_x[..., 0]
    return torch.stack([x, torch.ones_like(x)], -1), batch.support_y[..., 0]


def hessians(batch):
    """H_t = (2/K) X_t^T X_t, ``[T, 2, 2]``."""
    X, _ = design(batch)
    return 2 * X.transpose(1, 2) @ X / X.shape[1]


def maml_quadratic(batch, alpha):
    """(Hbar, theta*, loss(theta)) of the mean one-step MAML loss (module docstring)."""
    X, y = design(batch)
    T, K, _ = X.shape
    P = torch.eye(K, dtype=X.dtype) - (2 * alpha / K) * X @ X.transpose(1, 2)
    PX, Py = P @ X, (P @ y[..., None])[..., 0]
    Hbar = 2 * (PX.transpose(1, 2) @ PX).sum(0) / (K * T)
    theta = torch.linalg.lstsq(PX.reshape(-1, 2), Py.reshape(-1, 1)).solution[:, 0]

    def loss(th):
        return float(((PX @ th - Py) ** 2).mean())

    return Hbar, theta, loss


def gd_iterate(Hbar, theta_star, theta0, beta, n):
    """theta_n = theta* + (I - beta Hbar)^n (theta_0 - theta*)."""
    M = torch.linalg.matrix_power(torch.eye(2, dtype=Hbar.dtype) - beta * Hbar, n)
    return theta_star + M @ (theta0 - theta_star)


def beta_c_exact_of(eigs, alpha):
    """min_i 2 / (lambda_i (1 - alpha lambda_i)^2) over the given eigenvalues, for an alpha array."""
    e = np.asarray(eigs, dtype=float).reshape(1, -1)
    a = np.asarray(alpha, dtype=float).reshape(-1, 1)
    return (2 / (e * (1 - a * e) ** 2)).min(1).reshape(np.shape(alpha))


def beta_c_paper_of(eigs, alpha):
    """2LR eqs. 18-19: min over lambda - alpha lambda^2 > 0 of 2 / (lambda - alpha lambda^2)."""
    e = np.asarray(eigs, dtype=float).reshape(1, -1)
    a = np.asarray(alpha, dtype=float).reshape(-1, 1)
    f = e - a * e ** 2
    return np.where(f > 0, 2 / np.where(f > 0, f, 1), np.inf).min(1).reshape(np.shape(alpha))
