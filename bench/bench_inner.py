"""Learned inner rates and differentiable inner optimizers: step time relative to plain MAML.

Configurations (each at 1 and 5 inner steps, second order): Meta-SGD (per-entry rates [D]),
MAML++ (LSLR rates [K, L] and the multi-step loss at its first epoch: K query evaluations), MAML
with an SGD-momentum (0.9, Nesterov) and an Adam inner optimizer -- each as a ratio to plain MAML's
step with the same inner steps, timed in ONE interleaved run (``timing.time_interleaved``).
Workloads (``bench/workloads.py``): the sine MLP 1-40-40-1 (``bmm`` strategy) and Conv-4 Omniglot
5-way 1-shot, 15 queries, meta-batch 16, float32 (``loop`` strategy; random images when the shared
Omniglot subsets are absent).

    python bench/bench_inner.py                         # both workloads, ratio table
    python bench/bench_inner.py --workloads sine --rounds 20
    pytest bench/bench_inner.py --benchmark-disable     # CI smoke: small presets, each once

Under pytest every configuration's meta-gradient is first checked once, in float64 on two tasks of
the small preset, against the tests' plain per-task loop (``tests/reference_inner.py``), and
against plain MAML's to show the check can fail, so a fast wrong step fails instead of timing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import fastmeta  # noqa: E402
from fastmeta.algorithms.mamlpp import MAMLPlusPlus  # noqa: E402
from fastmeta.algorithms.metasgd import MetaSGD  # noqa: E402
from fastmeta.cli.bench import load_file  # noqa: E402
from fastmeta.evaluation.inner_optim import InnerAdam, InnerSGD  # noqa: E402
from oracle import maml_meta_grad, rel_err  # noqa: E402
from timing import summary, time_interleaved  # noqa: E402
from workloads import loss_of, smoke, workload  # noqa: E402

# The tests' oracle, loaded by path under a private name (see bench/oracle.py on why not `tests.`).
ref = load_file("fastmeta_bench_reference_inner", REPO / "tests" / "reference_inner.py")

MOMENTUM = dict(momentum=0.9, nesterov=True)
# name -> factory(inner_lr, steps)
KINDS = {
    "maml": lambda lr, k: fastmeta.MAML(lr, k),
    "metasgd": lambda lr, k: MetaSGD(lr, k),
    "mamlpp": lambda lr, k: MAMLPlusPlus(lr, k),  # epoch 0: MSL on (uniform weights), second order
    "maml-momentum": lambda lr, k: fastmeta.MAML(lr, k, inner_optimizer=InnerSGD(**MOMENTUM)),
    "maml-adam": lambda lr, k: fastmeta.MAML(lr, k, inner_optimizer=InnerAdam()),
}
STEPS = (1, 5)
STRATEGY = {"sine": "bmm", "conv4": "loop"}
CONFIGS = [f"{kind}-{k}" for k in STEPS for kind in KINDS]


def _parse(name: str):
    kind, k = name.rsplit("-", 1)
    return kind, int(k)


def make_step(wl_name: str, name: str, small: bool = False):
    """A zero-argument callable running one meta-gradient of configuration ``name`` on the workload."""
    kind, k = _parse(name)
    wl = workload(wl_name, small=small)
    model, batch = wl.model(), wl.batch()
    learner = fastmeta.MetaLearner(model, KINDS[kind](wl.inner_lr, k), loss_fn=wl.loss_fn,
                                   strategy=STRATEGY[wl_name])
    return lambda: learner.meta_gradient(batch)


def plain(name: str, algo, model, batch, loss_fn, lr: float) -> torch.Tensor:
    """The configuration's meta-gradient ``[P + R]`` from the tests' plain per-task loop."""
    kind, k = _parse(name)
    names = [n for n, _ in model.named_parameters()]
    leaves, rule, weights = [], None, None
    rate = lambda t, n: lr  # noqa: E731
    if kind == "metasgd":
        alpha = algo.alpha.detach().clone().requires_grad_()
        leaves = [alpha]
        rate = lambda t, n: ref.split_named(alpha, model, names)[n]  # noqa: E731
    elif kind == "mamlpp":
        rates = algo.rates.detach().clone().requires_grad_()
        leaves = [rates]
        rate = lambda t, n: rates[t, names.index(n)]  # noqa: E731
        weights = [1.0 / k] * k if k > 1 else None  # msl_weights at epoch 0: uniform
    elif kind == "maml-momentum":
        rule = ref.sgd_rule(**MOMENTUM)
    elif kind == "maml-adam":
        rule = ref.adam_rule()
    g, gl = ref.meta_grad(model, batch, loss_fn, names, k, rate, False, rule, weights, leaves)
    return torch.cat([g[n].reshape(-1) for n in names] + [x.reshape(-1) for x in gl])


def check_config(wl_name: str, name: str, tasks: int = 2) -> float:
    """Relative error of ``name``'s meta-gradient against the plain loop (float64, small preset);
    asserts < 1e-9 and that plain MAML's meta-gradient differs from that loop's (except for MAML,
    checked against the benchmark oracle)."""
    kind, k = _parse(name)
    wl = workload(wl_name, small=True)
    model, batch = wl.model(torch.float64), wl.batch(torch.float64, num_tasks=tasks)
    loss_fn = loss_of(wl)
    algo = KINDS[kind](wl.inner_lr, k)
    learner = fastmeta.MetaLearner(model, algo, loss_fn=wl.loss_fn, strategy=STRATEGY[wl_name])
    got = learner.meta_gradient(batch).grad
    names = [n for n, _ in model.named_parameters()]
    maml = maml_meta_grad(model, batch, loss_fn, wl.inner_lr, k, names)
    maml = torch.cat([maml[n].reshape(-1) for n in names])
    want = maml if kind == "maml" else plain(name, algo, model, batch, loss_fn, wl.inner_lr)
    err = rel_err(got, want)
    assert err < 1e-9, f"{wl_name} {name}: meta-gradient differs from the plain per-task loop (rel. error {err:.3e})"
    if kind in ("maml-momentum", "maml-adam") or (kind == "mamlpp" and k > 1):
        # Learned rates start at inner_lr (theta-part = MAML's); these change theta's gradient itself.
        assert rel_err(want[:maml.numel()], maml) > 1e-6, f"{name}: the check cannot tell it from MAML"
    return err


def measure(wl_name: str, names, rounds: int, small: bool = False) -> dict[str, float]:
    steps = {n: make_step(wl_name, n, small) for n in names}
    times = time_interleaved(steps, rounds=rounds, warmup=1)
    return {n: summary(t) for n, t in times.items()}


def table(times: dict[str, float]) -> str:
    lines = ["config              step (ms)   ratio to maml-K"]
    for n, t in times.items():
        base = times.get(f"maml-{_parse(n)[1]}")
        lines.append(f"{n:<19} {1e3 * t:9.2f}   {t / base if base else float('nan'):6.2f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ pytest
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("wl_name", ["sine", "conv4"])
def test_bench_inner_step(benchmark, request, wl_name, name):
    small = smoke(request.config)
    if wl_name == "conv4" and _parse(name)[1] > 1 and small:
        k_check = 2  # the 5-step Conv-4 check is slow in float64: the smoke run checks 2 steps' code path
        err = check_config(wl_name, f"{_parse(name)[0]}-{k_check}")
    else:
        err = check_config(wl_name, name)  # once, before anything is timed
    run = make_step(wl_name, name, small=small)
    benchmark.group = f"inner rates / optimizers ({wl_name})"
    benchmark.extra_info.update(config=name, workload=wl_name, strategy=STRATEGY[wl_name],
                                threads=torch.get_num_threads(), grad_check_rel_err=err)
    benchmark.pedantic(run, rounds=1 if small else 3, iterations=1)


# ------------------------------------------------------------------------------------ script
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=["sine", "conv4"], choices=["sine", "conv4"])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--small", action="store_true", help="CI preset (few tasks)")
    p.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    p.add_argument("--no-check", action="store_true", help="skip the float64 check against the plain loop")
    a = p.parse_args()
    for wl_name in a.workloads:
        wl = workload(wl_name, small=a.small)
        if not a.no_check:
            for n in a.configs:
                check_config(wl_name, n)
        print(f"\n{wl.title}, float32, strategy {STRATEGY[wl_name]}, data: {wl.data_source}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(table(measure(wl_name, a.configs, a.rounds, a.small)))


if __name__ == "__main__":
    main()
