"""``fastmeta landscape``: loss landscapes, sharpness and generalization gap of checkpoints.

    fastmeta landscape --ckpt maml.pt --ckpt sharp.pt --out report/

writes ``landscape_1d.png`` (one curve per checkpoint, MAML objective and plain loss side by
side), ``landscape_2d_<label>.png`` per checkpoint, ``report.md`` (sharpness table and
generalization gap) and ``results.json`` (all numbers). All checkpoints see the same tasks and the
same raw random directions (each filter-normalized to its own weights).
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from ..analysis.generalization import generalization_gap
from ..analysis.landscape import loss_landscape
from ..analysis.report import markdown_table, plot_1d, plot_2d, sharpness_dict
from ..analysis.sharpness import sharpness
from ..training import CheckpointError, learner_from_checkpoint, load_checkpoint, source_from_checkpoint


def register(subparsers) -> None:
    p = subparsers.add_parser("landscape", help="loss landscapes, sharpness (eq. 7) and generalization gap of checkpoints",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, help="checkpoint from 'fastmeta train' (repeat for overlays)")
    p.add_argument("--label", action="append", help="name per --ckpt (default: file stem and algorithm)")
    p.add_argument("--out", required=True, help="output folder for PNGs, report.md and results.json")
    p.add_argument("--data-root", nargs="+",
                   help="Omniglot data (default: the one used for training); must be the same data")
    p.add_argument("--allow-data-mismatch", action="store_true",
                   help="use --data-root even if it differs from the training data (with a warning)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="tasks for landscapes and sharpness")
    p.add_argument("--tasks", type=int, default=4, help="tasks in the landscape/sharpness batch")
    p.add_argument("--steps-1d", type=int, default=31, help="grid points of the 1-D lines")
    p.add_argument("--steps-2d", type=int, default=11, help="grid points per axis of the 2-D grids (0: skip)")
    p.add_argument("--span", type=float, default=1.0, help="grid half-width in filter-normalized units")
    p.add_argument("--radius", type=float, nargs="+", default=[0.05], help="sharpness radii alpha (eq. 7)")
    p.add_argument("--ascent-steps", type=int, default=5, help="projected ascent steps k (1 = SAM eq. 8a)")
    p.add_argument("--gap-tasks", type=int, default=100, help="tasks per side for the generalization gap (0: skip)")
    p.add_argument("--no-plain", dest="plain", action="store_false", help="skip the plain-loss (ERM view) objective")
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    p.add_argument("--grid-chunk", type=int, default=None, help="grid points per batched call")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "ckpt"


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if value is None or (value < 0 if allow_zero else value <= 0):
        raise ValueError(f"{name}: expected {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _source_key(cfg: dict, ckpt: dict) -> str:
    keys = ("task", "data_root", "test_alphabets", "ways", "shots", "queries", "rotations", "seed", "float64", "image_size")
    return json.dumps(dict({k: cfg.get(k) for k in keys}, split=ckpt.get("split")), sort_keys=True, default=str)


def run(args) -> int:
    """Landscapes, sharpness and generalization gap of ``args.ckpt``; writes the report to ``args.out``."""
    _positive("--span", args.span)
    for r in args.radius:
        _positive("--radius", r)
    _positive("--tasks", args.tasks)
    _positive("--steps-1d", args.steps_1d)
    _positive("--steps-2d", args.steps_2d, allow_zero=True)
    _positive("--ascent-steps", args.ascent_steps)
    _positive("--gap-tasks", args.gap_tasks, allow_zero=True)
    if args.label and len(args.label) != len(args.ckpt):
        raise ValueError(f"--label: give one per --ckpt ({len(args.ckpt)}), got {len(args.label)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = print

    entries = []
    ref = None
    for i, path in enumerate(args.ckpt):
        if not Path(path).is_file():
            raise ValueError(f"--ckpt: {path} does not exist")
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:  # its message names the path and the problem
            raise ValueError(f"--ckpt: {path} could not be read: {e}") from e
        learner = learner_from_checkpoint(ckpt)
        shapes = [(s.name, tuple(s.shape)) for s in learner.layout.slots]
        if ref is None:
            ref = (path, ckpt["model_config"], shapes)
        elif shapes != ref[2]:
            raise ValueError(f"--ckpt: {path} has another architecture ({ckpt['model_config']}) than {ref[0]} "
                             f"({ref[1]}); landscapes are overlaid along shared directions, so all checkpoints "
                             "need the same parameter shapes")
        cfg = dict(ckpt["config"])
        if args.data_root:
            cfg["data_root"] = args.data_root
        label = args.label[i] if args.label else f"{Path(path).stem} ({cfg.get('algo', '?')})"
        entries.append(dict(path=path, ckpt=ckpt, cfg=cfg, learner=learner, label=label))

    # One task source (and one sample of tasks) per data configuration, so checkpoints trained on
    # the same tasks are compared on identical landscape batches and identical gap tasks.
    sources: dict[str, dict] = {}
    for e in entries:
        key = _source_key(e["cfg"], e["ckpt"])
        if key not in sources:
            src = source_from_checkpoint(e["ckpt"], args.data_root, allow_data_mismatch=args.allow_data_mismatch,
                                         warn=lambda msg: log(f"fastmeta landscape: {msg}"))
            sampler = src.train if args.split == "train" else src.test
            s = dict(batch=sampler.sample(args.tasks))
            if args.gap_tasks:
                s["gap_train"] = [src.train.sample(min(50, args.gap_tasks - k)) for k in range(0, args.gap_tasks, 50)]
                s["gap_test"] = [src.test.sample(min(50, args.gap_tasks - k)) for k in range(0, args.gap_tasks, 50)]
            sources[key] = s
        e["src"] = sources[key]

    objectives = [("post-adaptation", True)] + ([("plain", False)] if args.plain else [])
    curves, rows, results = {}, [], []
    for e in entries:
        t0 = time.perf_counter()
        lr, batch = e["learner"], e["src"]["batch"]
        log(f"{e['label']}: {e['path']} (step {e['ckpt']['step']}, {lr.algorithm})")
        res = dict(label=e["label"], path=str(e["path"]), algo=e["cfg"].get("algo"), step=e["ckpt"]["step"])
        curves[e["label"]] = {}
        grids = {}
        for name, post in objectives:
            ls = loss_landscape(lr, batch, 1, args.steps_1d, args.span, post_adaptation=post, seed=args.seed,
                                grid_chunk=args.grid_chunk, progress=args.progress)
            curves[e["label"]][name] = ls
            res[f"landscape_1d_{name}"] = dict(coords=ls.coords.tolist(), loss=ls.loss.tolist(),
                                               center_loss=ls.center_loss, strategy=ls.strategy)
            if args.steps_2d:
                g2 = loss_landscape(lr, batch, 2, args.steps_2d, args.span, post_adaptation=post, seed=args.seed,
                                    grid_chunk=args.grid_chunk, progress=args.progress)
                grids[name] = g2
                res[f"landscape_2d_{name}"] = dict(coords=g2.coords.tolist(), loss=g2.loss.tolist())
        if grids:
            f = plot_2d(grids, out / f"landscape_2d_{_slug(e['label'])}.png", title=e["label"])
            log(f"  wrote {f}")
        sharp = []
        for rad in args.radius:
            for name, post in objectives:
                s = sharpness(lr, batch, rad, steps=args.ascent_steps, post_adaptation=post)
                sharp.append(s)
                log(f"  sharpness ({name}, alpha={rad:g}, k={args.ascent_steps}): {s.value:.4g} "
                    f"(SAM first-order alpha*|grad| {s.first_order:.4g}, loss {s.loss:.4g})")
        res["sharpness"] = [sharpness_dict(s) for s in sharp]
        gap = None
        if args.gap_tasks:
            gap = generalization_gap(lr, e["src"]["gap_train"], e["src"]["gap_test"])
            log(f"  {gap}")
            res["generalization"] = dict(
                train_loss=gap.train.loss, train_loss_ci95=gap.train.loss_ci95, test_loss=gap.test.loss,
                test_loss_ci95=gap.test.loss_ci95, train_accuracy=gap.train.accuracy,
                train_accuracy_ci95=gap.train.accuracy_ci95, test_accuracy=gap.test.accuracy,
                test_accuracy_ci95=gap.test.accuracy_ci95, accuracy_gap=gap.accuracy_gap,
                accuracy_gap_ci95=gap.accuracy_gap_ci95, loss_gap=gap.loss_gap, loss_gap_ci95=gap.loss_gap_ci95,
                tasks=gap.train.num_tasks)
        res["seconds"] = time.perf_counter() - t0
        rows.append(dict(label=e["label"], algo=e["cfg"].get("algo", ""), sharp=sharp, gap=gap))
        results.append(res)

    f1 = plot_1d(curves, out / "landscape_1d.png",
                 title=f"{args.tasks} {args.split} tasks, filter-normalized direction (seed {args.seed})")
    log(f"wrote {f1}")
    table = markdown_table(rows)
    md = (f"# fastmeta landscape report\n\n"
          f"Checkpoints: {', '.join(str(e['path']) for e in entries)}. Landscapes and sharpness on {args.tasks} "
          f"meta-{args.split} tasks; sharpness = eq. 7 of Sharp-MAML by {args.ascent_steps}-step projected gradient "
          f"ascent (k = 1 is SAM's eq. 8a); α‖∇L‖ is SAM's first-order estimate; gap over "
          f"{args.gap_tasks} tasks per side (95% CI).\n\n{table}\n"
          f"![1-D landscapes](landscape_1d.png)\n")
    (out / "report.md").write_text(md)
    (out / "results.json").write_text(json.dumps(dict(args={k: v for k, v in vars(args).items() if k != "func"},
                                                      checkpoints=results), indent=1))
    log(table)
    log(f"wrote {out / 'report.md'} and {out / 'results.json'}")
    return 0
