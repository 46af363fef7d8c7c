"""``fastmeta advise`` wiring: register() adds the subparser, run() prints the advice and writes
both plots and the JSON (tiny grids; the numbers themselves are tested in the other files)."""
import argparse
import json

import pytest
import torch

from fastmeta.cli import advise as cli


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
    assert adv["alpha_c"] > 0 and adv["recommended_alpha"] == pytest.approx(0.5 * adv["alpha_c"])
    lo, hi = adv["measured_beta_boundary"]
    assert lo < hi or lo != lo   # bracketed, or NaN when 2 steps never diverge


def test_advise_linreg_tiny(tmp_path, capsys):
    args = parse(["advise", "--task", "linreg", "--out", str(tmp_path), "--grid", "4", "--iters", "40"])
    assert args.func(args) == 0
    assert "exact boundary" in capsys.readouterr().out
    assert (tmp_path / "lr_linreg_stability_map.png").exists()
