"""The benchmarks' oracle: a plain per-task MAML loop written here, and the tests' loops by path.

``maml_meta_grad`` is the "plain loop" row of the benchmark tables and what every other row's
meta-gradient is checked against (``checks.py``). It is written out in this file, one task at a
time with ``torch.autograd.grad``, from the papers' equations, and calls no fastmeta code, so a
fastmeta row agreeing with it says something. It is in turn checked against the tests' own oracle,
``tests/reference.py`` (``bench_algorithms.py::test_bench_oracle_matches_the_tests_reference``):
two loops written independently that agree to 1e-9 in float64.

``tests/reference.py`` (the loops for HF-MAML and Sharp-MAML, used by ``bench_algorithms.py``) is
loaded from its file under the private module name ``fastmeta_bench_reference`` rather than
imported as ``tests.reference``: ``tests`` is a common top-level package name (learn2learn 0.2.0
installs one), and whichever comes first on the path would shadow the repository's folder.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.func import functional_call

from fastmeta.cli.bench import load_file

PATH = Path(__file__).resolve().parents[1] / "tests" / "reference.py"
MODULE = "fastmeta_bench_reference"


def maml_meta_grad(model, batch, loss_fn, inner_lr: float, inner_steps: int, adapt_names,
                   first_order: bool = False) -> dict:
    """MAML's meta-gradient, ``{name: grad}`` over the model's trainable parameters.

    For each task m: ``inner_steps`` steps ``w <- w - inner_lr grad_w L(w; D_m)`` on the support
    set over ``adapt_names`` (Sharp-MAML eq. 9, MAML Alg. 2), then ``d/dtheta L(w; D'_m)`` on the
    query set, differentiating through the steps (``first_order``: the inner gradients held
    constant, Fallah eq. 8); the mean over the ``T`` tasks of ``batch`` (``support_x [T, N, ...]``).
    """
    theta = {n: p for n, p in model.named_parameters() if p.requires_grad}
    num_tasks = batch.support_x.shape[0]
    out = {n: torch.zeros_like(p) for n, p in theta.items()}
    for m in range(num_tasks):
        w = dict(theta)
        for _ in range(inner_steps):
            support = loss_fn(functional_call(model, w, (batch.support_x[m],)), batch.support_y[m])
            step = torch.autograd.grad(support, [w[n] for n in adapt_names], create_graph=not first_order)
            for n, g in zip(adapt_names, step):
                w[n] = w[n] - inner_lr * (g.detach() if first_order else g)
        query = loss_fn(functional_call(model, w, (batch.query_x[m],)), batch.query_y[m])
        for n, g in zip(theta, torch.autograd.grad(query, list(theta.values()))):
            out[n] = out[n] + g / num_tasks
    return out


def flat(grads: dict, layout) -> torch.Tensor:
    """``grads`` as one vector in the order of ``layout.slots`` (any object listing ``.name``s)."""
    return torch.cat([grads[s.name].reshape(-1) for s in layout.slots])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``."""
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def load():
    """``tests/reference.py`` as a module (once per process; later calls return the same module)."""
    if not PATH.is_file():
        raise ImportError(f"the plain reference loops are missing: {PATH} not found", path=str(PATH))
    return load_file(MODULE, PATH)


reference = load()
