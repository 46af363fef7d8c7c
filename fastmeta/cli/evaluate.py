"""``fastmeta evaluate``: meta-test a checkpoint written by ``fastmeta train``."""
from __future__ import annotations

from ..training import TaskSource, evaluate_tasks, learner_from_checkpoint, load_checkpoint


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="meta-test a checkpoint written by 'fastmeta train'")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--tasks", type=int, default=None, help="number of meta-test tasks")
    p.add_argument("--data-root", nargs="+", help="Omniglot data (default: the one used for training)")
    p.add_argument("--inner-steps", type=int, default=None, help="inner steps at meta-test (default: training's)")
    p.set_defaults(func=run)


def run(args) -> int:
    ckpt = load_checkpoint(args.ckpt)
    cfg = dict(ckpt["config"])
    if args.data_root:
        cfg["data_root"] = args.data_root
    learner = learner_from_checkpoint(ckpt)
    src = TaskSource(cfg)
    r = evaluate_tasks(learner, src.test, args.tasks or cfg["test_tasks"], steps=args.inner_steps, progress=True)
    print(f"{args.ckpt} (step {ckpt['step']}, {cfg['algo']} on {cfg['task']}): meta-test {r}")
    return 0
