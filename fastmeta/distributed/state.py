"""Training state across ranks: rank 0's parameters broadcast at the start, checkpoints written
by rank 0 only (atomically), and on resume read by rank 0 and broadcast, so that only rank 0's
machine needs the file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .group import broadcast_object, collective, rank_and_size, resolve_group


def broadcast_module(model: torch.nn.Module, group, src_rank: int = 0) -> None:
    """Copy rank ``src_rank``'s parameters and buffers to every rank (start of training)."""
    src = dist.get_global_rank(group, src_rank)
    with torch.no_grad():
        for t in model.state_dict().values():
            collective("broadcast of the initial parameters", group, lambda t=t: dist.broadcast(t, src, group=group))


def save_checkpoint(path, payload: dict, process_group=None) -> None:
    """Write ``payload`` with ``torch.save`` atomically (a temporary file in the same folder, fsync,
    ``os.replace``: a crash leaves the old file or the new one, never half of one). Under a
    process group (``None``: the default group, if any) only rank 0 writes; the others return."""
    if rank_and_size(resolve_group(process_group))[0] != 0:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_for_resume(path, process_group=None, load: Optional[Callable[[Path], dict]] = None) -> Optional[dict]:
    """Rank 0 reads the checkpoint at ``path`` (None if absent) with ``load`` (default:
    ``torch.load(weights_only=True)`` to CPU); every rank receives it by broadcast."""
    group = resolve_group(process_group)
    payload = None
    if rank_and_size(group)[0] == 0 and Path(path).exists():
        payload = (load or _load)(Path(path))
    if group is not None:
        payload = broadcast_object(payload, group, "resume checkpoint")
    return payload


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
