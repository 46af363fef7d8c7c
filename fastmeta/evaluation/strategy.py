"""``strategy="auto"``: time the candidate evaluation strategies on the caller's own computation
and keep the fastest. One implementation for :class:`fastmeta.MetaLearner` and
:mod:`fastmeta.analysis`."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..profiling import annotate
from .bmm import BmmPlan
from .evaluator import EVALUATION_STRATEGIES, Evaluator

STRATEGIES = ("auto",) + EVALUATION_STRATEGIES


def candidate_strategies(model: nn.Module) -> tuple[str, ...]:
    """The strategies ``"auto"`` measures for ``model``: ``loop`` and ``vmap``, plus ``bmm`` where the
    model qualifies (:meth:`BmmPlan.reason`)."""
    return ("loop", "vmap") + (("bmm",) if BmmPlan.reason(model) is None else ())


@contextlib.contextmanager
def no_trace(model: nn.Module):
    """Run trial evaluations of ``model`` without leaving a trace: its buffers (batch-norm running
    statistics and counters) and the global RNG states (CPU, and the CUDA devices of the model's
    tensors) are restored on exit, so that timing or probing passes change neither the model nor
    the random stream (Dropout) a run would otherwise see."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({t.device.index or 0 for t in list(model.parameters()) + list(model.buffers())
                      if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has finished the work queued so far (no-op on the CPU, where every op
    has finished when it returns). A host clock read after a GPU call measures only how long the
    launches took to enqueue, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if backend is not None and hasattr(backend, "synchronize"):
            backend.synchronize()


@dataclass
class StrategyChoice:
    """The outcome of :func:`time_strategies`.

    strategy: the fastest candidate (``None`` if every candidate failed). evaluator: its evaluator.
    result: what ``run`` returned in the chosen strategy's last call. timings: best seconds per
    candidate that ran. errors: ``"Type: message"`` per candidate that failed. rounds: timed rounds.
    """

    strategy: Optional[str] = None
    evaluator: Optional[Evaluator] = None
    result: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    rounds: int = 0


def time_strategies(candidates, make_evaluator: Callable[[str], Evaluator], run: Callable[[Evaluator], Any], *,
                    warmup: bool = True, max_rounds: int = 7, budget_s: float = 1.0) -> StrategyChoice:
    """Time ``run(evaluator)`` for every candidate strategy and keep the fastest.

    With ``warmup``, each candidate first runs once untimed (vmap traces, oneDNN picks kernels).
    Then the candidates run round-robin and each keeps its minimum, so a stall of the machine
    (another process, CPU steal on a VM) spoils single calls, not a whole strategy: at least one
    round, more (up to ``max_rounds``) while the rounds so far took less than ``budget_s`` in all.
    A candidate whose evaluator or run raises is dropped with its reason in ``errors``. The
    model's device is synchronized before and after each timed run (a no-op on the CPU), so that
    on a GPU the timings are of the work, not of its enqueueing.
    """
    with annotate("strategy"):
        return _time_strategies(candidates, make_evaluator, run, warmup, max_rounds, budget_s)


def _time_strategies(candidates, make_evaluator, run, warmup, max_rounds, budget_s) -> StrategyChoice:
    choice = StrategyChoice()
    evs, results = {}, {}
    for name in candidates:
        try:
            ev = make_evaluator(name)
            if warmup:
                results[name] = run(ev)
            evs[name] = ev
        except Exception as e:  # noqa: BLE001 - any failure disqualifies the strategy
            choice.errors[name] = f"{type(e).__name__}: {e}"
    spent = 0.0
    while evs and (choice.rounds < 1 or (choice.rounds < max_rounds and spent < budget_s)):
        for name, ev in list(evs.items()):
            device = ev.layout.device
            synchronize(device)  # earlier work (e.g. the warm-up) must not be charged to this run
            t0 = time.perf_counter()
            try:
                results[name] = run(ev)
                synchronize(device)  # the run's device work, not just its launches
            except Exception as e:  # noqa: BLE001
                choice.errors[name] = f"{type(e).__name__}: {e}"
                del evs[name]
                continue
            dt = time.perf_counter() - t0
            choice.timings[name] = min(choice.timings.get(name, float("inf")), dt)
            spent += dt
        choice.rounds += 1
    if choice.timings:
        choice.strategy = min(choice.timings, key=choice.timings.get)
        choice.evaluator, choice.result = evs[choice.strategy], results[choice.strategy]
    return choice
