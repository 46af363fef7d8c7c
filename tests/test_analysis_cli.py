"""``fastmeta landscape``: end to end on tiny sinusoid checkpoints written by ``fastmeta train``,
and its errors for bad input (another architecture, not a checkpoint, span/radius <= 0)."""
import argparse
import json

import pytest
import torch

import fastmeta
from fastmeta.analysis import loss_landscape
from fastmeta.cli import landscape as acli
from fastmeta.training import TaskSource, learner_from_checkpoint, load_checkpoint, save_checkpoint


def run(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    acli.register(sub)
    args = parser.parse_args(["landscape", *map(str, argv)])
    return args.func(args)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from fastmeta.cli import main

    d = tmp_path_factory.mktemp("ckpts")
    paths = []
    for seed in (0, 1):
        p = d / f"sine{seed}.pt"
        main(["train", "--task", "sinusoid", "--steps", "3", "--meta-batch", "4", "--val-every", "0",
              "--test-tasks", "4", "--seed", str(seed), "--strategy", "vmap", "--out", str(p), "--no-progress"])
        paths.append(p)
    return paths


def test_cli_is_registered():
    from fastmeta.cli import build_parser

    args = build_parser().parse_args(["landscape", "--ckpt", "a.pt", "--out", "x"])
    assert args.func is acli.run


def test_landscape_command_writes_plots_table_and_numbers(ckpts, tmp_path):
    out = tmp_path / "report"
    run(["--ckpt", ckpts[0], "--ckpt", ckpts[1], "--label", "A", "--label", "B", "--out", out, "--steps-1d", 5,
         "--steps-2d", 3, "--tasks", 2, "--gap-tasks", 6, "--ascent-steps", 2, "--radius", 0.01, 0.1, "--no-progress"])
    for f in ("landscape_1d.png", "landscape_2d_A.png", "landscape_2d_B.png", "report.md", "results.json"):
        assert (out / f).stat().st_size > 0, f
    md = (out / "report.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| A ") or ln.startswith("| B ")]
    assert len(table) == 2
    res = json.loads((out / "results.json").read_text())["checkpoints"]
    assert [r["label"] for r in res] == ["A", "B"]
    assert len(res[0]["sharpness"]) == 4          # 2 radii x (MAML objective, plain)
    assert all(s["value"] >= 0 for s in res[0]["sharpness"])
    # The written curve is the library's curve on the same tasks (one shared sample per data config).
    ck = load_checkpoint(ckpts[1])
    batch = TaskSource(dict(ck["config"])).train.sample(2)
    ls = loss_landscape(learner_from_checkpoint(ck), batch, 1, 5, 1.0, post_adaptation=True, seed=0)
    assert torch.allclose(torch.tensor(res[1]["landscape_1d_post-adaptation"]["loss"], dtype=ls.loss.dtype), ls.loss,
                          rtol=1e-5)


def test_landscape_command_rejects_bad_input(ckpts, tmp_path):
    base = ["--out", tmp_path / "o", "--no-progress", "--steps-1d", 3, "--steps-2d", 0, "--gap-tasks", 0]
    # a checkpoint of another architecture
    ck = load_checkpoint(ckpts[0])
    other = fastmeta.SineMLP(hidden=7)
    ck["model_config"], ck["model_state"] = other.config, other.state_dict()
    save_checkpoint(tmp_path / "other.pt", ck)
    with pytest.raises(ValueError, match="--ckpt.*another architecture"):
        run(["--ckpt", ckpts[0], "--ckpt", tmp_path / "other.pt", *base])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="--ckpt: .* could not be read"):
        run(["--ckpt", tmp_path / "junk.pt", *base])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="ckpt: .* not a fastmeta checkpoint"):
        run(["--ckpt", tmp_path / "plain.pt", *base])
    with pytest.raises(ValueError, match="--ckpt: .* does not exist"):
        run(["--ckpt", tmp_path / "missing.pt", *base])
    with pytest.raises(ValueError, match="--span"):
        run(["--ckpt", ckpts[0], "--span", 0, *base])
    with pytest.raises(ValueError, match="--radius"):
        run(["--ckpt", ckpts[0], "--radius", 0.1, -0.1, *base])
    with pytest.raises(ValueError, match="--label"):
        run(["--ckpt", ckpts[0], "--label", "a", "--label", "b", *base])
