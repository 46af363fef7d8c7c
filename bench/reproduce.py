"""Do the papers' claims hold? Each study from one command, resumable; a report writer.

    python bench/reproduce.py sharp  --out runs/reproduce            # study 1: Sharp-MAML vs MAML, Omniglot
    python bench/reproduce.py alpha  --out runs/reproduce            # study 2: alpha* / alpha_c vs a rate sweep
    python bench/reproduce.py budget --out runs/reproduce            # study 3: MAML 20-way 1-shot in a budget
    python bench/reproduce.py report --out runs/reproduce > table.md # markdown tables + verdicts

Common options: ``--seeds N`` (seeds 0..N-1; ``--first-seed``), ``--budget tiny|smoke|full``
(presets; full is the default), ``--set KEY=VALUE ...`` to override any option of the preset
(values are JSON, e.g. ``--set ways=[5,20] patience=6``; ``--show`` prints the options and
exits), ``--data-root`` (Omniglot folders or zips; default the shared subsets), ``--quiet``.

Each study writes ``<out>/<study>.json`` and ``<out>/<study>.png`` and keeps one folder per run
(algorithm x seed x setting) under ``<out>/<study>/runs/``: a finished run has a ``result.json``
and is skipped on a rerun; an interrupted one resumes from its checkpoint (``fastmeta train``'s
bit-exact resume). Interrupt any time and run the same command again. See docs/reproduce.md.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import reproduce_core as core  # noqa: E402
import reproduce_studies as studies  # noqa: E402

# ----------------------------------------------------------------------------------- presets
_OMNIGLOT = dict(queries=15, meta_batch=16, inner_steps=1, meta_lr=1e-3, width=None, image_size=None, fused=True)

PRESETS = {
    "sharp": {
        # Sharp-MAML App. E: one inner step with rate 0.1, 16 tasks per meta-batch, 15 queries per
        # class, Adam 1e-3; radii from the top of the paper's grid and one below it.
        "full": dict(_OMNIGLOT, ways=[5, 20], algos=["maml", "sharp-low", "sharp-both"], radii=[0.05, 0.005],
                     inner_lr=0.1, max_steps=3000, eval_every=250, patience=4, val_tasks=200, test_tasks=600),
        "smoke": dict(_OMNIGLOT, ways=[5, 20], algos=["maml", "sharp-low", "sharp-both"], radii=[0.05],
                      inner_lr=0.1, max_steps=40, eval_every=20, patience=2, val_tasks=20, test_tasks=100,
                      meta_batch=4),
        "tiny": dict(_OMNIGLOT, ways=[3], algos=["maml", "sharp-low"], radii=[0.05], inner_lr=0.1, max_steps=4,
                     eval_every=2, patience=1, val_tasks=2, test_tasks=6, meta_batch=2, queries=2, width=4,
                     image_size=16),
    },
    "alpha": {
        "full": dict(alpha_tasks=["sinusoid", "linreg"], rates=12, span=10.0, steps=4000, eval_every=500,
                     meta_batch=25, k_shot=10, meta_lr=3e-3, val_tasks=200, test_tasks=2000, linreg_tasks=5000,
                     linreg_test_tasks=5000, linreg_k=50, linreg_d=20),
        "smoke": dict(alpha_tasks=["sinusoid", "linreg"], rates=8, span=10.0, steps=300, eval_every=100,
                      meta_batch=25, k_shot=10, meta_lr=3e-3, val_tasks=100, test_tasks=500, linreg_tasks=1000,
                      linreg_test_tasks=1000, linreg_k=50, linreg_d=20),
        "tiny": dict(alpha_tasks=["sinusoid", "linreg"], rates=4, span=4.0, steps=4, eval_every=2, meta_batch=4,
                     k_shot=5, meta_lr=3e-3, val_tasks=4, test_tasks=16, linreg_tasks=40, linreg_test_tasks=40,
                     linreg_k=10, linreg_d=4),
    },
    "budget": {
        # fastmeta's Omniglot defaults (inner rate 0.4, one inner step, 16 tasks) at 20-way.
        "full": dict(_OMNIGLOT, budget_ways=20, inner_lr=0.4, max_steps=3000, minutes=60.0, eval_every=250,
                     val_tasks=200, test_tasks=600),
        "smoke": dict(_OMNIGLOT, budget_ways=20, inner_lr=0.4, max_steps=40, minutes=5.0, eval_every=20,
                      val_tasks=20, test_tasks=100, meta_batch=4),
        "tiny": dict(_OMNIGLOT, budget_ways=3, inner_lr=0.4, max_steps=4, minutes=10.0, eval_every=2, val_tasks=2,
                     test_tasks=6, meta_batch=2, queries=2, width=4, image_size=16),
    },
}
DEFAULT_SEEDS = {"full": 3, "smoke": 2, "tiny": 2}


def _int_at_least(o: dict, key: str, low: int) -> None:
    v = o[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{key}: expected an int >= {low}, got {v!r}")


def check_options(study: str, o: dict) -> None:
    """``ValueError`` naming the first bad option of ``study`` (cheap; before any work)."""
    if not o["seeds"]:
        raise ValueError("seeds: expected at least one seed")
    if study in ("sharp", "budget"):
        if not o.get("data_root"):
            raise ValueError("data_root: no Omniglot data (the shared subsets are absent); pass --data-root")
        for key in ("max_steps", "eval_every", "val_tasks", "test_tasks", "meta_batch", "queries", "inner_steps"):
            _int_at_least(o, key, 1)
        if study == "sharp":
            if not o["ways"] or any(isinstance(w, bool) or not isinstance(w, int) or w < 2 for w in o["ways"]):
                raise ValueError(f"ways: expected a list of ints >= 2, got {o['ways']!r}")
            _int_at_least(o, "patience", 1)
            studies.sharp_algorithms(o["algos"], o["radii"])
            if any(not (isinstance(r, (int, float)) and r > 0) for r in o["radii"]):
                raise ValueError(f"radii: expected positive numbers, got {o['radii']!r}")
        else:
            _int_at_least(o, "budget_ways", 2)
            if not (isinstance(o["minutes"], (int, float)) and o["minutes"] > 0):
                raise ValueError(f"minutes: expected a number > 0, got {o['minutes']!r}")
    if study == "alpha":
        bad = [t for t in o["alpha_tasks"] if t not in ("sinusoid", "linreg")]
        if bad or not o["alpha_tasks"]:
            raise ValueError(f"alpha_tasks: expected a non-empty subset of ['sinusoid', 'linreg'], got {o['alpha_tasks']!r}")
        for key in ("steps", "eval_every", "val_tasks", "test_tasks", "k_shot", "linreg_tasks", "linreg_test_tasks",
                    "linreg_k", "linreg_d"):
            _int_at_least(o, key, 1)
        _int_at_least(o, "rates", 2)
        _int_at_least(o, "meta_batch", 2)  # alpha* and alpha_c are expectations over >= 2 probe tasks
        if not (isinstance(o["span"], (int, float)) and o["span"] > 1):
            raise ValueError(f"span: expected a number > 1 (the grid reaches span x beyond alpha* and alpha_c), "
                             f"got {o['span']!r}")


def options(study: str, args) -> dict:
    """The options of a study: the ``--budget`` preset, then ``--set`` overrides, then the common
    flags; checked by :func:`check_options`."""
    o = dict(PRESETS[study][args.budget])
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        if not sep or key not in o:
            raise ValueError(f"set: expected KEY=VALUE with KEY one of {sorted(o)}, got {item!r}")
        try:
            o[key] = json.loads(raw)
        except json.JSONDecodeError:
            o[key] = raw  # a bare string
    n = DEFAULT_SEEDS[args.budget] if args.seeds is None else args.seeds
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"seeds: expected an int >= 1, got {n!r}")
    o.update(out=str(args.out), seeds=list(range(args.first_seed, args.first_seed + n)), budget=args.budget,
             progress=not args.no_progress, data_root=args.data_root or studies.default_data_root(),
             log=(lambda *a, **k: None) if args.quiet else print)
    check_options(study, o)
    return o


# ------------------------------------------------------------------------------------ report
def _pm(d: dict, digits: int = 2, signed: bool = False) -> str:
    if d is None or d.get("mean") is None or not math.isfinite(d["mean"]):
        return "n/a"
    m = f"{d['mean']:+.{digits}f}" if signed else f"{d['mean']:.{digits}f}"
    ci = d.get("ci95")
    return m + (f" ± {ci:.{digits}f}" if ci is not None and math.isfinite(ci) else " (1 seed)")


def _claims_table(claims: list) -> list[str]:
    lines = ["| setting | claim | source | verdict | why |", "| --- | --- | --- | --- | --- |"]
    for c in claims:
        verdict = c["verdict"] if c["verdict"] != core.NOT_TESTABLE else f"{c['verdict']} ({c['why']})"
        lines.append(f"| {c['setting']} | {c['claim']} | {c['source']} | **{verdict}** | {c['why']} |")
    return lines


def report_sharp(r: dict) -> list[str]:
    o = r["options"]
    lines = ["### Study 1: Sharp-MAML vs MAML at equal meta-iterations (Omniglot, early stopping)", "",
             f"Seeds {o['seeds']}; early stopping every {o['eval_every']} steps on {o['val_tasks']} fixed validation "
             f"tasks, patience {o['patience']}, at most {o['max_steps']} steps; best checkpoint meta-tested on "
             f"{o['test_tasks']} tasks of held-out alphabets (the same tasks for every algorithm of a seed). "
             f"Inner rate {o['inner_lr']}, {o['inner_steps']} inner step(s), {o['meta_batch']} tasks per step, "
             f"fused={o['fused']}, strategy auto. Accuracies in %, mean ± 95% t-CI over seeds; differences are "
             "seed-paired (CI over seeds) and task-paired (same test tasks, pooled over seeds, normal CI).", ""]
    for setting, t in r["table"].items():
        lines += [f"**{setting}**", "",
                  "| algorithm | meta-test accuracy | Δ vs MAML, seed-paired | Δ vs MAML, task-paired | steps run | "
                  "best step | wall-clock (s) | s / step | verdict |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for label, a in t["algorithms"].items():
            d = t["differences"].get(label)
            lines.append(f"| {label} | {_pm(a['accuracy'])} | {_pm(d['seed_paired'], signed=True) if d else '—'} | "
                         f"{_pm(d['task_paired'], signed=True) if d else '—'} | {a['steps']} | {a['best_steps']} | "
                         f"{_pm(a['train_seconds'], 0)} | {_pm(a['seconds_per_step'], 3)} | "
                         f"{d['verdict'] if d else '—'} |")
        lines.append("")
    return lines + _claims_table(r["claims"]) + [""]


def _edge(v) -> str:
    return "open" if v is None else f"{v:.4g}"


def report_alpha(r: dict) -> list[str]:
    o = r["options"]
    lines = ["### Study 2: alpha* and alpha_c against a measured sweep of inner rates", "",
             f"Seeds {o['seeds']}; sinusoid: MAML one inner step, {o['steps']} meta-steps per rate (Adam "
             f"{o['meta_lr']}, {o['meta_batch']} tasks, K = {o['k_shot']}, strategy bmm), post-adaptation MSE on "
             f"{o['test_tasks']} test tasks with the same rate; linreg: Zou's mixed linear regression "
             f"(N = {o['linreg_tasks']}, K = {o['linreg_k']}, d = {o['linreg_d']}), exact MAML minimizer, "
             f"{o['linreg_test_tasks']} test tasks. Neighbourhood of the best rate: the open interval between the "
             "grid points adjacent to the rates that the seeds cannot tell from the best (seed-paired 95% CI "
             "of the difference reaches 0).", ""]
    for task, t in r["tasks"].items():
        nb = t["neighbourhood"]
        rng = f", H.18 range [{t['alpha_range'][0]:.4g}, {t['alpha_range'][1]:.4g}]" if t.get("alpha_range") else ""
        trained = (f", alpha* after meta-training (best rate) {t['alpha_star_trained']:.4g}"
                   if t.get("alpha_star_trained") is not None else "")
        lines += [f"**{task}**: alpha* {t['alpha_star']:.4g} (mean over seeds), alpha_c {t['alpha_c']:.4g}{rng}"
                  f"{trained}; best rate {nb['best_rate']:.4g}, neighbourhood ({_edge(nb['low'])}, "
                  f"{_edge(nb['high'])})"
                  + (f"; diverged at {t['diverged_rates']}" if t.get("diverged_rates") else ""), "",
                  "| rate | mean test loss ± 95% CI | " + " | ".join(f"seed {s}" for s in t["losses"]) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in t["losses"]) + " |"]
        for i, rate in enumerate(t["rates"]):
            m, c = t["mean_loss"][i], t["ci95"][i]
            cell = "diverged" if m is None else (f"{m:.4g}" + (f" ± {c:.2g}" if c is not None else ""))
            mark = " (best)" if i == nb["best_index"] else ""
            seeds = " | ".join("diverged" if ls[i] is None else f"{ls[i]:.4g}" for ls in t["losses"].values())
            lines.append(f"| {rate:.4g}{mark} | {cell} | {seeds} |")
        lines.append("")
    return lines + _claims_table(r["claims"]) + [""]


def report_budget(r: dict) -> list[str]:
    b = r["budget"]
    lines = ["### Study 3: " + r["setting"] + " within a budget", "",
             f"Budget: at most {b['max_steps']} steps or {b['minutes']:g} min of training wall-clock per seed "
             f"(checked at each evaluation, every {b['eval_every']} steps); best validation checkpoint meta-tested "
             f"on {r['options']['test_tasks']} tasks of held-out alphabets.", "",
             "| seed | steps | wall-clock (s) | best step | meta-test accuracy (95% CI over tasks) | stop |",
             "| --- | --- | --- | --- | --- | --- |"]
    for run in r["runs"]:
        lines.append(f"| {run['seed']} | {run['steps']} | {run['train_seconds']:.0f} | {run['best_step']} | "
                     f"{100 * run['test_accuracy']:.2f} ± {100 * run['test_accuracy_ci95']:.2f} | "
                     f"{run['stop_reason']} |")
    lines += ["", f"Mean over seeds: {_pm(r['accuracy'])} % (95% t-CI over seeds).", ""]
    return lines + _claims_table(r["claims"]) + [""]


REPORTERS = {"sharp": report_sharp, "alpha": report_alpha, "budget": report_budget}


def report(out) -> str:
    """The markdown tables of every study JSON in ``out`` (``ValueError`` naming ``out`` if none)."""
    results = studies.load_results(out)
    if not results:
        raise ValueError(f"out: no study results (sharp.json, alpha.json, budget.json) in {out}")
    lines = []
    for name, res in results.items():
        lines += REPORTERS[name](res)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/reproduce.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="study", required=True)
    for name, help_ in (("sharp", "study 1: Sharp-MAML vs MAML on Omniglot N-way 1-shot, early stopping"),
                        ("alpha", "study 2: alpha* / alpha_c against a measured sweep of inner rates"),
                        ("budget", "study 3: MAML Omniglot 20-way 1-shot within a step / wall-clock budget")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--out", default="runs/reproduce", help="results folder (JSON, plots, per-run folders)")
        s.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; smoke/tiny 2)")
        s.add_argument("--first-seed", type=int, default=0)
        s.add_argument("--budget", choices=("full", "smoke", "tiny"), default="full",
                       help="preset of sizes (full: the study; smoke: minutes; tiny: the CI test)")
        s.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override preset options (JSON values)")
        s.add_argument("--data-root", nargs="+", default=None, help="Omniglot folders or zips (default: the shared "
                                                                     "subsets in ../shared/data/omniglot)")
        s.add_argument("--show", action="store_true", help="print the study's options and exit")
        s.add_argument("--no-progress", action="store_true")
        s.add_argument("--quiet", action="store_true", help="no per-chunk training log")
        s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    r = sub.add_parser("report", help="markdown tables and verdicts from the study JSONs in --out")
    r.add_argument("--out", default="runs/reproduce")
    r.add_argument("--write", default=None, help="also write the markdown to this file")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.study == "report":
            text = report(args.out)
            print(text)
            if args.write:
                Path(args.write).write_text(text + "\n")
            return 0
        o = options(args.study, args)
        if args.show:
            print(json.dumps(studies._public(o), indent=1))
            return 0
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        studies.STUDIES[args.study](o)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {Path(args.out) / args.study}.json and .png; runs trained this call: "
          f"{core.COUNTERS['runs_started']}, finished before: {core.COUNTERS['runs_skipped']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
