"""Meta-training and meta-testing loops behind ``fastmeta train`` / ``fastmeta evaluate``."""
from __future__ import annotations

import functools
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from .algorithms.registry import build_algorithm
from .learner import EvalResult, MetaLearner
from .models import Conv4, SineMLP, build_model

CHECKPOINT_FORMAT = "fastmeta-checkpoint/1"

DEFAULTS = {
    "sinusoid": dict(inner_lr=0.01, meta_lr=3e-3, meta_batch=25, shots=10, queries=10, steps=3000,
                     val_every=1000, val_tasks=200, test_tasks=1000),
    "omniglot": dict(inner_lr=0.4, meta_lr=1e-3, meta_batch=16, ways=5, shots=1, queries=15, steps=600,
                     val_every=100, val_tasks=100, test_tasks=600),
}


class TaskSource:
    """Train / validation / test task samplers and the model for a task family."""

    def __init__(self, cfg: dict):
        task = cfg["task"]
        seed = cfg["seed"]
        dtype = torch.float64 if cfg.get("float64") else torch.float32
        if task == "sinusoid":
            from .data import SinusoidTasks

            self.train = SinusoidTasks(cfg["shots"], cfg["queries"], seed=seed, dtype=dtype)
            self.val = SinusoidTasks(cfg["shots"], cfg["queries"], seed=seed + 10_000, dtype=dtype)
            self.test = SinusoidTasks(cfg["shots"], cfg["queries"], seed=seed + 20_000, dtype=dtype)
            self.loss_fn = "mse"
            self.model_config = SineMLP().config
            self.split = None
        elif task == "omniglot":
            from .data import Omniglot, OmniglotTasks, split_alphabets

            if not cfg.get("data_root"):
                raise ValueError("data_root: --task omniglot needs --data-root (Omniglot folders or zips; nothing is downloaded)")
            data = Omniglot(cfg["data_root"])
            if cfg.get("test_alphabets"):
                test = list(cfg["test_alphabets"])
                rest = [a for a in data.alphabets if a not in test]
                val, train = rest[:1], rest[1:]
            else:
                n = len(data.alphabets)
                train, val, test = split_alphabets(data.alphabets, n_test=max(1, n // 4), n_val=1 if n >= 4 else 0, seed=seed)
            self.split = dict(train=train, val=val, test=test)
            kw = dict(ways=cfg["ways"], shots=cfg["shots"], queries=cfg["queries"], dtype=dtype)
            self.train = OmniglotTasks(data, train, rotations=cfg.get("rotations", True), seed=seed, **kw)
            self.val = OmniglotTasks(data, val or train, seed=seed + 10_000, **kw)
            self.test = OmniglotTasks(data, test, seed=seed + 20_000, **kw)
            self.loss_fn = "cross_entropy"
            self.model_config = Conv4(cfg["ways"], image_size=data.image_size).config
        else:
            raise ValueError(f"task: expected 'sinusoid' or 'omniglot', got {task!r}")


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically: a temp file in the same folder, fsync, then ``os.replace``."""
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


def load_checkpoint(path) -> dict:
    """Load a fastmeta checkpoint with ``weights_only=True`` (plain tensors and primitives only)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"ckpt: {path} is not a fastmeta checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def evaluate_tasks(learner: MetaLearner, sampler, n_tasks: int, chunk: int = 50, steps: Optional[int] = None,
                   progress: bool = False) -> EvalResult:
    """Meta-test on ``n_tasks`` fresh tasks from ``sampler`` (in chunks to bound memory)."""
    losses, accs = [], []
    it = range(0, n_tasks, chunk)
    for start in tqdm(it, desc="meta-test", disable=not progress, leave=False):
        r = learner.evaluate(sampler.sample(min(chunk, n_tasks - start)), steps=steps)
        losses.append(r.per_task_loss)
        if r.per_task_accuracy is not None:
            accs.append(r.per_task_accuracy)
    loss = torch.cat(losses)
    acc = torch.cat(accs) if accs else None

    def ci(x):
        return float(1.96 * x.double().std() / math.sqrt(x.numel())) if x.numel() > 1 else float("nan")

    return EvalResult(float(loss.mean()), ci(loss), None if acc is None else float(acc.mean()),
                      None if acc is None else ci(acc), loss.numel(), loss, acc)


def pre_adaptation_loss(learner: MetaLearner, sampler, n_tasks: int) -> float:
    """Query loss of the meta-parameters themselves (no inner step), mean over tasks."""
    b = sampler.sample(n_tasks)
    ev = learner.evaluator(b)
    theta = learner.layout.flatten(learner.model)
    adapted, shared = learner.layout.split(theta)
    with torch.no_grad():
        return float(ev.losses(adapted, shared, b.query_x, b.query_y).mean())


def train(cfg: dict, log=None) -> dict:
    """Meta-train per ``cfg`` (see ``fastmeta train --help``); returns a summary dict."""
    log = log or functools.partial(print, flush=True)
    from . import distributed

    limit = cfg.get("time_limit")
    if limit is not None and not limit > 0:
        raise ValueError(f"time_limit: expected a positive number of minutes, got {limit!r}")
    if cfg.get("nproc") is not None or cfg.get("resume") or distributed.under_torchrun():
        # Task-sharded training (fastmeta.distributed): --nproc N, --resume, or torchrun.
        return distributed.train(cfg, log)
    torch.manual_seed(cfg["seed"])
    src = TaskSource(cfg)
    model = build_model(src.model_config)
    if cfg.get("float64"):
        model = model.double()
    learner = learner_from_config(cfg, model, src.loss_fn)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["meta_lr"])
    out = Path(cfg["out"]) if cfg.get("out") else None
    history = []
    t0 = time.perf_counter()
    bar = tqdm(range(1, cfg["steps"] + 1), desc=f"{cfg['algo']} on {cfg['task']}", disable=not cfg.get("progress", True))
    steps_done = 0

    def say(msg: str) -> None:
        bar.write(msg)  # keeps the progress bar intact; flushed so redirected logs show it now
        sys.stdout.flush()

    for step in bar:
        # The budget covers everything before meta-testing (validation included).
        if limit is not None and time.perf_counter() - t0 > 60 * limit:
            say(f"time limit of {limit:g} min reached after {steps_done} steps")
            break
        steps_done = step
        opt.zero_grad(set_to_none=True)
        res = learner.step(src.train.sample(cfg["meta_batch"]))
        opt.step()
        if step == 1:
            log(f"strategy: {learner.chosen_strategy} ({learner.strategy_reason})")
        post = {"loss": f"{res.loss:.3f}"}
        if res.accuracy is not None:
            post["acc"] = f"{res.accuracy:.3f}"
        bar.set_postfix(post, refresh=False)
        if cfg.get("val_every") and (step % cfg["val_every"] == 0 or step == cfg["steps"]):
            val = evaluate_tasks(learner, src.val, cfg["val_tasks"])
            history.append(dict(step=step, train_loss=res.loss, val_loss=val.loss, val_accuracy=val.accuracy,
                                seconds=time.perf_counter() - t0))
            say(f"step {step}: meta-validation {val}")
            if out is not None:
                save_checkpoint(out, _payload(cfg, src, model, opt, step, history))
    train_seconds = time.perf_counter() - t0
    test = evaluate_tasks(learner, src.test, cfg["test_tasks"], progress=cfg.get("progress", True))
    summary = dict(train_seconds=train_seconds, steps=steps_done, test_loss=test.loss, test_loss_ci95=test.loss_ci95,
                   test_accuracy=test.accuracy, test_accuracy_ci95=test.accuracy_ci95, test_tasks=test.num_tasks,
                   strategy=learner.chosen_strategy, split=src.split)
    if cfg["task"] == "sinusoid":
        summary["pre_adaptation_mse"] = pre_adaptation_loss(learner, src.test, cfg["test_tasks"])
        log(f"meta-test on {test.num_tasks} unseen tasks: pre-adaptation MSE {summary['pre_adaptation_mse']:.4f}, "
            f"post-adaptation MSE ({cfg['inner_steps']} step) {test.loss:.4f} ± {test.loss_ci95:.4f}")
    else:
        log(f"meta-test on {test.num_tasks} tasks from held-out alphabets {src.split['test']}: {test}")
    log(f"training time {train_seconds:.1f} s for {steps_done} steps")
    if out is not None:
        save_checkpoint(out, _payload(cfg, src, model, opt, steps_done, history, summary))
        log(f"checkpoint: {out}")
    summary["learner"] = learner
    return summary


def _payload(cfg, src, model, opt, step, history, summary=None) -> dict:
    plain = {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    res = dict(format=CHECKPOINT_FORMAT, step=step, config=plain, model_config=src.model_config,
               model_state=model.state_dict(), optimizer_state=opt.state_dict(), history=history)
    if summary is not None:
        res["summary"] = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, type(None)))}
    return res


def learner_from_checkpoint(ckpt: dict) -> MetaLearner:
    cfg = ckpt["config"]
    model = build_model(ckpt["model_config"])
    if cfg.get("float64"):
        model = model.double()
    model.load_state_dict(ckpt["model_state"])
    return learner_from_config(cfg, model, "mse" if cfg["task"] == "sinusoid" else "cross_entropy")


def learner_from_config(cfg: dict, model, loss_fn, process_group=None) -> MetaLearner:
    """The :class:`MetaLearner` a ``fastmeta train`` config describes (algorithm, adapt, strategy,
    speed modes); one place for training, checkpoints and the distributed driver."""
    return MetaLearner(model, build_algorithm(cfg), loss_fn=loss_fn, adapt=cfg.get("adapt", "all"),
                       strategy=cfg.get("strategy", "auto"), channels_last=bool(cfg.get("channels_last")),
                       bf16=bool(cfg.get("bf16")), fused=bool(cfg.get("fused")), process_group=process_group)
