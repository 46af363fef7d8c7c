"""What a ``fastmeta train`` config means: per-task defaults, the checks a config must pass before
any work starts, the task samplers and model of a task family, and the
:class:`~fastmeta.MetaLearner` it describes (for training and for checkpoints)."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..algorithms.registry import build_algorithm
from ..data import (CIFARFS, FC100, ImageTasks, MiniImageNet, Omniglot, OmniglotTasks, SinusoidTasks,
                    TieredImageNet, split_alphabets)
from ..data.omniglot import fingerprint as omniglot_fingerprint
from ..evaluation import STRATEGIES
from ..learner import MetaLearner
from ..models import SineMLP, build_model

# RGB image tasks: loader class and default image side (ImageNet-derived 84, CIFAR-derived 32).
IMAGE_TASKS = {"miniimagenet": (MiniImageNet, 84), "tieredimagenet": (TieredImageNet, 84),
               "cifar-fs": (CIFARFS, 32), "fc100": (FC100, 32)}

# The image tasks' defaults: 5-way 1-shot with 15 queries per class, inner_lr 0.01 and 5 inner
# steps as in MAML's mini-ImageNet setting (Finn et al. 2017, sec. 5.2), Adam meta_lr 1e-3, and 4
# tasks per meta-batch (MAML used 4 for 1-shot) so that a step fits a CPU.
_IMAGE_DEFAULTS = dict(inner_lr=0.01, meta_lr=1e-3, meta_batch=4, ways=5, shots=1, queries=15, inner_steps=5,
                       steps=600, val_every=100, val_tasks=100, test_tasks=600)

DEFAULTS = {
    "sinusoid": dict(inner_lr=0.01, meta_lr=3e-3, meta_batch=25, shots=10, queries=10, inner_steps=1, steps=3000,
                     val_every=1000, val_tasks=200, test_tasks=1000),
    "omniglot": dict(inner_lr=0.4, meta_lr=1e-3, meta_batch=16, ways=5, shots=1, queries=15, inner_steps=1, steps=600,
                     val_every=100, val_tasks=100, test_tasks=600),
    **{task: dict(_IMAGE_DEFAULTS) for task in IMAGE_TASKS},
}

LOSS_FN = {"sinusoid": "mse", "omniglot": "cross_entropy", **{task: "cross_entropy" for task in IMAGE_TASKS}}

MODELS = ("conv4", "resnet12")
# Default widths: Conv-4 with 64 filters on Omniglot and 32 on the RGB tasks (MAML's choices, where
# 64 overfits mini-ImageNet); MetaOptNet's ResNet-12 widths.
CONV4_WIDTH = {"omniglot": 64}
RESNET12_WIDTHS = (64, 160, 320, 640)
MIN_IMAGE_SIDE = 16  # four 2x poolings down to 1 x 1


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
        raise ValueError(f"task: expected one of {list(LOSS_FN)}, got {task!r}")
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
    if task in IMAGE_TASKS:
        _int(cfg, "ways", 2, " (classes per task)")
        image_root(cfg)
    _check_model(cfg, task)
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


def _check_model(cfg: dict, task: str) -> None:
    model, width, size = cfg.get("model"), cfg.get("model_width"), cfg.get("image_size")
    if task == "sinusoid":
        for key, v in (("model", model), ("model_width", width), ("image_size", size)):
            if v is not None:
                raise ValueError(f"{key}: --task sinusoid always uses its MLP (1-40-40-1); got {v!r}")
        return
    if model is not None and model not in MODELS:
        raise ValueError(f"model: expected one of {list(MODELS)}, got {model!r}")
    if width is not None:
        n = 4 if model == "resnet12" else 1
        widths = [width] if isinstance(width, int) and not isinstance(width, bool) else width
        if not isinstance(widths, (list, tuple)) or len(widths) != n or \
                any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"model_width: --model {model or 'conv4'} takes {n} positive int width(s), got {width!r}")
    if size is not None:
        _int(cfg, "image_size", MIN_IMAGE_SIDE, " (four 2x poolings)")


def image_root(cfg: dict) -> str:
    """The one data root of an image task's config (``ValueError`` naming ``data_root`` otherwise)."""
    root = cfg.get("data_root")
    roots = [root] if isinstance(root, str) else list(root or [])
    if len(roots) != 1:
        expected = "images/ + train.csv or train/<class>/" if "imagenet" in cfg["task"] else "cifar-100-python/"
        raise ValueError(f"data_root: --task {cfg['task']} needs one --data-root (the folder holding {expected}; "
                         f"nothing is downloaded), got {roots}")
    return str(roots[0])


def image_data(cfg: dict):
    """The loader of an image task's data (listing and fingerprint only; splits decode on use)."""
    cls, side = IMAGE_TASKS[cfg["task"]]
    return cls(image_root(cfg), image_size=cfg.get("image_size") or side)


def model_config(cfg: dict, ways: int, in_channels: int, image_size: int) -> dict:
    """The ``model_config`` (see :func:`fastmeta.models.build_model`) a config asks for:
    ``model`` ('conv4', default, or 'resnet12') with ``model_width`` (one int for Conv-4, four
    for ResNet-12; default :data:`CONV4_WIDTH` / :data:`RESNET12_WIDTHS`)."""
    width = cfg.get("model_width")
    widths = [width] if isinstance(width, int) else (list(width) if width else None)
    if cfg.get("model") == "resnet12":
        return dict(kind="resnet12", ways=ways, in_channels=in_channels, widths=widths or list(RESNET12_WIDTHS))
    hidden = widths[0] if widths else CONV4_WIDTH.get(cfg["task"], 32)
    return dict(kind="conv4", ways=ways, in_channels=in_channels, hidden=hidden, image_size=image_size)


def data_fingerprint(cfg: dict) -> Optional[dict]:
    """The fingerprint of the data a config trains on (None for sinusoid: no files). Cheap: file
    listings only (see :func:`fastmeta.data.omniglot.fingerprint`); refuses a root that is not in
    the task's layout."""
    if cfg["task"] == "omniglot":
        return omniglot_fingerprint(cfg["data_root"])
    if cfg["task"] in IMAGE_TASKS:
        return image_data(cfg).fingerprint
    return None


class TaskSource:
    """Train / validation / test task samplers and the model for a task family.

    ``split``: the Omniglot alphabets to use (``dict(train=..., val=..., test=...)``, e.g. a
    checkpoint's); default: ``test_alphabets`` or a seeded split of the data's alphabets. Image
    tasks (:data:`IMAGE_TASKS`) have the fixed class split of their data set; a ``split`` given
    must equal it (the class names per split). The data must hold enough classes and images for
    ``ways``, ``shots`` and ``queries`` in every split (``ValueError`` naming the split
    otherwise). Attributes: ``train``, ``val``, ``test``, ``loss_fn``, ``model_config``,
    ``split`` (None for sinusoid), ``fingerprint`` (of the data; None for sinusoid) and
    ``held_out`` (what the meta-test draws from, for logs).
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
            self.held_out = "unseen sinusoids"
        elif task in IMAGE_TASKS:
            self._image_task(cfg, split, dtype)
        elif task == "omniglot":
            if not cfg.get("data_root"):
                raise ValueError("data_root: --task omniglot needs --data-root (Omniglot folders or zips; nothing is downloaded)")
            data = Omniglot(cfg["data_root"], image_size=cfg.get("image_size") or 28)
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
            self.model_config = model_config(cfg, cfg["ways"], 1, data.image_size)
            self.held_out = f"held-out alphabets {test}"
        else:
            raise ValueError(f"task: expected one of {list(LOSS_FN)}, got {task!r}")

    def _image_task(self, cfg: dict, split: Optional[dict], dtype: torch.dtype) -> None:
        data = image_data(cfg)
        self.fingerprint = data.fingerprint
        self.split = {s: list(data.split_classes[s]) for s in ("train", "val", "test")}
        if split is not None:
            for s in ("train", "val", "test"):
                if list(split.get(s, [])) != self.split[s]:
                    raise ValueError(f"data_root: the {s} classes of the data differ from the checkpoint's stored split "
                                     f"({len(self.split[s])} vs {len(split.get(s, []))} classes)")
        kw = dict(ways=cfg["ways"], shots=cfg["shots"], queries=cfg["queries"], dtype=dtype)
        seed = cfg["seed"]
        splits = {}
        for name, offset in (("train", 0), ("val", 10_000), ("test", 20_000)):
            try:
                splits[name] = ImageTasks(data.split(name), seed=seed + offset, **kw)
            except ValueError as e:  # say which split is too small
                raise ValueError(f"{e} (the {name} split of {data.root})") from e
        self.train, self.val, self.test = splits["train"], splits["val"], splits["test"]
        self.loss_fn = LOSS_FN[cfg["task"]]
        self.model_config = model_config(cfg, cfg["ways"], 3, data.image_size)
        self.held_out = f"the {len(self.split['test'])} test classes of {data.name}"


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
    if cfg["task"] == "sinusoid":
        return TaskSource(cfg)
    if not cfg.get("data_root"):
        raise ValueError("data_root: the checkpoint records no data root; pass --data-root")
    stored, split = ckpt.get("data"), ckpt.get("split")
    problem = None
    if stored is None or split is None:
        problem = ("the checkpoint records no data fingerprint or class split (written by an older fastmeta), "
                   "so the held-out classes cannot be checked")
    else:
        now = data_fingerprint(cfg)
        if now["sha256"] != stored["sha256"]:
            problem = (f"the data differs from the data the checkpoint was trained on: trained on "
                       f"{_describe(stored)}, given {_describe(now)}")
    if problem is not None:
        if not allow_data_mismatch:
            raise ValueError(f"data_root: {problem}. Pass --allow-data-mismatch to evaluate anyway")
        (warn or print)(f"warning: {problem}; evaluating anyway (--allow-data-mismatch)")
    return TaskSource(cfg, split=split)


def _describe(fp: dict) -> str:
    def n(v):
        return "?" if v is None else v  # CIFAR's count is known only once its pickles are read

    roots = ", ".join(f"{r['name']} ({n(r['images'])} images)" for r in fp["roots"])
    return f"{n(fp['images'])} images in {fp['classes']} classes from {roots}"


def learner_from_checkpoint(ckpt: dict) -> MetaLearner:
    """The trained :class:`MetaLearner` of a checkpoint (see :func:`fastmeta.training.load_checkpoint`)."""
    cfg = ckpt["config"]
    model = build_model(ckpt["model_config"])
    if cfg.get("float64"):
        model = model.double()
    model.load_state_dict(ckpt["model_state"])
    learner = learner_from_config(cfg, model, LOSS_FN[cfg["task"]])
    learner.algorithm.load_state_dict(ckpt.get("algorithm_state", {}))  # learned inner rates
    return learner


def learner_from_config(cfg: dict, model, loss_fn, process_group=None) -> MetaLearner:
    """The :class:`MetaLearner` a ``fastmeta train`` config describes (algorithm, adapt, strategy,
    speed modes); one place for training (any world size) and checkpoints."""
    return MetaLearner(model, build_algorithm(cfg), loss_fn=loss_fn, adapt=cfg.get("adapt", "all"),
                       strategy=cfg.get("strategy", "auto"), channels_last=bool(cfg.get("channels_last")),
                       bf16=bool(cfg.get("bf16")), fused=bool(cfg.get("fused")), process_group=process_group)
