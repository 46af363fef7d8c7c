"""The ``fastmeta train`` checkpoint: what it holds, how it is written and read, and when a run
may resume from it.

A checkpoint is a ``torch.save``'d dict of plain tensors and primitives (readable with
``weights_only=True``): ``format`` (:data:`CHECKPOINT_FORMAT`), ``step``, ``config`` (the run's
plain config values), ``model_config``, ``model_state``, ``optimizer_state``, ``history`` (one
entry per validation) and, at the end of a run, ``summary``. Only rank 0 writes it:
:func:`save_checkpoint` is :func:`fastmeta.distributed.save_checkpoint` (atomic; a process
without a group is rank 0).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..distributed.state import load_for_resume as _broadcast_load
from ..distributed.state import save_checkpoint

CHECKPOINT_FORMAT = "fastmeta-checkpoint/1"

# The config keys that fix a run's task stream and update rule: a resumed run must match them.
_RESUME_KEYS = ("task", "algo", "meta_batch", "seed", "inner_lr", "inner_steps", "float64")

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "payload", "load_for_resume", "check_resume"]


def load_checkpoint(path) -> dict:
    """Load a fastmeta checkpoint with ``weights_only=True`` (plain tensors and primitives only)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"ckpt: {path} is not a fastmeta checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def payload(cfg: dict, model_config: dict, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int,
            history: list, summary: Optional[dict] = None) -> dict:
    """The checkpoint of a run at ``step``; values that are not plain (e.g. the learner, a split
    dict, tensors) are left out of ``config`` and ``summary``."""
    plain = {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    res = dict(format=CHECKPOINT_FORMAT, step=step, config=plain, model_config=model_config,
               model_state=model.state_dict(), optimizer_state=opt.state_dict(), history=history)
    if summary is not None:
        res["summary"] = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, type(None)))}
    return res


def load_for_resume(path, group=None) -> Optional[dict]:
    """The checkpoint at ``path`` (None if absent) on every rank: rank 0 reads, the others receive."""
    return _broadcast_load(Path(path), group, load=load_checkpoint)


def check_resume(cfg: dict, ckpt: dict) -> None:
    """Raise ``ValueError`` (naming ``resume``) unless ``ckpt`` continues the run ``cfg`` describes."""
    old = ckpt.get("config", {})
    for key in _RESUME_KEYS:
        if old.get(key) != cfg.get(key):
            raise ValueError(f"resume: the checkpoint was trained with {key}={old.get(key)!r}, "
                             f"this run has {key}={cfg.get(key)!r}")
    if old.get("sampler") != "sharded":
        raise ValueError("resume: the checkpoint was not written by a `--nproc` run (its task stream differs)")
