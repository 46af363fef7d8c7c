"""The implementations of one MAML meta-gradient that the benchmarks compare, and which run where.

* the plain per-task loop (``bench/oracle.py``'s own, checked against ``tests/reference.py``);
* fastmeta (``MetaLearner``), with its CPU speed modes as extra rows on convolutional workloads;
* the peers: higher, torchopt and learn2learn, each when importable (else skipped with the reason);
* the compute floor (``floor``).

Each ``make_*`` returns a zero-argument callable running one meta-gradient on a fixed batch and
returning the flat gradient ``[P]`` in fastmeta's layout order (mean over tasks), so any two can
be compared. Model and batch are built outside the timed call.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch

import fastmeta
from fastmeta.params import ParamLayout
from floor import make_floor
from oracle import flat, maml_meta_grad
from workloads import Workload, flat_in_layout, loss_of


def peer_status() -> dict[str, tuple[bool, str]]:
    """``{peer: (importable, version or the reason it is skipped)}``."""
    out = {}
    for name in ("higher", "torchopt", "learn2learn"):
        try:
            mod = __import__(name)
            out[name] = (True, getattr(mod, "__version__", "?"))
        except Exception as e:  # noqa: BLE001 - any import failure means "skip with the reason"
            reason = f"{type(e).__name__}: {e}"
            if name == "learn2learn":
                reason = ("not installed: learn2learn 0.2.0's sdist does not build on Python "
                          f"{sys.version_info.major}.{sys.version_info.minor} without regenerating its Cython files ({reason})")
            out[name] = (False, reason)
    if "higher" in out and out["higher"][0]:
        out["higher"] = (True, _dist_version("higher"))
    return out


def _dist_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return "?"


# ---------------------------------------------------------------------------------------- implementations
def make_plain(wl: Workload, model, batch, first_order: bool):
    layout = ParamLayout(model, "all")
    names = [n for n, _ in model.named_parameters()]
    loss = loss_of(wl)

    def run():
        return flat(maml_meta_grad(model, batch, loss, wl.inner_lr, 1, names, first_order), layout)
    return run


def make_fastmeta(wl: Workload, model, batch, first_order: bool, strategy: str = "auto",
                  channels_last: bool = False, bf16: bool = False, fused: bool = False):
    algo = fastmeta.FOMAML(wl.inner_lr) if first_order else fastmeta.MAML(wl.inner_lr)
    learner = fastmeta.MetaLearner(model, algo, wl.loss_fn, strategy=strategy,
                                   channels_last=channels_last, bf16=bf16, fused=fused)
    learner.evaluator(batch)  # "auto" measures its strategies here, outside the timed call

    def run():
        return learner.meta_gradient(batch).grad
    run.learner = learner
    return run


def make_higher(wl: Workload, model, batch, first_order: bool):
    import higher

    layout = ParamLayout(model, "all")
    loss = loss_of(wl)
    params = list(model.parameters())
    T = batch.num_tasks

    def run():
        total = [torch.zeros_like(p) for p in params]
        inner = torch.optim.SGD(model.parameters(), lr=wl.inner_lr)
        for t in range(T):
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False,
                                      track_higher_grads=not first_order) as (fmodel, diffopt):
                diffopt.step(loss(fmodel(batch.support_x[t]), batch.support_y[t]))
                q = loss(fmodel(batch.query_x[t]), batch.query_y[t])
                # first order: higher's fast weights are detached copies, so the gradient is taken
                # at them (FO-MAML) and applied to the initial parameters.
                wrt = list(fmodel.parameters()) if first_order else params
                for acc, g in zip(total, torch.autograd.grad(q, wrt)):
                    acc += g / T
        return flat_in_layout(model, layout, total)
    return run


def make_torchopt(wl: Workload, model, batch, first_order: bool):
    import torchopt
    from torch.func import functional_call

    layout = ParamLayout(model, "all")
    loss = loss_of(wl)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    T = batch.num_tasks

    def run():
        total = [torch.zeros_like(p) for p in params]
        for t in range(T):
            if first_order:
                # torchopt's functional API (the MetaOptimizer always differentiates through the step)
                opt = torchopt.sgd(lr=wl.inner_lr)
                state = opt.init(tuple(params))
                grads = torch.autograd.grad(loss(model(batch.support_x[t]), batch.support_y[t]), params)
                updates, _ = opt.update(grads, state, inplace=False)
                fast = [p.detach().requires_grad_() for p in torchopt.apply_updates(tuple(params), updates, inplace=False)]
                q = loss(functional_call(model, dict(zip(names, fast)), (batch.query_x[t],)), batch.query_y[t])
                gs = torch.autograd.grad(q, fast)
            else:
                # torchopt's MAML recipe (examples/few-shot/maml_omniglot.py): MetaSGD steps the
                # module in place through a differentiable update, then restore the state.
                state = torchopt.extract_state_dict(model)
                opt = torchopt.MetaSGD(model, lr=wl.inner_lr)
                opt.step(loss(model(batch.support_x[t]), batch.support_y[t]))
                q = loss(model(batch.query_x[t]), batch.query_y[t])
                gs = torch.autograd.grad(q, params)
                torchopt.recover_state_dict(model, state)
            for acc, g in zip(total, gs):
                acc += g / T
        return flat_in_layout(model, layout, total)
    return run


def make_learn2learn(wl: Workload, model, batch, first_order: bool):
    import learn2learn as l2l

    layout = ParamLayout(model, "all")
    loss = loss_of(wl)
    maml = l2l.algorithms.MAML(model, lr=wl.inner_lr, first_order=first_order)
    params = list(model.parameters())
    T = batch.num_tasks

    def run():
        total = [torch.zeros_like(p) for p in params]
        for t in range(T):
            learner = maml.clone()
            learner.adapt(loss(learner(batch.support_x[t]), batch.support_y[t]))
            q = loss(learner(batch.query_x[t]), batch.query_y[t])
            for acc, g in zip(total, torch.autograd.grad(q, params)):
                acc += g / T
        return flat_in_layout(model, layout, total)
    return run


# ---------------------------------------------------------------------------------------- rows
# fastmeta speed modes are fastmeta rows with MetaLearner flags.
FASTMETA_MODES = {
    "fastmeta": dict(),
    "fastmeta channels_last": dict(channels_last=True),
    "fastmeta bf16": dict(bf16=True),
    "fastmeta fused": dict(fused=True),
    "fastmeta fused+bf16": dict(fused=True, bf16=True),
    "fastmeta fused+bf16+channels_last": dict(fused=True, bf16=True, channels_last=True),
}
PEERS = {"higher": make_higher, "torchopt": make_torchopt, "learn2learn": make_learn2learn}


def implementations(wl: Workload, peers: bool = True, modes: bool = True) -> dict[str, Callable]:
    """``{row name: make(wl, model, batch, first_order)}`` for the rows to measure on ``wl``."""
    impls = {"plain loop": make_plain}
    if peers:
        status = peer_status()
        impls.update({n: f for n, f in PEERS.items() if status[n][0]})
    impls["fastmeta"] = make_fastmeta
    if modes and wl.conv:
        for name, kw in FASTMETA_MODES.items():
            if kw:
                impls[name] = _bind(make_fastmeta, **kw)
    impls["compute floor"] = make_floor
    return impls


def _bind(fn, **kw):
    def make(wl, model, batch, first_order):
        return fn(wl, model, batch, first_order, **kw)
    return make


def is_bf16(name: str) -> bool:
    return "bf16" in name
