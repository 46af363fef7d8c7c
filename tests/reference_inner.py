"""Plain per-task oracles for learned / scheduled inner rates and differentiable inner optimizers
(tests/test_metasgd.py, test_mamlpp.py, test_inner_optim.py).

One task at a time, named parameters, ``torch.autograd.grad(create_graph=True)``, written from the
equations -- nothing shared with fastmeta's implementation (no task rows, no Evaluator, no
inner_loop, no InnerOptimizer).
"""
import math

import torch
from torch.func import functional_call


def adapted_order(model, adapt):
    """The adapted parameter names in the model's order (``"all"``, ``"head"`` or a list)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if adapt == "all":
        return names
    if adapt == "head":
        return [n for n in names if n.startswith("head.")]
    return list(adapt)


def split_named(vec, model, names):
    """A flat ``[D]`` vector over ``names`` (model order) -> ``{name: tensor of the param's shape}``."""
    params = dict(model.named_parameters())
    out, i = {}, 0
    for n in names:
        k = params[n].numel()
        out[n] = vec[i:i + k].view(params[n].shape)
        i += k
    return out


def sgd_rule(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    """torch.optim.SGD's update direction (its documented algorithm), state per tensor name."""
    def direction(k, name, w, g, state):
        g = g + weight_decay * w
        if momentum == 0:
            return g
        b = g if k == 0 else momentum * state[name] + (1 - dampening) * g
        state[name] = b
        return g + momentum * b if nesterov else b
    return direction


def safe_sqrt(v):
    """sqrt with derivative 0 where v == 0 (instead of inf * 0 = NaN): the double-where idiom."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), torch.zeros_like(v))


def adam_rule(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, sqrt=safe_sqrt, bias_correction=True):
    """torch.optim.Adam's update direction (its documented algorithm; eps outside the root).
    ``bias_correction=False`` is a deliberately wrong variant for guards."""
    b1, b2 = betas

    def direction(k, name, w, g, state):
        g = g + weight_decay * w
        m_prev, v_prev = state.get(name, (torch.zeros_like(g), torch.zeros_like(g)))
        m = b1 * m_prev + (1 - b1) * g
        v = b2 * v_prev + (1 - b2) * g * g
        state[name] = (m, v)
        bc1, bc2 = (1 - b1 ** (k + 1), 1 - b2 ** (k + 1)) if bias_correction else (1.0, 1.0)
        return (m / bc1) / (sqrt(v) / math.sqrt(bc2) + eps)
    return direction


def meta_grad(model, batch, loss_fn, adapt_names, steps, lr, first_order=False, rule=None, weights=None,
              leaves=()):
    """Mean over tasks of d/d(theta, leaves) of the per-task meta-objective

        sum_k c_k L(theta_k; D'_m),   theta_{k+1}^n = theta_k^n - lr(k, n) * d_k^n

    with ``d_k = grad L(theta_k; D_m)`` (or ``rule(k, n, theta_k^n, g, state)``),
    ``c = weights`` (``None``: the final query loss alone). ``lr(k, n)`` is a float or a tensor
    broadcastable to parameter n, built from ``leaves`` (learned rates). ``first_order``: the
    inner gradients are detached. Returns (``{name: grad}``, [leaf grads]).
    """
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    leaves = list(leaves)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    total_leaves = [torch.zeros_like(x) for x in leaves]
    T = batch.support_x.shape[0]
    for t in range(T):
        fast = dict(params)
        state = {}
        obj = 0.0
        for k in range(steps):
            loss = loss_fn(functional_call(model, fast, (batch.support_x[t],)), batch.support_y[t])
            gs = torch.autograd.grad(loss, [fast[n] for n in adapt_names], create_graph=not first_order)
            for n, g in zip(adapt_names, gs):
                if first_order:
                    g = g.detach()
                d = g if rule is None else rule(k, n, fast[n], g, state)
                fast[n] = fast[n] - lr(k, n) * d
            if weights is not None:
                q = loss_fn(functional_call(model, fast, (batch.query_x[t],)), batch.query_y[t])
                obj = obj + weights[k] * q
        if weights is None:
            obj = loss_fn(functional_call(model, fast, (batch.query_x[t],)), batch.query_y[t])
        grads = torch.autograd.grad(obj, [params[n] for n in names] + leaves)
        for n, g in zip(names, grads):
            total[n] += g / T
        for i, g in enumerate(grads[len(names):]):
            total_leaves[i] += g / T
    return total, total_leaves
