"""Measuring time and the machine: interleaved round-robin timing, the reported statistic, GEMM
GFLOP/s, FLOPs of a step, CPU stall and a description of the machine.

One timing round runs every implementation once, so a noisy shared machine slows all of them
alike; ratios are only meaningful between rows timed in the same run.
"""
from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch


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
    (0.2-0.7 s) gets one).
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
