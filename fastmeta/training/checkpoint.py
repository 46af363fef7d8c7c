"""The ``fastmeta train`` checkpoint: what it holds, how it is written and read, and when a run
may resume from it.

A checkpoint is a ``torch.save``'d dict of plain tensors and primitives (readable with
``weights_only=True``):

* ``format`` (:data:`CHECKPOINT_FORMAT`), ``step``, ``config`` (the run's plain config values),
  ``model_config``, ``model_state``, ``optimizer_state``, ``history`` (one entry per validation)
  and, once the meta-test has run, ``summary``;
* ``rng``: everything a resumed run needs to continue the same random streams (torch's global
  RNG, the training task sampler's generator, generators of the algorithm), and
  ``strategy_chosen``: the evaluation strategy in use (what ``"auto"`` picked);
* ``split`` (Omniglot: the train/val/test alphabets; image tasks: the class names per split) and
  ``data`` (:func:`fastmeta.training.config.data_fingerprint`), so that ``fastmeta evaluate``
  meta-tests on the alphabets or classes held out in training and refuses other data;
* ``algorithm_state`` (the algorithm's learned tensors, e.g. Meta-SGD's inner rates; empty for MAML);
* ``resumes``: one entry per resume (``step``, ``world_size`` and the config values it
  ``changed``: ``{key: [old, new]}``);
* ``checksum``: sha256 over everything else (tensor bytes included), verified on load.

Only rank 0 writes it: :func:`save_checkpoint` adds the checksum and writes atomically through
:func:`fastmeta.distributed.save_checkpoint` (a process without a group is rank 0).
"""
from __future__ import annotations

import hashlib
import math
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Optional

import torch

from ..distributed.group import rank_and_size, resolve_group
from ..distributed.state import load_for_resume as _broadcast_load
from ..distributed.state import save_checkpoint as _atomic_save

CHECKPOINT_FORMAT = "fastmeta-checkpoint/2"
# Format 1 (before checksums, RNG states and stored data splits) is still read; see load_checkpoint.
_OLD_FORMATS = ("fastmeta-checkpoint/1",)

# Config keys a resumed run may change freely: they say how long and where the run goes, how it
# is watched and how its ranks talk, not what it computes. Every other key must match the
# checkpoint's (or be overridden with allow_changed).
FREE_KEYS = frozenset({"steps", "out", "resume", "progress", "time_limit", "nproc", "world_size", "dist_timeout",
                       "val_every", "val_tasks", "test_tasks", "data_root", "command", "debug", "allow_changed",
                       "allow_data_mismatch"})

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint", "payload", "with_summary",
           "load_for_resume", "check_resume", "resume_differences", "checksum"]


class CheckpointError(ValueError):
    """A file that is not a readable, intact fastmeta checkpoint (the message names ``ckpt``, the
    path and what is wrong)."""


# ------------------------------------------------------------------------------------- checksum
def _feed(h, obj) -> None:
    # A canonical byte encoding: type tag, then the value; dict entries in sorted key order, so that
    # the digest does not depend on insertion order (which pickling preserves anyway).
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(b"T" + str(t.dtype).encode() + repr(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"D" + struct.pack("<q", len(obj)))
        for k in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(b"L" + struct.pack("<q", len(obj)))
        for v in obj:
            _feed(h, v)
    elif obj is None or isinstance(obj, bool):
        h.update(b"B" + repr(obj).encode())
    elif isinstance(obj, int):
        h.update(b"I" + str(obj).encode() + b";")
    elif isinstance(obj, float):
        h.update(b"F" + (obj.hex() if math.isfinite(obj) else repr(obj)).encode())
    elif isinstance(obj, str):
        b = obj.encode()
        h.update(b"S" + struct.pack("<q", len(b)) + b)
    else:  # torch.dtype, torch.Size, ...: not in our payloads, but digest them deterministically
        h.update(b"O" + type(obj).__name__.encode() + repr(obj).encode())


def checksum(ckpt: dict) -> str:
    """sha256 (hex) over every entry of ``ckpt`` except ``checksum``: tensor dtypes, shapes and
    bytes, and all plain values."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in ckpt.items() if k != "checksum"})
    return h.hexdigest()


# --------------------------------------------------------------------------------- save / load
def save_checkpoint(path, payload: dict, process_group=None) -> None:
    """Write ``payload`` (plus its :func:`checksum`) atomically; under a process group only rank 0
    writes. ``payload`` itself is not modified."""
    if rank_and_size(resolve_group(process_group))[0] != 0:
        return
    _atomic_save(path, dict(payload, checksum=checksum(payload)), process_group)


def _corrupt(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"ckpt: {path} {what}")


def load_checkpoint(path) -> dict:
    """Load a fastmeta checkpoint with ``weights_only=True`` (plain tensors and primitives only)
    and verify its checksum.

    Raises ``FileNotFoundError`` for a missing file and :class:`CheckpointError` (a
    ``ValueError``) naming ``ckpt``, the path and the problem for anything else: empty,
    truncated or corrupt, not a fastmeta checkpoint, checksum mismatch."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ckpt: {path} does not exist")
    if path.is_dir():
        raise _corrupt(path, "is a directory, not a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise _corrupt(path, "is empty (0 bytes): not a checkpoint (an interrupted copy?)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch reports these as OSError, EOFError, RuntimeError, UnpicklingError
        if not zipfile.is_zipfile(path):
            why = f"is truncated or corrupt, or not a torch.save file ({size} bytes; {type(e).__name__})"
        elif isinstance(e, pickle.UnpicklingError):
            # weights_only refused an object: a torch.save of something other than plain values.
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            why = ("is not a fastmeta checkpoint: it holds Python objects, not only tensors and plain values"
                   + (f" ({found.group(1)})" if found else ""))
        else:
            why = f"is truncated or corrupt ({size} bytes; {type(e).__name__}: {str(e).splitlines()[0][:200]})"
        raise _corrupt(path, why) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (CHECKPOINT_FORMAT, *_OLD_FORMATS):
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise _corrupt(path, f"is not a fastmeta checkpoint (expected format {CHECKPOINT_FORMAT!r}, found "
                             f"{found!r})")
    missing = [k for k in ("step", "config", "model_config", "model_state") if k not in ckpt]
    if missing:
        raise _corrupt(path, f"is incomplete: it lacks {missing}")
    if ckpt["format"] == CHECKPOINT_FORMAT:
        stored = ckpt.get("checksum")
        if not isinstance(stored, str):
            raise _corrupt(path, "has no checksum (every checkpoint of this format carries one): corrupt or edited")
        actual = checksum(ckpt)
        if actual != stored:
            raise _corrupt(path, f"failed its checksum (stored {stored[:16]}..., computed {actual[:16]}...): the "
                                 f"file is corrupt; use an earlier copy or retrain")
    return ckpt


def load_for_resume(path, group=None) -> Optional[dict]:
    """The checkpoint at ``path`` (None if absent) on every rank: rank 0 reads, the others receive
    (a file rank 0 cannot read raises the same error on every rank)."""
    return _broadcast_load(Path(path), group, load=load_checkpoint)


# --------------------------------------------------------------------------------------- payload
def _plain(d: dict, types: tuple) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, types)}


def payload(cfg: dict, model_config: dict, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int,
            history: list, summary: Optional[dict] = None, **extra) -> dict:
    """The checkpoint of a run at ``step``; values that are not plain (e.g. the learner, tensors)
    are left out of ``config`` and ``summary``. ``extra``: further top-level entries (``rng``,
    ``strategy_chosen``, ``split``, ``data``, ``resumes``)."""
    res = dict(format=CHECKPOINT_FORMAT, step=step,
               config=_plain(cfg, (int, float, str, bool, list, type(None))), model_config=model_config,
               model_state=model.state_dict(), optimizer_state=opt.state_dict(), history=list(history), **extra)
    return res if summary is None else with_summary(res, summary)


def with_summary(ckpt: dict, summary: dict) -> dict:
    """``ckpt`` with the plain values of a run's ``summary`` (a new dict; ``ckpt`` is unchanged)."""
    return dict(ckpt, summary=_plain(summary, (int, float, str, type(None))))


# ---------------------------------------------------------------------------------------- resume
def _norm(v):
    # A key a config does not have, None and False mean "off" alike (older configs lack newer keys).
    return None if v is False else v


def effective_strategy(config: dict, chosen: Optional[str]) -> Optional[str]:
    """The evaluation strategy a run uses: the one given, or what ``"auto"`` chose."""
    s = config.get("strategy", "auto")
    return chosen if s == "auto" else s


def resume_differences(cfg: dict, ckpt: dict, data: Optional[dict] = None) -> dict:
    """``{key: [checkpoint's value, this run's value]}`` for every setting in which the run ``cfg``
    differs from the run that wrote ``ckpt`` (keys in :data:`FREE_KEYS` excepted). ``data``: this
    run's data fingerprint (compared with the checkpoint's ``data`` by its ``sha256``)."""
    old = ckpt.get("config", {})
    diff = {}
    for key in sorted(set(old) | set(cfg)):
        if key in FREE_KEYS or key in ("strategy", "sampler"):
            continue
        a, b = _norm(old.get(key)), _norm(cfg.get(key))
        if a != b:
            diff[key] = [old.get(key), cfg.get(key)]
    a, b = old.get("sampler", "plain"), cfg.get("sampler", "plain")
    if a != b:
        diff["sampler"] = [a, b]
    chosen = ckpt.get("strategy_chosen")
    a, b = effective_strategy(old, chosen), effective_strategy(cfg, chosen)
    if a is not None and b is not None and a != b:
        diff["strategy"] = [a, b]
    old_data = (ckpt.get("data") or {}).get("sha256")
    new_data = (data or {}).get("sha256")
    if old_data != new_data:
        diff["data"] = [_describe_data(ckpt.get("data")), _describe_data(data)]
    return diff


def _describe_data(fp: Optional[dict]) -> Optional[str]:
    if not fp:
        return None
    roots = ", ".join(f"{r['name']} ({r['images']} images)" for r in fp.get("roots", []))
    return f"{fp.get('images')} images in {fp.get('classes')} classes [{roots}], listing sha256 {fp['sha256'][:12]}"


def check_resume(cfg: dict, ckpt: dict, data: Optional[dict] = None, allow_changed: bool = False) -> dict:
    """Raise ``ValueError`` (naming ``resume`` and listing every difference) unless ``ckpt``
    continues the run ``cfg`` describes; with ``allow_changed`` return the differences instead
    (see :func:`resume_differences`), to be recorded in the checkpoint."""
    diff = resume_differences(cfg, ckpt, data)
    if diff and not allow_changed:
        items = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
        hint = ""
        if "sampler" in diff:
            hint = (" (the checkpoint's task stream is "
                    + ("the sharded one of a --nproc/torchrun run: pass --nproc" if diff["sampler"][0] == "sharded"
                       else "the plain one-process stream: drop --nproc") + ")")
        raise ValueError(f"resume: this run differs from the checkpoint (step {ckpt.get('step')}) in "
                         f"{len(diff)} setting(s): {items}{hint}. Pass --allow-changed (allow_changed=True) to "
                         f"continue with the new values (recorded in the checkpoint), or choose another --out")
    return diff
