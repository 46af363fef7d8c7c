"""PNG plots (1-D overlays, 2-D contours) and the markdown table written by ``fastmeta landscape``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .generalization import GeneralizationGap
from .landscape import Landscape
from .sharpness import Sharpness


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_1d(curves: dict[str, dict[str, Landscape]], path, title: str = "", return_figure: bool = False):
    """One panel per objective (``"post-adaptation"``, ``"plain"``), one curve per checkpoint label.

    ``curves[label][objective] -> Landscape`` (1-D). Returns the written path, or ``(path, figure)``
    with ``return_figure`` (the closed Figure, whose artists hold the plotted arrays: for tests).
    """
    plt = _plt()
    objectives = sorted({o for per in curves.values() for o in per}, key=lambda o: o != "post-adaptation")
    fig, axes = plt.subplots(1, len(objectives), figsize=(4.2 * len(objectives), 3.2), squeeze=False)
    for ax, obj in zip(axes[0], objectives):
        for label, per in curves.items():
            if obj in per:
                ls = per[obj]
                ax.plot(ls.coords.cpu().numpy(), ls.loss.cpu().numpy(), label=label)
        ax.set_xlabel("a  (theta + a d, filter-normalized d)")
        ax.set_ylabel("loss (mean over tasks)")
        ax.set_title({"post-adaptation": "MAML objective L(theta'(theta); D')",
                      "plain": "plain loss L(theta; D')"}.get(obj, obj), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return (path, fig) if return_figure else path


def plot_2d(per_objective: dict[str, Landscape], path, title: str = "", levels: int = 20,
            return_figure: bool = False):
    """Contour plot(s) of 2-D landscapes of one checkpoint, one panel per objective (x: d1, y: d2).
    Returns the written path, or ``(path, figure)`` with ``return_figure``."""
    plt = _plt()
    import numpy as np

    fig, axes = plt.subplots(1, len(per_objective), figsize=(3.8 * len(per_objective), 3.4), squeeze=False)
    for ax, (obj, ls) in zip(axes[0], per_objective.items()):
        c = ls.coords.cpu().numpy()
        z = ls.loss.cpu().numpy()
        # log-spaced levels resolve the basin and the walls at once (losses span decades off-center)
        lo, hi = max(float(np.nanmin(z)), 1e-6), float(np.nanmax(z))
        lv = np.geomspace(lo, hi, levels) if hi > lo * 1.01 else levels
        cs = ax.contour(c, c, z.T, levels=lv, linewidths=0.8, cmap="viridis")
        ax.clabel(cs, cs.levels[::4], fontsize=6, fmt="%.2g")
        ax.plot([0], [0], "r+")
        ax.set_xlabel("a (d1)")
        ax.set_ylabel("b (d2)")
        ax.set_title(obj, fontsize=9)
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return (path, fig) if return_figure else path


def _fmt(x: Optional[float], pct: bool = False, ci: Optional[float] = None) -> str:
    if x is None:
        return "—"
    if pct:
        return f"{100 * x:.1f}%" + (f" ± {100 * ci:.1f}" if ci is not None else "")
    return f"{x:.4g}" + (f" ± {ci:.2g}" if ci is not None else "")


def markdown_table(rows: Sequence[dict]) -> str:
    """The per-checkpoint table: sharpness (eq. 7) per radius and objective, SAM's first-order value,
    and the generalization gap.

    Each row: ``label``, ``algo``, ``sharp`` (list of :class:`Sharpness`), ``gap``
    (:class:`GeneralizationGap` or None).
    """
    radii = sorted({(s.radius, s.post_adaptation) for r in rows for s in r["sharp"]}, key=lambda t: (not t[1], t[0]))
    head = ["checkpoint", "algo"]
    for rad, post in radii:
        obj = "MAML obj." if post else "plain"
        head += [f"sharpness {obj} α={rad:g}", f"α‖∇L‖ {obj} α={rad:g}"]
    head += ["meta-train acc", "meta-test acc", "acc. gap (train−test)", "loss gap (test−train)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], r.get("algo", "")]
        by = {(s.radius, s.post_adaptation): s for s in r["sharp"]}
        for key in radii:
            s = by.get(key)
            cells += [_fmt(None if s is None else s.value), _fmt(None if s is None else s.first_order)]
        g: Optional[GeneralizationGap] = r.get("gap")
        if g is None:
            cells += ["—"] * 4
        else:
            cells += [_fmt(g.train.accuracy, True, g.train.accuracy_ci95), _fmt(g.test.accuracy, True, g.test.accuracy_ci95),
                      _fmt(g.accuracy_gap, True, g.accuracy_gap_ci95), _fmt(g.loss_gap, False, g.loss_gap_ci95)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sharpness_dict(s: Sharpness) -> dict:
    return dict(radius=s.radius, steps=s.steps, post_adaptation=s.post_adaptation, value=s.value, last=s.last,
                first_order=s.first_order, loss=s.loss, history=s.history.tolist())
