"""Plainly written per-task autograd loops, built line by line from the papers' equations.

These are the oracles for the algorithm tests: one task at a time, named parameters,
``torch.autograd.grad`` with ``create_graph=True`` -- no task rows, no vmap, nothing shared with
fastmeta's implementation.
"""
import torch
from torch.func import functional_call


def task_loss(model, params, x, y, loss_fn):
    return loss_fn(functional_call(model, params, (x,)), y)


def maml_meta_grad(model, batch, loss_fn, inner_lr, inner_steps, adapt_names, first_order=False):
    """Mean over tasks of d/dtheta L(theta'_m; D'_m), theta'_m from ``inner_steps`` steps of
    Sharp-MAML eq. 9 (MAML, Alg. 2) on the support set; ``first_order`` holds the inner
    gradients constant (Fallah eq. 8). Returns ``{name: grad}`` over all trainable parameters."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    T = batch.support_x.shape[0]
    for t in range(T):
        fast = dict(params)
        for _ in range(inner_steps):
            loss = task_loss(model, fast, batch.support_x[t], batch.support_y[t], loss_fn)
            grads = torch.autograd.grad(loss, [fast[n] for n in adapt_names], create_graph=not first_order)
            for n, g in zip(adapt_names, grads):
                fast[n] = fast[n] - inner_lr * (g.detach() if first_order else g)
        q = task_loss(model, fast, batch.query_x[t], batch.query_y[t], loss_fn)
        grads = torch.autograd.grad(q, list(params.values()))
        for n, g in zip(params, grads):
            total[n] += g / T
    return total


def flat(grads: dict, layout) -> torch.Tensor:
    return torch.cat([grads[s.name].reshape(-1) for s in layout.slots])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
