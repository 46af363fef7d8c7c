"""Hessian-free MAML (Fallah, Mokhtari, Ozdaglar 2020, eqs. 9-11, Algorithm 3, Theorem 4.17)."""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .._checks import positive_float
from ..evaluation import Evaluator, inner_loop
from ..params import ParamLayout
from ..profiling import annotate
from ..tasks import TaskBatch
from .. import ops
from ._shared import per_task_grads
from .base import Algorithm, MetaResult


@functools.lru_cache(maxsize=None)
def _tf32_switches(device_type: str) -> tuple[tuple, object]:
    """The switches that let float32 matmuls/convolutions on ``device_type`` run in reduced
    precision (CUDA: TF32 on Ampere/Hopper, where cuDNN convolutions default to it; CPU: oneDNN's
    bf16/TF32 when a user opts in), and the value that turns each off. torch >= 2.9 has
    per-backend ``fp32_precision``; mixing it with the legacy ``allow_tf32`` flags makes torch
    raise, so one family is used throughout."""
    b = torch.backends
    if device_type == "cuda":
        new = [(b.cuda.matmul, "fp32_precision")]
        new += [(getattr(b.cudnn, c), "fp32_precision") for c in ("conv", "rnn") if hasattr(b.cudnn, c)]
        legacy = ((b.cuda.matmul, "allow_tf32"), (b.cudnn, "allow_tf32"))
    else:
        new = [(getattr(b.mkldnn, c), "fp32_precision") for c in ("matmul", "conv") if hasattr(b.mkldnn, c)]
        legacy = ()  # before fp32_precision, oneDNN had no reduced-precision float32 switch
    if new and all(hasattr(obj, attr) for obj, attr in new):
        return tuple(new), "ieee"
    return legacy, False


class _full_fp32:
    """Within: float32 matmuls and convolutions on ``device_type`` in full (IEEE) precision; on exit
    every switch is restored to its previous value. TF32 keeps 10 mantissa bits (relative error
    ~1e-3), and HF-MAML multiplies the difference of two such gradients by alpha / (2 delta)."""

    __slots__ = ("_device_type", "_saved")

    def __init__(self, device_type: str):
        self._device_type = device_type

    def __enter__(self):
        switches, off = _tf32_switches(self._device_type)
        self._saved = [(obj, attr, getattr(obj, attr)) for obj, attr in switches]
        for obj, attr, value in self._saved:
            if value != off:
                setattr(obj, attr, off)
        return self

    def __exit__(self, *exc):
        for obj, attr, value in reversed(self._saved):
            setattr(obj, attr, value)
        return False


class HFMAML(Algorithm):
    """Hessian-free MAML: MAML's meta-gradient with every Hessian-vector product replaced by a
    central finite difference of gradients (Fallah et al. 2020, eqs. 9-11).

    One inner step (Fallah eqs. 4, 10, 11), per task i, with ``alpha = inner_lr``::

        w_i   = theta - alpha * grad f_i(theta; D_in)                  (support set)
        g_o,i = grad f_i(w_i; D_o)                                      (query set)
        d_i   = (grad f_i(theta + delta_i g_o,i; D_h) - grad f_i(theta - delta_i g_o,i; D_h)) / (2 delta_i)
        meta-gradient = mean_i (g_o,i - alpha * d_i)                    (Fallah sums; fastmeta averages)

    ``d_i`` approximates ``H_i(theta; D_h) g_o,i`` with error at most ``rho delta_i ||g_o,i||^2``
    (Fallah eq. 9); it is an approximation, **never exact** -- on ReLU / max-pool nets in float32
    the differences cross activation kinks and can be far off (see ``fd_dtype``).

    Implementation: the two perturbed points of all T tasks come from ``fd_hvp_points`` as one
    ``[2T, D]`` matrix and their gradients from ONE batched gradient call on ``D_h`` repeated
    twice; ``fd_hvp_combine`` forms ``g_o - alpha d``. No second-order autograd graph is built:
    every gradient is first order.

    **D_h** is ``TaskBatch.hessian`` (``hessian_x/y`` if given, else the support set D_in). The
    Hessian in MAML's gradient is the inner loss's, so only D_h = D_in makes delta -> 0 recover
    exact MAML (Fallah's D_h independent of D_in gives an unbiased estimate of the same term).

    **delta**: ``None`` uses Theorem 4.17's rule ``delta_i = 1 / (6 rho alpha ||g_o,i||)`` (so that
    ``||delta_i g_o,i|| = 1 / (6 rho alpha)`` for every task); a task with ``||g_o,i|| = 0`` has a
    zero direction and gets ``delta_i = 1`` (then ``d_i = 0`` exactly). ``rho`` is the Hessian's
    Lipschitz constant (Assumption 4.4); a float ``delta`` fixes the step for all tasks.

    **Shared (non-adapted) parameters** ``phi`` (e.g. ANIL's body) are meta-learned too. With
    ``w = theta - alpha grad_theta f(theta, phi; D_in)`` the chain rule gives for phi

        dF/dphi = grad_phi f(w, phi; D_o) - alpha * d/dphi [grad_theta f(theta, phi; D_in)]^T g_o
                = grad_phi f(w, phi; D_o) - alpha * d/de grad_phi f(theta + e g_o, phi; D_in) |_{e=0}

    (mixed partials commute), so the same two perturbed points give it as the central difference
    ``(grad_phi f(theta + delta g_o, phi) - grad_phi f(theta - delta g_o, phi)) / (2 delta)``: the
    one batched call returns per-task gradients w.r.t. the shared parameters as well (one copy of
    phi per row) and ``fd_hvp_combine`` runs on the full ``[T, P]`` gradients.

    **Several inner steps** (fastmeta's extension; Fallah analyze one step): with iterates
    ``w_0 = theta, ..., w_K`` the MAML gradient is ``(I - alpha H(w_0)) ... (I - alpha H(w_{K-1}))
    grad f(w_K; D_o)``. fastmeta applies the factors backwards, ``v_K = grad f(w_K; D_o)``,
    ``v_k = v_{k+1} - alpha * FD-HVP(w_k, v_{k+1})``, one batched finite difference (2T rows) per
    inner step at that step's iterate, with ``delta_k`` from the rule applied to ``v_{k+1}``. For
    one step this is exactly eqs. 10-11. The shared-parameter terms of every step add up.

    Args:
        inner_lr: alpha. inner_steps: K >= 1.
        delta: None (Theorem 4.17 rule) or a float > 0.
        rho: Hessian Lipschitz constant for the rule (> 0).
        fd_dtype: ``torch.float64`` evaluates the two perturbed gradients (model, data and
            difference) in float64 and casts the result back -- float32 differences on
            ReLU/max-pool nets are dominated by round-off and kinks. ``None``: the model's dtype.

    ``MetaResult.extras["delta"]`` holds the ``[T, K]`` steps used (column k: inner step k).
    """

    name = "hfmaml"

    def __init__(self, inner_lr: float, inner_steps: int = 1, delta: Optional[float] = None, rho: float = 1.0,
                 fd_dtype: Optional[torch.dtype] = None):
        super().__init__(inner_lr, inner_steps)
        if delta is not None and (isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta > 0):
            raise ValueError(f"delta: expected None (Theorem 4.17 rule) or a float > 0, got {delta!r}")
        self.rho = positive_float(rho, "rho")
        if fd_dtype is not None and fd_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"fd_dtype: expected None, torch.float32 or torch.float64, got {fd_dtype!r}")
        self.delta = None if delta is None else float(delta)
        self.fd_dtype = fd_dtype

    def deltas(self, v: torch.Tensor) -> torch.Tensor:
        """Per-task steps ``[T]`` for directions ``v`` ``[T, D]`` (Fallah Theorem 4.17 or fixed)."""
        if self.delta is not None:
            return torch.full((v.shape[0],), self.delta, dtype=v.dtype, device=v.device)
        norm = torch.linalg.vector_norm(v, dim=1)
        # ||v|| = 0: the direction is zero, any delta gives d = 0; 1 keeps the division finite.
        # ||v|| not finite (a diverging run): delta 1 lets the inf/NaN reach the meta-gradient, where
        # MetaLearner raises FloatingPointError, instead of a zero step the ops would refuse.
        ok = (norm > 0) & torch.isfinite(norm)
        safe = torch.where(ok, norm, torch.ones_like(norm))
        return torch.where(ok, 1.0 / (6.0 * self.rho * self.inner_lr * safe), torch.ones_like(norm))

    def _fd_step(self, ev: Evaluator, w_k: torch.Tensor, shared: torch.Tensor, v: torch.Tensor,
                 x: torch.Tensor, y: torch.Tensor):
        """One finite-difference factor ``(I - alpha H(w_k))`` applied to ``v`` ``[T, P]``.

        Returns the new ``[T, P]`` (adapted part: the chain's next vector; shared part: the
        accumulated shared terms of this step) and the deltas ``[T]``.
        """
        D = w_k.shape[1]
        fdt = self.fd_dtype or v.dtype
        T = v.shape[0]
        v_rows = v[:, :D].to(fdt)
        delta = self.deltas(v_rows)
        with annotate("hvp"):
            # Fallah eq. 11: rows w_k + delta v, then w_k - delta v -- all tasks in one matrix.
            pts = ops.fd_hvp_points(w_k.detach().to(fdt), v_rows, delta)
            x2 = torch.cat([x, x]).to(fdt) if x.is_floating_point() else torch.cat([x, x])
            y2 = torch.cat([y, y]).to(fdt) if y.is_floating_point() else torch.cat([y, y])
            # [2T, P]: with shared parameters phi, one copy of phi per row gives the per-task
            # gradients w.r.t. phi from the same backward. In full float32 precision: see _full_fp32.
            if fdt == torch.float32:
                with _full_fp32(pts.device.type):
                    _, grads = per_task_grads(ev, pts, shared.to(fdt), x2, y2)
            else:
                _, grads = per_task_grads(ev, pts, shared.to(fdt), x2, y2)
            out = ops.fd_hvp_combine(v.to(fdt), grads[:T], grads[T:], delta, self.inner_lr, reduce="none")
        return out.to(v.dtype), delta

    def meta_grad(self, ev: Evaluator, layout: ParamLayout, theta: torch.Tensor, batch: TaskBatch) -> MetaResult:
        theta = theta.detach()
        adapted, shared = layout.split(theta)

        def task_pass(b: TaskBatch):
            with annotate("inner"):
                # Fallah eq. 4 (K times): first-order inner loop, iterates kept for the HVPs.
                w, iterates = inner_loop(ev, adapted, shared, b.support_x, b.support_y,
                                         self.inner_lr, self.inner_steps, create_graph=False)
            with annotate("outer"):
                # v [T, P]: the per-task query gradient over Theta (adapted rows and shared phi).
                q, v, out = per_task_grads(ev, w, shared, b.query_x, b.query_y, return_outputs=True)
            x_h, y_h = b.hessian
            deltas = []
            # Backward through the inner steps: v <- (I - alpha H(w_k)) v, last step first.
            for k in reversed(range(self.inner_steps)):
                # Adapted columns: the chain's next vector. Shared columns: the query gradient
                # plus each step's mixed term -alpha d_phi (they are not multiplied by later
                # factors, since phi is not updated by the inner loop).
                v, delta = self._fd_step(ev, iterates[k], shared, v, x_h, y_h)
                deltas.append(delta.to(v.dtype))
            deltas.reverse()
            return v.sum(0), q, out, torch.stack(deltas, dim=1)

        g, q, out, deltas = ev.over_tasks(task_pass, batch)
        return MetaResult(g, q, out, extras={"delta": deltas})
