"""The meta-training loop of ``fastmeta train``, for one process and for N.

One loop serves every world size. With ``cfg["nproc"] > 1`` and no process group it launches
``nproc`` local gloo ranks that each run it (:func:`launch_train`); under torchrun it initializes
the group; otherwise it runs in this process (in the group, if one is initialized).

Task streams: a plain one-process run (no ``nproc``, no group) draws
``src.train.sample(meta_batch)`` per step, like a hand-written loop. A sharded run (``nproc`` given,
or a group) draws from :class:`fastmeta.distributed.ShardedTaskSampler`, whose union over ranks is
the same meta-batch for every world size, so a 1-rank and an N-rank run see the same tasks; such
checkpoints record ``sampler="sharded"``. Every checkpoint holds what a resumed run needs to
continue its stream exactly (RNG states, the plain sampler's generator, the step), so both kinds
resume; a resume must keep the kind. Every rank builds the same model (same seed;
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
from ..distributed.state import probe_writable
from ..models import build_model
from .checkpoint import check_resume, load_for_resume, payload, save_checkpoint, with_summary
from .config import TaskSource, check_config, data_fingerprint, learner_from_config
from .evaluate import evaluate_tasks, pre_adaptation_loss


def _quiet(*args, **kwargs) -> None:
    pass


def _train_worker(rank: int, world: int, cfg: dict) -> dict:
    summary = train(cfg, log=functools.partial(print, flush=True) if rank == 0 else _quiet)
    summary.pop("learner", None)  # stays in the rank: only plain values travel back to the caller
    return summary


def _pg_timeout(cfg: dict) -> float:
    t = cfg.get("dist_timeout")
    return DEFAULT_TIMEOUT if t is None else float(t)


def launch_train(cfg: dict, nproc: int, start_method: str = "spawn", timeout: Optional[float] = None) -> dict:
    """``fastmeta train --nproc N``: :func:`train` in ``nproc`` local gloo ranks; rank 0's summary."""
    return launch(_train_worker, nproc, (cfg,), timeout=timeout, start_method=start_method,
                  pg_timeout=_pg_timeout(cfg))[0]


def _generators(algorithm) -> list:
    # Random streams an algorithm owns (e.g. Sharp-MAML's SWP mask generator): part of the state a
    # resumed run must continue. Found by type, so a new algorithm's generator is not forgotten.
    return [(k, v) for k, v in sorted(vars(algorithm).items()) if isinstance(v, torch.Generator)]


def _rng_state(src: TaskSource, learner, sharded: bool) -> dict:
    state = dict(torch=torch.get_rng_state(),
                 algorithm={k: g.get_state() for k, g in _generators(learner.algorithm)})
    if not sharded:  # the plain stream's position; a sharded stream is a function of the step
        state["train_sampler"] = src.train.gen.get_state()
    return state


def _restore_rng(state: Optional[dict], src: TaskSource, learner, sharded: bool) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    for k, g in _generators(learner.algorithm):
        if k in state.get("algorithm", {}):
            g.set_state(state["algorithm"][k])
    if not sharded and "train_sampler" in state:
        src.train.gen.set_state(state["train_sampler"])


def _fixed(sampler):
    # Validation draws the same tasks every time: the curve compares like with like, and a resumed
    # run validates on exactly the tasks an unbroken run would (no sampler position to carry).
    sampler.gen.manual_seed(sampler.gen.initial_seed())
    return sampler


def _preflight(cfg: dict, group, world: int, log) -> tuple[dict, Optional[dict], Optional[dict], dict]:
    """The cheap checks that need more than the config: the output path, the data files (listings
    only) and, with ``resume``, the checkpoint. Returns the run's config (with ``sampler`` and
    ``world_size`` for a sharded run), the data fingerprint, the checkpoint (or None) and the
    settings it changes."""
    if group is not None or cfg.get("nproc") is not None:
        cfg = dict(cfg, sampler="sharded", world_size=world)
    else:
        cfg = dict(cfg)
    out = Path(cfg["out"]) if cfg.get("out") else None
    if out is not None:
        probe_writable(out, group)
    data = data_fingerprint(cfg)  # a missing or unreadable data root fails here, before any decoding
    ckpt, changed = None, {}
    if cfg.get("resume"):
        ckpt = load_for_resume(out, group)
        if ckpt is None:
            # Not an error: a retried job runs the same command before and after its first checkpoint.
            log(f"resume: no checkpoint at {out} yet; starting a new run")
        else:
            changed = check_resume(cfg, ckpt, data, allow_changed=bool(cfg.get("allow_changed")))
            if ckpt["step"] > cfg["steps"]:
                raise ValueError(f"steps: the checkpoint {out} is already at step {ckpt['step']}, beyond "
                                 f"steps={cfg['steps']}; pass --steps {ckpt['step']} or more to continue it")
    return cfg, data, ckpt, changed


def train(cfg: dict, log: Optional[Callable[[str], None]] = None) -> dict:
    """Meta-train per ``cfg`` (see ``fastmeta train --help``); returns a summary dict.

    Everything the run needs is checked before the first step: the settings
    (:func:`~fastmeta.training.config.check_config`), the output path (written and removed once),
    the data (enough classes and drawings in every split) and, with ``resume``, the checkpoint
    (every setting that differs is listed; ``allow_changed`` accepts and records them). The final
    checkpoint is written before the meta-test, and again with the summary after it.

    ``resume``: continue from the checkpoint at ``out`` (a missing file starts a new run, said in
    the log); the continued run equals an unbroken one bit for bit (parameters, optimizer,
    random streams, sampler position).

    Summary: ``train_seconds``, ``steps``, ``test_loss`` / ``test_accuracy`` (and ``_ci95``),
    ``test_tasks``, ``strategy``, ``split`` (Omniglot alphabets; image tasks: class names per split), ``world_size``, ``rank``,
    ``comm_seconds`` / ``all_reduces`` (of the meta-gradient; 0 in one process),
    ``pre_adaptation_mse`` (sinusoid), ``final_params`` (flat ``[P]``) and ``learner``.
    """
    log = log or functools.partial(print, flush=True)
    check_config(cfg)
    nproc = cfg.get("nproc")
    if not dist.is_initialized() and under_torchrun():
        init(timeout=_pg_timeout(cfg))
    elif not dist.is_initialized() and (nproc or 1) > 1:
        _preflight(cfg, None, nproc, _quiet)  # here, before any rank starts; the ranks check again
        return launch_train(cfg, nproc)
    group = resolve_group(None)
    rank, world = rank_and_size(group)
    if nproc is not None and under_torchrun() and nproc != world:
        raise ValueError(f"nproc: {nproc} differs from torchrun's world size {world}; drop --nproc under torchrun")
    cfg, _, ckpt, changed = _preflight(cfg, group, world, log)
    sharded = cfg.get("sampler") == "sharded"
    out = Path(cfg["out"]) if cfg.get("out") else None

    torch.manual_seed(cfg["seed"])
    src = TaskSource(cfg, split=ckpt.get("split") if ckpt is not None and "data" not in changed else None)
    model = build_model(src.model_config)
    if cfg.get("float64"):
        model = model.double()
    chosen = ckpt.get("strategy_chosen") if ckpt is not None else None
    forced = chosen is not None and cfg.get("strategy", "auto") == "auto"
    # A resumed "auto" run keeps the strategy measured at its start: timing again could pick
    # another one, whose floating-point results differ in the last bits.
    learner = learner_from_config(dict(cfg, strategy=chosen) if forced else cfg, model, src.loss_fn,
                                  process_group=group)
    # The algorithm's learned tensors (Meta-SGD's, MAML++'s inner rates) are meta-trained beside the model's.
    opt = torch.optim.Adam(learner.parameters(), lr=cfg["meta_lr"])
    sampler = ShardedTaskSampler(src.train, cfg["meta_batch"], seed=cfg["seed"], process_group=group) \
        if sharded else None
    start, history, resumes = 1, [], []
    if ckpt is not None:
        model.load_state_dict(ckpt["model_state"])
        learner.algorithm.load_state_dict(ckpt.get("algorithm_state", {}))
        opt.load_state_dict(ckpt["optimizer_state"])
        for g in opt.param_groups:  # the optimizer state holds the old rate; this run's rate applies
            g["lr"] = cfg["meta_lr"]
        _restore_rng(ckpt.get("rng"), src, learner, sharded)
        start, history = ckpt["step"] + 1, list(ckpt.get("history", []))
        resumes = list(ckpt.get("resumes", [])) + [dict(step=ckpt["step"], world_size=world, changed=changed)]
        log(f"resumed from {out} at step {ckpt['step']} on {world} rank(s)" + (
            "; changed: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()) if changed else ""))
    if group is not None:
        broadcast_module(model, group)
    if sharded:
        log(f"distributed: {world} rank(s), backend {dist.get_backend(group) if group else 'none'}, "
            f"{cfg['meta_batch']} tasks per step, shard sizes "
            f"{[len(shard_range(cfg['meta_batch'], r, world)) for r in range(world)]}")

    def snapshot(step: int) -> dict:
        return payload(cfg, src.model_config, model, opt, step, history, rng=_rng_state(src, learner, sharded),
                       strategy_chosen=learner.chosen_strategy or chosen, split=src.split, data=src.fingerprint,
                       resumes=resumes, algorithm_state=learner.algorithm.state_dict())

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
            say(f"strategy: {learner.chosen_strategy} (" + (
                "measured by 'auto' at the start of the run, kept from the checkpoint" if forced
                else learner.strategy_reason) + ")")
        post = {"loss": f"{res.loss:.3f}"}
        if res.accuracy is not None:
            post["acc"] = f"{res.accuracy:.3f}"
        bar.set_postfix(post, refresh=False)
        if cfg.get("val_every") and (step % cfg["val_every"] == 0 or step == cfg["steps"]):
            # The query loss over all ranks' tasks, for the log only (2 numbers).
            train_loss = res.loss if group is None else float(
                all_reduce_mean(res.per_task_loss.sum().reshape(1).double(), len(res.per_task_loss), group)[0])
            val = evaluate_tasks(learner, _fixed(src.val), cfg["val_tasks"])
            history.append(dict(step=step, train_loss=train_loss, val_loss=val.loss, val_accuracy=val.accuracy,
                                seconds=time.perf_counter() - t0))
            say(f"step {step}: train loss {train_loss:.4f}, meta-validation {val}")
            if out is not None:
                save_checkpoint(out, snapshot(step), group)
    bar.close()
    train_seconds = time.perf_counter() - t0

    # The trained model is on disk before the meta-test, so that no error there can cost it.
    final = snapshot(steps_done)
    if out is not None:
        save_checkpoint(out, final, group)
        log(f"checkpoint: {out} (step {steps_done})")
    try:
        test = evaluate_tasks(learner, src.test, cfg["test_tasks"], progress=progress)
        pre = pre_adaptation_loss(learner, src.test, cfg["test_tasks"]) if cfg["task"] == "sinusoid" else None
    except BaseException:
        if out is not None:
            log(f"meta-test failed; the trained model (step {steps_done}) is saved in {out}")
        raise
    reduction = learner.reduction
    summary = dict(train_seconds=train_seconds, steps=steps_done, test_loss=test.loss, test_loss_ci95=test.loss_ci95,
                   test_accuracy=test.accuracy, test_accuracy_ci95=test.accuracy_ci95, test_tasks=test.num_tasks,
                   strategy=learner.chosen_strategy, split=src.split, world_size=world, rank=rank,
                   comm_seconds=reduction.comm_seconds if reduction is not None else 0.0,
                   all_reduces=reduction.reductions if reduction is not None else 0)
    if pre is not None:
        summary["pre_adaptation_mse"] = pre
        log(f"meta-test on {test.num_tasks} unseen tasks: pre-adaptation MSE {pre:.4f}, "
            f"post-adaptation MSE ({cfg['inner_steps']} step) {test.loss:.4f} ± {test.loss_ci95:.4f}")
    else:
        log(f"meta-test on {test.num_tasks} tasks from {src.held_out}: {test}")
    log(f"training time {train_seconds:.1f} s for {steps_done} steps" + (
        "" if group is None else f" on {world} ranks, {summary['comm_seconds']:.2f} s in "
                                 f"{summary['all_reduces']} all-reduces (rank {rank})"))
    if out is not None:
        save_checkpoint(out, with_summary(final, summary), group)
    summary["final_params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    summary["learner"] = learner
    return summary
