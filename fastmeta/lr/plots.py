"""Plots of the learning-rate advisor (matplotlib, PNG, headless backend)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .stability import beta_c_exact, beta_c_paper


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _edges(v: np.ndarray) -> np.ndarray:
    lv = np.log10(v)
    mid = (lv[1:] + lv[:-1]) / 2
    return 10 ** np.concatenate([[2 * lv[0] - mid[0]], mid, [2 * lv[-1] - mid[-1]]])


def plot_stability_map(path, alphas, betas, loss, diverged, eigenvalues, alpha_c: float, title: str,
                       recommended: Optional[tuple] = None, boundary: Optional[tuple] = None,
                       extra_alphas: Sequence[tuple] = (), show_exact: bool = True, return_figure: bool = False):
    """2LR Fig. 3/4: final training loss over the (alpha, beta) grid (log color), diverged cells
    in grey with an x, the theoretical alpha_c (dashed) and beta_c(alpha) curves (paper eqs. 18/26
    solid, exact quadratic case dotted) overlaid; the recommended pair (star) and a measured
    divergence interval of beta (vertical bar) if given. ``extra_alphas``: ``(value, label)``
    vertical markers (e.g. alpha*). Returns ``path``, or ``(path, figure)`` with ``return_figure``
    (the closed matplotlib Figure, whose artists hold the plotted arrays: for tests)."""
    plt = _plt()
    alphas, betas = np.asarray(alphas, float), np.asarray(betas, float)
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=90)
    z = np.where(diverged, np.nan, np.log10(np.maximum(loss, 1e-12)))
    mesh = ax.pcolormesh(_edges(alphas), _edges(betas), z.T, cmap="viridis", shading="flat")
    fig.colorbar(mesh, ax=ax, label="log10 final training loss")
    ax.set_facecolor("0.85")   # diverged cells are NaN: the grey background shows through
    ai, bj = np.nonzero(diverged)
    if diverged.size <= 400:
        ax.scatter(alphas[ai], betas[bj], marker="x", color="0.45", s=18, label="diverged (grey)")
    else:
        ax.fill_between([], [], color="0.85", label="diverged (grey)")
    a_fine = np.logspace(np.log10(_edges(alphas)[0]), np.log10(_edges(alphas)[-1]), 400)
    with np.errstate(all="ignore"):
        ax.plot(a_fine, beta_c_paper(eigenvalues, a_fine), "r-", lw=1.8, label=r"$\beta_c(\alpha)$ paper eq. 18/26")
        if show_exact:
            ax.plot(a_fine, beta_c_exact(eigenvalues, a_fine), "w:", lw=1.8, label=r"$\beta_c$ exact (quadratic)")
    ax.axvline(alpha_c, color="r", ls="--", lw=1.2, label=r"$\alpha_c = 1/\lambda_{max}$")
    for v, lab in extra_alphas:
        ax.axvline(v, color="orange", ls="-.", lw=1.2, label=lab)
    if boundary is not None:
        a, lo, hi = boundary
        ax.plot([a, a], [lo, hi], color="magenta", lw=4, solid_capstyle="butt", label="measured divergence of beta")
    if recommended is not None:
        ax.plot(*recommended, marker="*", color="yellow", mec="k", ms=14, ls="none", label="recommended")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(_edges(alphas)[0], _edges(alphas)[-1])
    ax.set_ylim(_edges(betas)[0], _edges(betas)[-1])
    ax.set_xlabel(r"inner rate $\alpha$")
    ax.set_ylabel(r"meta rate $\beta$ (SGD)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower left", framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return (path, fig) if return_figure else path


def plot_alpha_sweep(path, alphas, post, pre, alpha_star: Optional[float], alpha_range: Optional[tuple],
                     alpha_c: Optional[float], title: str, ylabel: str = "held-out query loss",
                     return_figure: bool = False):
    """Zou Fig. 2 / Table 2 style: loss after one adaptation step (and before) versus alpha, with
    alpha* (eq. 3.3), the heuristic range (H.18-H.25, shaded) and alpha_c marked. Returns ``path``, or
    ``(path, figure)`` with ``return_figure``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=90)
    ax.plot(alphas, post, "o-", label="post-adaptation (1 step)")
    ax.plot(alphas, pre, "s--", color="0.5", label="pre-adaptation")
    if alpha_range is not None:
        lo, hi = alpha_range
        ax.axvspan(max(lo, np.min(alphas) / 3), min(hi, np.max(alphas) * 3), color="red", alpha=0.08,
                   label=r"heuristic $\alpha^*$ range (H.18-25)")
    if alpha_star is not None:
        ax.axvline(alpha_star, color="orange", lw=2, label=rf"$\alpha^*$ = {alpha_star:.3g} (Zou eq. 3.3)")
    if alpha_c is not None:
        ax.axvline(alpha_c, color="r", ls="--", label=rf"$\alpha_c$ = {alpha_c:.3g}")
    ok = np.isfinite(post)
    if ok.any():
        i = int(np.nanargmin(np.where(ok, post, np.nan)))
        ax.plot(alphas[i], post[i], "k*", ms=12, label=rf"best measured $\alpha$ = {alphas[i]:.3g}")
    ax.set_xscale("log")
    ax.set_xlim(np.min(alphas) / 1.5, np.max(alphas) * 1.5)
    ax.set_xlabel(r"inner rate $\alpha$")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return (path, fig) if return_figure else path
