"""A launcher for one machine: ``fn(rank, world_size, *args)`` in N local processes joined by a
gloo group over loopback, each rank's outcome (value or error) reported back to the caller."""
from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .group import DEFAULT_TIMEOUT, init


def _worker(rank: int, world: int, rdzv: str, pg_timeout: float, threads: int, fn, args, result_dir: str) -> None:
    # Loopback only: gloo binds the interface named here (a launcher for one machine).
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    try:
        init("gloo", timeout=pg_timeout, init_method=f"file://{rdzv}", rank=rank, world_size=world)
        status = ("ok", fn(rank, world, *args))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        status = ("error", f"{type(e).__name__}: {e}", traceback.format_exc())
    tmp = Path(result_dir) / f".rank{rank}.pt"
    torch.save(status, tmp)
    os.replace(tmp, Path(result_dir) / f"rank{rank}.pt")
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a dead peer can make teardown fail; the result is written
        pass


class LaunchError(RuntimeError):
    """One or more locally launched ranks failed; ``results`` holds every rank's outcome."""

    def __init__(self, msg: str, results: list):
        super().__init__(msg)
        self.results = results


def launch(fn: Callable, nproc: int, args: tuple = (), timeout: Optional[float] = None,
           pg_timeout: float = DEFAULT_TIMEOUT, start_method: str = "spawn", threads: Optional[int] = None,
           raise_on_error: bool = True) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``nproc`` local processes joined by a gloo group over
    loopback (file rendezvous, no port to pick); return the ranks' return values.

    Args:
        fn: a picklable (module-level) function. nproc: number of ranks (>= 1).
        timeout: hard limit in seconds for the whole launch; ranks still alive then are killed and
            ``TimeoutError`` is raised. None: no limit (collectives are still bounded by ``pg_timeout``).
        pg_timeout: process-group timeout of every collective (see :func:`init`).
        start_method: ``"spawn"`` (safe default) or ``"fork"`` (no re-import: fast start, for tests).
        threads: torch threads per rank (default: the cores divided among the ranks).
        raise_on_error: raise :class:`LaunchError` if any rank failed; else return, per rank,
            ``("ok", value)`` or ``("error", message, traceback)`` (``("missing", exitcode)`` for a
            rank that exited without reporting).
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc: expected an int >= 1, got {nproc!r}")
    if start_method not in ("spawn", "fork", "forkserver"):
        raise ValueError(f"start_method: expected 'spawn', 'fork' or 'forkserver', got {start_method!r}")
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    ctx = mp.get_context(start_method)
    with tempfile.TemporaryDirectory(prefix="fastmeta_launch_") as tmp:
        rdzv = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, nproc, rdzv, pg_timeout, threads, fn, args, tmp), daemon=False)
                 for r in range(nproc)]
        for p in procs:
            p.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for p in procs:
                p.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        finally:
            alive = [p for p in procs if p.is_alive()]
            for p in alive:  # our own children only
                p.kill()
            for p in alive:
                p.join()
        results = []
        for r, p in enumerate(procs):
            f = Path(tmp) / f"rank{r}.pt"
            results.append(torch.load(f, weights_only=False) if f.exists() else ("missing", p.exitcode))
    if alive:
        raise TimeoutError(f"launch: ranks {[procs.index(p) for p in alive]} of {nproc} still running after "
                           f"{timeout} s were killed; outcomes: {[r[:2] if r[0] != 'ok' else 'ok' for r in results]}")
    if raise_on_error and any(r[0] != "ok" for r in results):
        lines = [f"rank {i}: {r[1] if r[0] == 'error' else f'exited with code {r[1]} without reporting'}"
                 for i, r in enumerate(results) if r[0] != "ok"]
        first = next((r[2] for r in results if r[0] == "error"), "")
        raise LaunchError("launch: " + "; ".join(lines) + ("\n" + first if first else ""), results)
    return [r[1] for r in results] if raise_on_error else results
