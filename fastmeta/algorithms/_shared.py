"""What several algorithms compute the same way."""
from __future__ import annotations

import torch

from ..evaluation import Evaluator


def per_task_grads(ev: Evaluator, rows: torch.Tensor, shared: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                   return_outputs: bool = False):
    """Per-task losses ``[T]`` and first-order gradients ``[T, P]`` over ALL meta-parameters.

    ``rows`` ``[T, D]`` (or ``[D]``, broadcast to the T tasks of ``x``) are the adapted parameters,
    ``shared`` ``[P-D]`` the non-adapted ones. Column block ``[:, :D]`` is ``grad_rows L_t``; when
    the layout shares parameters (``P > D``), block ``[:, D:]`` is ``grad_shared L_t`` per task,
    from ONE backward: the shared values are expanded to one copy per task. Gradients are
    constants (no graph). With ``return_outputs``: ``(loss, grads, outputs)``.

    Used by HF-MAML (the query gradient ``v`` over Theta and the finite differences of the shared
    gradient, Fallah eqs. 10-11) and by Fallah's step size (per-task gradient norms, eq. 16).
    """
    T = x.shape[0]
    rows = (rows.expand(T, -1) if rows.dim() == 1 else rows).detach().requires_grad_()
    with torch.enable_grad():
        if shared.shape[-1] > 0:
            sh = shared.detach().expand(T, -1).requires_grad_()
            loss, out = ev.losses(rows, sh, x, y, return_outputs=True)
            g_rows, g_sh = torch.autograd.grad(loss.sum(), [rows, sh])
            grads = torch.cat([g_rows, g_sh], dim=1)
        else:
            loss, out = ev.losses(rows, shared, x, y, return_outputs=True)
            (grads,) = torch.autograd.grad(loss.sum(), rows)
    loss = loss.detach()
    return (loss, grads, out.detach()) if return_outputs else (loss, grads)
