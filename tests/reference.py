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


# ---------------------------------------------------------------------------------------------
# HF-MAML and Sharp-MAML oracles (appended). One task at a time, named parameters, plain
# torch.autograd.grad; every line follows the cited equation.

def _grads(model, params, names, x, y, loss_fn, create_graph=False):
    loss = task_loss(model, params, x, y, loss_fn)
    return dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph)))


def _norm(d, names):
    return torch.sqrt(sum((d[n] ** 2).sum() for n in names))


def hfmaml_meta_grad(model, batch, loss_fn, inner_lr, inner_steps, adapt_names, delta=None, rho=1.0,
                     fd_dtype=None, record_deltas=None):
    """Fallah eqs. 4, 9-11 per task (Alg. 3), finite differences done per task.

    One step: g_o = grad f(w; D_o), w = theta - alpha grad f(theta; D_in);
    d = (grad f(theta + delta g_o; D_h) - grad f(theta - delta g_o; D_h)) / (2 delta), the gradient
    over ALL parameters (the shared part is the mixed term d/dphi of grad_theta f . g_o);
    meta-gradient = g_o - alpha d. delta None: Thm 4.17, delta = 1 / (6 rho alpha ||g_o||).
    K steps: v <- v - alpha FD(w_k, v) backwards over the iterates. Mean over tasks.
    ``record_deltas``: a list that receives, per task, the K deltas used (inner step order)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    shared_names = [n for n in names if n not in adapt_names]
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    T = batch.support_x.shape[0]
    hx = batch.hessian_x if batch.hessian_x is not None else batch.support_x
    hy = batch.hessian_y if batch.hessian_y is not None else batch.support_y
    for t in range(T):
        iterates, used = [], []
        w = {n: p.clone().requires_grad_() for n, p in params.items()}
        for _ in range(inner_steps):
            iterates.append({n: p.detach().clone() for n, p in w.items()})
            g = _grads(model, w, adapt_names, batch.support_x[t], batch.support_y[t], loss_fn)
            w = {n: (w[n] - inner_lr * g[n] if n in g else w[n]).detach().requires_grad_() for n in names}
        v = _grads(model, w, names, batch.query_x[t], batch.query_y[t], loss_fn)  # over all params
        acc_shared = {n: v[n].clone() for n in shared_names}
        va = {n: v[n] for n in adapt_names}
        for k in reversed(range(inner_steps)):
            dt = fd_dtype or va[adapt_names[0]].dtype
            vv = {n: va[n].to(dt) for n in adapt_names}
            d = delta if delta is not None else 1.0 / (6 * rho * inner_lr * float(_norm(vv, adapt_names)))
            used.insert(0, d)
            plus = {n: (iterates[k][n].to(dt) + d * vv[n] if n in vv else iterates[k][n].to(dt)).requires_grad_()
                    for n in names}
            minus = {n: (iterates[k][n].to(dt) - d * vv[n] if n in vv else iterates[k][n].to(dt)).requires_grad_()
                     for n in names}
            xh = hx[t].to(dt) if hx.is_floating_point() else hx[t]
            yh = hy[t].to(dt) if hy.is_floating_point() else hy[t]
            gp = _grads(model, plus, names, xh, yh, loss_fn)
            gm = _grads(model, minus, names, xh, yh, loss_fn)
            hv = {n: (gp[n] - gm[n]) / (2 * d) for n in names}
            for n in shared_names:
                acc_shared[n] = (acc_shared[n].to(dt) - inner_lr * hv[n]).to(acc_shared[n].dtype)
            va = {n: (vv[n] - inner_lr * hv[n]).to(va[n].dtype) for n in adapt_names}
        for n in adapt_names:
            total[n] += va[n] / T
        for n in shared_names:
            total[n] += acc_shared[n] / T
        if record_deltas is not None:
            record_deltas.append(used)
    return total


def adapted_query_grads(model, batch, loss_fn, inner_lr, inner_steps):
    """Per task, the query gradient g_o = grad f(w_K; D_o) over all parameters at the iterate after
    ``inner_steps`` plain gradient steps on the support set (Fallah eq. 4 / MAML's inner loop, all
    parameters adapted): ``[T, P]`` in named_parameters order."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    rows = []
    for t in range(batch.support_x.shape[0]):
        w = {n: p.clone().requires_grad_() for n, p in params.items()}
        for _ in range(inner_steps):
            g = _grads(model, w, names, batch.support_x[t], batch.support_y[t], loss_fn)
            w = {n: (w[n] - inner_lr * g[n]).detach().requires_grad_() for n in names}
        g = _grads(model, w, names, batch.query_x[t], batch.query_y[t], loss_fn)
        rows.append(torch.cat([g[n].reshape(-1) for n in names]))
    return torch.stack(rows)


def sharp_maml_meta_grad(model, batch, loss_fn, inner_lr, inner_steps, adapt_names, alpha_low=0.0, alpha_up=0.0,
                         first_order=False, swp_masks=None, sds_ratio=None):
    """Sharp-MAML per task (Abbas et al. 2022), perturbations held constant (eq. 10).

    low (Alg. 4): eps_m = alpha_low g_m / ||g_m|| (eq. 11, g_m the support gradient over the adapted
    parameters at the current iterate), theta'_m = theta - beta grad L(theta + eps_m) (eq. 22),
    meta-gradient of L(theta'_m; D'_m) (eq. 23). up (Alg. 3): grad h = MAML meta-gradient,
    eps = alpha_up grad h / ||grad h|| (eq. 20), meta-gradient at theta + eps (eq. 21). both (Alg. 1):
    eqs. 11-15, pass 2 reusing pass 1's eps_m. ESAM: swp_masks [K][T] dicts of 0/1 masks multiply
    g_m before the norm; sds_ratio keeps the round(mu N) samples whose loss rises most at theta+eps_m
    and takes the step gradient on those only. Mean over tasks; returns {name: grad}."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    T = batch.support_x.shape[0]

    def one_pass(base, eps_reuse):
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        eps_all = []
        for t in range(T):
            x, y = batch.support_x[t], batch.support_y[t]
            fast = dict(base)
            eps_t = []
            for k in range(inner_steps):
                xs, ys = x, y
                if alpha_low > 0:
                    if eps_reuse is not None:
                        eps, keep = eps_reuse[t][k]
                    else:
                        det = {n: fast[n].detach().requires_grad_() for n in names}
                        g = _grads(model, det, adapt_names, x, y, loss_fn)
                        if swp_masks is not None:
                            g = {n: g[n] * swp_masks[k][t][n] for n in adapt_names}
                        nrm = _norm(g, adapt_names)
                        eps = {n: alpha_low * g[n] / nrm for n in adapt_names}
                        keep = None
                        if sds_ratio is not None:
                            with torch.no_grad():
                                pert = {n: det[n] + eps[n] if n in eps else det[n] for n in names}
                                l0 = loss_fn(functional_call(model, det, (x,)), y, reduction="none")
                                l1 = loss_fn(functional_call(model, pert, (x,)), y, reduction="none")
                            n_keep = max(1, round(sds_ratio * x.shape[0]))
                            order = sorted(range(x.shape[0]), key=lambda i: (-(float(l1[i]) - float(l0[i])), i))
                            keep = sorted(order[:n_keep])
                    eps_t.append((eps, keep))
                    at = {n: fast[n] + eps[n] if n in eps else fast[n] for n in names}
                    if keep is not None:
                        xs, ys = x[keep], y[keep]
                else:
                    at = fast
                g = _grads(model, at, adapt_names, xs, ys, loss_fn, create_graph=not first_order)
                fast = {n: fast[n] - inner_lr * (g[n].detach() if first_order else g[n]) if n in g else fast[n]
                        for n in names}
            eps_all.append(eps_t)
            q = task_loss(model, fast, batch.query_x[t], batch.query_y[t], loss_fn)
            for n, gq in zip(names, torch.autograd.grad(q, [base[n] for n in names])):
                total[n] += gq / T
        return total, eps_all

    base = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    g1, eps_all = one_pass(base, None)
    if alpha_up == 0:
        return g1
    nrm = _norm(g1, names)
    base2 = {n: (params[n].detach() + alpha_up * g1[n] / nrm).requires_grad_() for n in names}
    g2, _ = one_pass(base2, eps_all if alpha_low > 0 else None)
    return g2


# ---------------------------------------------------------------------------------------- test cases
# Small float64 problems shared by the algorithm tests (test_maml, test_sharp, test_hfmaml).
def mlp_case(activation="tanh", dtype=torch.float64):
    """A tanh sine MLP on 3 regression tasks (6 support, 8 query points each), MSE, inner lr 0.05."""
    import torch.nn.functional as F
    import fastmeta
    from fastmeta.tasks import TaskBatch

    model = fastmeta.SineMLP(hidden=12, activation=activation).to(dtype)
    x = torch.rand(3, 14, 1, dtype=dtype) * 10 - 5
    y = 2.0 * torch.sin(x - 0.3)
    return model, TaskBatch(x[:, :6], y[:, :6], x[:, 6:], y[:, 6:]), F.mse_loss, 0.05


def conv_case(dtype=torch.float64):
    """Conv-4 with batch norm (hidden 6, 16x16 images) on 3 tasks of 3-way 2-shot, inner lr 0.3."""
    import torch.nn.functional as F
    import fastmeta
    from fastmeta.tasks import TaskBatch

    model = fastmeta.Conv4(ways=3, hidden=6, image_size=16).to(dtype)
    x = torch.randn(3, 3 * 4, 1, 16, 16, dtype=dtype)
    y = torch.arange(3).repeat_interleave(4).expand(3, -1)
    b = TaskBatch(x[:, ::2], y[:, ::2].contiguous(), x[:, 1::2], y[:, 1::2].contiguous(), ways=3)
    return model, b, F.cross_entropy, 0.3


def run(algo, model, batch, loss_fn, adapt="all", strategy="vmap"):
    """fastmeta's meta-gradient of ``algo`` on ``batch`` through one Evaluator: ``(MetaResult, layout)``."""
    from fastmeta.evaluation import Evaluator
    from fastmeta.params import ParamLayout

    layout = ParamLayout(model, adapt)
    ev = Evaluator(model, layout, loss_fn, strategy)
    return algo.meta_grad(ev, layout, layout.flatten(model), batch), layout
