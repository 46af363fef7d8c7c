"""Fault injection for ``fastmeta train`` / ``evaluate`` and checkpoints: what a run needs is
checked before the first step; a finished run is saved before the meta-test; evaluation uses the
stored alphabet split on the training data only; a damaged checkpoint is refused with one clear
error; the CLI reports user errors in one line (exit status 2) and bad flags with the
subcommand's usage."""
import io
import random
import subprocess
import sys
import zipfile

import pytest
import torch

from fastmeta import training
from fastmeta.cli import main
from fastmeta.learner import MetaLearner

TINY = ["--meta-batch", "2", "--shots", "3", "--queries", "3", "--val-tasks", "4", "--test-tasks", "4",
        "--strategy", "bmm", "--no-progress"]


@pytest.fixture
def steps_taken(monkeypatch):
    """The number of meta-training steps taken (MetaLearner.step calls)."""
    calls = []
    real = MetaLearner.step

    def spy(self, batch):
        calls.append(1)
        return real(self, batch)

    monkeypatch.setattr(MetaLearner, "step", spy)
    return calls


@pytest.fixture(scope="module")
def sine_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("sine") / "sine.pt"
    assert main(["train", "--steps", "2", "--val-every", "0", "--out", str(out), *TINY]) == 0
    return out


def _err_line(capsys, prefix="fastmeta train: error: "):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(prefix), err
    return err


# ------------------------------------------------------------------------- 1. lost training
def test_zero_test_tasks_is_refused_before_training(tmp_path, capsys, steps_taken):
    # Was: 300 steps of training, then torch.cat() of no results, and no checkpoint.
    out = tmp_path / "t0.pt"
    assert main(["train", "--steps", "300", "--val-every", "0", "--test-tasks", "0", "--out", str(out),
                 "--no-progress"]) == 2
    assert "test_tasks: expected an int >= 1" in _err_line(capsys)
    assert steps_taken == [] and not out.exists()


def test_unwritable_out_is_refused_before_training(tmp_path, capsys, steps_taken):
    # Was: training and the meta-test ran, then writing the checkpoint failed. (The tests run as
    # root, for whom permissions do not bite: a file where the folder should be fails the same way.)
    (tmp_path / "blocker").write_text("a file, not a folder")
    out = tmp_path / "blocker" / "run.pt"
    assert main(["train", "--steps", "5", "--val-every", "0", "--out", str(out), *TINY]) == 2
    assert f"out: cannot write the checkpoint {out}" in _err_line(capsys)
    assert steps_taken == []
    # A folder that does not exist yet is created (and holds no probe file afterwards).
    deep = tmp_path / "a" / "b" / "run.pt"
    assert main(["train", "--steps", "1", "--val-every", "0", "--out", str(deep), *TINY]) == 0
    assert sorted(p.name for p in deep.parent.iterdir()) == ["run.pt"]


def test_final_checkpoint_is_written_before_the_meta_test(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run.pt"

    def failing_meta_test(*args, **kwargs):
        raise FloatingPointError("loss: non-finite post-adaptation query loss (injected)")

    monkeypatch.setattr(training.loop, "evaluate_tasks", failing_meta_test)
    assert main(["train", "--steps", "4", "--val-every", "0", "--out", str(out), *TINY]) == 2
    captured = capsys.readouterr()
    assert "meta-test failed; the trained model (step 4) is saved in" in captured.out
    assert captured.err.strip() == "fastmeta train: error: loss: non-finite post-adaptation query loss (injected)"
    ck = training.load_checkpoint(out)
    assert ck["step"] == 4 and "summary" not in ck  # the trained model survived; no meta-test result
    monkeypatch.undo()
    assert main(["train", "--steps", "4", "--val-every", "0", "--out", str(out), *TINY]) == 0
    assert training.load_checkpoint(out)["summary"]["steps"] == 4  # added after the meta-test


BAD_ARGS = [
    (["--steps", "-5"], "steps: expected an int >= 1"),
    (["--steps", "0"], "steps: expected an int >= 1"),
    (["--meta-batch", "0"], "meta_batch: expected an int >= 1"),
    (["--shots", "0"], "shots: expected an int >= 1"),
    (["--queries", "-1"], "queries: expected an int >= 1"),
    (["--inner-steps", "0"], "inner_steps: expected an int >= 1"),
    (["--val-every", "-1"], "val_every: expected an int >= 0"),
    (["--val-every", "2", "--val-tasks", "0"], "val_tasks: expected an int >= 1"),
    (["--meta-lr", "0"], "meta_lr: expected a finite number > 0"),
    (["--inner-lr", "nan"], "inner_lr: expected a finite number > 0"),
    (["--nproc", "0"], "nproc: expected an int >= 1"),
    (["--nproc", "3", "--meta-batch", "2"], "meta_batch: 2 tasks cannot be sharded over nproc=3"),
    (["--nproc", "2", "--dist-timeout", "0"], "dist_timeout: expected a finite number > 0"),
    (["--time-limit", "-1"], "time_limit: expected a finite number > 0"),
    (["--algo", "sharp-both", "--alpha-low", "-1"], "alpha_low"),
]


@pytest.mark.parametrize("bad,message", BAD_ARGS, ids=[" ".join(b) for b, _ in BAD_ARGS])
def test_bad_arguments_are_refused_before_anything(tmp_path, capsys, monkeypatch, steps_taken, bad, message):
    # Was (among others): --steps -5 overwrote --out with an untrained model; --dist-timeout 0
    # silently became 300 s.
    launched = []
    monkeypatch.setattr(training.loop, "launch_train", lambda *a, **k: launched.append(a) or {})
    out = tmp_path / "earlier.pt"
    out.write_bytes(b"an earlier run's checkpoint")
    assert main(["train", "--val-every", "0", *TINY, "--out", str(out), *bad]) == 2
    assert message in _err_line(capsys)
    assert steps_taken == [] and launched == [] and out.read_bytes() == b"an earlier run's checkpoint"


def _png(rng: random.Random, size: int = 12) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("L", (size, size), bytes(rng.randrange(256) for _ in range(size * size))).save(buf, "PNG")
    return buf.getvalue()


def _fake_omniglot(path, alphabets, chars=2, drawings=4, seed=0, skip=None, corrupt=None):
    """A zip in the Omniglot layout; ``skip``/``corrupt``: a member left out / replaced by junk."""
    rng = random.Random(seed)
    with zipfile.ZipFile(path, "w") as zf:
        for a in alphabets:
            for c in range(chars):
                for d in range(drawings):
                    name = f"{path.stem}/{a}/character{c + 1:02d}/{c + 1:02d}_{d + 1:02d}.png"
                    data = _png(rng)
                    if name == skip:
                        continue
                    zf.writestr(name, b"\x89PNG not really" if name == corrupt else data)
    return path


OMNI = ["--task", "omniglot", "--ways", "2", "--shots", "1", "--queries", "1", "--meta-batch", "2",
        "--val-every", "0", "--test-tasks", "2", "--strategy", "loop", "--no-progress"]


def test_data_too_small_for_a_split_is_refused_before_training(tmp_path, capsys, steps_taken):
    root = _fake_omniglot(tmp_path / "small.zip", [f"Alpha{i}" for i in range(4)], drawings=3)
    args = ["train", *OMNI, "--data-root", str(root), "--steps", "3", "--out", str(tmp_path / "o.pt")]
    assert main([*args, "--queries", "3"]) == 2  # 1 + 3 drawings per class needed, 3 present
    assert "shots/queries" in _err_line(capsys) and steps_taken == []
    # 3 ways: the train split has 2 alphabets x 2 characters x 4 rotations, the validation split
    # 1 alphabet x 2 characters (no rotations): too few, and said for that split.
    assert main([*args, "--ways", "3"]) == 2
    err = _err_line(capsys)
    assert "ways: expected 2 <= ways <= 2 classes" in err and "the val split" in err and steps_taken == []
    assert main([*args, "--data-root", str(tmp_path / "missing.zip")]) == 2
    assert "data_root: " in _err_line(capsys) and steps_taken == []


# ------------------------------------------------------------------- 3. silent wrong results
def test_evaluate_uses_the_stored_split_and_refuses_other_data(tmp_path, capsys):
    # Was: evaluate with one of the training zips re-split its alphabets and meta-tested on
    # alphabets the model was trained on.
    a = _fake_omniglot(tmp_path / "a.zip", [f"Alpha{i}" for i in range(4)], seed=1)
    b = _fake_omniglot(tmp_path / "b.zip", [f"Beta{i}" for i in range(4)], seed=2)
    ckpt = tmp_path / "omni.pt"
    assert main(["train", *OMNI, "--data-root", str(a), str(b), "--steps", "1", "--out", str(ckpt)]) == 0
    ck = training.load_checkpoint(ckpt)
    alphabets = [f"Alpha{i}" for i in range(4)] + [f"Beta{i}" for i in range(4)]
    assert sorted(sum(ck["split"].values(), [])) == alphabets
    assert len(ck["split"]["test"]) == 2 and ck["data"]["images"] == 8 * 2 * 4
    capsys.readouterr()

    assert main(["evaluate", "--ckpt", str(ckpt), "--tasks", "2", "--data-root", str(a)]) == 2
    err = _err_line(capsys, "fastmeta evaluate: error: data_root: the data differs")
    assert "--allow-data-mismatch" in err
    # The same data in another order is the same data.
    assert main(["evaluate", "--ckpt", str(ckpt), "--tasks", "2", "--data-root", str(b), str(a)]) == 0
    capsys.readouterr()
    # Allowed explicitly: a warning, and still the stored split (never a re-split).
    c = _fake_omniglot(tmp_path / "c.zip", alphabets, seed=1, skip="c/Alpha0/character01/01_01.png")
    warnings = []
    src = training.source_from_checkpoint(ck, [str(c)], allow_data_mismatch=True, warn=warnings.append)
    assert src.split == ck["split"] and len(warnings) == 1 and "differs" in warnings[0]
    with pytest.raises(ValueError, match="data_root: the data differs"):
        training.source_from_checkpoint(ck, [str(c)])


def test_evaluate_refuses_inner_steps_and_tasks_below_one(sine_ckpt, capsys):
    # Was: --inner-steps -3 reported the loss before adaptation; 0 became the training value.
    for flag, value in (("--inner-steps", "-3"), ("--inner-steps", "0"), ("--tasks", "0")):
        assert main(["evaluate", "--ckpt", str(sine_ckpt), flag, value]) == 2
        assert f"{flag}: expected an int >= 1, got {value}" in _err_line(capsys, "fastmeta evaluate: error: ")
    assert main(["evaluate", "--ckpt", str(sine_ckpt), "--inner-steps", "2", "--tasks", "3"]) == 0


def test_flipped_bit_in_the_weights_is_detected(sine_ckpt, tmp_path, capsys):
    ck = training.load_checkpoint(sine_ckpt)
    raw = bytearray(sine_ckpt.read_bytes())
    weights = ck["model_state"]["body.2.weight"].numpy().tobytes()
    at = raw.find(weights)
    assert at >= 0 and raw.find(weights, at + 1) < 0  # the tensor's bytes, stored once
    raw[at + len(weights) // 2] ^= 0x04
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(training.CheckpointError, match=r"ckpt: .*flipped.pt failed its checksum"):
        training.load_checkpoint(bad)
    assert main(["evaluate", "--ckpt", str(bad)]) == 2
    assert "failed its checksum" in _err_line(capsys, "fastmeta evaluate: error: ckpt:")


# ---------------------------------------------------------------------- 5. unclear failures
def test_cli_error_is_one_line_and_a_traceback_only_with_debug(tmp_path, capsys):
    args = ["train", "--steps", "-5", "--out", str(tmp_path / "x.pt"), "--no-progress"]
    assert main(args) == 2
    assert _err_line(capsys) == "fastmeta train: error: steps: expected an int >= 1 (steps to train), got -5"
    for debug in (["--debug", *args], [*args, "--debug"]):
        assert main(debug) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and err.rstrip().endswith("got -5")
    # The installed entry point behaves the same.
    r = subprocess.run([sys.executable, "-m", "fastmeta", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "steps: expected" in r.stderr


def test_bad_flag_shows_the_subcommand_usage_and_a_suggestion(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--stpes", "5"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fastmeta train") and "--stpes -> --steps" in err
    with pytest.raises(SystemExit):
        main(["evaluate", "--ckpt", "x.pt", "--inner_steps", "2"])
    err = capsys.readouterr().err
    assert err.startswith("usage: fastmeta evaluate") and "--inner_steps -> --inner-steps" in err


class _Foreign:  # a pickled object that weights_only=True refuses
    pass


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "foreign object"])
def test_unreadable_checkpoints_raise_one_clear_error(sine_ckpt, tmp_path, kind):
    # Was: OSError [Errno 22], a bare EOFError, torch's advice to use weights_only=False.
    p = tmp_path / "bad.pt"
    data = sine_ckpt.read_bytes()
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "truncated":
        p.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        p.write_bytes(bytes(range(256)) * 4)
    else:
        torch.save({"format": "fastmeta-checkpoint/2", "x": _Foreign()}, p)
    what = {"empty": "is empty", "truncated": "truncated or corrupt", "garbage": "truncated or corrupt",
            "foreign object": "is not a fastmeta checkpoint"}[kind]
    with pytest.raises(training.CheckpointError) as e:
        training.load_checkpoint(p)
    msg = str(e.value)
    assert msg.startswith(f"ckpt: {p} ") and what in msg and "weights_only=False" not in msg, msg
    assert isinstance(e.value, ValueError) and "\n" not in msg
