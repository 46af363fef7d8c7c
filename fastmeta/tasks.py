"""``TaskBatch``: a meta-batch of T tasks as tensors with a leading task dimension."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence, Union

import torch

_FIELDS = ("support_x", "support_y", "query_x", "query_y", "hessian_x", "hessian_y")


@dataclass
class TaskBatch:
    """T tasks, each with a support set (inner loop, D_in) and a query set (outer loss, D_o).

    Shapes (N_s, N_q, N_h samples per task; ``...`` the input's own shape):
        support_x ``[T, N_s, ...]``, support_y ``[T, N_s, ...]``
        query_x   ``[T, N_q, ...]``, query_y   ``[T, N_q, ...]``
        hessian_x ``[T, N_h, ...]``, hessian_y ``[T, N_h, ...]`` (optional; HF-MAML's D_h in
        Fallah et al. eq. 10. When absent the support set is used, which is what makes
        HF-MAML converge to exact MAML as delta -> 0.)

    ``ways``: number of classes for classification; when given, integer labels are checked to
    lie in ``[0, ways)``. Integer labels are class indices in any case: a negative one (e.g.
    cross-entropy's ignore index -100) is refused, and :class:`~fastmeta.MetaLearner` checks the
    largest against the model's number of outputs. ``label_range``: ``(min, max)`` over all
    integer labels, or ``None`` when the labels are not integers.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    hessian_x: Optional[torch.Tensor] = None
    hessian_y: Optional[torch.Tensor] = None
    ways: Optional[int] = None

    def __post_init__(self) -> None:
        present = {n: getattr(self, n) for n in _FIELDS if getattr(self, n) is not None}
        for name, t in present.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dim() < 2:
                raise ValueError(f"{name}: expected shape [T, N, ...] with a leading task dim, got {tuple(t.shape)}")
        if (self.hessian_x is None) != (self.hessian_y is None):
            raise ValueError("hessian_x/hessian_y: give both or neither")
        T = self.support_x.shape[0]
        if T == 0:
            raise ValueError("support_x: the TaskBatch has no tasks (T = 0)")
        for name, t in present.items():
            if t.shape[0] != T:
                raise ValueError(f"{name}: has {t.shape[0]} tasks but support_x has {T}; every tensor needs the same task count T")
        for x, y in (("support_x", "support_y"), ("query_x", "query_y"), ("hessian_x", "hessian_y")):
            if x in present and present[x].shape[1] != present[y].shape[1]:
                raise ValueError(f"{y}: has {present[y].shape[1]} samples per task but {x} has {present[x].shape[1]}")
            if x in present and present[x].shape[1] == 0:
                raise ValueError(f"{x}: has no samples")
        devices = {t.device for t in present.values()}
        if len(devices) != 1:
            raise ValueError(f"TaskBatch: all tensors must be on one device, got {sorted(map(str, devices))}")
        xdt = {present[n].dtype for n in present if n.endswith("_x")}
        if len(xdt) != 1:
            raise ValueError(f"TaskBatch: inputs (*_x) must share one dtype, got {xdt}")
        if self.ways is not None and self.ways < 1:
            raise ValueError(f"ways: expected >= 1, got {self.ways}")
        labels = {n: present[n] for n in ("support_y", "query_y", "hessian_y") if n in present}
        if self.ways is not None:
            for name, y in labels.items():
                if y.is_floating_point():
                    raise ValueError(f"{name}: classification labels must be integers, got {y.dtype}")
        ints = {n: y for n, y in labels.items() if not y.is_floating_point() and y.dtype != torch.bool and y.numel()}
        self.label_range = None
        if ints:
            # All label ranges in one host transfer (one device sync on a GPU, not one per tensor).
            bounds = torch.stack([torch.stack([y.min(), y.max()]).to(torch.int64) for y in ints.values()]).tolist()
            hi_bound = self.ways if self.ways is not None else None
            for (name, _), (lo, hi) in zip(ints.items(), bounds):
                if lo < 0 or (hi_bound is not None and hi >= hi_bound):
                    allowed = f"[0, {self.ways})" if hi_bound is not None else "[0, number of classes)"
                    raise ValueError(f"{name}: labels must lie in {allowed}, found range [{lo}, {hi}]")
            self.label_range = (min(b[0] for b in bounds), max(b[1] for b in bounds))

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    @property
    def device(self) -> torch.device:
        return self.support_x.device

    def __len__(self) -> int:
        return self.num_tasks

    def select(self, idx) -> "TaskBatch":
        """Tasks ``idx`` (an int keeps the task dim: ``select(3)`` is a batch of one task)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        kw = {f.name: (getattr(self, f.name)[idx] if getattr(self, f.name) is not None and f.name in _FIELDS
                       else getattr(self, f.name)) for f in fields(self)}
        out = object.__new__(TaskBatch)
        out.__dict__.update(kw)  # a sub-batch of a valid batch is valid: skip re-validation
        out.label_range = self.label_range  # the whole batch's range bounds the sub-batch's
        return out

    def to(self, *args, **kwargs) -> "TaskBatch":
        """Move inputs (``*_x``) with ``.to(*args)``; labels move device only."""
        new = {}
        for n in _FIELDS:
            t = getattr(self, n)
            if t is None:
                continue
            if n.endswith("_x"):
                new[n] = t.to(*args, **kwargs)
            else:
                dev = next((a for a in args if isinstance(a, (torch.device, str))), kwargs.get("device"))
                new[n] = t.to(dev) if dev is not None else t
        return replace(self, **new)

    @property
    def hessian(self) -> tuple[torch.Tensor, torch.Tensor]:
        """D_h of Fallah eq. 10: the Hessian batch if given, else the support set (D_in)."""
        if self.hessian_x is not None:
            return self.hessian_x, self.hessian_y
        return self.support_x, self.support_y

    @classmethod
    def from_tasks(cls, tasks: Sequence[Sequence[torch.Tensor]], ways: Optional[int] = None
                   ) -> Union["TaskBatch", "RaggedTaskBatch"]:
        """A meta-batch from a list of per-task tuples ``(support_x [N_s, ...], support_y [N_s, ...],
        query_x [N_q, ...], query_y [N_q, ...])`` (optionally ``+ (hessian_x, hessian_y)``).

        Tasks of equal shapes stack into one :class:`TaskBatch`. Tasks of unequal sizes (ragged:
        different shot counts, query sizes or input sizes) give a :class:`RaggedTaskBatch`: the tasks
        grouped by shape, each group a TaskBatch, never padded (padding would enter the loss and,
        in a BatchNorm model, the batch statistics). :class:`~fastmeta.MetaLearner` takes both and
        averages over all tasks exactly as if they were one batch.
        """
        tasks = list(tasks)
        if not tasks:
            raise ValueError("tasks: expected at least one task")
        for i, t in enumerate(tasks):
            if not isinstance(t, (tuple, list)) or len(t) not in (4, 6):
                raise ValueError(f"tasks[{i}]: expected a tuple (support_x, support_y, query_x, query_y"
                                 f"[, hessian_x, hessian_y]), got {type(t).__name__}"
                                 + (f" of length {len(t)}" if isinstance(t, (tuple, list)) else ""))
            if len(t) != len(tasks[0]):
                raise ValueError(f"tasks[{i}]: has {len(t)} tensors but tasks[0] has {len(tasks[0])}")
            for n, v in zip(_FIELDS, t):
                if not isinstance(v, torch.Tensor) or v.dim() < 1:
                    raise ValueError(f"tasks[{i}]: {n} must be a tensor [N, ...], got "
                                     f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(tasks):
            groups.setdefault(tuple((tuple(v.shape), v.dtype) for v in t), []).append(i)
        batches = [cls(*(torch.stack([tasks[i][k] for i in idx]) for k in range(len(tasks[0]))), ways=ways)
                   for idx in groups.values()]
        if len(batches) == 1:
            return batches[0]
        return RaggedTaskBatch(batches, [torch.tensor(idx) for idx in groups.values()])


class RaggedTaskBatch:
    """T tasks of unequal sizes, as groups of equal-shape tasks (see :meth:`TaskBatch.from_tasks`).

    ``groups``: the :class:`TaskBatch` of each shape; ``index``: for each group, the positions
    ``[T_g]`` of its tasks in the original list (per-task results come back in that order).
    """

    def __init__(self, groups: Sequence[TaskBatch], index: Sequence[torch.Tensor]):
        if len(groups) != len(index) or not groups:
            raise ValueError("groups: expected one index tensor per group and at least one group")
        devices = {g.device for g in groups}
        if len(devices) != 1:
            raise ValueError(f"groups: all tasks must be on one device, got {sorted(map(str, devices))}")
        self.groups, self.index = list(groups), list(index)
        ranges = [g.label_range for g in groups if g.label_range is not None]
        self.label_range = (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else None

    @property
    def num_tasks(self) -> int:
        return sum(g.num_tasks for g in self.groups)

    @property
    def device(self) -> torch.device:
        return self.groups[0].device

    def __len__(self) -> int:
        return self.num_tasks

    def to(self, *args, **kwargs) -> "RaggedTaskBatch":
        return RaggedTaskBatch([g.to(*args, **kwargs) for g in self.groups], self.index)

    def reorder(self, per_group: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-task values ``[T_g, ...]`` of each group -> ``[T, ...]`` in the original task order."""
        out = per_group[0].new_empty((self.num_tasks, *per_group[0].shape[1:]))
        for idx, v in zip(self.index, per_group):
            out[idx.to(v.device)] = v
        return out
