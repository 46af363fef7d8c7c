"""bench/reproduce.py ("do the papers' claims hold?"): the statistics and verdicts on hand-made
inputs, early stopping on a hand-made validation curve, and every study end to end on a tiny
budget (generated data for Omniglot), with its JSON, its plot's data, the skip of finished runs
on a rerun and the resume of an interrupted run."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


rep = _load("reproduce")
core = _load("reproduce_core")
studies = _load("reproduce_studies")


# --------------------------------------------------------------------------------- statistics
def test_early_stopping_stops_at_the_patience_th_evaluation_without_improvement():
    curve = [0.50, 0.60, 0.60, 0.55, 0.70, 0.69, 0.68, 0.65, 0.90]
    # A tie (index 2) is not an improvement: patience 2 stops at index 3, best is index 1.
    assert core.early_stopping(curve, 2) == (1, 3)
    # Patience 3: 0.70 at index 4, then 5, 6, 7 without improvement -> stop at 7 (0.90 never seen).
    assert core.early_stopping(curve, 3) == (4, 7)
    assert core.early_stopping(curve, 4) == (8, None)
    assert core.early_stopping(curve, None) == (8, None)
    assert core.early_stopping([], 2) == (None, None)
    # Losses: lower is better; a NaN never improves.
    assert core.early_stopping([3.0, 2.0, float("nan"), 2.5, 1.0], 2, higher_is_better=False) == (1, 3)
    with pytest.raises(ValueError, match="patience"):
        core.early_stopping(curve, 0)


def test_paired_difference_matches_a_hand_computed_t_interval():
    d = core.paired_difference({0: 90.0, 1: 91.0, 2: 92.0, 3: 50.0}, {0: 91.0, 1: 93.0, 2: 93.0})
    # Differences 1, 2, 1 (seed 3 has no pair): mean 4/3, sd sqrt(1/3), t_{0.975, 2} = 4.303.
    assert d["seeds"] == [0, 1, 2] and d["per_seed"] == [1.0, 2.0, 1.0]
    assert d["mean"] == pytest.approx(4 / 3)
    assert d["ci95"] == pytest.approx(4.303 * math.sqrt(1 / 3) / math.sqrt(3))
    assert d["lo"] == pytest.approx(4 / 3 - d["ci95"])
    one = core.paired_difference({0: 1.0}, {0: 3.0})
    assert one["mean"] == 2.0 and math.isnan(one["ci95"])
    with pytest.raises(ValueError, match="base/other"):
        core.paired_difference({0: 1.0}, {1: 1.0})
    t = core.task_paired_difference([0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0])
    assert t["mean"] == 0.5 and t["ci95"] == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)
    assert core.t975(1) == 12.706 and abs(core.t975(60) - 2.000) < 1e-3 and abs(core.t975(31) - 2.040) < 1e-3


def _diff(mean, ci, n=3):
    return dict(n=n, mean=mean, ci95=ci, lo=mean - ci, hi=mean + ci)


def test_improvement_verdicts_on_known_intervals():
    assert core.improvement_verdict(_diff(1.0, 0.5), 1.12)[0] == core.HELD          # [0.5, 1.5] above 0
    assert core.improvement_verdict(_diff(0.1, 0.5), 1.12)[0] == core.NOT_HELD      # [-0.4, 0.6] excludes +1.12
    assert core.improvement_verdict(_diff(0.5, 1.0), 1.12)[0] == core.NOT_TESTABLE  # [-0.5, 1.5] holds both
    assert core.improvement_verdict(_diff(-1.0, 0.5))[0] == core.NOT_HELD           # no paper gain: <= 0
    assert core.improvement_verdict(_diff(0.2, 0.5))[0] == core.NOT_TESTABLE
    v, why = core.improvement_verdict(_diff(1.0, float("nan"), n=1), 1.12)
    assert v == core.NOT_TESTABLE and "1 seed" in why


def test_rate_neighbourhood_and_alpha_verdicts():
    rates = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32]
    base = [5.0, 4.0, 3.0, 2.0, 3.5, 9.0]
    # Three seeds with small, differing noise: only index 3 is indistinguishable from itself.
    losses = {s: [v + 0.01 * s * (i % 2) for i, v in enumerate(base)] for s in range(3)}
    nb = core.rate_neighbourhood(rates, losses)
    assert nb["best_index"] == 3 and nb["block"] == [3, 3] and (nb["low"], nb["high"]) == (0.04, 0.16)
    assert core.in_neighbourhood_verdict(0.05, nb, rates)[0] == core.HELD
    assert core.in_neighbourhood_verdict(0.2, nb, rates)[0] == core.NOT_HELD
    # Index 4 made indistinguishable from the best (its paired differences straddle 0): the block grows.
    tied = {s: list(v) for s, v in losses.items()}
    for s, delta in enumerate((-0.3, 0.2, 0.4)):
        tied[s][4] = tied[s][3] + delta
    nb2 = core.rate_neighbourhood(rates, tied)
    assert nb2["block"] == [3, 4] and (nb2["low"], nb2["high"]) == (0.04, 0.32)
    assert core.in_neighbourhood_verdict(0.2, nb2, rates)[0] == core.HELD
    # A diverged rate (inf / NaN for any seed) is never the best nor tied.
    div = {s: [math.nan] + v[1:] for s, v in losses.items()}
    assert core.rate_neighbourhood(rates, div)["best_index"] == 3
    # Best at the grid's edge: that side is open; alpha beyond the grid there is not testable.
    edge = core.rate_neighbourhood(rates, {s: list(range(6)) for s in range(3)})
    assert edge["block"] == [0, 0] and edge["low"] is None and edge["high"] == 0.02
    assert core.in_neighbourhood_verdict(0.001, edge, rates)[0] == core.NOT_TESTABLE
    assert core.in_neighbourhood_verdict(0.01, edge, rates)[0] == core.HELD
    # One seed: no CI, the block is the best alone.
    assert core.rate_neighbourhood(rates, {0: base})["block"] == [3, 3]
    # Nothing distinguishable from the best: not testable (a "held" would be vacuous).
    flat = core.rate_neighbourhood(rates, {0: [1.0] * 6, 1: [1.1, 0.9] * 3})
    assert flat["low"] is None and flat["high"] is None
    assert core.in_neighbourhood_verdict(0.05, flat, rates)[0] == core.NOT_TESTABLE
    with pytest.raises(ValueError, match="rates"):
        core.rate_neighbourhood([0.1, 0.05], {0: [1.0, 2.0]})


def test_write_json_is_atomic_and_leaves_no_temporaries(tmp_path):
    p = core.write_json(tmp_path / "a" / "r.json", {"x": 1.5})
    assert json.loads(p.read_text()) == {"x": 1.5}
    with pytest.raises(TypeError):
        core.write_json(p, {"x": object()})
    assert json.loads(p.read_text()) == {"x": 1.5}  # the old file survives a failed write
    assert [f.name for f in p.parent.iterdir()] == ["r.json"]


def test_bad_options_name_the_argument(tmp_path):
    for argv, key in ((["alpha", "--budget", "tiny", "--set", "rates=1"], "rates"),
                      (["alpha", "--budget", "tiny", "--set", "nope=1"], "set"),
                      (["alpha", "--budget", "tiny", "--seeds", "0"], "seeds"),
                      (["sharp", "--budget", "tiny", "--set", "algos=[\"sharp-low\"]"], "algos"),
                      (["sharp", "--budget", "tiny", "--set", "ways=[1]"], "ways")):
        args = rep.build_parser().parse_args(argv + ["--out", str(tmp_path)])
        with pytest.raises(ValueError, match=key):
            rep.options(args.study, args)
    with pytest.raises(ValueError, match="out"):
        rep.report(tmp_path)


def test_sinusoid_advice_is_what_fastmeta_advise_computes():
    import argparse

    from fastmeta.cli import advise

    args = argparse.Namespace(task="sinusoid", seed=3, meta_batch=6, k_shot=5, data_root=None)
    model, tasks, _, _, _ = advise._setup(args)
    a_star, _, _ = advise._alpha_star(args, model, tasks.sample(6))
    ours = studies.sinusoid_advice(3, 6, 5)
    assert ours["alpha_star"] == pytest.approx(a_star, rel=1e-12)
    assert ours["alpha_c"] > 0 and ours["alpha_range"][0] < ours["alpha_range"][1]


# ------------------------------------------------------------------------------ end to end
def _run(argv):
    assert rep.main(argv + ["--quiet", "--no-progress"]) == 0


def _finite(x):
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    return not isinstance(x, float) or math.isfinite(x)


def _lines(fig):
    return {ln.get_gid(): ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid()}


def _mtimes(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_alpha_study_end_to_end(tmp_path):
    out = tmp_path / "out"
    argv = ["alpha", "--budget", "tiny", "--out", str(out)]
    _run(argv)
    res = json.loads((out / "alpha.json").read_text())
    assert set(res["tasks"]) == {"sinusoid", "linreg"}
    for task, t in res["tasks"].items():
        assert len(t["rates"]) == 4 and t["rates"] == sorted(t["rates"])
        assert set(t["losses"]) == {"0", "1"} and all(len(v) == 4 for v in t["losses"].values())
        for key in ("alpha_star", "alpha_c", "mean_loss", "losses", "ci95"):
            assert t[key] is not None and _finite(t[key]), (task, key)
        # The grid surrounds alpha* and alpha_c (tiny span 4).
        assert t["rates"][0] < min(t["alpha_star"], t["alpha_c"]) < max(t["alpha_star"], t["alpha_c"]) < t["rates"][-1]
        means = [sum(t["losses"][s][i] for s in ("0", "1")) / 2 for i in range(4)]
        assert t["mean_loss"] == pytest.approx(means)
        assert t["neighbourhood"]["best_index"] == min(range(4), key=lambda i: means[i])
    assert res["tasks"]["sinusoid"]["alpha_range"] is not None and res["tasks"]["sinusoid"]["alpha_star_trained"] > 0
    assert {c["verdict"] for c in res["claims"]} <= {core.HELD, core.NOT_HELD, core.NOT_TESTABLE}
    assert (out / "alpha.png").stat().st_size > 0
    # The plot's arrays are the JSON's.
    fig = studies.plot_alpha(res, tmp_path / "again.png")
    for ax, (task, t) in zip(fig.axes, res["tasks"].items()):
        lines = {ln.get_gid(): ln for ln in ax.get_lines() if ln.get_gid()}
        assert list(lines["mean"].get_xdata()) == t["rates"]
        assert list(lines["mean"].get_ydata()) == pytest.approx(t["mean_loss"])
        for s, ls in t["losses"].items():
            assert list(lines[f"seed{s}"].get_ydata()) == pytest.approx(ls)
        assert lines["alpha_star"].get_xdata()[0] == t["alpha_star"]
        assert lines["alpha_c"].get_xdata()[0] == t["alpha_c"]
    # A rerun trains nothing and rewrites no run file.
    runs_before = _mtimes(out / "alpha" / "runs")
    calls = core.COUNTERS["train_calls"]
    _run(argv)
    assert core.COUNTERS["train_calls"] == calls
    assert _mtimes(out / "alpha" / "runs") == runs_before
    assert json.loads((out / "alpha.json").read_text())["tasks"] == res["tasks"]
    md = rep.report(out)
    assert "Study 2" in md and "| sinusoid |" in md
    # Another budget in the same --out is refused (naming out), not mixed with the finished runs.
    args = rep.build_parser().parse_args(argv + ["--set", "test_tasks=17"])
    with pytest.raises(ValueError, match="out: .*test_tasks"):
        studies.run_alpha(rep.options("alpha", args))


@pytest.fixture(scope="module")
def tiny_omniglot(tmp_path_factory):
    """A generated Omniglot-layout tree: 6 alphabets x 5 characters x 4 drawings of 10 x 10
    random 1-bit images (no real data)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny_omniglot") / "images_background"
    g = torch.Generator().manual_seed(0)
    for a in range(6):
        for c in range(5):
            d = root / f"Alphabet_{a}" / f"character{c + 1:02d}"
            d.mkdir(parents=True)
            proto = torch.rand(10, 10, generator=g) > 0.5
            for k in range(4):
                flip = torch.rand(10, 10, generator=g) > 0.9
                px = ((proto ^ flip).to(torch.uint8) * 255).numpy()
                Image.fromarray(px, mode="L").convert("1").save(d / f"{c:04d}_{k:02d}.png")
    return root


def test_sharp_study_end_to_end(tmp_path, tiny_omniglot):
    out = tmp_path / "out"
    argv = ["sharp", "--budget", "tiny", "--out", str(out), "--data-root", str(tiny_omniglot)]
    _run(argv)
    res = json.loads((out / "sharp.json").read_text())
    assert len(res["runs"]) == 4  # 1 setting x (maml, sharp-low@0.05) x 2 seeds
    for r in res["runs"]:
        assert r["config"]["fused"] is True and r["config"]["strategy"] == "auto"
        assert 0 <= r["test_accuracy"] <= 1 and r["test_tasks"] == 6 and len(r["per_task_accuracy"]) == 6
        assert r["steps"] in (2, 4) and r["best_step"] <= r["steps"] and r["train_seconds"] > 0
        assert r["split"]["test"] and not set(r["split"]["test"]) & set(r["split"]["train"] + r["split"]["val"])
        assert _finite(r)
    # Paired by seed: both algorithms of a seed were meta-tested on the same held-out alphabets.
    by_seed = {}
    for r in res["runs"]:
        by_seed.setdefault(r["seed"], []).append(r["split"]["test"])
    assert all(a == b for a, b in by_seed.values())
    t = res["table"]["3-way 1-shot"]
    d = t["differences"]["sharp-low@0.05"]
    acc = {(r["algorithm"], r["seed"]): 100 * r["test_accuracy"] for r in res["runs"]}
    assert d["seed_paired"]["per_seed"] == pytest.approx([acc["sharp-low@0.05", s] - acc["maml", s] for s in (0, 1)])
    assert d["verdict"] in (core.HELD, core.NOT_HELD, core.NOT_TESTABLE) and len(res["claims"]) == 1
    fig = studies.plot_sharp(res, tmp_path / "again.png")
    lines = _lines(fig)
    assert list(lines["mean:3-way 1-shot"].get_ydata()) == pytest.approx(
        [a["accuracy"]["mean"] for a in t["algorithms"].values()])
    assert list(lines["seed1:3-way 1-shot"].get_ydata()) == pytest.approx(
        [acc[lab, 1] for lab in t["algorithms"]])
    calls = core.COUNTERS["train_calls"]
    before = _mtimes(out / "sharp" / "runs")
    _run(argv)
    assert core.COUNTERS["train_calls"] == calls and _mtimes(out / "sharp" / "runs") == before
    assert "Study 1" in rep.report(out)


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path, tiny_omniglot):
    """An interrupted budget run (its checkpoint after the first chunk, no result) resumes there
    and ends exactly as an unbroken run."""
    from fastmeta.training import load_checkpoint, train

    argv = ["budget", "--budget", "tiny", "--seeds", "1", "--data-root", str(tiny_omniglot)]
    _run(argv + ["--out", str(tmp_path / "unbroken")])
    unbroken = json.loads((tmp_path / "unbroken" / "budget.json").read_text())["runs"][0]
    assert unbroken["steps"] == 4

    # The interrupted run: the first chunk (2 steps) done by the same config, then the process died.
    run_dir = tmp_path / "broken" / "budget" / "runs" / "3way" / "seed0"
    run_dir.mkdir(parents=True)
    cfg = dict(unbroken["config"], steps=2, val_every=2, out=str(run_dir / "ckpt.pt"), progress=False)
    train(cfg, log=lambda *a: None)
    assert load_checkpoint(run_dir / "ckpt.pt")["step"] == 2
    calls = core.COUNTERS["train_calls"]
    _run(argv + ["--out", str(tmp_path / "broken")])
    assert core.COUNTERS["train_calls"] == calls + 1  # one chunk (steps 3-4), not two
    resumed = json.loads((tmp_path / "broken" / "budget.json").read_text())["runs"][0]
    assert resumed["steps"] == 4 and resumed["best_step"] == unbroken["best_step"]
    assert [c["val_accuracy"] for c in resumed["curve"]] == [c["val_accuracy"] for c in unbroken["curve"]]
    assert resumed["per_task_accuracy"] == unbroken["per_task_accuracy"]
    assert resumed["per_task_loss"] == pytest.approx(unbroken["per_task_loss"], rel=1e-6)
    res = json.loads((tmp_path / "broken" / "budget.json").read_text())
    fig = studies.plot_budget(res, tmp_path / "again.png")
    steps_line = _lines(fig)["steps:seed0"]
    assert list(steps_line.get_xdata()) == [c["step"] for c in resumed["curve"]]
    assert list(steps_line.get_ydata()) == pytest.approx([100 * c["val_accuracy"] for c in resumed["curve"]])
    assert res["claims"][0]["verdict"] == core.NOT_TESTABLE and "Study 3" in rep.report(tmp_path / "broken")
