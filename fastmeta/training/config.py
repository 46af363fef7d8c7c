"""What a ``fastmeta train`` config means: per-task defaults, the checks a config must pass before
any work starts, the task samplers and model of a task family, and the
:class:`~fastmeta.MetaLearner` it describes (for training and for checkpoints)."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..algorithms.registry import build_algorithm
from ..data import Omniglot, OmniglotTasks, SinusoidTasks, split_alphabets
from ..data.omniglot import fingerprint as omniglot_fingerprint
from ..evaluation import STRATEGIES
from ..learner import MetaLearner
from ..models import Conv4, SineMLP, build_model

DEFAULTS = {
    "sinusoid": dict(inner_lr=0.01, meta_lr=3e-3, meta_batch=25, shots=10, queries=10, steps=3000,
                     val_every=1000, val_tasks=200, test_tasks=1000),
    "omniglot": dict(inner_lr=0.4, meta_lr=1e-3, meta_batch=16, ways=5, shots=1, queries=15, steps=600,
                     val_every=100, val_tasks=100, test_tasks=600),
}

LOSS_FN = {"sinusoid": "mse", "omniglot": "cross_entropy"}


def _int(cfg: dict, key: str, low: int, why: str = "") -> None:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{key}: expected an int >= {low}{why}, got {v!r}")


def _positive_number(cfg: dict, key: str, unit: str = "") -> None:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{key}: expected a finite number > 0{unit}, got {v!r}")


def check_config(cfg: dict) -> None:
    """Raise ``ValueError`` naming the first bad setting of a ``fastmeta train`` config (what was
    expected, what was given). Cheap: no data is read, nothing is built but the algorithm."""
    task = cfg.get("task")
    if task not in LOSS_FN:
        raise ValueError(f"task: expected 'sinusoid' or 'omniglot', got {task!r}")
    if isinstance(cfg.get("seed"), bool) or not isinstance(cfg.get("seed"), int):
        raise ValueError(f"seed: expected an int, got {cfg.get('seed')!r}")
    # steps = 0 is a dry run of the API (the initial model, nothing written); a checkpoint always
    # holds a trained model, so with an output path at least one step is required.
    _int(cfg, "steps", 1 if cfg.get("out") else 0, " (steps to train)")
    for key in ("meta_batch", "shots", "queries", "inner_steps"):
        _int(cfg, key, 1)
    _int(cfg, "val_every", 0, " (0: no validation)")
    if cfg["val_every"]:
        _int(cfg, "val_tasks", 1, f" (validation every {cfg['val_every']} steps)")
    _int(cfg, "test_tasks", 1, " (the meta-test after training)")
    _positive_number(cfg, "meta_lr")
    _positive_number(cfg, "inner_lr")
    if task == "omniglot":
        _int(cfg, "ways", 2, " (classes per task)")
        if not cfg.get("data_root"):
            raise ValueError("data_root: --task omniglot needs --data-root (Omniglot folders or zips; nothing is "
                             "downloaded)")
    if cfg.get("adapt", "all") not in ("all", "head"):
        raise ValueError(f"adapt: expected 'all' or 'head', got {cfg.get('adapt')!r}")
    if cfg.get("strategy", "auto") not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {list(STRATEGIES)}, got {cfg.get('strategy')!r}")
    if cfg.get("bf16") and cfg.get("float64"):
        raise ValueError("bf16: the bf16 speed mode needs float32 parameters; drop --float64 or --bf16")
    if cfg.get("time_limit") is not None:
        _positive_number(cfg, "time_limit", " (minutes)")
    nproc = cfg.get("nproc")
    if nproc is not None:
        _int(cfg, "nproc", 1)
        if cfg["meta_batch"] < nproc:
            raise ValueError(f"meta_batch: {cfg['meta_batch']} tasks cannot be sharded over nproc={nproc} ranks "
                             f"(every rank needs at least one task)")
    if cfg.get("dist_timeout") is not None:
        _positive_number(cfg, "dist_timeout", " (seconds)")
    if cfg.get("resume") and not cfg.get("out"):
        raise ValueError("resume: needs --out (the checkpoint to resume from)")
    build_algorithm(cfg)  # validates the algorithm and its options (radii, delta, ...)


def data_fingerprint(cfg: dict) -> Optional[dict]:
    """The fingerprint of the data a config trains on (None for sinusoid: no files). Cheap: file
    listings only (see :func:`fastmeta.data.omniglot.fingerprint`)."""
    if cfg["task"] != "omniglot":
        return None
    return omniglot_fingerprint(cfg["data_root"])


class TaskSource:
    """Train / validation / test task samplers and the model for a task family.

    ``split``: the Omniglot alphabets to use (``dict(train=..., val=..., test=...)``, e.g. a
    checkpoint's); default: ``test_alphabets`` or a seeded split of the data's alphabets. The
    data must hold enough classes and drawings for ``ways``, ``shots`` and ``queries`` in every
    split (``ValueError`` naming the split otherwise). Attributes: ``train``, ``val``, ``test``,
    ``loss_fn``, ``model_config``, ``split`` (None for sinusoid) and ``fingerprint`` (of the data;
    None for sinusoid).
    """

    def __init__(self, cfg: dict, split: Optional[dict] = None):
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
            self.fingerprint = None
        elif task == "omniglot":
            if not cfg.get("data_root"):
                raise ValueError("data_root: --task omniglot needs --data-root (Omniglot folders or zips; nothing is downloaded)")
            data = Omniglot(cfg["data_root"])
            self.fingerprint = data.fingerprint
            if split is not None:
                train, val, test = list(split["train"]), list(split["val"]), list(split["test"])
                unknown = sorted(set(train + val + test) - set(data.alphabets))
                if unknown:
                    raise ValueError(f"data_root: the data lacks the alphabets {unknown} of the stored split; "
                                     f"it has {data.alphabets}")
            elif cfg.get("test_alphabets"):
                test = list(cfg["test_alphabets"])
                unknown = sorted(set(test) - set(data.alphabets))
                if unknown:
                    raise ValueError(f"test_alphabets: unknown {unknown}; the data has {data.alphabets}")
                rest = [a for a in data.alphabets if a not in test]
                if not rest:
                    raise ValueError("test_alphabets: every alphabet is held out; none is left for meta-training")
                val, train = rest[:1], rest[1:]
                if not train:
                    train, val = rest, []
            else:
                n = len(data.alphabets)
                if n < 2:
                    raise ValueError(f"data_root: found {n} alphabet ({data.alphabets}); meta-training and "
                                     f"meta-testing need at least 2 (disjoint alphabets)")
                train, val, test = split_alphabets(data.alphabets, n_test=max(1, n // 4), n_val=1 if n >= 4 else 0, seed=seed)
            self.split = dict(train=train, val=val, test=test)
            kw = dict(ways=cfg["ways"], shots=cfg["shots"], queries=cfg["queries"], dtype=dtype)
            self.train = _tasks("train", data, train, rotations=cfg.get("rotations", True), seed=seed, **kw)
            self.val = _tasks("val", data, val or train, seed=seed + 10_000, **kw)
            self.test = _tasks("test", data, test, seed=seed + 20_000, **kw)
            self.loss_fn = LOSS_FN[task]
            self.model_config = Conv4(cfg["ways"], image_size=data.image_size).config
        else:
            raise ValueError(f"task: expected 'sinusoid' or 'omniglot', got {task!r}")


def _tasks(name: str, data, alphabets, **kw) -> OmniglotTasks:
    try:
        return OmniglotTasks(data, alphabets, **kw)
    except ValueError as e:  # say which split is too small
        raise ValueError(f"{e} (the {name} split: alphabets {list(alphabets)})") from e


def source_from_checkpoint(ckpt: dict, data_root=None, allow_data_mismatch: bool = False,
                           warn: Optional[Callable[[str], None]] = None) -> TaskSource:
    """The task source of a checkpoint's run, on its stored alphabet split.

    ``data_root``: other roots for the same data (default: the training ones). Data whose
    fingerprint differs from the checkpoint's is refused (``ValueError`` naming ``data_root``), as
    is an Omniglot checkpoint without a stored split; with ``allow_data_mismatch`` it is used with
    a warning (``warn``), still on the stored split where there is one."""
    cfg = dict(ckpt["config"])
    if data_root:
        cfg["data_root"] = list(data_root) if not isinstance(data_root, str) else [data_root]
    if cfg["task"] != "omniglot":
        return TaskSource(cfg)
    if not cfg.get("data_root"):
        raise ValueError("data_root: the checkpoint records no data root; pass --data-root")
    stored, split = ckpt.get("data"), ckpt.get("split")
    problem = None
    if stored is None or split is None:
        problem = ("the checkpoint records no data fingerprint or alphabet split (written by an older fastmeta), "
                   "so the held-out alphabets cannot be checked")
    else:
        now = omniglot_fingerprint(cfg["data_root"])
        if now["sha256"] != stored["sha256"]:
            problem = (f"the data differs from the data the checkpoint was trained on: trained on "
                       f"{_describe(stored)}, given {_describe(now)}")
    if problem is not None:
        if not allow_data_mismatch:
            raise ValueError(f"data_root: {problem}. Pass --allow-data-mismatch to evaluate anyway")
        (warn or print)(f"warning: {problem}; evaluating anyway (--allow-data-mismatch)")
    return TaskSource(cfg, split=split)


def _describe(fp: dict) -> str:
    roots = ", ".join(f"{r['name']} ({r['images']} images)" for r in fp["roots"])
    return f"{fp['images']} images in {fp['classes']} classes from {roots}"


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
