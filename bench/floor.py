"""The compute floor: the forward/backward passes one MAML step needs, written by hand with
``torch.nn.functional`` on plain tensors, no library machinery. A row's ratio to it is what the
library's machinery costs on top of the arithmetic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmeta.params import ParamLayout
from workloads import Workload, flat_in_layout, loss_of


def _sine_forward_batched(ps, x):
    # 1-40-40-1 MLP with per-task weights [T, in, out] (x [T, N, 1]): three batched GEMMs.
    w1, b1, w2, b2, w3, b3 = ps
    h = F.relu(torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)))
    h = F.relu(torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2)))
    return torch.baddbmm(b3.unsqueeze(1), h, w3.transpose(1, 2))


def _conv4_forward(ps, x):
    # Conv-4 written with torch.nn.functional on a plain list of tensors (one task).
    for i in range(4):
        w, b, gamma, beta = ps[4 * i: 4 * i + 4]
        x = F.max_pool2d(F.relu(F.batch_norm(F.conv2d(x, w, b, padding=1), None, None, gamma, beta, training=True)), 2)
    return F.linear(x.flatten(1), ps[16], ps[17])


def make_floor(wl: Workload, model, batch, first_order: bool):
    """The passes one MAML step needs, written by hand: sine batched over tasks with ``baddbmm``
    (one launch per layer for all tasks), Conv-4 one task at a time (the loop is the fastest
    plain form on this CPU). Same math as the plain loop: a support forward+backward (kept
    differentiable for second order), an SGD step, a query forward+backward to theta."""
    layout = ParamLayout(model, "all")
    loss = loss_of(wl)
    params = [p for _, p in model.named_parameters()]
    lr, T = wl.inner_lr, batch.num_tasks

    def run():
        if wl.name == "sine":
            tp = [p.expand(T, *p.shape) for p in params]
            sl = loss(_sine_forward_batched(tp, batch.support_x), batch.support_y, reduction="none").mean((1, 2)).sum()
            gs = torch.autograd.grad(sl, tp, create_graph=not first_order)
            fast = [p - lr * g for p, g in zip(tp, gs)]
            if first_order:
                fast = [f.detach().requires_grad_() for f in fast]
            ql = loss(_sine_forward_batched(fast, batch.query_x), batch.query_y, reduction="none").mean((1, 2)).sum() / T
            if first_order:
                total = [g.sum(0) for g in torch.autograd.grad(ql, fast)]
            else:
                total = list(torch.autograd.grad(ql, params))
        else:
            total = [torch.zeros_like(p) for p in params]
            for t in range(T):
                sl = loss(_conv4_forward(params, batch.support_x[t]), batch.support_y[t])
                gs = torch.autograd.grad(sl, params, create_graph=not first_order)
                fast = [p - lr * g for p, g in zip(params, gs)]
                if first_order:
                    fast = [f.detach().requires_grad_() for f in fast]
                ql = loss(_conv4_forward(fast, batch.query_x[t]), batch.query_y[t])
                for acc, g in zip(total, torch.autograd.grad(ql, fast if first_order else params)):
                    acc += g / T
        return flat_in_layout(model, layout, total)
    return run
