"""The compatibility layers against the libraries they replace: one second-order MAML meta-gradient
on Conv-4, Omniglot-shaped 5-way 1-shot tasks (synthetic images), 15 queries, meta-batch 16,
one inner SGD step, through

* ``compat.learn2learn``: the canonical learn2learn loop with ``fastmeta.compat.learn2learn``;
* ``learn2learn-equivalent``: the same loop on learn2learn's mechanism, written here (learn2learn
  itself does not build on this Python): per task a copy of the module tree whose parameters are
  ``p.clone()`` (``clone_module``), ``torch.autograd.grad(create_graph=True)``, and parameters
  swapped for ``p - lr * g`` (``update_module``);
* ``higher`` (when importable) and ``compat.higher``: ``innerloop_ctx(copy_initial_weights=False)``;
* ``MetaLearner``: fastmeta's batched driver.

Each row's meta-gradient (mean over tasks) is checked once against the plain per-task loop
(``oracle.maml_meta_grad``) before anything is timed, so a fast wrong row fails.

    pytest bench/bench_compat.py --benchmark-enable          # pytest-benchmark, group per workload
    python bench/bench_compat.py --rounds 5                  # interleaved rounds, same-run ratios
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import fastmeta
import fastmeta.compat.higher as compat_higher
import fastmeta.compat.learn2learn as compat_l2l
from fastmeta.params import ParamLayout
from oracle import flat, maml_meta_grad

INNER_LR = 0.4
ROWS = ["compat.learn2learn", "learn2learn-equivalent", "higher", "compat.higher", "MetaLearner"]


def make_case(meta_batch=16, queries=15, ways=5, seed=0):
    torch.manual_seed(seed)
    model = fastmeta.Conv4(ways)
    g = torch.Generator().manual_seed(seed)
    lab = torch.arange(ways)
    batch = fastmeta.TaskBatch(torch.rand(meta_batch, ways, 1, 28, 28, generator=g), lab.expand(meta_batch, -1),
                               torch.rand(meta_batch, ways * queries, 1, 28, 28, generator=g),
                               lab.repeat_interleave(queries).expand(meta_batch, -1), ways=ways)
    return model, batch


def _l2l_clone(module):
    # clone_module's mechanism: a new object per module sharing everything but the parameter
    # dict, whose entries are differentiable clones.
    new = copy.copy(module)
    new._parameters = {k: None if p is None else p.clone() for k, p in module._parameters.items()}
    new._buffers = dict(module._buffers)
    new._modules = {k: _l2l_clone(m) for k, m in module._modules.items()}
    return new


def _l2l_update(module, new_params: iter):
    for k, p in module._parameters.items():
        if p is not None:
            module._parameters[k] = next(new_params)
    for m in module._modules.values():
        _l2l_update(m, new_params)


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def make_row(name, model, batch):
    """A zero-argument callable returning the meta-gradient (list, model.parameters() order)."""
    T = batch.num_tasks
    sx, sy, qx, qy = batch.support_x, batch.support_y, batch.query_x, batch.query_y
    if name == "MetaLearner":
        learner = fastmeta.MetaLearner(model, fastmeta.MAML(inner_lr=INNER_LR))
        learner.evaluator(batch)  # "auto" picks its strategy here, outside the timed call
        layout = learner.layout

        def run():
            flat_grad = learner.meta_gradient(batch).grad
            by_name = {s.name: flat_grad[s.offset:s.offset + s.numel].view(s.shape) for s in layout.slots}
            return [by_name[n] for n, _ in model.named_parameters()]
        return run

    def run():
        model.zero_grad()
        if name == "compat.learn2learn":
            maml = compat_l2l.algorithms.MAML(model, lr=INNER_LR)
            for t in range(T):
                learner = maml.clone()
                learner.adapt(F.cross_entropy(learner(sx[t]), sy[t]))
                (F.cross_entropy(learner(qx[t]), qy[t]) / T).backward()
        elif name == "learn2learn-equivalent":
            for t in range(T):
                clone = _l2l_clone(model)
                params = list(clone.parameters())
                grads = torch.autograd.grad(F.cross_entropy(clone(sx[t]), sy[t]), params, create_graph=True)
                _l2l_update(clone, iter([p - INNER_LR * g for p, g in zip(params, grads)]))
                (F.cross_entropy(clone(qx[t]), qy[t]) / T).backward()
        else:
            lib = compat_higher if name == "compat.higher" else pytest.importorskip("higher")
            inner = torch.optim.SGD(model.parameters(), lr=INNER_LR)
            for t in range(T):
                with lib.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                    diffopt.step(F.cross_entropy(fmodel(sx[t]), sy[t]))
                    (F.cross_entropy(fmodel(qx[t]), qy[t]) / T).backward()
        return _grads(model)
    return run


def check(name, run, model, batch) -> float:
    """Relative error of the row's meta-gradient against the plain loop (float32: <= 1e-4)."""
    layout = ParamLayout(model, "all")
    names = [n for n, _ in model.named_parameters()]
    ref = flat(maml_meta_grad(model, batch, F.cross_entropy, INNER_LR, 1, names), layout)
    got = flat(dict(zip(names, run())), layout)
    err = float((got - ref).norm() / ref.norm())
    assert err <= 1e-4, f"{name}: meta-gradient off by {err:.2e} relative to the plain loop"
    return err


@pytest.mark.parametrize("name", ROWS)
def test_compat(benchmark, request, name):
    disabled = request.config.getoption("benchmark_disable") and not request.config.getoption("benchmark_enable")
    model, batch = make_case(meta_batch=2, queries=2) if disabled else make_case()
    run = make_row(name, model, batch)
    benchmark.extra_info["rel_err_vs_plain_loop"] = check(name, run, model, batch)
    benchmark.extra_info.update(threads=torch.get_num_threads(), torch=torch.__version__)
    benchmark.group = f"compat Conv-4 5w1s meta-batch {batch.num_tasks} second order"
    benchmark.pedantic(run, rounds=1 if disabled else 5, iterations=1, warmup_rounds=0 if disabled else 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description="compat layers vs the libraries they replace (same-run ratios)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--meta-batch", type=int, default=16)
    args = ap.parse_args(argv)
    model, batch = make_case(meta_batch=args.meta_batch)
    rows = {}
    for name in ROWS:
        try:
            rows[name] = make_row(name, model, batch)
            print(f"{name}: checked, {check(name, rows[name], model, batch):.1e} relative to the plain loop")
        except pytest.skip.Exception as e:
            print(f"{name}: skipped ({e})")
            rows.pop(name, None)
    times = {n: [] for n in rows}
    for _ in range(args.rounds):  # interleaved: every row once per round
        for name, run in rows.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["learn2learn-equivalent"])
    print(f"\nmedian of {args.rounds} interleaved rounds, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:>24}: {1e3 * med:8.1f} ms   {base / med:5.2f}x vs learn2learn-equivalent")


if __name__ == "__main__":
    main()
