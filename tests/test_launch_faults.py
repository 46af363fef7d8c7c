"""The launcher owns its ranks: faults injected into `fastmeta.distributed.launch` and `fastmeta
train --nproc 2`.

* the launcher SIGKILLed: its ranks die with it (parent-death signal), and the next launch removes
  the temporary folder it could not;
* the launcher sent SIGTERM or SIGINT: it stops its ranks, removes its folder and exits non-zero
  with one line naming the signal;
* a rank stalled (SIGSTOP, or busy forever) after its peer failed: the launcher kills it after the
  process-group timeout plus a margin and raises LaunchError naming it, timeout=None or not;
* `fastmeta train --nproc 2` sent SIGTERM mid-training: no rank keeps training or writing the
  checkpoint.

Ranks are found through the PIDs they write (or /proc), and "gone" means no such process or a
zombie. Every wait is bounded, so a launcher that hangs fails the test instead of blocking it.
"""
import contextlib
import os
import queue
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

import fastmeta
from fastmeta import distributed as fd

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc: Linux only"),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with gloo is not available"),
]

PG_TIMEOUT = 2.0  # s: tiny, so that stragglers are found within seconds
STARTUP = 90.0  # s for ranks to come up on a loaded 2-core machine (spawn re-imports torch)
GONE_WITHIN = 10.0  # s for the ranks to disappear once the launcher is killed
REPO = str(Path(fastmeta.__file__).resolve().parent.parent)


def _state(pid: int) -> str:
    """The process state letter from /proc ('' when there is no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    # A zombie has exited; whether its new parent reaps it is not the launcher's business.
    return _state(pid) not in ("", "Z", "X")


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


def _descendants(pid: int) -> list[int]:
    todo, out = [pid], []
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def _wait_for(cond, limit: float, what: str, proc=None, log: Path = None):
    end = time.monotonic() + limit
    while not cond():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the launcher exited first with {proc.returncode}: {log.read_text()[-3000:]}")
        if time.monotonic() > end:
            pytest.fail(f"{what}: not within {limit} s")
        time.sleep(0.05)


def _kill_leftovers(pids) -> None:
    # Only what this test started: on a launcher that orphans its ranks, they must not keep running.
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _run_dirs(root: Path) -> list[Path]:
    return sorted(root.glob("fastmeta_launch_*"))


class Hung(Exception):
    """Not an OSError (as TimeoutError is), which multiprocessing's wait for a child would swallow."""


@contextlib.contextmanager
def _no_hang(seconds: float):
    """Fail (not block) if the body takes longer than ``seconds``."""
    def on_alarm(signum, frame):
        raise Hung(f"still waiting after {seconds} s: the launcher hangs")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------
# A launcher in its own process: two forked ranks that write their PID, then beat (append a byte
# to a file) forever, so that a rank that survives the launcher is seen to keep working.
LAUNCHER = textwrap.dedent("""
    import os, signal, sys, time
    from fastmeta.distributed import launch

    # Ctrl-C in a terminal; a non-interactive parent may have left SIGINT ignored for its children.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def beat(rank, world, out):
        with open(os.path.join(out, f"pid{rank}"), "w") as f:
            f.write(str(os.getpid()))
        while True:
            with open(os.path.join(out, f"beat{rank}"), "ab") as f:
                f.write(b".")
            time.sleep(0.05)

    launch(beat, 2, (sys.argv[1],), pg_timeout=float(sys.argv[2]), start_method="fork", threads=1)
""")


def _start_launcher(tmp_path: Path):
    out, tmpdir = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    tmpdir.mkdir()
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    env = dict(os.environ, PYTHONPATH=REPO, TMPDIR=str(tmpdir), OMP_NUM_THREADS="1")
    log = tmp_path / "launcher.err"  # a file, not a pipe: ranks that outlive the launcher would hold a pipe open
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(script), str(out), str(PG_TIMEOUT)], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    files = [out / f"{k}{r}" for k in ("pid", "beat") for r in range(2)]
    _wait_for(lambda: all(f.exists() and f.stat().st_size > 0 for f in files), STARTUP, "ranks started", proc, log)
    pids = [int((out / f"pid{r}").read_text()) for r in range(2)]
    return proc, pids, out, tmpdir, log


def _beats(out: Path) -> list[int]:
    return [(out / f"beat{r}").stat().st_size for r in range(2)]


def test_sigkill_of_the_launcher_kills_its_ranks(tmp_path, monkeypatch):
    proc, pids, out, tmpdir, _ = _start_launcher(tmp_path)
    try:
        assert all(_alive(p) for p in pids)
        proc.kill()
        proc.wait(GONE_WITHIN)
        _wait_for(lambda: not any(_alive(p) for p in pids), GONE_WITHIN, "ranks gone after the launcher's SIGKILL")
        before = _beats(out)
        time.sleep(0.5)
        assert _beats(out) == before, "a rank is still working"
    finally:
        _kill_leftovers(pids)

    # Nothing can clean up after SIGKILL; the next launch removes the folder of the dead one.
    assert len(_run_dirs(tmpdir)) == 1
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    with _no_hang(60):
        assert fd.launch(_rank_id, 2, pg_timeout=30.0, start_method="fork", threads=1) == [0, 1]
    assert _run_dirs(tmpdir) == []


def _rank_id(rank, world):
    return rank


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_sigterm_or_sigint_to_the_launcher_stops_ranks_and_cleans_up(tmp_path, sig):
    proc, pids, out, tmpdir, log = _start_launcher(tmp_path)
    try:
        assert len(_run_dirs(tmpdir)) == 1
        proc.send_signal(getattr(signal, sig))
        try:
            rc = proc.wait(GONE_WITHIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher is still running {GONE_WITHIN} s after {sig}")
        err = log.read_text()
        # The launcher reaps its ranks before it exits: they are gone, not zombies of a dead parent.
        assert [_state(p) for p in pids] == ["", ""], "ranks outlived the launcher"
        before = _beats(out)
        time.sleep(0.5)
        assert _beats(out) == before
        assert _run_dirs(tmpdir) == [], "the launcher left its temporary folder"
        if sig == "SIGTERM":
            assert rc == 128 + signal.SIGTERM, (rc, err)
            assert "SIGTERM received: stopped its 2 rank(s)" in err, err
        else:
            assert rc != 0 and "KeyboardInterrupt" in err and "SIGINT received" in err, (rc, err)
    finally:
        _kill_leftovers(pids)


# ---------------------------------------------------------------------------------------------
def _stall_worker(rank, world, out, mode):
    Path(out, f"pid{rank}").write_text(str(os.getpid()))
    if rank == 1:
        if mode == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)  # the way a debugger or a frozen host stalls a rank
        time.sleep(3600)
    if mode == "stop":
        dist.barrier()  # fails at the process-group timeout: the peer never arrives
        return "passed a barrier with a stopped peer"
    raise ValueError("boom")


@pytest.mark.parametrize("mode", ["stop", "sleep"])
def test_a_stalled_rank_is_killed_and_named(tmp_path, monkeypatch, mode):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    t0 = time.monotonic()
    try:
        with _no_hang(PG_TIMEOUT + 60), pytest.raises(fd.LaunchError) as info:
            fd.launch(_stall_worker, 2, (str(tmp_path), mode), pg_timeout=PG_TIMEOUT, start_method="fork",
                      threads=1)
        elapsed = time.monotonic() - t0
    finally:
        _kill_leftovers(int(p.read_text()) for p in tmp_path.glob("pid*"))
    first_line = str(info.value).splitlines()[0]
    assert "rank 1: stopped responding: killed" in first_line, first_line
    assert "after rank 0 failed (process-group timeout 2 s)" in first_line, first_line
    # rank 0 failed first: by its own error, or at the barrier's process-group timeout
    assert ("rank 0: ValueError: boom" if mode == "sleep" else "rank 0: RuntimeError") in first_line, first_line
    assert mode == "sleep" or "Timed out" in first_line, first_line
    outcomes = [r[0] for r in info.value.results]
    assert outcomes == ["error", "killed"], outcomes
    # Not before rank 1's own collective could have timed out; then no longer than a margin.
    assert PG_TIMEOUT < elapsed < PG_TIMEOUT + 45, elapsed
    pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(2)]
    assert [_state(p) for p in pids] == ["", ""]
    assert _run_dirs(tmp_path) == []


def test_a_rank_outliving_a_finished_peer_is_killed_without_raise(tmp_path, monkeypatch):
    # raise_on_error=False still ends the launch; the straggler's outcome says what happened.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)]
    try:
        with _no_hang(PG_TIMEOUT + 60):
            res = fd.launch(_sleep_on_rank1, 2, (str(tmp_path),), pg_timeout=PG_TIMEOUT, start_method="fork",
                            threads=1, raise_on_error=False)
    finally:
        _kill_leftovers(int(p.read_text()) for p in tmp_path.glob("pid*"))
    assert res[0] == ("ok", 0)
    assert res[1][0] == "killed" and "after rank 0 finished" in res[1][1], res[1]
    assert _run_dirs(tmp_path) == []
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)] == handlers


def _sleep_on_rank1(rank, world, out):
    Path(out, f"pid{rank}").write_text(str(os.getpid()))
    if rank == 1:
        time.sleep(3600)
    return rank


def test_launch_checks_pg_timeout():
    with pytest.raises(ValueError, match="pg_timeout"):
        fd.launch(_rank_id, 2, pg_timeout=0, start_method="fork")


# ---------------------------------------------------------------------------------------------
def test_sigterm_to_fastmeta_train_nproc_2_leaves_no_orphans(tmp_path):
    tmpdir, ckpt = tmp_path / "tmp", tmp_path / "run.pt"
    tmpdir.mkdir()
    env = dict(os.environ, PYTHONPATH=REPO, TMPDIR=str(tmpdir), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "fastmeta", "train", "--nproc", "2", "--task", "sinusoid", "--steps", "1000000",
           "--meta-batch", "4", "--val-every", "10", "--val-tasks", "2", "--test-tasks", "2", "--no-progress",
           "--dist-timeout", "20", "--out", str(ckpt)]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    ranks: list[int] = []
    try:
        end, seen = time.monotonic() + STARTUP, []
        while not any(line.startswith("step 20:") for line in seen):  # two checkpoints written
            try:
                seen.append(lines.get(timeout=max(0.0, end - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"no 'step 20:' line within {STARTUP} s: {''.join(seen)[-3000:]}")
        ranks = _descendants(proc.pid)
        assert len(ranks) >= 2, ranks  # the two ranks (and multiprocessing's resource tracker)
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(GONE_WITHIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`fastmeta train --nproc 2` still running {GONE_WITHIN} s after SIGTERM")
        assert rc == 128 + signal.SIGTERM, rc
        _wait_for(lambda: not any(_alive(p) for p in ranks), GONE_WITHIN, "ranks gone after SIGTERM")
        written = ckpt.stat().st_mtime_ns
        time.sleep(1.0)
        assert ckpt.stat().st_mtime_ns == written, "the checkpoint is still being written"
        assert _run_dirs(tmpdir) == []
    finally:
        _kill_leftovers(ranks + _descendants(proc.pid))
        if proc.poll() is None:
            proc.kill()
            proc.wait()
