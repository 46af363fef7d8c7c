"""Which tasks each rank evaluates: contiguous shards of the task indices and a sampler whose
tasks are seeded by ``(seed, step, index)``, so that shards are disjoint, reproducible without
state and their union is the same meta-batch for every world size."""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import torch

from ..tasks import _FIELDS, TaskBatch
from .group import rank_and_size, resolve_group


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
        self._indices = shard_range(meta_batch, self.rank, self.world_size)  # validates
        self.source, self.meta_batch, self.seed = source, meta_batch, seed

    @property
    def indices(self) -> range:
        """Global task indices this rank evaluates (the same block at every step)."""
        return self._indices

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
        return self.tasks(step, self._indices)

    def full(self, step: int) -> TaskBatch:
        """The whole meta-batch ``[T, ...]`` of ``step`` (what a single process evaluates)."""
        return self.tasks(step, range(self.meta_batch))
