"""A launcher for one machine: ``fn(rank, world_size, *args)`` in N local processes joined by a
gloo group over loopback, each rank's outcome (value or error) reported back to the caller.

The launcher owns its ranks. They die with it: on Linux each rank asks the kernel for SIGKILL
when the launcher dies (even by SIGKILL); on SIGTERM, SIGINT or SIGHUP the launcher stops its
ranks and removes its files before it exits. A rank that outlives a finished or failed peer by
more than the process-group timeout (plus a margin) is killed, and the launch fails naming it.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .group import DEFAULT_TIMEOUT, init

try:
    import fcntl
except ImportError:  # not POSIX: no lock, so no sweep of stale run folders either
    fcntl = None

_PREFIX = "fastmeta_launch_"
_LOCK = "launcher.lock"  # held (flock) by a live launcher, and by ranks forked from it
_POLL = 0.25  # s between looks at the ranks' result files (exits wake the launcher at once)
_TERM_WAIT = 2.0  # s a rank gets to exit on SIGTERM before SIGKILL
_REAP_WAIT = 10.0  # s to reap a SIGKILLed rank (only a process stuck in the kernel takes longer)
_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, n))
_PR_SET_PDEATHSIG = 1


def straggler_grace(pg_timeout: float) -> float:
    """Seconds the other ranks get after the first rank finished or failed before they are killed.

    A survivor's pending collective fails after ``pg_timeout``; it may have entered that collective
    a little after the peer ended, and it still has to report and exit: hence the margin."""
    return 1.1 * pg_timeout + 5.0


class LaunchError(RuntimeError):
    """One or more locally launched ranks failed; ``results`` holds every rank's outcome."""

    def __init__(self, msg: str, results: list):
        super().__init__(msg)
        self.results = results


class _Interrupted(BaseException):
    """A signal reached the launcher; raised to leave the wait and run the cleanup."""


class _SignalGuard:
    """While a launch runs, SIGTERM, SIGINT and SIGHUP raise :class:`_Interrupted` in the launcher
    (once), so that it stops its ranks and removes its files before it exits. Only signals left
    at their default are taken over (a handler the caller installed, or an ignored signal, stays),
    and only in the main thread (Python delivers signals there alone). Signals are held (recorded,
    acted on later) from the start until :meth:`release`."""

    def __init__(self):
        self.previous: dict = {}
        self.signum: Optional[int] = None
        self.held = True
        if threading.current_thread() is not threading.main_thread():
            return
        for s in _SIGNALS:
            prev = signal.getsignal(s)
            if prev is signal.SIG_DFL or (s == signal.SIGINT and prev is signal.default_int_handler):
                self.previous[s] = prev
                signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        if not self.held:
            self.held = True  # later signals must not interrupt the cleanup
            raise _Interrupted()

    def hold(self) -> None:
        """Defer signals again: a cleanup cut short would leave ranks or files behind."""
        self.held = True

    def release(self) -> None:
        self.held = False
        if self.signum is not None:
            self.held = True
            raise _Interrupted()

    def restore(self) -> None:
        for s, prev in self.previous.items():
            signal.signal(s, prev)

    @staticmethod
    def reset_in_rank() -> None:
        # A forked rank inherits the launcher's handlers; it must react to signals as a plain process.
        for s in _SIGNALS:
            guard = getattr(signal.getsignal(s), "__self__", None)
            if isinstance(guard, _SignalGuard):
                signal.signal(s, guard.previous[s])


def _die_with_launcher(launcher_pid: int, direct_child: bool) -> None:
    """Have the kernel SIGKILL this rank when its parent dies (Linux); exit now if it already has.

    The parent is the launcher, or under ``forkserver`` the fork server, which exits when the
    launcher does."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fastmeta.distributed.launch: prctl(PR_SET_PDEATHSIG) failed in a rank: "
                               f"{os.strerror(err)}")
    # A parent that died before the call above never sends the signal.
    gone = os.getppid() != launcher_pid if direct_child else not _pid_alive(launcher_pid)
    if gone:
        os._exit(1)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worker(rank: int, world: int, rdzv: str, pg_timeout: float, threads: int, fn, args, result_dir: str,
            launcher_pid: int, direct_child: bool) -> None:
    _SignalGuard.reset_in_rank()
    # Loopback only: gloo binds the interface named here (a launcher for one machine).
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    try:
        _die_with_launcher(launcher_pid, direct_child)
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


def _make_run_dir() -> tuple[str, Optional[int]]:
    """A fresh temporary folder and the fd of its lock, held for the launch."""
    tmp = tempfile.mkdtemp(prefix=_PREFIX)
    if fcntl is None:
        return tmp, None
    # Locked before it gets the name the sweep looks for, so no sweep can take a live folder.
    staged = os.path.join(tmp, f".{_LOCK}")
    fd = os.open(staged, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(staged, os.path.join(tmp, _LOCK))
    return tmp, fd


def _remove_stale_run_dirs() -> None:
    """Remove the folders of launches whose launcher and ranks are all gone (a SIGKILLed launcher
    cannot clean up after itself): their lock is free. Folders without a lock are left alone."""
    if fcntl is None:
        return
    root = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(root) if n.startswith(_PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(root, name)
        try:
            fd = os.open(os.path.join(path, _LOCK), os.O_RDWR)
        except OSError:  # no lock file (yet), or not ours to open
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: that launch is alive
            os.close(fd)
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def _stop(procs: list, gentle: bool) -> list:
    """End the ranks still running (SIGTERM first if ``gentle``, then SIGKILL); returns their indices."""
    alive = [r for r, p in enumerate(procs) if p.exitcode is None]
    if gentle and alive:
        for r in alive:
            procs[r].terminate()
        end = time.monotonic() + _TERM_WAIT
        while any(procs[r].exitcode is None for r in alive) and time.monotonic() < end:
            mp.connection.wait([procs[r].sentinel for r in alive if procs[r].exitcode is None],
                               timeout=max(0.0, end - time.monotonic()))
    for r in alive:
        if procs[r].exitcode is None:
            procs[r].kill()  # also ends a stopped (SIGSTOP) process
    for r in alive:
        procs[r].join(_REAP_WAIT)
    return alive


def _supervise(procs: list, tmp: str, timeout: Optional[float], grace: float):
    """Wait until every rank has exited, the launch ``timeout`` has passed, or ``grace`` seconds
    have passed since the first rank finished or failed. Returns ``None``, ``("timeout",)`` or
    ``("grace", ranks that had ended first, seconds)``."""
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    first = None  # (time, ranks): when a rank first exited or reported
    while True:
        running = [r for r, p in enumerate(procs) if p.exitcode is None]
        if not running:
            return None
        now = time.monotonic()
        if first is None:
            ended = [r for r, p in enumerate(procs)
                     if p.exitcode is not None or (Path(tmp) / f"rank{r}.pt").exists()]
            if ended:
                first = (now, ended)
        if deadline is not None and now >= deadline:
            return ("timeout",)
        if first is not None and now >= first[0] + grace:
            return ("grace", first[1], now - first[0])
        wake = min(t for t in (deadline, first and first[0] + grace, now + _POLL) if t is not None)
        mp.connection.wait([procs[r].sentinel for r in running], timeout=max(0.0, wake - now))


def _first_line(msg: str) -> str:
    return (msg.splitlines() or [""])[0]


def _exit_reason(code: Optional[int]) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name} without reporting"
        except ValueError:
            pass
    return f"exited with code {code} without reporting"


def launch(fn: Callable, nproc: int, args: tuple = (), timeout: Optional[float] = None,
           pg_timeout: float = DEFAULT_TIMEOUT, start_method: str = "spawn", threads: Optional[int] = None,
           raise_on_error: bool = True) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``nproc`` local processes joined by a gloo group over
    loopback (file rendezvous, no port to pick); return the ranks' return values.

    The ranks never outlive the launcher: on Linux the kernel kills them when it dies (SIGKILL
    included); on SIGTERM, SIGINT or SIGHUP (when left at their defaults, in the main thread) it
    terminates and then kills them, removes its temporary folder and exits with status
    ``128 + signum`` (one line on stderr), or raises ``KeyboardInterrupt`` for SIGINT. The folder
    of a launcher that was SIGKILLed is removed by the next launch.

    Stragglers: once a rank has finished or failed, the others get :func:`straggler_grace`
    (``pg_timeout`` plus a margin; their pending collectives fail within ``pg_timeout``) to end;
    a rank still running then (stalled, stopped, or busy outside collectives) is killed.

    Args:
        fn: a picklable (module-level) function. nproc: number of ranks (>= 1).
        timeout: hard limit in seconds for the whole launch; ranks still alive then are killed and
            ``TimeoutError`` is raised. None: no limit (stragglers are still killed as above).
        pg_timeout: process-group timeout of every collective (see :func:`init`).
        start_method: ``"spawn"`` (safe default) or ``"fork"`` (no re-import: fast start, for tests).
        threads: torch threads per rank (default: the cores divided among the ranks).
        raise_on_error: raise :class:`LaunchError` if any rank failed; else return, per rank,
            ``("ok", value)`` or ``("error", message, traceback)`` (``("missing", exitcode)`` for a
            rank that exited without reporting, ``("killed", message)`` for a straggler).
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc: expected an int >= 1, got {nproc!r}")
    if start_method not in ("spawn", "fork", "forkserver"):
        raise ValueError(f"start_method: expected 'spawn', 'fork' or 'forkserver', got {start_method!r}")
    if isinstance(pg_timeout, bool) or not isinstance(pg_timeout, (int, float)) or not pg_timeout > 0:
        raise ValueError(f"pg_timeout: expected seconds > 0, got {pg_timeout!r}")
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    ctx = mp.get_context(start_method)
    _remove_stale_run_dirs()
    guard = _SignalGuard()
    procs: list = []
    tmp, lock_fd, stopped, ended = None, None, [], None
    try:
        try:
            tmp, lock_fd = _make_run_dir()
            rdzv = os.path.join(tmp, "rendezvous")
            for r in range(nproc):
                p = ctx.Process(target=_worker, daemon=False,
                                args=(r, nproc, rdzv, pg_timeout, threads, fn, args, tmp, os.getpid(),
                                      start_method != "forkserver"))
                p.start()
                procs.append(p)
            guard.release()
            ended = _supervise(procs, tmp, timeout, straggler_grace(pg_timeout))
            stopped = _stop(procs, gentle=False)
            results = []
            for r, p in enumerate(procs):
                f = Path(tmp) / f"rank{r}.pt"
                results.append(torch.load(f, weights_only=False) if f.exists() else ("missing", p.exitcode))
        finally:
            guard.hold()
            _stop(procs, gentle=True)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if lock_fd is not None:
                os.close(lock_fd)
    except _Interrupted:
        pass
    finally:
        guard.restore()
    if guard.signum is not None:
        what = f"stopped its {len(procs)} rank(s)" + (f" and removed {tmp}" if tmp else "")
        msg = f"fastmeta.distributed.launch: {signal.Signals(guard.signum).name} received: {what}"
        if guard.signum == signal.SIGINT:
            raise KeyboardInterrupt(msg)
        with contextlib.suppress(OSError, ValueError):  # a hung-up terminal may have taken stderr
            print(msg, file=sys.stderr, flush=True)
        raise SystemExit(128 + guard.signum)

    if ended is not None and ended[0] == "grace":
        first, waited = ended[1], ended[2]
        failed = any(results[r][0] != "ok" for r in first)
        who = ("rank " if len(first) == 1 else "ranks ") + ", ".join(str(r) for r in first)
        for r in stopped:
            if results[r][0] == "missing":  # reported ranks keep their outcome (they hung in teardown)
                results[r] = ("killed", f"stopped responding: killed {waited:.0f} s after {who} "
                                        f"{'failed' if failed else 'finished'} (process-group timeout {pg_timeout:g} s)")
    elif ended is not None:
        raise TimeoutError(f"launch: ranks {stopped} of {nproc} still running after {timeout} s were killed; "
                           f"outcomes: {[r[:2] if r[0] != 'ok' else 'ok' for r in results]}")
    if raise_on_error and any(r[0] != "ok" for r in results):
        # One line; a multi-line error message is whole in the traceback that follows.
        lines = [f"rank {i}: " + (_first_line(r[1]) if r[0] in ("error", "killed") else _exit_reason(r[1]))
                 for i, r in enumerate(results) if r[0] != "ok"]
        first_tb = next((r[2] for r in results if r[0] == "error"), "")
        raise LaunchError("launch: " + "; ".join(lines) + ("\n" + first_tb if first_tb else ""), results)
    return [r[1] for r in results] if raise_on_error else results
