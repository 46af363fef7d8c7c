"""Sharp-MAML (Abbas et al. 2022): SAM in MAML's inner loop (low), outer loop (up) or both,
with ESAM's SWP and SDS inside the inner-loop SAM step (ESharp-MAML, sec. 5.4)."""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import nonnegative_float, unit_fraction
from ..evaluation import Evaluator, inner_loop
from ..params import ParamLayout
from ..profiling import annotate
from ..tasks import TaskBatch
from .. import ops
from .base import Algorithm, MetaResult


class SharpMAML(Algorithm):
    """Sharp-MAML (Abbas et al. 2022): sharpness-aware minimization inside MAML.

    With ``beta_low = inner_lr`` and per-task support set D_m, query set D'_m:

    * **low** (``alpha_up = 0``, Alg. 4, eqs. 11, 22-23): per task the ascent direction
      ``eps_m = alpha_low g_m / ||g_m||`` with ``g_m = grad L(theta; D_m)`` (eq. 11; norm over all
      adapted parameters of the task), the inner step
      ``theta'_m = theta - beta_low grad L(theta + eps_m; D_m)`` (eq. 22), and the meta-gradient
      ``mean_m d/dtheta L(theta'_m; D'_m)`` (eq. 23) -- by eq. 10 the Hessian in it is taken at the
      perturbed point ``theta + eps_m``.
    * **up** (``alpha_low = 0``, Alg. 3, eqs. 20-21): the MAML meta-gradient ``grad h`` at theta,
      ``eps = alpha_up grad h / ||grad h||`` (eq. 20; one norm over all meta-parameters), then the
      MAML meta-gradient at ``theta + eps`` (eq. 21) is the update direction.
    * **both** (Alg. 1, eqs. 11-15): pass 1 is Sharp-MAML_low's (eqs. 11-12) giving ``grad h``;
      ``eps`` by eq. 13; pass 2 repeats the perturbed inner step from ``theta + eps`` with the SAME
      ``eps_m`` (eq. 14 uses ``eps_m(theta^t)``, computed at theta -- fastmeta reuses pass 1's
      instead of recomputing it) and returns its meta-gradient (eq. 15).

    With several inner steps the SAM step applies at each inner step k: ``eps_{m,k}`` is the
    normalized support gradient at the k-th iterate (pass 2 of "both" reuses pass 1's
    ``eps_{m,k}``). ``alpha_low = alpha_up = 0`` is MAML, bit for bit (no extra pass is run).

    **Perturbations are constants** (SAM's convention; Sharp-MAML eq. 10 evaluates the Hessian at
    the perturbed point and treats ``eps_m``, ``eps`` as given): the perturbed point passes
    gradient to theta as the identity and nothing differentiates through ``g / ||g||``. The
    authors' reference code instead builds ``eps_m`` from a differentiable gradient and so
    back-propagates through the normalization (third-order terms, and an extra double-backward
    through the ascent gradient). fastmeta follows the paper's equations: that is what the
    convergence analysis (Theorem 1) covers, it matches SAM, and it avoids the cost.

    **ESAM inside the inner SAM step** (ESharp-MAML, sec. 5.4):

    * ``swp_keep_prob`` (xi, SWP): each inner step draws a Bernoulli(xi) mask per task over the
      adapted parameters; ``eps_m = alpha_low (g_m * mask) / ||g_m * mask||``. The masks come from
      ``seed`` (or torch's global RNG) and are the same for every evaluation strategy; they are
      returned in ``extras["swp_masks"]`` ``[K, T, D]``.
    * ``sds_ratio`` (mu, SDS): per task, per-sample support losses at the iterate and at the
      perturbed point (one extra forward, no backward); the ``k = max(1, round(mu N))`` samples
      whose loss increases most (``sds_select``) are kept and the SAM-step gradient is computed
      on them only -- a backward over mu*N samples, not N. The ascent direction uses all N. With
      batch-statistics normalization the kept samples are normalized among themselves.

    Args:
        inner_lr: beta_low. inner_steps: K >= 1.
        alpha_low, alpha_up: SAM radii (>= 0) of the inner and the meta level.
        first_order: hold the inner gradients constant (FO-MAML inside every pass).
        swp_keep_prob, sds_ratio: ESAM options (None = off); they need ``alpha_low > 0``.
        seed: seeds the SWP mask stream (None: draw from torch's global RNG).

    ``query_loss`` / ``query_out`` are the post-adaptation values of pass 1 (at theta, the
    unperturbed meta-parameters, with the inner SAM step).
    """

    name = "sharp"

    def __init__(self, inner_lr: float, inner_steps: int = 1, alpha_low: float = 0.0, alpha_up: float = 0.0,
                 first_order: bool = False, swp_keep_prob: Optional[float] = None,
                 sds_ratio: Optional[float] = None, seed: Optional[int] = None):
        super().__init__(inner_lr, inner_steps)
        self.alpha_low = nonnegative_float(alpha_low, "alpha_low")
        self.alpha_up = nonnegative_float(alpha_up, "alpha_up")
        self.first_order = bool(first_order)
        self.swp_keep_prob = unit_fraction(swp_keep_prob, "swp_keep_prob")
        self.sds_ratio = unit_fraction(sds_ratio, "sds_ratio")
        if self.alpha_low == 0 and (self.swp_keep_prob is not None or self.sds_ratio is not None):
            name = "swp_keep_prob" if self.swp_keep_prob is not None else "sds_ratio"
            raise ValueError(f"{name}: ESAM options act on the inner SAM step and need alpha_low > 0")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed: expected None or an int, got {seed!r}")
        self.seed = seed
        self._gen = None if seed is None else torch.Generator().manual_seed(seed)

    # ------------------------------------------------------------------ pieces
    def _draw_masks(self, T: int, D: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        """SWP masks ``[K, T, D]`` for the whole meta-batch (so chunking does not change them)."""
        if self.swp_keep_prob is None:
            return None
        src = self._gen
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=src))
        m = ops.swp_mask((self.inner_steps * T, D), self.swp_keep_prob, seed=seed,
                             device=like.device, dtype=like.dtype)
        return m.reshape(self.inner_steps, T, D)

    def _support_grad(self, ev: Evaluator, w: torch.Tensor, shared: torch.Tensor, x, y):
        """First-order support gradient ``[T, D]`` at ``w`` (a constant) and per-sample losses ``[T, N]``."""
        wd = w.detach().requires_grad_()
        # Under ANIL feature caching pass ``shared`` itself (the cache is keyed on identity): this
        # call and the inner step then share one body evaluation; the gradient is taken w.r.t.
        # ``wd`` only, so the body's graph is neither traversed nor freed. Without the cache, the
        # detached copy keeps the body's graph from being recorded at all.
        sh = shared if getattr(ev, "caches_features", False) else shared.detach()
        with torch.enable_grad():
            per = ev.losses(wd, sh, x, y, per_sample=True)
            (g,) = torch.autograd.grad(per.mean(1).sum(), wd)
        return g, per.detach()

    def _inner(self, ev: Evaluator, rows: torch.Tensor, shared: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               masks: Optional[torch.Tensor] = None, reuse: Optional[list] = None):
        """K inner steps of Sharp-MAML (eqs. 9, 11, 12/14/22) from ``rows`` (``[D]`` or ``[T, D]``).

        ``reuse``: per step ``(eps [T, D], idx [T, k] or None)`` from pass 1 (Sharp-MAML_both, eq. 14).
        Returns the adapted rows ``[T, D]`` and the per-step ``(eps, idx)`` used.
        """
        used = []

        def perturbed(k: int, w: torch.Tensor):
            # Where step k takes its gradient: w + eps_{m,k}, on the SDS-kept samples if any.
            with annotate("perturb"):
                if reuse is not None:
                    eps, idx = reuse[k]
                else:
                    g, per_clean = self._support_grad(ev, w, shared, x, y)
                    mask = None if masks is None else masks[k]
                    # eq. 11 (with ESAM's SWP mask): eps_m = alpha_low (g*mask) / ||g*mask||, a constant.
                    eps = ops.sam_perturb(torch.zeros_like(g), g, self.alpha_low, mask=mask)
                    idx = None
                    if self.sds_ratio is not None:
                        with torch.no_grad():
                            per_pert = ev.losses(w.detach() + eps, shared, x, y, per_sample=True)
                        # ESAM SDS: keep the samples whose loss rises most; in their original order.
                        idx = ops.sds_select(per_clean, per_pert, self.sds_ratio).sort(dim=1).values
                used.append((eps, idx))
                if idx is None:
                    return w + eps, x, y
                ar = torch.arange(x.shape[0], device=idx.device)[:, None]
                return w + eps, x[ar, idx], y[ar, idx]

        with annotate("inner"):
            # eq. 9 / 22: step from w with the gradient at the perturbed point; the graph (second
            # order) makes eq. 10's Hessian at w + eps appear in the meta-gradient.
            w, _ = inner_loop(ev, rows, shared, x, y, self.inner_lr, self.inner_steps,
                              create_graph=not self.first_order,
                              grad_at=perturbed if self.alpha_low > 0 else None)
        return w, used

    # ------------------------------------------------------------------ meta-gradient
    def meta_grad(self, ev: Evaluator, layout: ParamLayout, theta: torch.Tensor, batch: TaskBatch) -> MetaResult:
        theta = theta.detach().requires_grad_()
        T = batch.num_tasks
        masks = self._draw_masks(T, layout.D, theta)
        need_reuse = self.alpha_up > 0 and self.alpha_low > 0
        saved: list[list] = []
        pos = {"start": 0}

        def pass1(b: TaskBatch):
            n = b.num_tasks
            start = pos["start"]
            pos["start"] += n  # over_tasks visits the chunks in order: slice this chunk's masks
            adapted, shared = layout.split(theta)
            m = None if masks is None else masks[:, start:start + n]
            w, used = self._inner(ev, adapted, shared, b.support_x, b.support_y, masks=m)
            if need_reuse:
                saved.append([(e.detach(), i) for e, i in used])
            with annotate("outer"):
                q, out = ev.losses(w, shared, b.query_x, b.query_y, return_outputs=True)
                (g,) = torch.autograd.grad(q.sum(), theta)
            return g, q.detach(), out.detach()

        g, q, out = ev.over_tasks(pass1, batch)
        extras = {}
        if masks is not None:
            extras["swp_masks"] = masks
        if self.alpha_up == 0:
            return MetaResult(g, q, out, extras or None)

        with annotate("perturb"):
            # eq. 13 / 20: eps = alpha_up grad h / ||grad h||, one norm over all meta-parameters.
            theta2 = ops.sam_perturb(theta.detach(), g, self.alpha_up, global_norm=True)
        theta2 = theta2.detach().requires_grad_()
        it = iter(saved)

        def pass2(b: TaskBatch):
            adapted, shared = layout.split(theta2)
            # eq. 14 / 21: the inner step from theta + eps (with pass 1's eps_m for "both").
            w, _ = self._inner(ev, adapted, shared, b.support_x, b.support_y,
                               reuse=next(it) if need_reuse else None)
            with annotate("outer"):
                q2 = ev.losses(w, shared, b.query_x, b.query_y)
                # d/dtheta L(theta~2_m(theta)) = d/dtheta2 since theta2 = theta + constant (eq. 15).
                (g2,) = torch.autograd.grad(q2.sum(), theta2)
            return (g2,)

        (g2,) = ev.over_tasks(pass2, batch)
        extras["meta_perturbation_norm"] = float(torch.linalg.vector_norm(theta2.detach() - theta.detach()))
        return MetaResult(g2, q, out, extras)
