"""The reductions across ranks: the exact task mean of the meta-gradient and the flag that stops
every rank at the same step.

Each rank holds the sum of its T_r tasks' meta-gradients:

    local:  s_r = sum_{m in shard r} g_m   ([P]),   n_r = T_r
    global: all_reduce_SUM([s_r | n_r])  ->  g = (sum_r s_r) / (sum_r n_r)

one all-reduce of ``P + 1`` numbers, so every rank ends with the exact mean over all T tasks,
also when T is not divisible by the world size (a mean of per-rank means would weight tasks
unevenly).
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .group import broadcast_object, collective


def all_reduce_mean(grad_sum: torch.Tensor, n_local: int, group) -> torch.Tensor:
    """Exact mean over all ranks' tasks: ``sum_r grad_sum_r / sum_r n_local_r`` (``[P]``).

    One all-reduce of ``P + 1`` numbers (the task count rides along with the gradient).
    """
    buf = torch.cat([grad_sum.detach().reshape(-1), grad_sum.new_tensor([float(n_local)])])
    collective("all_reduce of the meta-gradient", group, lambda: dist.all_reduce(buf, group=group))
    return buf[:-1] / buf[-1]


class TaskReduction:
    """The reduction a :class:`~fastmeta.MetaLearner` with a process group applies to per-task sums.

    :meth:`mean` is called by :meth:`fastmeta.evaluation.Evaluator.over_tasks`, the one place
    every algorithm reduces per-task meta-gradients, so an algorithm that reduces twice gets two
    all-reduces: Sharp-MAML_up / _both normalize the *global* first-pass meta-gradient for the meta
    perturbation (Sharp-MAML eq. 13 / 20) and reduce pass 2 (eq. 15 / 21) again. HF-MAML's delta
    rule (Fallah Thm. 4.17) and ESAM's SDS selection act per task and communicate nothing.

    Attributes: ``group``; ``comm_seconds``: time spent in :meth:`mean`'s all-reduces (including
    waiting for slower ranks); ``reductions``: how many there were.
    """

    def __init__(self, group):
        if not isinstance(group, dist.ProcessGroup):
            raise ValueError(f"group: expected a torch.distributed.ProcessGroup, got {type(group).__name__}")
        self.group = group
        self.comm_seconds = 0.0
        self.reductions = 0

    def mean(self, grad_sum: torch.Tensor, n_local: int) -> torch.Tensor:
        """The mean ``[P]`` over all ranks' tasks from this rank's task sum ``[P]`` of ``n_local`` tasks."""
        t0 = time.perf_counter()
        g = all_reduce_mean(grad_sum, n_local, self.group)
        self.comm_seconds += time.perf_counter() - t0
        self.reductions += 1
        return g

    def agree(self, value):
        """Rank 0's ``value`` (picklable) on every rank: e.g. the strategy each rank timed on its own
        shard, so that all run the same code (and the same floating-point summation order)."""
        return broadcast_object(value, self.group, "evaluation strategy")

    def __repr__(self) -> str:
        return f"TaskReduction(reductions={self.reductions}, comm_seconds={self.comm_seconds:.3f})"


def any_rank(flag: bool, group) -> bool:
    """True on every rank of ``group`` when ``flag`` is true on any (``flag`` itself without a group).

    The training loop's time limit: each rank's clock differs a little, and stopping on rank 0's
    word alone would still need a broadcast; a MAX all-reduce of one flag costs the same (~0.1 ms
    on loopback, once per step) while keeping all ranks at the same step (else one rank would wait
    forever at the next gradient all-reduce).
    """
    if group is None:
        return flag
    # NCCL reduces CUDA tensors only; gloo, CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    buf = torch.tensor([1.0 if flag else 0.0], device=device)
    collective("all_reduce of the time-limit flag", group,
               lambda: dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group))
    return bool(buf[0] > 0)
