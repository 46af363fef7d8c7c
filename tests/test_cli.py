import subprocess
import sys

import pytest
import torch

from fastmeta.cli import main
from fastmeta.training import load_checkpoint, save_checkpoint


def test_train_and_evaluate_sinusoid(tmp_path, capsys):
    ckpt = tmp_path / "sine.pt"
    assert main(["train", "--steps", "30", "--val-every", "15", "--val-tasks", "20", "--test-tasks", "50",
                 "--out", str(ckpt), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "pre-adaptation MSE" in out and "post-adaptation MSE" in out
    c = load_checkpoint(ckpt)  # weights_only=True inside
    assert c["step"] == 30 and len(c["history"]) == 2
    assert main(["evaluate", "--ckpt", str(ckpt), "--tasks", "20"]) == 0
    assert "meta-test loss" in capsys.readouterr().out


def test_train_omniglot_tiny(tmp_path, omniglot_zips, capsys):
    ckpt = tmp_path / "omni.pt"
    args = ["train", "--task", "omniglot", "--data-root", *map(str, omniglot_zips), "--steps", "2",
            "--meta-batch", "2", "--queries", "2", "--val-every", "2", "--val-tasks", "2", "--test-tasks", "4",
            "--strategy", "loop", "--out", str(ckpt), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "held-out alphabets" in out and "accuracy" in out
    c = load_checkpoint(ckpt)
    assert set(c["summary"]) >= {"test_accuracy", "test_accuracy_ci95"}


def test_time_limit_stops_meta_training_then_meta_tests(tmp_path, monkeypatch, capsys):
    import types

    import fastmeta.training.loop as train_mod

    ticks = iter(range(0, 10 ** 6, 20))  # a fake clock: every read advances 20 s
    monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    ckpt = tmp_path / "limited.pt"
    assert main(["train", "--steps", "50", "--time-limit", "1", "--val-every", "0", "--test-tasks", "10",
                 "--strategy", "vmap", "--out", str(ckpt), "--no-progress"]) == 0
    out = capsys.readouterr().out
    # t0 = 0; the checks before steps 1-3 read 20, 40, 60 s (not over 60), step 4's reads 80 s.
    assert "time limit of 1 min reached after 3 steps" in out and "post-adaptation MSE" in out
    c = load_checkpoint(ckpt)
    assert c["step"] == 3 and c["summary"]["steps"] == 3
    # A user error is one line on stderr and status 2 (it was a ValueError traceback).
    assert main(["train", "--steps", "2", "--time-limit", "0", "--no-progress", "--out", str(ckpt)]) == 2
    assert "fastmeta train: error: time_limit" in capsys.readouterr().err


def test_checkpoint_is_atomic_and_rejects_foreign_files(tmp_path):
    p = tmp_path / "x.pt"
    save_checkpoint(p, {"format": "fastmeta-checkpoint/1", "w": torch.ones(2)})
    assert list(tmp_path.iterdir()) == [p]  # no temp file left behind
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="ckpt"):
        load_checkpoint(tmp_path / "other.pt")


def test_omniglot_without_data_root_is_a_clear_error(capsys):
    assert main(["train", "--task", "omniglot", "--steps", "1", "--no-progress"]) == 2
    assert "fastmeta train: error: data_root" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "fastmeta", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--inner-lr" in r.stdout


@pytest.mark.slow
def test_default_job_learns_to_adapt(tmp_path, monkeypatch, capsys):
    # `fastmeta train` with no arguments: MAML on sinusoid. On 1,000 unseen tasks the
    # post-adaptation MSE (one inner step, 10 shots) must be clearly below the pre-adaptation MSE
    # and below 1.0 (issue 2's acceptance bar).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fastmeta"])
    from fastmeta import training as train_mod

    seen = {}
    real = train_mod.train

    def spy(cfg, log=None):
        seen.update(real(cfg, log))
        return seen

    monkeypatch.setattr("fastmeta.cli.train.train", spy)
    assert main([]) == 0
    print(capsys.readouterr().out)
    assert seen["test_tasks"] == 1000
    assert seen["test_loss"] < 1.0
    assert seen["test_loss"] < 0.5 * seen["pre_adaptation_mse"]
    assert (tmp_path / "fastmeta_ckpt.pt").exists()
