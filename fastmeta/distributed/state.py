"""Training state across ranks: rank 0's parameters broadcast at the start, the output path
checked by rank 0 before training, checkpoints written by rank 0 only (atomically), and on resume
read by rank 0 and broadcast, so that only rank 0's machine needs the file."""
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
    ``torch.load(weights_only=True)`` to CPU); every rank receives it by broadcast. If rank 0
    cannot read it, every rank raises rank 0's error (same type and message), so that no rank waits
    in the broadcast for a payload that never comes."""
    group = resolve_group(process_group)
    payload, error = None, None
    if rank_and_size(group)[0] == 0 and Path(path).exists():
        try:
            payload = (load or _load)(Path(path))
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    if group is not None:
        sent = ("error", _portable(error)) if error is not None else ("ok", payload)
        kind, value = broadcast_object(sent, group, "resume checkpoint")
        if kind == "error":
            error = value
        else:
            payload = value
    if error is not None:
        raise error
    return payload


def _portable(e: BaseException) -> BaseException:
    # What travels to the other ranks: the error's type when it is a builtin one (ValueError,
    # OSError, ...), else ValueError; its message either way (tracebacks do not pickle).
    cls = type(e)
    for base in cls.__mro__:
        if base.__module__ == "builtins" and issubclass(base, Exception):
            try:
                return base(str(e))
            except Exception:  # noqa: BLE001 - a constructor with other arguments
                break
    return ValueError(str(e))


def probe_writable(path, process_group=None) -> None:
    """Check that the checkpoint ``path`` can be written, before any training: rank 0 creates its
    folder and writes and removes a probe file there. A failure raises on every rank of the group:
    ``ValueError`` (``path`` is a folder), ``PermissionError`` or another ``OSError``, each naming
    ``out`` and the path."""
    group = resolve_group(process_group)
    error = None
    if rank_and_size(group)[0] == 0:
        try:
            _probe(Path(path))
        except OSError as e:
            error = type(e)(f"out: cannot write the checkpoint {path}: {e.strerror or e}")
        except ValueError as e:
            error = e
    if group is not None:
        error = broadcast_object(None if error is None else _portable(error), group, "output path check")
    if error is not None:
        raise error


def _probe(path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"out: {path} is a directory; expected a checkpoint file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.probe.", dir=path.parent)
    try:
        os.write(fd, b"fastmeta write probe")
        os.fsync(fd)
    finally:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
