"""``fastmeta advise`` end to end on task families whose answers are known in closed form.

* The model pipeline (alpha*, alpha_c, beta_c, the recommendation, the measured beta boundary, the
  alpha-beta map, both plots) on the linear-regression family of linear_family.py: Hessian
  H = (2/K) X^T X of every task known, so alpha_c = 1/lambda_max (2LR eq. 11/23), the paper's
  beta_c(alpha) = min 2/(lambda - alpha lambda^2) (eqs. 18-19/26), the exact divergence boundary
  beta lambda (1 - alpha lambda)^2 > 2 and alpha* = K tr S^2 / (2 tr S^3) (Zou eq. 3.3) are written
  out in the test.
* The linreg (2LR sec. 5.1) pipeline against the eigenvalues of 2 mean([x, 1][x, 1]^T) and the exact
  boundary.
"""
import argparse
import json
import math

import numpy as np
import pytest
import torch

from fastmeta.cli import advise as cli
from fastmeta.lr import bounds_from_eigenvalues, linear_regression_map
from fastmeta.lr import plots as lr_plots

from linear_family import LinearFamily, beta_c_exact_of, beta_c_paper_of, design, hessians, zero_linear


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def parse(argv):
    p = argparse.ArgumentParser()
    cli.register(p.add_subparsers(dest="command", required=True))
    return p.parse_args(argv)


def test_register_adds_advise_with_run():
    args = parse(["advise", "--task", "sinusoid", "--out", "x"])
    assert args.func is cli.run
    with pytest.raises(SystemExit):
        parse(["advise", "--task", "mnist", "--out", "x"])


@pytest.mark.slow   # ~10 s of CPU (vmap warm-up, Lanczos, 4 tiny training runs); minutes on a loaded machine
def test_advise_sinusoid_tiny(tmp_path, capsys):
    args = parse(["advise", "--task", "sinusoid", "--out", str(tmp_path), "--meta-batch", "2", "--grid", "2",
                  "--iters", "2", "--k", "1", "--sweep", "1", "--bisect", "1", "--no-progress"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for word in ("alpha* =", "range", "alpha_c =", "beta_c(alpha) at the recommended alpha", "recommended:",
                 "measured divergence boundary"):
        assert word in out
    for name in ("lr_sinusoid_stability_map.png", "lr_sinusoid_alpha_sweep.png"):
        assert (tmp_path / name).stat().st_size > 1000
    adv = json.loads((tmp_path / "lr_sinusoid_advice.json").read_text())
    # the numbers the advice is made of follow from the eigenvalues it reports (2LR eqs. 11, 18)
    lam = np.asarray(adv["eigenvalues"]).max()
    assert adv["alpha_c"] == pytest.approx(1 / lam, rel=1e-12)
    assert adv["recommended_alpha"] == pytest.approx(0.5 / lam, rel=1e-12)
    assert adv["beta_c_at_rec"] == pytest.approx(float(beta_c_paper_of(adv["eigenvalues"], 0.5 / lam)), rel=1e-12)


def _capture_plots(monkeypatch):
    """Wrap the plot functions so that the test gets their figures (``return_figure``)."""
    figs = {}
    for name in ("plot_stability_map", "plot_alpha_sweep"):
        orig = getattr(lr_plots, name)

        def wrapped(*a, _orig=orig, _name=name, **kw):
            path, figs[_name] = _orig(*a, return_figure=True, **kw)
            return path

        monkeypatch.setattr(lr_plots, name, wrapped)
    return figs


def _line(ax, label_start):
    lines = [ln for ln in ax.get_lines() if str(ln.get_label()).startswith(label_start)]
    assert len(lines) == 1, [ln.get_label() for ln in ax.get_lines()]
    return np.asarray(lines[0].get_xdata(), float), np.asarray(lines[0].get_ydata(), float)


def test_advise_pipeline_on_linear_regression_tasks_matches_closed_forms(tmp_path, capsys, monkeypatch):
    """``fastmeta advise``'s model pipeline with the task family swapped for linear regression on
    shared inputs (support = query), where every learning-rate answer is known exactly."""
    fam = LinearFamily(K=12, shared_x=True, seed=0)
    test = LinearFamily(K=12, shared_x=True, spread=1.0, seed=0).sample(10).select(slice(4, 10))
    monkeypatch.setattr(cli, "_setup", lambda args: (zero_linear(), fam, test, "mse", "vmap"))
    figs = _capture_plots(monkeypatch)
    T, iters, bisect = 3, 40, 5
    args = parse(["advise", "--task", "sinusoid", "--out", str(tmp_path), "--meta-batch", str(T), "--grid", "3",
                  "--iters", str(iters), "--k", "2", "--sweep", "2", "--bisect", str(bisect), "--no-progress"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    adv = json.loads((tmp_path / "lr_sinusoid_advice.json").read_text())

    X, _ = design(fam.sample(1))
    H = hessians(fam.sample(1))[0]
    eigs = torch.linalg.eigvalsh(H).flip(0).numpy()                  # [lambda_1, lambda_2]
    lam = eigs[0]
    assert eigs[1] > 0 and lam / eigs[1] > 2                         # guard: two distinct eigenvalues
    # Hessian eigenvalues of all T tasks, alpha_c (eq. 11/23) and the recommendation
    assert np.allclose(np.asarray(adv["eigenvalues"]), np.tile(eigs, (T, 1)), rtol=1e-8, atol=0)
    assert adv["alpha_c"] == pytest.approx(1 / lam, rel=1e-8)
    assert f"alpha_c = 1/lambda_max = {1 / lam:.4g}" in out
    a_rec = 0.5 / lam
    assert adv["recommended_alpha"] == pytest.approx(a_rec, rel=1e-8)
    bc = float(beta_c_paper_of(eigs, a_rec))                          # eqs. 18-19 over both eigenvalues
    assert adv["beta_c_at_rec"] == pytest.approx(bc, rel=1e-8)
    assert adv["recommended_beta"] == pytest.approx(0.5 * bc, rel=1e-8)
    # with the whole spectrum computed (k = D = 2) and lambda_2 < 1/(2 alpha), the lower bound is beta_c
    assert adv["beta_c_lower_at_rec"] == pytest.approx(bc, rel=1e-8)
    # alpha* (Zou eq. 3.3) on the tangent features, which for a linear model are X itself
    S = (X[0].T @ X[0]).numpy()
    K = X.shape[1]
    a_star = K * np.trace(S @ S) / (2 * np.trace(S @ S @ S))
    assert adv["alpha_star"] == pytest.approx(a_star, rel=1e-9)
    assert adv["alpha_star_split"] == pytest.approx(a_star, rel=1e-9)    # query = support here

    # the measured boundary of beta at the recommended alpha brackets the exact quadratic boundary,
    # which is 1/(1 - alpha lambda) = 2x the paper's first-order curve here
    lo, hi = adv["measured_beta_boundary"]
    exact = float(beta_c_exact_of(eigs, a_rec))
    assert math.isfinite(lo) and math.isfinite(hi)
    assert hi > exact and lo <= exact * 1.05, (lo, hi, exact)
    assert adv["measured_over_predicted"] == pytest.approx(math.sqrt(lo * hi) / bc, rel=1e-12)
    assert adv["measured_over_predicted"] > 1.8

    # the alpha-beta map: diverged exactly where the exact boundary says, away from a +-15% band
    alphas, betas = np.asarray(adv["map_alphas"]), np.asarray(adv["map_betas"])
    div = np.asarray(adv["map_diverged"])
    ratio = betas[None, :] / beta_c_exact_of(eigs, alphas)[:, None]
    away = np.abs(np.log(ratio)) > math.log(1.15)
    assert away.sum() >= 6 and 0 < div[away].mean() < 1
    assert np.array_equal(div[away], (ratio > 1)[away])

    # the plots show these numbers
    ax = figs["plot_stability_map"].axes[0]
    x, y = _line(ax, r"$\beta_c(\alpha)$ paper")
    assert np.allclose(y, beta_c_paper_of(eigs, x), rtol=1e-9)
    assert x.min() < alphas.min() and x.max() > alphas.max()
    assert _line(ax, r"$\alpha_c")[0] == pytest.approx([1 / lam] * 2, rel=1e-8)
    assert np.allclose(np.column_stack(_line(ax, "recommended")), [[a_rec, 0.5 * bc]], rtol=1e-8)
    bx, by = _line(ax, "measured divergence")
    assert np.allclose(bx, [a_rec] * 2, rtol=1e-8) and np.allclose(by, [lo, hi], rtol=1e-12)
    mesh = ax.collections[0].get_array()
    loss = np.asarray(adv["map_loss"], float)
    want = np.where(div, np.nan, np.log10(np.maximum(loss, 1e-12))).T.ravel()
    assert np.array_equal(np.ma.filled(mesh.astype(float), np.nan).ravel(), want, equal_nan=True)
    ax2 = figs["plot_alpha_sweep"].axes[0]
    sx, sy = _line(ax2, "post-adaptation")
    # the JSON writes -1 where a sweep run diverged; the plot leaves a gap (NaN) there
    post_json = np.asarray(adv["sweep_post"])
    assert np.allclose(sx, adv["sweep_alphas"], rtol=1e-12)
    assert np.array_equal(np.isnan(sy), post_json == -1) and np.isfinite(sy).sum() >= 2
    assert np.allclose(sy[np.isfinite(sy)], post_json[post_json != -1], rtol=1e-12)
    sp = _line(ax2, "pre-adaptation")[1]
    assert np.allclose(sp[np.isfinite(sp)], np.asarray(adv["sweep_pre"])[post_json != -1], rtol=1e-12)
    assert _line(ax2, r"$\alpha^*$")[0] == pytest.approx([a_star] * 2, rel=1e-9)
    best = np.asarray(adv["sweep_alphas"])[np.nanargmin(sy)]
    assert adv["sweep_best_alpha"] == pytest.approx(best, rel=1e-12)
    assert np.allclose(np.column_stack(_line(ax2, "best measured")), [[best, np.nanmin(sy)]], rtol=1e-12)


def test_beta_c_lower_bounds_every_completion_of_the_spectrum():
    """StabilityBounds.beta_c_lower(alpha): the paper's beta_c over the whole spectrum when only the
    top-k eigenvalues are known (the rest lie below the smallest known one, lambda_k)."""
    res = bounds_from_eigenvalues([[4.0, 3.0]])
    g = np.random.default_rng(0)
    for alpha in (0.1, 0.2):
        low = res.beta_c_lower(alpha)
        completions = [np.concatenate([[4.0, 3.0], g.uniform(0, 3.0, 5)]) for _ in range(200)]
        worst = min(float(beta_c_paper_of(c, alpha)) for c in completions)
        assert low <= worst * (1 + 1e-12)
        if alpha == 0.1:
            # 1/(2 alpha) = 5 > lambda_k = 3: f(lambda) = lambda - alpha lambda^2 rises up to 3, no unknown
            # eigenvalue beats lambda_k, and the bound is the top-k value min(2 / (4 - 1.6), 2 / (3 - 0.9))
            assert low == pytest.approx(2 / (4 - 0.1 * 16), rel=1e-12)
        else:
            # 1/(2 alpha) = 2.5 < 3: an unknown eigenvalue 2.5 would give f = 1/(4 alpha) = 1.25, so
            # the bound is 2 / 1.25 = 1.6 (below the top-k value 2 / (3 - 1.8) = 1.67), and attained
            assert low == pytest.approx(1.6, rel=1e-12)
            assert float(beta_c_paper_of([4.0, 3.0, 2.5], alpha)) == pytest.approx(1.6, rel=1e-12)
            assert res.beta_c(alpha) == pytest.approx(2 / 1.2, rel=1e-12)


def test_advise_linreg_matches_the_exact_boundary(tmp_path, capsys, monkeypatch):
    figs = _capture_plots(monkeypatch)
    args = parse(["advise", "--task", "linreg", "--out", str(tmp_path), "--grid", "6", "--iters", "60",
                  "--k-shot", "30"])
    assert args.func(args) == 0
    assert "exact boundary" in capsys.readouterr().out
    adv = json.loads((tmp_path / "lr_linreg_advice.json").read_text())
    # the data of 2LR sec. 5.1 for this seed; its Hessian is 2 mean([x, 1][x, 1]^T)
    x = linear_regression_map([0.0], [0.0], iters=0, n_points=30, seed=0).x
    feats = torch.stack([x, torch.ones_like(x)], 1)
    eigs = torch.linalg.eigvalsh(2 * feats.T @ feats / 30).flip(0).numpy()
    assert np.allclose(adv["eigenvalues"], eigs, rtol=1e-10)
    assert adv["alpha_c"] == pytest.approx(1 / eigs[0], rel=1e-10)
    alphas, betas = np.asarray(adv["map_alphas"]), np.asarray(adv["map_betas"])
    div = np.asarray(adv["map_diverged"])
    ratio = betas[None, :] / beta_c_exact_of(eigs, alphas)[:, None]
    away = np.abs(np.log(ratio)) > math.log(1.15)
    assert 0 < div[away].mean() < 1
    assert np.array_equal(div[away], (ratio > 1)[away])
    assert adv["acc_exact_away_from_band"] == 1.0 and adv["cells_away"] == int(away.sum())
    below = alphas < 1 / eigs[0]
    dev = beta_c_exact_of(eigs, alphas[below]) / beta_c_paper_of(eigs, alphas[below])
    assert adv["exact_over_paper_min"] == pytest.approx(dev.min(), rel=1e-9)
    assert adv["exact_over_paper_max"] == pytest.approx(dev.max(), rel=1e-9)
    ax = figs["plot_stability_map"].axes[0]
    xs, ys = _line(ax, r"$\beta_c$ exact")
    assert np.allclose(ys, beta_c_exact_of(eigs, xs), rtol=1e-9)
