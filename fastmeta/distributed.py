"""Meta-batches across processes and machines with ``torch.distributed``.

The task dimension of a meta-batch is sharded across the ranks of a process group (gloo on CPU,
NCCL on CUDA; launched by ``fastmeta train --nproc N`` or by ``torchrun``). Each rank runs the
unchanged algorithm on its shard of T_r tasks; the only change is in
:meth:`Evaluator.over_tasks`, the one place every algorithm reduces per-task meta-gradients:

    local:  s_r = sum_{m in shard r} g_m   ([P]),   n_r = T_r
    global: all_reduce_SUM([s_r | n_r])  ->  g = (sum_r s_r) / (sum_r n_r)

one all-reduce of ``P + 1`` numbers, so every rank ends with the exact mean over all T tasks,
also when T is not divisible by the world size (a mean of per-rank means would weight tasks
unevenly). An algorithm that reduces twice gets two all-reduces: Sharp-MAML_up / _both normalize
the *global* first-pass meta-gradient for the meta perturbation (Sharp-MAML eq. 13 / 20), which
is what pass 1 returns here, and pass 2 (eq. 15 / 21) is reduced again. HF-MAML's delta rule
(Fallah Thm. 4.17) and ESAM's SDS selection act per task and communicate nothing.

Pieces:

* :class:`DistributedEvaluator` / :func:`wrap_evaluator`: the reduction (used by
  ``MetaLearner(process_group=...)``).
* :class:`ShardedTaskSampler`: task ``i`` of step ``s`` is drawn from a generator seeded by
  ``(seed, s, i)``; rank r draws only its contiguous block of task indices. Shards are disjoint,
  reproducible without state (resume needs no sampler state) and the union over ranks does not
  depend on the world size, so a 1-process run sees the same meta-batches as an N-process run.
* :func:`save_checkpoint` (rank 0 writes, atomically, via :func:`fastmeta.train.save_checkpoint`)
  and :func:`load_for_resume` (rank 0 reads, every rank receives it by broadcast: no shared file
  system needed across machines).
* :func:`init` (process-group timeout: a dead or stalled rank makes the others raise
  :class:`RankFailure` instead of hanging), :func:`launch` (N local gloo ranks over loopback),
  :func:`train` (the ``fastmeta train --nproc N`` / ``torchrun`` loop), :func:`bench_all_reduce`.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from .batched import Evaluator
from .tasks import _FIELDS, TaskBatch

# Default process-group timeout for `fastmeta train --nproc` / torchrun runs: long enough for a
# validation pass or a checkpoint write on one rank while the others wait in the next collective,
# short enough that a dead rank does not hold a job for torch's default 30 minutes.
DEFAULT_TIMEOUT = 300.0
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankFailure(RuntimeError):
    """A collective failed: a peer rank died, stalled past the process-group timeout, or the
    connection broke. Raised on the surviving ranks instead of hanging."""


# ---------------------------------------------------------------------------------------------
# process groups
def under_torchrun() -> bool:
    """True when the torchrun/env:// variables are set with a world size > 1."""
    return all(v in os.environ for v in _TORCHRUN_VARS) and int(os.environ["WORLD_SIZE"]) > 1


def resolve_group(process_group=None):
    """The group to shard over, or None for single-process.

    ``None``: the default (WORLD) group if torch.distributed is initialized with more than one
    rank, else single-process. A ``ProcessGroup`` is used as given.
    """
    if process_group is None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group: torch.distributed is not initialized (call fastmeta.distributed.init() "
                         "or torch.distributed.init_process_group first)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise ValueError(f"process_group: expected None or a torch.distributed.ProcessGroup, "
                         f"got {type(process_group).__name__}")
    return process_group


def rank_and_size(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (``(0, 1)`` without one)."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def init(backend: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT, init_method: Optional[str] = None,
         rank: Optional[int] = None, world_size: Optional[int] = None):
    """Initialize the default process group; returns it.

    ``backend``: ``"nccl"`` when CUDA is available, else ``"gloo"``. ``timeout`` (seconds) bounds
    every collective: when a rank dies or stalls, the others raise :class:`RankFailure` after at
    most this long. Without ``init_method``, the torchrun variables (``env://``) are used. Under
    NCCL the CUDA device is ``LOCAL_RANK``.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout: expected seconds > 0, got {timeout!r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    kw = {} if init_method is None else dict(init_method=init_method, rank=rank, world_size=world_size)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout)), **kw)
    return dist.group.WORLD


def _collective(what: str, group, fn):
    try:
        return fn()
    except (RuntimeError, ConnectionError) as e:  # DistBackendError / gloo errors are RuntimeErrors
        r, w = rank_and_size(group)
        raise RankFailure(
            f"fastmeta.distributed: {what} failed on rank {r} of {w}: a peer rank died, stalled longer than the "
            f"process-group timeout, or the connection broke ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
        ) from e


def all_reduce_mean(grad_sum: torch.Tensor, n_local: int, group) -> torch.Tensor:
    """Exact mean over all ranks' tasks: ``sum_r grad_sum_r / sum_r n_local_r`` (``[P]``).

    One all-reduce of ``P + 1`` numbers (the task count rides along with the gradient).
    """
    buf = torch.cat([grad_sum.detach().reshape(-1), grad_sum.new_tensor([float(n_local)])])
    _collective("all_reduce of the meta-gradient", group, lambda: dist.all_reduce(buf, group=group))
    return buf[:-1] / buf[-1]


# ---------------------------------------------------------------------------------------------
# the reduction hook
class DistributedEvaluator(Evaluator):
    """An :class:`Evaluator` whose :meth:`over_tasks` returns the mean over the tasks of ALL ranks.

    Everything else (forward, losses, grads, chunks) is the wrapped evaluator's; per-task outputs
    (query losses, outputs, HF-MAML deltas) stay local to the rank. ``comm_seconds`` accumulates
    the time spent in all-reduces (including waiting for slower ranks).
    """

    def __init__(self, ev: Evaluator, group):
        if not isinstance(ev, Evaluator):
            raise ValueError(f"ev: expected a fastmeta Evaluator, got {type(ev).__name__}")
        self.__dict__.update(ev.__dict__)
        self.base, self.group = ev, group
        self.comm_seconds, self.reductions = 0.0, 0

    def over_tasks(self, fn, batch: TaskBatch):
        """``fn(sub_batch) -> (grad_sum [P], *per_task)`` over this rank's chunks, then the global mean.

        The wrapped evaluator returns the local mean over ``n = batch.num_tasks`` tasks; ``mean * n``
        restores the local sum (one rounding) and :func:`all_reduce_mean` divides by the global count.
        """
        local_mean, *extras = self.base.over_tasks(fn, batch)
        t0 = time.perf_counter()
        g = all_reduce_mean(local_mean * batch.num_tasks, batch.num_tasks, self.group)
        self.comm_seconds += time.perf_counter() - t0
        self.reductions += 1
        return (g, *extras)


def _agree_strategy(learner, group) -> None:
    """Under ``strategy="auto"`` each rank timed its own shard; all ranks adopt rank 0's choice so
    that they run the same code (and the same floating-point summation order)."""
    ev = learner._ev
    choice = [ev.strategy]
    _collective("broadcast of the evaluation strategy", group,
                lambda: dist.broadcast_object_list(choice, src=dist.get_global_rank(group, 0), group=group))
    if choice[0] != ev.strategy:
        learner._ev = Evaluator(learner.model, learner.layout, learner.loss_fn, choice[0],
                                **getattr(learner, "speed_modes", {}))
        learner.strategy_reason += f"; rank 0 chose {choice[0]!r}, adopted by all ranks"


def wrap_evaluator(learner, ev: Evaluator) -> Evaluator:
    """The evaluator ``MetaLearner.meta_gradient`` should use: ``ev`` itself in one process, a
    :class:`DistributedEvaluator` (cached on the learner) when a process group is in use."""
    group = resolve_group(getattr(learner, "process_group", None))
    if group is None:
        return ev
    cached = getattr(learner, "_dist_ev", None)
    if cached is not None and cached.base is ev and cached.group is group:
        return cached
    if learner.strategy == "auto" and cached is None:
        _agree_strategy(learner, group)
        ev = learner._ev
    wrapped = DistributedEvaluator(ev, group)
    if cached is not None:
        wrapped.comm_seconds, wrapped.reductions = cached.comm_seconds, cached.reductions
    learner._dist_ev = wrapped
    return wrapped


# ---------------------------------------------------------------------------------------------
# sharding tasks
def shard_range(num_tasks: int, rank: int, world_size: int) -> range:
    """Task indices of ``rank``: a contiguous block; sizes differ by at most one across ranks."""
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size: expected an int >= 1, got {world_size!r}")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank: expected an int in [0, {world_size}), got {rank!r}")
    if not (isinstance(num_tasks, int) and num_tasks >= world_size):
        raise ValueError(f"meta_batch: {num_tasks!r} tasks cannot be sharded over {world_size} ranks "
                         f"(every rank needs at least one task)")
    return range(rank * num_tasks // world_size, (rank + 1) * num_tasks // world_size)


def shard(batch: TaskBatch, process_group=None) -> TaskBatch:
    """This rank's block of a full meta-batch that every rank holds (see :func:`shard_range`)."""
    r, w = rank_and_size(resolve_group(process_group))
    idx = shard_range(batch.num_tasks, r, w)
    return batch.select(slice(idx.start, idx.stop))


def concat(batches: Sequence[TaskBatch]) -> TaskBatch:
    """Concatenate task batches along the task dimension."""
    if not batches:
        raise ValueError("batches: expected at least one TaskBatch")
    kw = {}
    for n in _FIELDS:
        ts = [getattr(b, n) for b in batches]
        if any(t is None for t in ts) and not all(t is None for t in ts):
            raise ValueError(f"batches: {n} is present in some batches and not in others")
        kw[n] = None if ts[0] is None else torch.cat(ts)
    return TaskBatch(**kw, ways=batches[0].ways)


def task_seed(seed: int, step: int, index: int) -> int:
    """The generator seed of task ``index`` of meta-batch ``step`` (a hash: independent streams)."""
    h = hashlib.blake2b(f"fastmeta:{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


class ShardedTaskSampler:
    """Each rank's disjoint, reproducible shard of meta-batch ``step``.

    Task ``i`` (``0 <= i < meta_batch``) of step ``s`` is ``source.sample(1)`` after seeding
    ``source.gen`` with :func:`task_seed` ``(seed, s, i)``; rank ``r`` of ``W`` takes tasks
    :func:`shard_range` ``(meta_batch, r, W)``. Hence the union of the shards is the same
    meta-batch for every world size, and step ``s`` can be drawn without replaying steps
    ``< s`` (resume needs no sampler state).

    Args:
        source: a task source with ``sample(n) -> TaskBatch`` and a ``gen`` ``torch.Generator``
            (``SinusoidTasks``, ``OmniglotTasks``); its generator is reseeded per task.
        meta_batch: T, tasks per step over all ranks (>= world size).
        seed: base seed. rank, world_size: default: from ``process_group`` (or 0, 1).
    """

    def __init__(self, source, meta_batch: int, seed: int = 0, rank: Optional[int] = None,
                 world_size: Optional[int] = None, process_group=None):
        if not callable(getattr(source, "sample", None)) or not isinstance(getattr(source, "gen", None), torch.Generator):
            raise ValueError("source: expected a task source with sample(n) and a torch.Generator `gen` "
                             "(e.g. fastmeta.data.SinusoidTasks)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed: expected an int, got {seed!r}")
        gr, gw = rank_and_size(resolve_group(process_group))
        self.rank = gr if rank is None else rank
        self.world_size = gw if world_size is None else world_size
        self.indices_of_rank = shard_range(meta_batch, self.rank, self.world_size)  # validates
        self.source, self.meta_batch, self.seed = source, meta_batch, seed

    def indices(self, step: int) -> range:
        """Global task indices this rank evaluates at ``step`` (the same block every step)."""
        return self.indices_of_rank

    def tasks(self, step: int, indices) -> TaskBatch:
        """Tasks ``indices`` of meta-batch ``step``."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step: expected an int >= 0, got {step!r}")
        out = []
        for i in indices:
            self.source.gen.manual_seed(task_seed(self.seed, step, i))
            out.append(self.source.sample(1))
        return concat(out)

    def sample(self, step: int) -> TaskBatch:
        """This rank's shard ``[T_r, ...]`` of meta-batch ``step``."""
        return self.tasks(step, self.indices(step))

    def full(self, step: int) -> TaskBatch:
        """The whole meta-batch ``[T, ...]`` of ``step`` (what a single process evaluates)."""
        return self.tasks(step, range(self.meta_batch))


# ---------------------------------------------------------------------------------------------
# state: broadcast, checkpoints
def broadcast_module(model: torch.nn.Module, group, src_rank: int = 0) -> None:
    """Copy rank ``src_rank``'s parameters and buffers to every rank (start of training)."""
    src = dist.get_global_rank(group, src_rank)
    with torch.no_grad():
        for t in model.state_dict().values():
            _collective("broadcast of the initial parameters", group, lambda t=t: dist.broadcast(t, src, group=group))


def save_checkpoint(path, payload: dict, process_group=None) -> None:
    """Rank 0 writes ``payload`` atomically (:func:`fastmeta.train.save_checkpoint`); others return."""
    from .train import save_checkpoint as _save

    if rank_and_size(resolve_group(process_group))[0] == 0:
        _save(Path(path), payload)


def load_for_resume(path, process_group=None) -> Optional[dict]:
    """Rank 0 loads the checkpoint at ``path`` (None if absent); every rank receives it by broadcast,
    so only rank 0's machine needs the file."""
    from .train import load_checkpoint

    group = resolve_group(process_group)
    payload = [None]
    if rank_and_size(group)[0] == 0 and Path(path).exists():
        payload[0] = load_checkpoint(path)
    if group is not None:
        _collective("broadcast of the resume checkpoint", group,
                    lambda: dist.broadcast_object_list(payload, src=dist.get_global_rank(group, 0), group=group))
    return payload[0]


# ---------------------------------------------------------------------------------------------
# local launcher
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
    import multiprocessing as mp

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


# ---------------------------------------------------------------------------------------------
# training
def _check_resume(cfg: dict, ckpt: dict) -> None:
    old = ckpt.get("config", {})
    for key in ("task", "algo", "meta_batch", "seed", "inner_lr", "inner_steps", "float64"):
        if old.get(key) != cfg.get(key):
            raise ValueError(f"resume: the checkpoint was trained with {key}={old.get(key)!r}, "
                             f"this run has {key}={cfg.get(key)!r}")
    if old.get("sampler") != "sharded":
        raise ValueError("resume: the checkpoint was not written by a `--nproc` run (its task stream differs)")


def _train_worker(rank: int, world: int, cfg: dict):
    summary = train(cfg, log=print if rank == 0 else (lambda *a, **k: None))
    summary.pop("learner", None)
    return summary


def launch_train(cfg: dict, nproc: int, start_method: str = "spawn", timeout: Optional[float] = None) -> dict:
    """``fastmeta train --nproc N``: :func:`train` in ``nproc`` local gloo ranks; rank 0's summary."""
    return launch(_train_worker, nproc, (cfg,), timeout=timeout, start_method=start_method,
                  pg_timeout=float(cfg.get("dist_timeout") or DEFAULT_TIMEOUT))[0]


def _over_budget(mine: bool, group) -> bool:
    """True on every rank as soon as any rank's clock says the time budget is spent.

    Each rank's clock differs a little; stopping on rank 0's word alone would still need a
    broadcast, and a MAX all-reduce of one flag costs the same (~0.1 ms on loopback, once per step)
    while keeping all ranks at the same step (else one rank would wait forever at the next
    gradient all-reduce).
    """
    if group is None:
        return mine
    flag = torch.tensor([1.0 if mine else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag[0] > 0)


def train(cfg: dict, log=print) -> dict:
    """The meta-training loop of ``fastmeta train`` with the task dimension sharded over ranks.

    Runs in the current process when a process group is initialized (or under torchrun, which it
    then initializes), or with world size 1; with ``cfg["nproc"] > 1`` and no group it launches
    ``nproc`` local ranks (:func:`launch_train`). Every rank builds the same model (same seed;
    rank 0's values are broadcast), draws its shard from :class:`ShardedTaskSampler`, and gets the
    same averaged meta-gradient, so the optimizers stay in step without exchanging parameters.
    Only rank 0 logs and writes checkpoints; ``cfg["resume"]`` restores the checkpoint at
    ``cfg["out"]`` on every rank. Validation and the final meta-test run on every rank (the same
    tasks; no rank waits at a collective while another evaluates).
    """
    from .models import build_model
    from .train import TaskSource, _payload, evaluate_tasks, learner_from_config, pre_adaptation_loss

    nproc = cfg.get("nproc")
    if nproc is not None and (isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1):
        raise ValueError(f"nproc: expected an int >= 1, got {nproc!r}")
    if not dist.is_initialized() and under_torchrun():
        init(timeout=float(cfg.get("dist_timeout") or DEFAULT_TIMEOUT))
    elif not dist.is_initialized() and (nproc or 1) > 1:
        return launch_train(cfg, nproc)
    group = resolve_group(None)
    rank, world = rank_and_size(group)
    if nproc is not None and under_torchrun() and nproc != world:
        raise ValueError(f"nproc: {nproc} differs from torchrun's world size {world}; drop --nproc under torchrun")
    cfg = dict(cfg, sampler="sharded", world_size=world)

    torch.manual_seed(cfg["seed"])
    src = TaskSource(cfg)
    model = build_model(src.model_config)
    if cfg.get("float64"):
        model = model.double()
    learner = learner_from_config(cfg, model, src.loss_fn, process_group=group)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["meta_lr"])
    sampler = ShardedTaskSampler(src.train, cfg["meta_batch"], seed=cfg["seed"], process_group=group)
    out = Path(cfg["out"]) if cfg.get("out") else None
    start, history = 1, []
    if cfg.get("resume"):
        if out is None:
            raise ValueError("resume: needs --out (the checkpoint to resume from)")
        ckpt = load_for_resume(out, group)
        if ckpt is not None:
            _check_resume(cfg, ckpt)
            model.load_state_dict(ckpt["model_state"])
            opt.load_state_dict(ckpt["optimizer_state"])
            start, history = ckpt["step"] + 1, list(ckpt.get("history", []))
            log(f"resumed from {out} at step {ckpt['step']} on {world} rank(s)")
    if group is not None:
        broadcast_module(model, group)
    log(f"distributed: {world} rank(s), backend {dist.get_backend(group) if group else 'none'}, "
        f"{cfg['meta_batch']} tasks per step, shard sizes "
        f"{[len(shard_range(cfg['meta_batch'], r, world)) for r in range(world)]}")

    limit = cfg.get("time_limit")
    if limit is not None and not limit > 0:
        raise ValueError(f"time_limit: expected a positive number of minutes, got {limit!r}")
    t0 = time.perf_counter()
    res = None
    steps_done = start - 1
    for step in range(start, cfg["steps"] + 1):
        if limit is not None and _over_budget(time.perf_counter() - t0 > 60 * limit, group):
            log(f"time limit of {limit:g} min reached after {steps_done} steps")
            break
        steps_done = step
        opt.zero_grad(set_to_none=True)
        res = learner.step(sampler.sample(step))
        opt.step()
        if step == start:
            log(f"strategy: {learner.chosen_strategy} ({learner.strategy_reason})")
        if cfg.get("val_every") and (step % cfg["val_every"] == 0 or step == cfg["steps"]):
            # Mean query loss over all ranks' tasks, for the log only (2 numbers).
            tl = all_reduce_mean(res.per_task_loss.sum().reshape(1).double(), len(res.per_task_loss), group) \
                if group is not None else res.per_task_loss.double().mean().reshape(1)
            val = evaluate_tasks(learner, src.val, cfg["val_tasks"])
            history.append(dict(step=step, train_loss=float(tl[0]), val_loss=val.loss, val_accuracy=val.accuracy,
                                seconds=time.perf_counter() - t0))
            log(f"step {step}: train loss {float(tl[0]):.4f}, meta-validation {val}")
            if out is not None:
                save_checkpoint(out, _payload(cfg, src, model, opt, step, history), group)
    train_seconds = time.perf_counter() - t0
    test = evaluate_tasks(learner, src.test, cfg["test_tasks"])
    dev = getattr(learner, "_dist_ev", None)
    summary = dict(train_seconds=train_seconds, steps=steps_done, test_loss=test.loss, test_loss_ci95=test.loss_ci95,
                   test_accuracy=test.accuracy, test_accuracy_ci95=test.accuracy_ci95, test_tasks=test.num_tasks,
                   strategy=learner.chosen_strategy, split=src.split, world_size=world, rank=rank,
                   comm_seconds=dev.comm_seconds if dev is not None else 0.0,
                   all_reduces=dev.reductions if dev is not None else 0)
    if cfg["task"] == "sinusoid":
        summary["pre_adaptation_mse"] = pre_adaptation_loss(learner, src.test, cfg["test_tasks"])
    log(f"meta-test on {test.num_tasks} tasks: {test}; training {train_seconds:.1f} s on {world} rank(s), "
        f"{summary['comm_seconds']:.2f} s in {summary['all_reduces']} all-reduces (rank {rank})")
    if out is not None:
        save_checkpoint(out, _payload(cfg, src, model, opt, steps_done, history, summary), group)
        log(f"checkpoint: {out}")
    summary["final_params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    summary["learner"] = learner
    return summary


# ---------------------------------------------------------------------------------------------
# cost of the communication
def _bench_worker(rank: int, world: int, sizes, repeats: int, dtype_name: str):
    dtype = getattr(torch, dtype_name)
    out = {}
    for n in sizes:
        buf = torch.ones(n + 1, dtype=dtype)  # P floats + the task count, as in all_reduce_mean
        for _ in range(2):
            dist.all_reduce(buf)
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            times.append(time.perf_counter() - t0)
        out[n] = sorted(times)[len(times) // 2]
    return out


def bench_all_reduce(sizes: Sequence[int] = (112_000, 11_000_000), nproc: int = 2, repeats: int = 10,
                     dtype: str = "float32", start_method: str = "spawn") -> dict:
    """Median seconds of one gloo all-reduce of ``n + 1`` numbers for each ``n`` in ``sizes``, among
    ``nproc`` local ranks over loopback (rank 0's timing)."""
    return launch(_bench_worker, nproc, (tuple(sizes), repeats, dtype), start_method=start_method,
                  pg_timeout=600.0, threads=1)[0]


def _main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastmeta.distributed",
                                description="Time the per-step all-reduce of the meta-gradient (gloo, loopback).")
    p.add_argument("--sizes", type=int, nargs="+", default=[112_000, 11_000_000], help="P, parameters")
    p.add_argument("--nproc", type=int, nargs="+", default=[2, 3])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--start-method", default="spawn", choices=["spawn", "fork"],
                   help="fork: ranks inherit the imported torch (fast start on a loaded machine)")
    args = p.parse_args(argv)
    print(f"gloo all_reduce over loopback (127.0.0.1), {args.dtype}, median of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| ranks | P | MB per rank | ms per all-reduce | MB/s (payload / time) |")
    print("| --- | --- | --- | --- | --- |")
    for n in args.nproc:
        res = bench_all_reduce(args.sizes, n, args.repeats, args.dtype, start_method=args.start_method)
        for size, sec in res.items():
            mb = (size + 1) * torch.tensor([], dtype=getattr(torch, args.dtype)).element_size() / 1e6
            print(f"| {n} | {size:,} | {mb:.2f} | {1e3 * sec:.2f} | {mb / sec:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
