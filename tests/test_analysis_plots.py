"""``fastmeta landscape``'s plots checked by their data: the arrays the axes hold, not the file.

plot_1d must draw every checkpoint's 1-D curve in its objective's panel; plot_2d must contour
loss[i, j] at (coords[i], coords[j]) -- x along d1, y along d2. The 2-D oracle is an anisotropic
bowl z = a^2 + 4 b^2: every contour line at level L lies on the ellipse a^2 + 4 b^2 = L (up to the
grid's linear interpolation), which a transposed array (b^2 + 4 a^2) would miss by far."""
import numpy as np
import torch

from fastmeta.analysis.landscape import Landscape
from fastmeta.analysis.report import plot_1d, plot_2d


def _landscape(coords, loss):
    return Landscape(coords=coords, loss=loss, per_task=loss[..., None], accuracy=None, per_task_accuracy=None,
                     directions=torch.zeros(loss.dim(), 3), center_loss=float(loss.flatten()[loss.numel() // 2]),
                     post_adaptation=True, normalization="filter", strategy="loop")


def test_plot_1d_draws_each_curve_in_its_panel(tmp_path):
    c = torch.linspace(-1, 1, 11, dtype=torch.float64)
    curves = {"A": {"post-adaptation": _landscape(c, c ** 2), "plain": _landscape(c, 2 + c)},
              "B": {"post-adaptation": _landscape(c, 3 * c ** 2)}}
    path, fig = plot_1d(curves, tmp_path / "one.png", title="t", return_figure=True)
    assert path.stat().st_size > 1000
    post, plain = fig.axes[:2]
    assert "L(theta'(theta); D')" in post.get_title() and "plain" in plain.get_title()
    got = {(ax_i, ln.get_label()): np.asarray(ln.get_ydata()) for ax_i, ax in enumerate(fig.axes[:2])
           for ln in ax.get_lines()}
    assert set(got) == {(0, "A"), (0, "B"), (1, "A")}
    assert np.array_equal(got[(0, "A")], (c ** 2).numpy()) and np.array_equal(got[(0, "B")], (3 * c ** 2).numpy())
    assert np.array_equal(got[(1, "A")], (2 + c).numpy())
    assert all(np.array_equal(ln.get_xdata(), c.numpy()) for ax in fig.axes[:2] for ln in ax.get_lines())


def test_plot_2d_contours_lie_on_the_known_level_sets(tmp_path):
    c = torch.linspace(-2, 2, 81, dtype=torch.float64)
    z = c[:, None] ** 2 + 4 * c[None, :] ** 2                         # loss[i, j] at (a = c[i], b = c[j])
    path, fig = plot_2d({"post-adaptation": _landscape(c, z)}, tmp_path / "two.png", return_figure=True)
    assert path.stat().st_size > 1000
    ax = fig.axes[0]
    cs = [col for col in ax.collections if hasattr(col, "levels")][0]
    lv = np.asarray(cs.levels)
    assert np.allclose(lv, np.geomspace(max(float(z.min()), 1e-6), float(z.max()), 20), rtol=1e-12)
    checked = 0
    for level, segs in zip(lv, cs.allsegs):
        for seg in segs:
            if 0.05 < level < 3.5 and len(seg) > 8:                    # closed ellipses inside the grid
                a, b = seg[:, 0], seg[:, 1]
                assert np.allclose(a ** 2 + 4 * b ** 2, level, rtol=0.02, atol=2e-3), level
                # guard: the transposed bowl is far off on the same points
                assert np.abs(b ** 2 + 4 * a ** 2 - level).max() > 0.3 * level
                checked += 1
    assert checked >= 5
