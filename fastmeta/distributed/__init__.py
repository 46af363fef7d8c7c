"""Meta-batches across processes and machines with ``torch.distributed``.

The task dimension of a meta-batch is sharded across the ranks of a process group (gloo on CPU,
NCCL on CUDA; launched by ``fastmeta train --nproc N`` or by ``torchrun``). Each rank runs the
unchanged algorithm on its shard of T_r tasks; the only change is the reduction of per-task
meta-gradients, which becomes one all-reduce of ``P + 1`` numbers per reduction and gives every
rank the exact mean over all T tasks (:class:`TaskReduction`, set up by
``MetaLearner(process_group=...)``).

* :mod:`.group`: :func:`init` (process-group timeout: a dead or stalled rank makes the others
  raise :class:`RankFailure` instead of hanging), :func:`resolve_group`, :func:`rank_and_size`,
  :func:`under_torchrun`.
* :mod:`.reduce`: :func:`all_reduce_mean`, :class:`TaskReduction`, :func:`any_rank`.
* :mod:`.sampling`: :class:`ShardedTaskSampler`: task ``i`` of step ``s`` is drawn from a
  generator seeded by ``(seed, s, i)``; rank r draws only its contiguous block of task indices.
  Shards are disjoint, reproducible without state (resume needs no sampler state) and the union
  over ranks does not depend on the world size, so a 1-process run sees the same meta-batches as
  an N-process run. :func:`shard`, :func:`shard_range`, :func:`concat`, :func:`task_seed`.
* :mod:`.state`: :func:`broadcast_module`, :func:`save_checkpoint` (rank 0 writes, atomically)
  and :func:`load_for_resume` (rank 0 reads, every rank receives it by broadcast: no shared file
  system needed across machines).
* :mod:`.launch`: :func:`launch` (N local gloo ranks over loopback), :class:`LaunchError`.
* :mod:`.bench`: :func:`bench_all_reduce` (``python -m fastmeta.distributed``).

The training loop that uses all of this for ``fastmeta train --nproc N`` / torchrun is
:func:`fastmeta.training.train` (the same loop as for one process).
"""
from .bench import bench_all_reduce
from .group import DEFAULT_TIMEOUT, RankFailure, init, rank_and_size, resolve_group, under_torchrun
from .launch import LaunchError, launch
from .reduce import TaskReduction, all_reduce_mean, any_rank
from .sampling import ShardedTaskSampler, concat, shard, shard_range, task_seed
from .state import broadcast_module, load_for_resume, save_checkpoint

__all__ = ["init", "resolve_group", "rank_and_size", "under_torchrun", "RankFailure", "DEFAULT_TIMEOUT",
           "all_reduce_mean", "TaskReduction", "any_rank", "shard_range", "shard", "concat", "task_seed",
           "ShardedTaskSampler", "broadcast_module", "save_checkpoint", "load_for_resume", "launch", "LaunchError",
           "bench_all_reduce"]
