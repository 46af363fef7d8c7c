"""``fastmeta evaluate``: meta-test a checkpoint written by ``fastmeta train``, on the classes it
held out (Omniglot's alphabets, stored in the checkpoint; an image task's test split) and only on
the data it was trained with (unless told)."""
from __future__ import annotations

import sys

from .._checks import positive_int
from ..training import evaluate_tasks, learner_from_checkpoint, load_checkpoint, source_from_checkpoint


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="meta-test a checkpoint written by 'fastmeta train'")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--tasks", type=int, default=None, help="number of meta-test tasks, >= 1 (default: training's)")
    p.add_argument("--data-root", nargs="+",
                   help="the task's data (default: the one used for training); must be the same data")
    p.add_argument("--allow-data-mismatch", action="store_true",
                   help="evaluate even if --data-root differs from the training data (with a warning)")
    p.add_argument("--inner-steps", type=int, default=None,
                   help="inner steps at meta-test, >= 1 (default: training's)")
    p.set_defaults(func=run)


def run(args) -> int:
    """Meta-test ``args.ckpt``; prints one line with the loss (and accuracy) and its 95% CI."""
    # The arguments first: nothing is loaded for a run that would be refused.
    if args.tasks is not None:
        positive_int(args.tasks, "--tasks")
    if args.inner_steps is not None:
        positive_int(args.inner_steps, "--inner-steps")
    ckpt = load_checkpoint(args.ckpt)
    cfg = ckpt["config"]
    src = source_from_checkpoint(ckpt, args.data_root, allow_data_mismatch=args.allow_data_mismatch,
                                 warn=lambda msg: print(f"fastmeta evaluate: {msg}", file=sys.stderr))
    learner = learner_from_checkpoint(ckpt)
    r = evaluate_tasks(learner, src.test, args.tasks or cfg["test_tasks"], steps=args.inner_steps, progress=True)
    print(f"{args.ckpt} (step {ckpt['step']}, {cfg['algo']} on {cfg['task']}): meta-test {r}")
    return 0
