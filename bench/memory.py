"""Peak memory of one benchmark configuration's step, each configuration in its own process.

``peak_rss_subprocess`` runs ``python bench/memory.py rss --workload W --impl NAME [--first-order]
[--small]``, which builds the implementation ``NAME`` (a row of ``peers.implementations``) on
workload ``W``, measures its steps with ``step_peak_rss`` and prints the result as one JSON line.
A fresh process per configuration keeps their allocations from mixing.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional


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
    # Imported here: the parent only needs peak_rss_subprocess, not the workloads and peers.
    from peers import implementations
    from workloads import workload

    wl = workload(args.workload, small=args.small)
    make = implementations(wl)[args.impl]
    model, batch = wl.model(), wl.batch()
    run = make(wl, model, batch, args.first_order)
    print(json.dumps(step_peak_rss(run)))


if __name__ == "__main__":
    import importlib.util

    # A checkout that is not installed (e.g. run from the repository root, which its parent process
    # had on the path) still finds fastmeta; appended, so nothing installed is shadowed.
    if importlib.util.find_spec("fastmeta") is None:
        sys.path.append(str(Path(__file__).resolve().parents[1]))
    p = argparse.ArgumentParser(description="helper processes for fastmeta benchmarks")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rss", help="peak RSS of one configuration (prints JSON)")
    r.add_argument("--workload", required=True)
    r.add_argument("--impl", required=True)
    r.add_argument("--first-order", action="store_true")
    r.add_argument("--small", action="store_true")
    a = p.parse_args()
    _rss_main(a)
