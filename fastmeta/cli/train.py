"""``fastmeta train``: meta-train a model (one process, ``--nproc N`` local ranks, or torchrun)."""
from __future__ import annotations

import argparse

from ..algorithms.registry import add_algorithm_args
from ..evaluation import STRATEGIES
from ..training import DEFAULTS, train


def register(sub) -> None:
    p = sub.add_parser("train", help="meta-train a model (default: MAML on sinusoid regression)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="sinusoid", choices=["sinusoid", "omniglot"])
    p.add_argument("--data-root", nargs="+", help="Omniglot folders or zips in <Alphabet>/<character>/*.png layout")
    p.add_argument("--test-alphabets", nargs="+", help="alphabets held out for meta-testing (default: a seeded quarter)")
    add_algorithm_args(p)
    p.add_argument("--adapt", default="all", choices=["all", "head"], help="'head' = ANIL")
    p.add_argument("--strategy", default="auto", choices=STRATEGIES)
    for name, typ in (("ways", int), ("shots", int), ("queries", int), ("meta-batch", int), ("inner-lr", float),
                      ("meta-lr", float), ("steps", int), ("val-every", int), ("val-tasks", int), ("test-tasks", int)):
        p.add_argument(f"--{name}", type=typ, default=None, help="task-dependent default")
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--no-rotations", dest="rotations", action="store_false", help="Omniglot: no 90-degree rotation classes")
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
