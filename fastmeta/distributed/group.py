"""Process groups: initialization with a timeout, the group a run shards over, and the wrapper
that turns a failed collective into :class:`RankFailure` instead of a hang."""
from __future__ import annotations

import datetime
import os
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

# Default process-group timeout for `fastmeta train --nproc` / torchrun runs: long enough for a
# validation pass or a checkpoint write on one rank while the others wait in the next collective,
# short enough that a dead rank does not hold a job for torch's default 30 minutes.
DEFAULT_TIMEOUT = 300.0
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

T = TypeVar("T")


class RankFailure(RuntimeError):
    """A collective failed: a peer rank died, stalled past the process-group timeout, or the
    connection broke. Raised on the surviving ranks instead of hanging."""


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


def collective(what: str, group, fn: Callable[[], T]) -> T:
    """``fn()``, a collective on ``group``; its failure becomes :class:`RankFailure` naming ``what``
    and this rank (torch raises a bare RuntimeError that does not say a peer is the cause)."""
    try:
        return fn()
    except (RuntimeError, ConnectionError) as e:  # DistBackendError / gloo errors are RuntimeErrors
        r, w = rank_and_size(group)
        raise RankFailure(
            f"fastmeta.distributed: {what} failed on rank {r} of {w}: a peer rank died, stalled longer than the "
            f"process-group timeout, or the connection broke ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
        ) from e


def broadcast_object(obj, group, what: str):
    """Rank 0's ``obj`` (any picklable object) on every rank of ``group``."""
    box = [obj]
    collective(f"broadcast of the {what}", group,
               lambda: dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group))
    return box[0]
