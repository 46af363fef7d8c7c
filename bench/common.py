"""Shared workloads, baselines and measuring tools for fastmeta's benchmarks.

Everything timed in ``bench/`` and by ``fastmeta bench`` is built here, so the step benchmark, the
peer comparison and the CLI table time exactly the same computations:

* **workloads** -- sine MLP 1-40-40-1 (10-shot, meta-batch 25) and Conv-4 Omniglot 5-way 1-shot,
  15 queries per class, meta-batch 16 (real images from the shared subsets when found, otherwise
  random images of the same shape, which cost the same to convolve);
* **implementations** of one meta-gradient on a fixed batch: the plain per-task loop (imported
  from ``tests/reference.py`` so the benchmark and the test oracle never drift), fastmeta
  (``MetaLearner`` with optional speed modes), the peers (higher, torchopt, learn2learn when
  importable) and the *compute floor* (the same forward/backward passes written by hand with
  ``torch.nn.functional``, no library machinery);
* **checks**: every implementation's meta-gradient is compared with the plain loop's in float64 on
  a fixed seed before it is timed (a fast wrong result is reported as wrong, never timed);
* **measuring**: interleaved round-robin timing (one round runs every implementation once, so a
  noisy shared machine slows all of them alike), GEMM GFLOP/s in fp32 and bf16, FLOPs of a step
  with ``torch.utils.flop_counter``, and peak RSS of one configuration in its own process
  (``python bench/common.py rss ...``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import fastmeta  # noqa: E402
from fastmeta.models import Conv4, SineMLP  # noqa: E402
from fastmeta.params import ParamLayout  # noqa: E402
from fastmeta.tasks import TaskBatch  # noqa: E402
from tests.reference import flat, maml_meta_grad, rel_err  # noqa: E402

# Relative error against the float64 plain loop that counts as "the same meta-gradient". Exact
# implementations land at 1e-15..1e-12 (summation order only).
GRAD_TOL = 1e-9
BF16_TOL = dict(rel_err=0.3, cos=0.98)


# ---------------------------------------------------------------------------------------- data
def omniglot_roots() -> list[Path]:
    """The shared Omniglot subsets (``$FASTMETA_OMNIGLOT`` or ``<repo>/../shared/data/omniglot``)."""
    base = Path(os.environ.get("FASTMETA_OMNIGLOT", REPO.parent / "shared" / "data" / "omniglot"))
    return sorted(base.glob("images_background_small*.zip")) if base.is_dir() else []


_OMNIGLOT = {}


def omniglot_data():
    """``fastmeta.data.Omniglot`` over the shared subsets (cached per process), or None."""
    roots = omniglot_roots()
    if not roots:
        return None
    key = tuple(map(str, roots))
    if key not in _OMNIGLOT:
        from fastmeta.data import Omniglot

        _OMNIGLOT[key] = Omniglot(roots)
    return _OMNIGLOT[key]


@dataclass
class Workload:
    """One benchmark configuration: a model, its loss, the MAML inner rate and a fixed batch."""

    name: str
    title: str
    model_fn: Callable[[], torch.nn.Module]
    loss_fn: str
    inner_lr: float
    meta_batch: int
    sample: Callable[[int, torch.dtype], TaskBatch]
    data_source: str = ""
    conv: bool = False
    extra: dict = field(default_factory=dict)

    def batch(self, dtype=torch.float32, num_tasks: Optional[int] = None) -> TaskBatch:
        return self.sample(num_tasks or self.meta_batch, dtype)

    def model(self, dtype=torch.float32, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self.model_fn().to(dtype)


def sine_workload(meta_batch: int = 25, shots: int = 10) -> Workload:
    from fastmeta.data import SinusoidTasks

    def sample(T, dtype):
        return SinusoidTasks(shots, shots, seed=0, dtype=dtype).sample(T)

    return Workload("sine", f"sine MLP 1-40-40-1, {shots}-shot, meta-batch {meta_batch}", SineMLP, "mse", 0.01,
                    meta_batch, sample, "synthetic sinusoids")


def conv4_workload(meta_batch: int = 16, ways: int = 5, shots: int = 1, queries: int = 15) -> Workload:
    data = omniglot_data()

    def sample(T, dtype):
        if data is not None:
            from fastmeta.data import OmniglotTasks

            return OmniglotTasks(data, data.alphabets, ways=ways, shots=shots, queries=queries, seed=0,
                                 dtype=dtype).sample(T)
        g = torch.Generator().manual_seed(0)
        sx = torch.rand(T, ways * shots, 1, 28, 28, generator=g, dtype=torch.float64).to(dtype)
        qx = torch.rand(T, ways * queries, 1, 28, 28, generator=g, dtype=torch.float64).to(dtype)
        lab = torch.arange(ways)
        return TaskBatch(sx, lab.repeat_interleave(shots).expand(T, -1), qx,
                         lab.repeat_interleave(queries).expand(T, -1), ways=ways)

    src = "shared Omniglot subsets" if data is not None else "random 28x28 images (Omniglot subsets not found)"
    return Workload("conv4", f"Conv-4 Omniglot {ways}w{shots}s, {queries} queries, meta-batch {meta_batch}",
                    lambda: Conv4(ways), "cross_entropy", 0.4, meta_batch, sample, src, conv=True)


def workload(name: str, small: bool = False) -> Workload:
    """``"sine"`` or ``"conv4"``; ``small=True`` (or the suffix ``-small``) is the CI smoke preset
    (a few tasks, few queries); ``"conv4-mb4"`` is Conv-4 at meta-batch 4 (``fastmeta bench``'s
    fast preset)."""
    if name.endswith("-small"):
        return workload(name[: -len("-small")], small=True)
    if name == "conv4-mb4":
        return conv4_workload(meta_batch=4)
    if name == "sine":
        return sine_workload(meta_batch=4) if small else sine_workload()
    if name == "conv4":
        return conv4_workload(meta_batch=2, queries=2) if small else conv4_workload()
    raise ValueError(f"name: unknown workload {name!r} (expected 'sine' or 'conv4')")


def _loss(wl: Workload):
    return F.mse_loss if wl.loss_fn == "mse" else F.cross_entropy


# ---------------------------------------------------------------------------------------- peers
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
# Each ``make_*`` returns a zero-argument callable running one meta-gradient on a fixed batch and
# returning the flat gradient ``[P]`` in fastmeta's layout order (mean over tasks), so any two can
# be compared. Model and batch are built outside the timed call.

def make_plain(wl: Workload, model, batch, first_order: bool):
    layout = ParamLayout(model, "all")
    names = [n for n, _ in model.named_parameters()]
    loss = _loss(wl)

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
    loss = _loss(wl)
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
        return torch.cat([g.reshape(-1) for g in _order(model, layout, total)])
    return run


def make_torchopt(wl: Workload, model, batch, first_order: bool):
    import torchopt
    from torch.func import functional_call

    layout = ParamLayout(model, "all")
    loss = _loss(wl)
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
        return torch.cat([g.reshape(-1) for g in _order(model, layout, total)])
    return run


def make_learn2learn(wl: Workload, model, batch, first_order: bool):
    import learn2learn as l2l

    layout = ParamLayout(model, "all")
    loss = _loss(wl)
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
        return torch.cat([g.reshape(-1) for g in _order(model, layout, total)])
    return run


def _order(model, layout: ParamLayout, grads: list) -> list:
    by_name = dict(zip([n for n, _ in model.named_parameters()], grads))
    return [by_name[s.name] for s in layout.slots]


# ---------------------------------------------------------------------------------------- compute floor
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
    loss = _loss(wl)
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
        return torch.cat([g.reshape(-1) for g in _order(model, layout, total)])
    return run


# ---------------------------------------------------------------------------------------- configurations
# name -> (factory, kwargs). fastmeta speed modes are fastmeta rows with MetaLearner flags.
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


# ---------------------------------------------------------------------------------------- checks
def check_gradient(wl: Workload, make, first_order: bool, bf16: bool = False, tasks: int = 2) -> dict:
    """Compare one implementation's meta-gradient with the plain loop's on a fixed seed.

    Exact implementations are checked in float64 (rel. error < ``GRAD_TOL``). A bf16 mode cannot
    run in float64, so it is checked against the float64 plain loop with the bf16 tolerances
    ``BF16_TOL``: bf16 keeps 8 mantissa bits (~4e-3 per rounding), and a second-order Conv-4
    meta-gradient through four batch norms measured 0.10-0.20 relative error (cosine ~0.99) here.
    That only says the direction is right; bf16's usefulness is judged by meta-test accuracy.
    Returns ``{"ok", "rel_err", "cos", "tol", "dtype"}``.
    """
    n = min(tasks, wl.meta_batch)
    ref = make_plain(wl, wl.model(torch.float64), wl.batch(torch.float64, num_tasks=n), first_order)()
    dtype = torch.float32 if bf16 else torch.float64
    got = make(wl, wl.model(dtype), wl.batch(dtype, num_tasks=n), first_order)()
    err = rel_err(got.double(), ref)
    tol = BF16_TOL["rel_err"] if bf16 else GRAD_TOL
    cos = float(F.cosine_similarity(got.double(), ref, dim=0))
    ok = bool(math.isfinite(err) and err < tol and (not bf16 or cos > BF16_TOL["cos"]))
    return dict(ok=ok, rel_err=err, cos=cos, tol=tol, dtype=str(dtype).replace("torch.", ""))


def smoke(config) -> bool:
    """True for the CI smoke run (small presets, each benchmark once). pyproject's addopts pass
    ``--benchmark-disable``; an explicit ``--benchmark-enable`` on the command line wins, as it
    does in pytest-benchmark itself (checking ``benchmark_disable`` alone ignored it)."""
    return bool(config.getoption("benchmark_disable")) and not config.getoption("benchmark_enable")


# ---------------------------------------------------------------------------------------- timing
def time_interleaved(fns: dict[str, Callable], rounds: int, warmup: int = 1,
                     settle_seconds: float = 0.01, max_settle: int = 10) -> dict[str, list[float]]:
    """Round-robin timing: each round times every function once (seconds per call).

    Each timed call directly follows untimed calls of the same function -- as many as take about
    ``settle_seconds`` (at least 1, at most ``max_settle``; measured on the warm-up call) -- as
    step t follows steps t-1, t-2, ... in a training loop. Timing the first call after a different
    implementation let the order decide: on the sine MLP, fastmeta always ran right after
    torchopt's 12 ms step (0.88 ms there, 0.80 ms after its own step) and the compute floor right
    after fastmeta, whose data it shares (0.70 ms) -- 1.26x apart instead of the 1.15x both show
    after their own steps. One settling call was not quite enough either: after the peers' 12-25
    ms steps, a ~1 ms step still ran ~4% slow on its second call (sine, min of 30 rounds,
    fastmeta/floor: 1.16-1.18x with one settling call, 1.13-1.14x with ten; each step of Conv-4
    (0.2-0.7 s) gets one, as before).
    """
    settle = {}
    for _ in range(warmup):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            settle[k] = max(1, min(max_settle, int(settle_seconds / max(time.perf_counter() - t0, 1e-9))))
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            for _ in range(settle.get(k, 1)):
                f()
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def summary(ts: list[float]) -> float:
    """The statistic reported: the minimum over rounds (least disturbed by other processes)."""
    return min(ts)


def gemm_gflops(dtype=torch.float32, n: int = 1024, seconds: float = 0.5) -> float:
    """GFLOP/s of an ``n x n @ n x n`` matmul in ``dtype`` (best of repeated calls)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end or best == float("inf"):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def count_flops(fn: Callable) -> int:
    """FLOPs of one call of ``fn`` (``torch.utils.flop_counter``: matmuls and convolutions,
    forward and every backward, including double backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def stall_fraction(seconds: float = 2.0, gap: float = 0.005) -> float:
    """Fraction of ``seconds`` of wall clock during which a pure-Python busy loop did not run
    (gaps longer than ``gap`` between consecutive clock reads): CPU steal by the host, or other
    processes. On an idle, dedicated core this is ~0; the development VM measured 0.3-0.7."""
    t0 = last = time.perf_counter()
    lost = 0.0
    while last - t0 < seconds:
        now = time.perf_counter()
        if now - last > gap:
            lost += now - last
        last = now
    return lost / (last - t0)


def machine() -> dict:
    """What the numbers were measured on (``stall_fraction``: see :func:`stall_fraction`)."""
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = ""
    with contextlib.suppress(OSError):
        txt = Path("/proc/cpuinfo").read_text()
        flags = " ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in txt)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return dict(cpu=cpu, isa=flags, cores=os.cpu_count(), threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(), load1=round(load, 2),
                cuda=torch.cuda.is_available(), stall_fraction=round(stall_fraction(), 3))


# ---------------------------------------------------------------------------------------- memory
def peak_rss_subprocess(workload_name: str, impl: str, first_order: bool, small: bool = False,
                        timeout: float = 900) -> Optional[float]:
    """Peak RSS (MiB) of a fresh process that builds ``impl`` on ``workload_name`` and runs two
    steps. Each configuration gets its own process so allocations do not mix."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "rss", "--workload", workload_name, "--impl", impl]
    if first_order:
        cmd.append("--first-order")
    if small:
        cmd.append("--small")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout
        return float(json.loads(out.strip().splitlines()[-1])["peak_rss_mib"])
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError):
        return None


def _status_mib(key: str) -> Optional[float]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def step_peak_rss(run: Callable, steps: int = 2) -> dict:
    """Peak RSS (MiB) while ``run`` is called ``steps`` times, and its growth over the RSS before.

    ``run`` is called once first, unmeasured: one-time setup (strategy choice, lazy inits) is not
    the step's working memory.

    The process's lifetime high-water mark is useless here: decoding the Omniglot zips peaks above
    any meta-training step, so every configuration would report the loader's peak (seen: 1045 MiB
    for all twelve algorithms). Instead the freed heap is returned to the OS (``malloc_trim``) and
    Linux's peak counter is reset (``/proc/self/clear_refs`` = 5, Linux >= 4.0) just before the
    steps; ``VmHWM`` afterwards is the steps' own peak. Without that interface, falls back to
    ``ru_maxrss`` and says so in ``method``.
    """
    import ctypes
    import gc

    # The first call of any torch.library custom op imports torch._dynamo (torch/_compile.py's
    # disable wrapper), and with it triton: +160 MiB RSS and ~1 s, once per process. fastmeta's fused
    # ops trigger it, MAML and the peers do not; importing it here for every configuration keeps that
    # one-time cost out of the comparison.
    import torch._dynamo  # noqa: F401

    run()
    gc.collect()
    method = "VmHWM after clear_refs"
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_mib("VmRSS")
    except OSError:
        method, before = "ru_maxrss (lifetime peak: includes data loading)", None
    for _ in range(steps):
        run()
    peak = _status_mib("VmHWM") if before is not None else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    growth = None if before is None else peak - before
    return dict(peak_rss_mib=peak, step_growth_mib=growth, method=method)


def _rss_main(args) -> None:
    wl = workload(args.workload, small=args.small)
    make = implementations(wl)[args.impl]
    model, batch = wl.model(), wl.batch()
    run = make(wl, model, batch, args.first_order)
    print(json.dumps(step_peak_rss(run)))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="helper processes for fastmeta benchmarks")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rss", help="peak RSS of one configuration (prints JSON)")
    r.add_argument("--workload", required=True)
    r.add_argument("--impl", required=True)
    r.add_argument("--first-order", action="store_true")
    r.add_argument("--small", action="store_true")
    a = p.parse_args()
    _rss_main(a)
