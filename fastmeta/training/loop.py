"""The meta-training loop of ``fastmeta train``, for one process and for N.

One loop serves every world size. With ``cfg["nproc"] > 1`` and no process group it launches
``nproc`` local gloo ranks that each run it (:func:`launch_train`); under torchrun it initializes
the group; otherwise it runs in this process (in the group, if one is initialized).

Task streams: a plain one-process run (no ``nproc``, no ``resume``, no group) draws
``src.train.sample(meta_batch)`` per step, like a hand-written loop. A sharded run (``nproc`` given,
``resume``, or a group) draws from :class:`fastmeta.distributed.ShardedTaskSampler`, whose union
over ranks is the same meta-batch for every world size, so a 1-rank and an N-rank run see the
same tasks and a resumed run continues the same stream; such checkpoints record
``sampler="sharded"`` and only they can be resumed. Every rank builds the same model (same seed;
rank 0's values are broadcast) and gets the same averaged meta-gradient, so the optimizers stay
in step without exchanging parameters. Only rank 0 logs, shows progress and writes checkpoints.
Validation and the final meta-test run on every rank (the same tasks; no rank waits at a
collective while another evaluates).
"""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..distributed import (DEFAULT_TIMEOUT, ShardedTaskSampler, all_reduce_mean, any_rank, broadcast_module, init,
                           launch, rank_and_size, resolve_group, shard_range, under_torchrun)
from ..models import build_model
from .checkpoint import check_resume, load_for_resume, payload, save_checkpoint
from .config import TaskSource, learner_from_config
from .evaluate import evaluate_tasks, pre_adaptation_loss


def _quiet(*args, **kwargs) -> None:
    pass


def _train_worker(rank: int, world: int, cfg: dict) -> dict:
    summary = train(cfg, log=functools.partial(print, flush=True) if rank == 0 else _quiet)
    summary.pop("learner", None)  # stays in the rank: only plain values travel back to the caller
    return summary


def launch_train(cfg: dict, nproc: int, start_method: str = "spawn", timeout: Optional[float] = None) -> dict:
    """``fastmeta train --nproc N``: :func:`train` in ``nproc`` local gloo ranks; rank 0's summary."""
    return launch(_train_worker, nproc, (cfg,), timeout=timeout, start_method=start_method,
                  pg_timeout=float(cfg.get("dist_timeout") or DEFAULT_TIMEOUT))[0]


def _check_cfg(cfg: dict) -> None:
    limit, nproc = cfg.get("time_limit"), cfg.get("nproc")
    if limit is not None and not limit > 0:
        raise ValueError(f"time_limit: expected a positive number of minutes, got {limit!r}")
    if nproc is not None and (isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1):
        raise ValueError(f"nproc: expected an int >= 1, got {nproc!r}")


def _resume(cfg: dict, out: Optional[Path], model, opt, group, log) -> tuple[int, list]:
    """Load the checkpoint at ``out`` (if it exists) into ``model`` and ``opt`` on every rank;
    returns the first step to run and the validation history so far."""
    if out is None:
        raise ValueError("resume: needs --out (the checkpoint to resume from)")
    ckpt = load_for_resume(out, group)
    if ckpt is None:
        return 1, []
    check_resume(cfg, ckpt)
    model.load_state_dict(ckpt["model_state"])
    opt.load_state_dict(ckpt["optimizer_state"])
    log(f"resumed from {out} at step {ckpt['step']} on {rank_and_size(group)[1]} rank(s)")
    return ckpt["step"] + 1, list(ckpt.get("history", []))


def train(cfg: dict, log: Optional[Callable[[str], None]] = None) -> dict:
    """Meta-train per ``cfg`` (see ``fastmeta train --help``); returns a summary dict.

    Summary: ``train_seconds``, ``steps``, ``test_loss`` / ``test_accuracy`` (and ``_ci95``),
    ``test_tasks``, ``strategy``, ``split`` (Omniglot alphabets), ``world_size``, ``rank``,
    ``comm_seconds`` / ``all_reduces`` (of the meta-gradient; 0 in one process),
    ``pre_adaptation_mse`` (sinusoid), ``final_params`` (flat ``[P]``) and ``learner``.
    """
    log = log or functools.partial(print, flush=True)
    _check_cfg(cfg)
    nproc = cfg.get("nproc")
    if not dist.is_initialized() and under_torchrun():
        init(timeout=float(cfg.get("dist_timeout") or DEFAULT_TIMEOUT))
    elif not dist.is_initialized() and (nproc or 1) > 1:
        return launch_train(cfg, nproc)
    group = resolve_group(None)
    rank, world = rank_and_size(group)
    if nproc is not None and under_torchrun() and nproc != world:
        raise ValueError(f"nproc: {nproc} differs from torchrun's world size {world}; drop --nproc under torchrun")
    sharded = group is not None or nproc is not None or bool(cfg.get("resume"))
    if sharded:
        cfg = dict(cfg, sampler="sharded", world_size=world)

    torch.manual_seed(cfg["seed"])
    src = TaskSource(cfg)
    model = build_model(src.model_config)
    if cfg.get("float64"):
        model = model.double()
    learner = learner_from_config(cfg, model, src.loss_fn, process_group=group)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["meta_lr"])
    sampler = ShardedTaskSampler(src.train, cfg["meta_batch"], seed=cfg["seed"], process_group=group) \
        if sharded else None
    out = Path(cfg["out"]) if cfg.get("out") else None
    start, history = _resume(cfg, out, model, opt, group, log) if cfg.get("resume") else (1, [])
    if group is not None:
        broadcast_module(model, group)
    if sharded:
        log(f"distributed: {world} rank(s), backend {dist.get_backend(group) if group else 'none'}, "
            f"{cfg['meta_batch']} tasks per step, shard sizes "
            f"{[len(shard_range(cfg['meta_batch'], r, world)) for r in range(world)]}")

    def checkpoint(step: int, summary: Optional[dict] = None) -> None:
        if out is not None:
            save_checkpoint(out, payload(cfg, src.model_config, model, opt, step, history, summary), group)

    progress = bool(cfg.get("progress", True)) and rank == 0
    limit = cfg.get("time_limit")
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg["steps"] + 1), desc=f"{cfg['algo']} on {cfg['task']}", disable=not progress,
               initial=start - 1, total=cfg["steps"])

    def say(msg: str) -> None:
        with tqdm.external_write_mode():  # keeps the progress bar intact
            log(msg)

    steps_done = start - 1
    for step in bar:
        # The budget covers everything before meta-testing (validation included). With ranks, any
        # rank's clock stops all of them at the same step.
        if limit is not None and any_rank(time.perf_counter() - t0 > 60 * limit, group):
            say(f"time limit of {limit:g} min reached after {steps_done} steps")
            break
        steps_done = step
        opt.zero_grad(set_to_none=True)
        res = learner.step(sampler.sample(step) if sampler is not None else src.train.sample(cfg["meta_batch"]))
        opt.step()
        if step == start:
            say(f"strategy: {learner.chosen_strategy} ({learner.strategy_reason})")
        post = {"loss": f"{res.loss:.3f}"}
        if res.accuracy is not None:
            post["acc"] = f"{res.accuracy:.3f}"
        bar.set_postfix(post, refresh=False)
        if cfg.get("val_every") and (step % cfg["val_every"] == 0 or step == cfg["steps"]):
            # The query loss over all ranks' tasks, for the log only (2 numbers).
            train_loss = res.loss if group is None else float(
                all_reduce_mean(res.per_task_loss.sum().reshape(1).double(), len(res.per_task_loss), group)[0])
            val = evaluate_tasks(learner, src.val, cfg["val_tasks"])
            history.append(dict(step=step, train_loss=train_loss, val_loss=val.loss, val_accuracy=val.accuracy,
                                seconds=time.perf_counter() - t0))
            say(f"step {step}: train loss {train_loss:.4f}, meta-validation {val}")
            checkpoint(step)
    bar.close()
    train_seconds = time.perf_counter() - t0

    test = evaluate_tasks(learner, src.test, cfg["test_tasks"], progress=progress)
    reduction = learner.reduction
    summary = dict(train_seconds=train_seconds, steps=steps_done, test_loss=test.loss, test_loss_ci95=test.loss_ci95,
                   test_accuracy=test.accuracy, test_accuracy_ci95=test.accuracy_ci95, test_tasks=test.num_tasks,
                   strategy=learner.chosen_strategy, split=src.split, world_size=world, rank=rank,
                   comm_seconds=reduction.comm_seconds if reduction is not None else 0.0,
                   all_reduces=reduction.reductions if reduction is not None else 0)
    if cfg["task"] == "sinusoid":
        summary["pre_adaptation_mse"] = pre_adaptation_loss(learner, src.test, cfg["test_tasks"])
        log(f"meta-test on {test.num_tasks} unseen tasks: pre-adaptation MSE {summary['pre_adaptation_mse']:.4f}, "
            f"post-adaptation MSE ({cfg['inner_steps']} step) {test.loss:.4f} ± {test.loss_ci95:.4f}")
    else:
        log(f"meta-test on {test.num_tasks} tasks from held-out alphabets {src.split['test']}: {test}")
    log(f"training time {train_seconds:.1f} s for {steps_done} steps" + (
        "" if group is None else f" on {world} ranks, {summary['comm_seconds']:.2f} s in "
                                 f"{summary['all_reduces']} all-reduces (rank {rank})"))
    checkpoint(steps_done, summary)
    if out is not None:
        log(f"checkpoint: {out}")
    summary["final_params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    summary["learner"] = learner
    return summary
