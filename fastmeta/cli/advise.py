"""``fastmeta advise``: alpha*, its heuristic range, alpha_c, beta_c and a recommended (alpha, beta)
for a task family, with measured plots that check them.

    fastmeta advise --task sinusoid --out runs/advise
    fastmeta advise --task omniglot --data-root path/to/images_background --out runs/advise
    fastmeta advise --task linreg --out runs/advise      # the 2LR sec. 5.1 map

Writes ``<out>/lr_<task>_stability_map.png``, ``<out>/lr_<task>_alpha_sweep.png`` (not for linreg)
and ``<out>/lr_<task>_advice.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..data import Omniglot, OmniglotTasks, SinusoidTasks
from ..models import Conv4, SineMLP

DEFAULTS = {  # per task: chosen to keep the default run to a few minutes on 2 shared CPU cores
    "sinusoid": dict(meta_batch=10, k_shot=10, grid=6, iters=40, k=5, sweep=6, bisect=4),
    "omniglot": dict(meta_batch=4, k_shot=1, grid=4, iters=8, k=5, sweep=4, bisect=3),
    "linreg": dict(meta_batch=1, k_shot=100, grid=30, iters=500, k=2, sweep=0, bisect=0),
}


def register(subparsers) -> None:
    p = subparsers.add_parser("advise", help="advise MAML's inner rate alpha and meta rate beta (alpha*, alpha_c, beta_c)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("sinusoid", "omniglot", "linreg"), required=True)
    p.add_argument("--data-root", nargs="+", default=None, help="Omniglot folder(s) or zip(s) (--task omniglot)")
    p.add_argument("--out", required=True, help="output directory for the plots and advice JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-batch (also the N of alpha*'s range)")
    p.add_argument("--k-shot", type=int, default=None, help="support samples per task (per class for omniglot)")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--hidden", type=int, default=32, help="Conv-4 channels (--task omniglot)")
    p.add_argument("--grid", type=int, default=None, help="alpha and beta values per axis of the stability map")
    p.add_argument("--iters", type=int, default=None, help="meta-training steps per grid cell")
    p.add_argument("--k", type=int, default=None, help="Hessian eigenvalues per task (Lanczos)")
    p.add_argument("--sweep", type=int, default=None, help="alpha values in the post-adaptation sweep")
    p.add_argument("--bisect", type=int, default=None, help="bisection steps for the measured beta boundary")
    p.add_argument("--hvp", choices=("autograd", "finite_difference"), default="autograd")
    p.add_argument("--alpha-margin", type=float, default=0.5)
    p.add_argument("--beta-margin", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the small models here run faster on one thread of a shared machine)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _opt(args, name):
    v = getattr(args, name)
    return DEFAULTS[args.task][name] if v is None else v


FALLAH_NOTE = ("also available: fastmeta.FallahStepSize, Fallah et al.'s adaptive meta step size "
               "beta_k = c / L~(w_k) (eqs. 16-17), an alternative to a fixed beta")


def run(args) -> int:
    """Estimate and check the learning rates for ``args.task``; writes plots and advice JSON to ``args.out``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.task == "linreg":
        summary = _run_linreg(args, out)
    else:
        summary = _run_model(args, out)
    print(FALLAH_NOTE)
    summary["fallah"] = FALLAH_NOTE
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / f"lr_{args.task}_advice.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"wrote {out}/lr_{args.task}_* in {summary['seconds']} s")
    return 0


# -------------------------------------------------------------------------------------------- linreg
def _run_linreg(args, out: Path) -> dict:
    from ..lr.experiments import linear_regression_map
    from ..lr.plots import plot_stability_map
    from ..lr.stability import beta_c_exact, beta_c_paper, bounds_from_eigenvalues

    G = _opt(args, "grid")
    alphas = np.logspace(-5, math.log10(9e-2), G)          # the ranges of 2LR sec. 5.1
    betas = np.logspace(math.log10(5e-3), math.log10(9), G)
    m = linear_regression_map(alphas, betas, iters=_opt(args, "iters"), n_points=_opt(args, "k_shot"), seed=args.seed)
    sb = bounds_from_eigenvalues(m.eigenvalues, curve="exact", alpha_margin=args.alpha_margin, beta_margin=args.beta_margin)
    ex, pa = beta_c_exact(m.eigenvalues, alphas), beta_c_paper(m.eigenvalues, alphas)
    ratio = betas[None, :] / ex[:, None]
    away = np.abs(np.log(ratio)) > math.log(1.15)
    acc_exact = float(((ratio > 1) == m.diverged)[away].mean())
    pred_paper = (betas[None, :] > pa[:, None]) | (alphas[:, None] >= sb.alpha_c)
    acc_paper = float((pred_paper == m.diverged).mean())
    below = alphas < sb.alpha_c
    dev = ex[below] / pa[below]
    above_ok = float((~m.diverged[~below]).mean()) if (~below).any() else float("nan")
    lam = [float(v) for v in m.eigenvalues]
    print(f"2LR sec. 5.1 linear regression: Hessian eigenvalues {lam[0]:.4g}, {lam[1]:.4g}; alpha_c = {sb.alpha_c:.4g}")
    print(f"exact boundary beta > 2/(lambda (1 - alpha lambda)^2): {100 * acc_exact:.1f}% of {int(away.sum())} cells "
          f"outside the +-15% band classified correctly")
    print(f"paper's curves (alpha >= alpha_c counted as divergent): {100 * acc_paper:.1f}% of all {m.diverged.size} cells")
    print(f"exact/paper beta_c ratio for alpha < alpha_c: {dev.min():.3g} .. {dev.max():.3g} "
          f"(= 1/(1 - alpha lambda) of the binding eigenvalue)")
    if (~below).any():
        print(f"cells with alpha > alpha_c that converged: {100 * above_ok:.0f}% (the paper's alpha_c is not a divergence bound)")
    path = plot_stability_map(out / "lr_linreg_stability_map.png", alphas, betas, m.loss, m.diverged, m.eigenvalues,
                              sb.alpha_c, "2LR sec. 5.1: linear regression, steepest GD, 500 it.")
    print(f"plot: {path}")
    return dict(task="linreg", eigenvalues=lam, alpha_c=sb.alpha_c, acc_exact_away_from_band=acc_exact,
                cells_away=int(away.sum()), acc_paper=acc_paper, exact_over_paper_min=float(dev.min()),
                exact_over_paper_max=float(dev.max()), converged_above_alpha_c=above_ok,
                map_alphas=alphas.tolist(), map_betas=betas.tolist(), map_diverged=m.diverged.tolist())


# -------------------------------------------------------------------------------------------- models
def _setup(args):
    torch.manual_seed(args.seed)
    if args.task == "sinusoid":
        model = SineMLP()
        k = _opt(args, "k_shot")
        tasks = SinusoidTasks(k_shot=k, k_query=10, seed=args.seed)
        test = SinusoidTasks(k_shot=k, k_query=10, seed=args.seed + 1000).sample(200)
        return model, tasks, test, "mse", "vmap"
    if not args.data_root:
        raise ValueError("--data-root: required for --task omniglot (nothing is downloaded)")
    data = Omniglot(args.data_root)
    shots = _opt(args, "k_shot")
    model = Conv4(args.ways, hidden=args.hidden)
    tasks = OmniglotTasks(data, data.alphabets, ways=args.ways, shots=shots, queries=5, seed=args.seed)
    test = OmniglotTasks(data, data.alphabets, ways=args.ways, shots=shots, queries=5, seed=args.seed + 1000).sample(20)
    return model, tasks, test, "cross_entropy", "loop"


def _alpha_star(args, model, probe):
    """(alpha*, how) -- Zou eq. 3.3 on tangent features for regression; H.3's online head estimate
    on normalized penultimate features for classification."""
    from ..lr.alpha import OnlineAlphaStar, alpha_star, tangent_features

    if args.task == "sinusoid":
        fs = tangent_features(model, probe.support_x)
        fq = tangent_features(model, probe.query_x)
        return alpha_star(fs), alpha_star(fs, fq), "eq. 3.3 on neural-tangent features of the support sets (H.16-17)"
    buf = OnlineAlphaStar()
    with torch.no_grad():
        for t in range(probe.num_tasks):
            buf.update(model.features(probe.support_x[t]), args.ways, _opt(args, "k_shot"))
    return buf.value, None, "H.3 online head estimate 1/(2 ways shots sigma^2), normalized penultimate features"


def _run_model(args, out: Path) -> dict:
    from ..lr.alpha import alpha_star_range
    from ..lr.experiments import alpha_sweep, beta_divergence_boundary, maml_ab_map
    from ..lr.plots import plot_alpha_sweep, plot_stability_map
    from ..lr.stability import stability_bounds

    progress = not args.no_progress
    model, tasks, test, loss_fn, strategy = _setup(args)
    T, G, iters = _opt(args, "meta_batch"), _opt(args, "grid"), _opt(args, "iters")
    probe = tasks.sample(T)
    D = sum(p.numel() for p in model.parameters())
    a_star, a_star_split, how = _alpha_star(args, model, probe)
    k_shot = _opt(args, "k_shot") * (args.ways if args.task == "omniglot" else 1)
    a_lo, a_hi = alpha_star_range(T, k_shot, D)
    t_est = time.perf_counter()
    sb = stability_bounds(model, probe, loss_fn, k=_opt(args, "k"), strategy=strategy, hvp=args.hvp,
                          alpha_margin=args.alpha_margin, beta_margin=args.beta_margin, tol=1e-4)
    t_est = time.perf_counter() - t_est
    a_rec, b_rec = sb.recommended
    bc_rec = float(sb.beta_c(a_rec))
    bc_lower = float(sb.beta_c_lower(a_rec))
    print(f"task {args.task}: {type(model).__name__} with D = {D} adapted parameters, meta-batch {T}, {k_shot} support samples/task")
    print(f"alpha* = {a_star:.4g}   [{how}]" + (f"; with query features (H.6): {a_star_split:.4g}" if a_star_split else ""))
    print(f"alpha* heuristic range (H.18-H.25, N={T}, K={k_shot}, d={D}): [{a_lo:.3g}, {a_hi:.3g}]")
    print(f"alpha_c = 1/lambda_max = {sb.alpha_c:.4g}   (lambda_max {sb.lambda_max:.4g} over {T} tasks, 2LR eq. 11/23; "
          f"{sb.lanczos_iterations} batched Lanczos steps, {t_est:.1f} s)")
    print(f"beta_c(alpha) at the recommended alpha {a_rec:.4g}: {bc_rec:.4g}   (2LR eqs. 18-19/26; lower bound over the "
          f"whole spectrum {bc_lower:.4g})")
    print(f"recommended: alpha = {args.alpha_margin:g} * alpha_c = {a_rec:.4g}, beta = {args.beta_margin:g} * beta_c = {b_rec:.4g} "
          f"(SGD meta-optimizer, mean over tasks)")

    batches = [tasks.sample(T) for _ in range(iters)]
    alphas = np.logspace(math.log10(sb.alpha_c / 30), math.log10(sb.alpha_c * 3), G)
    betas = np.logspace(math.log10(bc_rec / 30), math.log10(bc_rec * 10), G)
    abm = maml_ab_map(model, batches, alphas, betas, loss_fn, strategy, progress=progress)
    try:
        lo, hi, probes = beta_divergence_boundary(model, batches, a_rec, bc_rec / 2, bc_rec * 2, steps=_opt(args, "bisect"),
                                                  loss_fn=loss_fn, strategy=strategy, progress=progress)
        mid = math.sqrt(lo * hi)
        print(f"measured divergence boundary of beta at alpha = {a_rec:.4g} ({iters} SGD steps): between {lo:.4g} and "
              f"{hi:.4g}; beta_c predicted {bc_rec:.4g} -> measured/predicted = {mid / bc_rec:.3g}")
    except ValueError as e:   # no sign change found within the probed range
        lo = hi = mid = float("nan")
        probes = []
        print(f"measured divergence boundary of beta at alpha = {a_rec:.4g}: not bracketed ({e})")
    extra = [(a_star, r"$\alpha^*$ (Zou)")] if a_star else []
    p1 = plot_stability_map(out / f"lr_{args.task}_stability_map.png", alphas, betas, abm.loss, abm.diverged,
                            sb.eigenvalues, sb.alpha_c, f"{args.task}: MAML + SGD, {iters} steps, final training loss",
                            recommended=(a_rec, b_rec), boundary=None if math.isnan(lo) else (a_rec, lo, hi),
                            extra_alphas=extra, show_exact=False)
    S = _opt(args, "sweep")
    lo_a = min(a_star, sb.alpha_c) / 10
    hi_a = max(a_star, sb.alpha_c) * 2
    sweep_alphas = np.unique(np.concatenate([np.logspace(math.log10(lo_a), math.log10(hi_a), S), [a_star]]))
    sw = alpha_sweep(model, batches, test, sweep_alphas, b_rec, loss_fn, strategy, progress=progress)
    best = float(sweep_alphas[int(np.nanargmin(sw.post))]) if np.isfinite(sw.post).any() else float("nan")
    print(f"alpha sweep at beta = {b_rec:.4g} ({iters} steps, {test.num_tasks} held-out tasks): best measured alpha = {best:.4g}; "
          f"alpha* = {a_star:.4g}")
    p2 = plot_alpha_sweep(out / f"lr_{args.task}_alpha_sweep.png", sweep_alphas, sw.post, sw.pre, a_star, (a_lo, a_hi),
                          sb.alpha_c, f"{args.task}: held-out loss after meta-training {iters} steps at each alpha")
    print(f"plots: {p1}, {p2}")
    return dict(task=args.task, D=D, meta_batch=T, k_shot=k_shot, alpha_star=a_star, alpha_star_split=a_star_split,
                alpha_star_how=how, alpha_range=[a_lo, a_hi], alpha_c=sb.alpha_c, lambda_max=sb.lambda_max,
                eigenvalues=sb.eigenvalues.tolist(), recommended_alpha=a_rec, recommended_beta=b_rec, beta_c_at_rec=bc_rec,
                beta_c_lower_at_rec=bc_lower,
                measured_beta_boundary=[lo, hi], measured_over_predicted=mid / bc_rec, probes=probes, iters=iters,
                map_alphas=alphas.tolist(), map_betas=betas.tolist(), map_loss=np.where(np.isfinite(abm.loss), abm.loss, -1).tolist(),
                map_diverged=abm.diverged.tolist(), sweep_alphas=sweep_alphas.tolist(),
                sweep_post=np.nan_to_num(sw.post, nan=-1).tolist(), sweep_pre=np.nan_to_num(sw.pre, nan=-1).tolist(),
                sweep_best_alpha=best)
