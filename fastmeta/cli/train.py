"""``fastmeta train``: meta-train a model (one process, ``--nproc N`` local ranks, or torchrun).

Tasks: ``sinusoid`` (no data), ``omniglot`` and the RGB image tasks ``miniimagenet``,
``tieredimagenet``, ``cifar-fs`` and ``fc100`` (``--data-root``: one folder in the data set's
layout, see docs/data.md; nothing is downloaded). Each task has its defaults
(:data:`fastmeta.training.DEFAULTS`); the image tasks default to 5-way 1-shot with 15 queries,
``inner_lr`` 0.01 and 5 inner steps as in MAML's mini-ImageNet setting, Adam ``meta_lr`` 1e-3
and 4 tasks per meta-batch (CPU-friendly), with ``--model conv4`` (32 filters; ``--model
resnet12``: widths 64-160-320-640) on 84 x 84 (ImageNet-derived) or 32 x 32 (CIFAR-derived)
images.
"""
from __future__ import annotations

import argparse

from ..algorithms.registry import add_algorithm_args
from ..evaluation import STRATEGIES
from ..training import DEFAULTS, train
from ..training.config import IMAGE_TASKS, MODELS


def register(sub) -> None:
    p = sub.add_parser("train", help="meta-train a model (default: MAML on sinusoid regression)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="sinusoid", choices=list(DEFAULTS))
    p.add_argument("--data-root", nargs="+",
                   help="omniglot: folders or zips in <Alphabet>/<character>/*.png layout; "
                        f"{', '.join(IMAGE_TASKS)}: one folder in the data set's layout (docs/data.md)")
    p.add_argument("--model", default=None, choices=MODELS,
                   help="classifier for omniglot and the image tasks (default conv4)")
    p.add_argument("--model-width", type=int, nargs="+", default=None, metavar="W",
                   help="conv4: its filters (default 64 on omniglot, 32 on RGB); resnet12: its four block widths "
                        "(default 64 160 320 640)")
    p.add_argument("--image-size", type=int, default=None,
                   help="side images are resized to once, at load (default 28 omniglot, 84 mini-/tieredImageNet, "
                        "32 CIFAR-FS/FC100)")
    p.add_argument("--test-alphabets", nargs="+", help="alphabets held out for meta-testing (default: a seeded quarter)")
    add_algorithm_args(p)
    p.add_argument("--adapt", default="all", choices=["all", "head"], help="'head' = ANIL")
    p.add_argument("--strategy", default="auto", choices=STRATEGIES)
    for name, typ in (("ways", int), ("shots", int), ("queries", int), ("meta-batch", int), ("inner-lr", float),
                      ("meta-lr", float), ("steps", int), ("val-every", int), ("val-tasks", int), ("test-tasks", int)):
        p.add_argument(f"--{name}", type=typ, default=None, help="task-dependent default")
    p.add_argument("--inner-steps", type=int, default=None, help="task-dependent default (1; 5 on image tasks)")
    p.add_argument("--no-rotations", dest="rotations", action="store_false",
                   help="omniglot: no 90-degree rotation classes")
    p.add_argument("--float64", action="store_true")
    p.add_argument("--channels-last", action="store_true", help="CPU speed mode: NHWC convolutions (exact)")
    p.add_argument("--bf16", action="store_true",
                   help="CPU speed mode: bf16 autocast, float32 weights and meta-gradient (approximate)")
    p.add_argument("--fused", action="store_true",
                   help="CPU speed mode: fused BatchNorm+ReLU+MaxPool C++ kernels for conv blocks (same function)")
    p.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="stop meta-training after this many minutes of wall clock (then meta-test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="fastmeta_ckpt.pt",
                   help="checkpoint path (written atomically at every validation and before the meta-test)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--nproc", type=int, default=None,
                   help="shard each meta-batch's tasks over N local processes (gloo over loopback); "
                        "for several machines use torchrun (see fastmeta.distributed)")
    p.add_argument("--dist-timeout", type=float, default=None,
                   help="seconds (> 0) a collective may wait for a peer rank before failing (default 300)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint is at --out, exactly as if it had not stopped (a missing "
                        "file starts a new run); under --nproc/torchrun rank 0 reads, all ranks resume")
    p.add_argument("--allow-changed", action="store_true",
                   help="with --resume: accept settings that differ from the checkpoint's (recorded in it)")
    p.set_defaults(func=run)


def run(args) -> int:
    """Meta-train per the parsed ``args`` (defaults per task filled in); see :func:`fastmeta.training.train`."""
    cfg = {k: v for k, v in vars(args).items() if k not in ("func", "debug")}
    for k, v in DEFAULTS[args.task].items():
        if cfg.get(k) is None:
            cfg[k] = v
    cfg.setdefault("ways", None)
    train(cfg)
    return 0
