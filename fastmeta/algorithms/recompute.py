"""Memory-bounded second-order MAML: the meta-backward recomputes each inner step (docs/memory.md).

Default second-order MAML keeps the double-backward graph of every inner step of every task of a
chunk until the outer backward: memory ~ inner steps x tasks x activations. Here the inner loop
runs without a graph, keeping only its iterates ``w_0 .. w_K`` (``[T, D]`` each), and the
meta-backward walks the steps in reverse, rebuilding one step's graph at a time (Fallah eq. 5,
applied factor by factor):

    v_K = grad_w L(w_K, s; D')                                         (query gradient, [T, D])
    v_k = v_{k+1} - alpha * H_ww(w_k) v_{k+1}                          (k = K-1 .. 0)
    grad_a F = sum_m v_0,m            grad_s F = grad_s L(w_K, s; D') - alpha * sum_k H_sw(w_k) v_{k+1}

with ``H_ww(w_k) = d^2 L(w_k, s; D) / dw^2`` and ``H_sw(w_k) = d/ds grad_w L(w_k, s; D)`` (the shared,
non-adapted parameters ``s`` enter every step). One ``autograd.grad(g_k, [w_k, s], v_{k+1})`` on the
recomputed support gradient ``g_k`` returns both products. Exact to round-off: the recomputed
forward sees the same iterate, the same batch (so the same batch-norm statistics) and the same
random stream (dropout masks) as step k of the inner loop did.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..evaluation import Evaluator
from ..evaluation.evaluator import task_rows
from ..evaluation.strategy import no_trace
from ..params import ParamLayout
from ..profiling import annotate
from ..tasks import TaskBatch
from .base import MetaResult


def check_recompute(recompute, recompute_chunk, first_order: bool) -> tuple[bool, Optional[int]]:
    """Validate MAML's ``recompute`` / ``recompute_chunk`` options (``ValueError`` naming the argument).

    The reverse chain is that of plain SGD inner steps ``w_{k+1} = w_k - alpha g_k`` with a fixed
    float ``alpha`` (MAML refuses ``recompute`` with an ``inner_optimizer``).
    """
    if not isinstance(recompute, bool):
        raise ValueError(f"recompute: expected a bool, got {recompute!r}")
    if recompute and first_order:
        raise ValueError("recompute: applies to second-order MAML; first_order=True keeps no inner-step graph "
                         "to recompute")
    if recompute_chunk is not None:
        if not recompute:
            raise ValueError("recompute_chunk: only used with recompute=True")
        if isinstance(recompute_chunk, bool) or not isinstance(recompute_chunk, int) or recompute_chunk < 1:
            raise ValueError(f"recompute_chunk: expected None or an int >= 1, got {recompute_chunk!r}")
    return recompute, recompute_chunk


def _rng_devices(layout: ParamLayout) -> list:
    return [layout.device.index or 0] if layout.device.type == "cuda" else []


def _rng_state(devices: list) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state: tuple, devices: list) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in zip(devices, cuda):
        torch.cuda.set_rng_state(s, d)


def _replay(ev: Evaluator, devices: list):
    """Within: forwards that repeat earlier ones leave no trace. Buffers (batch-norm running
    statistics and counters; a fused ``ev.net`` shares the model's) are restored on exit -- the inner
    loop's forwards already updated them once, as the default mode does -- and so is the global RNG
    (the caller sets each step's saved state inside; afterwards the stream continues where the query
    forward left it). ``devices`` (the CUDA devices whose RNG is replayed) are the model's, which
    :func:`~fastmeta.evaluation.strategy.no_trace` forks."""
    return no_trace(ev.model)


def _chunk_pass(ev: Evaluator, layout: ParamLayout, adapted: torch.Tensor, shared: torch.Tensor, b: TaskBatch,
                lr: float, steps: int):
    """One chunk of tasks: ``(grad_sum [P], query losses [T], query outputs [T, N_q, ...])``."""
    T = b.num_tasks
    has_shared = layout.P > layout.D
    devices = _rng_devices(layout)
    # Under ANIL feature caching the support features (and their body graph) are memoized per
    # (shared, x) object pair: every call must pass this very ``sh`` so that the inner loop, the
    # query and each recomputed step share one body evaluation. Without caching, the no-graph
    # inner loop gets a detached copy, so that no body graph is even recorded.
    sh = shared.detach().requires_grad_(has_shared)
    cached = bool(getattr(ev, "caches_features", False))
    x, y = b.support_x, b.support_y

    with annotate("inner"):
        # Sharp-MAML eq. 9, K times, without a graph: only the iterates and the RNG state each
        # step's forward started from are kept (dropout masks are drawn in the forward).
        w = task_rows(adapted.detach(), T)
        iterates, rng = [], []
        for _ in range(steps):
            iterates.append(w)
            rng.append(_rng_state(devices))
            _, g = ev.grads(w, sh if cached else sh.detach(), x, y, create_graph=False)
            w = w - lr * g

    with annotate("outer"):
        w_K = w.detach().requires_grad_()
        with torch.enable_grad():
            q, out = ev.losses(w_K, sh, b.query_x, b.query_y, return_outputs=True)
            grads = torch.autograd.grad(q.sum(), [w_K, sh] if has_shared else [w_K])
        v = grads[0]  # v_K [T, D]
        g_sh = grads[1] if has_shared else None  # grad_s L(w_K, s; D'), summed over the chunk's tasks

    # Decided after the inner loop: the first forward may have verified (or turned off) the cache.
    cached = has_shared and bool(getattr(ev, "caches_features", False))
    mixed = None
    with annotate("recompute"), _replay(ev, devices):
        for k in reversed(range(steps)):
            _set_rng_state(rng[k], devices)  # step k's dropout masks
            w_k = iterates[k].detach().requires_grad_()
            with torch.enable_grad():
                _, g = ev.grads(w_k, sh, x, y, create_graph=True)  # g_k [T, D], differentiable
                if not has_shared:
                    (hv,) = torch.autograd.grad(g, w_k, v)
                elif not cached:
                    # [H_ww v, H_sw v] in one backward; this step's graph is freed afterwards.
                    hv, hs = torch.autograd.grad(g, [w_k, sh], v)
                    g_sh = g_sh - lr * hs
                else:
                    # The cached body graph is shared by all steps and may be traversed once only:
                    # H_ww v now (the head's graph only), the H_sw v terms as one backward at the end
                    # through sum_k <g_k, v_{k+1}> (v held constant). Keeps K head graphs, which
                    # are small next to the body's graph that the cache holds anyway.
                    (hv,) = torch.autograd.grad(g, w_k, v, retain_graph=True)
                    term = (g * v).sum()
                    mixed = term if mixed is None else mixed + term
            v = v - lr * hv  # v_k = (I - alpha H_ww(w_k)) v_{k+1}
        if mixed is not None:
            (hs,) = torch.autograd.grad(mixed, sh)
            g_sh = g_sh - lr * hs
    total = torch.cat([v.sum(0), g_sh]) if has_shared else v.sum(0)
    return total, q.detach(), out.detach()


def recompute_meta_grad(ev: Evaluator, layout: ParamLayout, theta: torch.Tensor, batch: TaskBatch, lr: float,
                        steps: int, chunk: Optional[int] = None) -> MetaResult:
    """Second-order MAML meta-gradient ``[P]`` (mean over tasks, Fallah eq. 5 with K inner steps of
    Sharp-MAML eq. 9) with each inner step's graph rebuilt during the meta-backward instead of kept.

    Same value as :meth:`MAML.meta_grad` to round-off; peak autograd memory is one inner step's
    double-backward graph (or the query forward's) for one chunk, independent of K, plus the
    iterates ``K x [T, D]``. ``chunk``: tasks per recomputed chunk (``None``: the evaluator's own
    chunks -- one task for ``loop``, the whole meta-batch for ``vmap``/``bmm``). Chunks go through
    :meth:`Evaluator.over_tasks` (mean over tasks, distributed reduction, feature scopes).
    """
    adapted, shared = layout.split(theta.detach())

    def task_pass(b: TaskBatch):
        if chunk is None or b.num_tasks <= chunk:
            return _chunk_pass(ev, layout, adapted, shared, b, lr, steps)
        total, qs, outs = None, [], []
        for start in range(0, b.num_tasks, chunk):
            with ev.feature_scope():  # cached features live for one sub-chunk
                g, q, out = _chunk_pass(ev, layout, adapted, shared, b.select(slice(start, start + chunk)), lr, steps)
            total = g if total is None else total + g
            qs.append(q)
            outs.append(out)
        return total, torch.cat(qs), torch.cat(outs)

    g, q, out = ev.over_tasks(task_pass, batch)
    return MetaResult(g, q, out)
