"""What a ``fastmeta train`` config means: per-task defaults, the task samplers and model of a task
family, and the :class:`~fastmeta.MetaLearner` it describes (for training and for checkpoints)."""
from __future__ import annotations

import torch

from ..algorithms.registry import build_algorithm
from ..data import Omniglot, OmniglotTasks, SinusoidTasks, split_alphabets
from ..learner import MetaLearner
from ..models import Conv4, SineMLP, build_model

DEFAULTS = {
    "sinusoid": dict(inner_lr=0.01, meta_lr=3e-3, meta_batch=25, shots=10, queries=10, steps=3000,
                     val_every=1000, val_tasks=200, test_tasks=1000),
    "omniglot": dict(inner_lr=0.4, meta_lr=1e-3, meta_batch=16, ways=5, shots=1, queries=15, steps=600,
                     val_every=100, val_tasks=100, test_tasks=600),
}

LOSS_FN = {"sinusoid": "mse", "omniglot": "cross_entropy"}


class TaskSource:
    """Train / validation / test task samplers and the model for a task family."""

    def __init__(self, cfg: dict):
        task = cfg["task"]
        seed = cfg["seed"]
        dtype = torch.float64 if cfg.get("float64") else torch.float32
        if task == "sinusoid":
            self.train = SinusoidTasks(cfg["shots"], cfg["queries"], seed=seed, dtype=dtype)
            self.val = SinusoidTasks(cfg["shots"], cfg["queries"], seed=seed + 10_000, dtype=dtype)
            self.test = SinusoidTasks(cfg["shots"], cfg["queries"], seed=seed + 20_000, dtype=dtype)
            self.loss_fn = LOSS_FN[task]
            self.model_config = SineMLP().config
            self.split = None
        elif task == "omniglot":
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
            self.loss_fn = LOSS_FN[task]
            self.model_config = Conv4(cfg["ways"], image_size=data.image_size).config
        else:
            raise ValueError(f"task: expected 'sinusoid' or 'omniglot', got {task!r}")


def learner_from_checkpoint(ckpt: dict) -> MetaLearner:
    """The trained :class:`MetaLearner` of a checkpoint (see :func:`fastmeta.training.load_checkpoint`)."""
    cfg = ckpt["config"]
    model = build_model(ckpt["model_config"])
    if cfg.get("float64"):
        model = model.double()
    model.load_state_dict(ckpt["model_state"])
    return learner_from_config(cfg, model, LOSS_FN[cfg["task"]])


def learner_from_config(cfg: dict, model, loss_fn, process_group=None) -> MetaLearner:
    """The :class:`MetaLearner` a ``fastmeta train`` config describes (algorithm, adapt, strategy,
    speed modes); one place for training (any world size) and checkpoints."""
    return MetaLearner(model, build_algorithm(cfg), loss_fn=loss_fn, adapt=cfg.get("adapt", "all"),
                       strategy=cfg.get("strategy", "auto"), channels_last=bool(cfg.get("channels_last")),
                       bf16=bool(cfg.get("bf16")), fused=bool(cfg.get("fused")), process_group=process_group)
