"""``fastmeta`` command line: train, evaluate, and the subcommands other modules register."""
from __future__ import annotations

import argparse
import importlib
import sys

from .algorithms.registry import add_algorithm_args
from .train import DEFAULTS, TaskSource, evaluate_tasks, learner_from_checkpoint, load_checkpoint, train

# Modules that add a subcommand through ``register(subparsers)``; a missing one is skipped.
PLUGINS = ("fastmeta.lr.cli", "fastmeta.bench_cli", "fastmeta.analysis.cli")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="meta-train a model (default: MAML on sinusoid regression)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="sinusoid", choices=["sinusoid", "omniglot"])
    p.add_argument("--data-root", nargs="+", help="Omniglot folders or zips in <Alphabet>/<character>/*.png layout")
    p.add_argument("--test-alphabets", nargs="+", help="alphabets held out for meta-testing (default: a seeded quarter)")
    add_algorithm_args(p)
    p.add_argument("--adapt", default="all", choices=["all", "head"], help="'head' = ANIL")
    p.add_argument("--strategy", default="auto", choices=["auto", "vmap", "loop", "bmm"])
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
    p.add_argument("--out", default="fastmeta_ckpt.pt", help="checkpoint path (written atomically)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--nproc", type=int, default=None,
                   help="shard each meta-batch's tasks over N local processes (gloo over loopback); "
                        "for several machines use torchrun (see fastmeta.distributed)")
    p.add_argument("--dist-timeout", type=float, default=None,
                   help="seconds a collective may wait for a peer rank before failing (default 300)")
    p.add_argument("--resume", action="store_true",
                   help="continue a --nproc/torchrun run from the checkpoint at --out (rank 0 reads, all ranks resume)")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    cfg = {k: v for k, v in vars(args).items() if k != "func"}
    for k, v in DEFAULTS[args.task].items():
        if cfg.get(k) is None:
            cfg[k] = v
    cfg.setdefault("ways", None)
    train(cfg)
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="meta-test a checkpoint written by 'fastmeta train'")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--tasks", type=int, default=None, help="number of meta-test tasks")
    p.add_argument("--data-root", nargs="+", help="Omniglot data (default: the one used for training)")
    p.add_argument("--inner-steps", type=int, default=None, help="inner steps at meta-test (default: training's)")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    ckpt = load_checkpoint(args.ckpt)
    cfg = dict(ckpt["config"])
    if args.data_root:
        cfg["data_root"] = args.data_root
    learner = learner_from_checkpoint(ckpt)
    src = TaskSource(cfg)
    r = evaluate_tasks(learner, src.test, args.tasks or cfg["test_tasks"], steps=args.inner_steps, progress=True)
    print(f"{args.ckpt} (step {ckpt['step']}, {cfg['algo']} on {cfg['task']}): meta-test {r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmeta", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    _add_train(sub)
    _add_evaluate(sub)
    for mod in PLUGINS:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and mod.startswith(e.name):  # the plugin itself is absent: fine
                continue
            raise
        m.register(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        argv = ["train"]  # `fastmeta` alone runs the embedded default job
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
