"""``fastmeta train --resume`` for every run: a run stopped at step 50 and resumed to 100 ends
bit for bit where an unbroken 100-step run ends (one process and two ranks); a resume that
changes a setting is refused with every difference listed, or recorded with ``--allow-changed``
(and then really uses the new value); a missing checkpoint is said in the log; a checkpoint rank 0
cannot read fails every rank instead of leaving the others waiting."""
import pytest
import torch
import torch.distributed as dist

from fastmeta import distributed as fd
from fastmeta import training
from fastmeta.cli import main

SINE = ["--meta-batch", "2", "--shots", "3", "--queries", "3", "--val-tasks", "4", "--test-tasks", "4",
        "--strategy", "bmm", "--no-progress"]


def _train(out, steps, *extra):
    assert main(["train", "--steps", str(steps), "--out", str(out), *SINE, *extra]) == 0
    return training.load_checkpoint(out)


def _assert_same_run(a, b, end_of_first_run=None):
    assert a["step"] == b["step"]
    assert a["model_state"].keys() == b["model_state"].keys()
    for k in a["model_state"]:
        assert torch.equal(a["model_state"][k], b["model_state"][k]), k
    sa, sb = a["optimizer_state"]["state"], b["optimizer_state"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    # The first run also validated at its own last step (`end_of_first_run`), which the unbroken
    # run passes without validating; every other validation is the same (fixed validation tasks).
    drop = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h  # noqa: E731
                      if e["step"] != end_of_first_run]
    assert drop(a["history"]) == drop(b["history"])
    assert a["summary"]["test_loss"] == b["summary"]["test_loss"]


def test_single_process_resume_equals_an_unbroken_run(tmp_path, capsys):
    # 50 steps, then --resume to 100 (from the end-of-run checkpoint), against 100 steps at once;
    # validation (and a checkpoint) every 10 steps in both.
    broken, whole = tmp_path / "broken.pt", tmp_path / "whole.pt"
    first = _train(broken, 50, "--val-every", "10")
    assert first["step"] == 50 and first["summary"]["steps"] == 50
    capsys.readouterr()
    resumed = _train(broken, 100, "--val-every", "10", "--resume")
    assert "resumed from" in capsys.readouterr().out
    unbroken = _train(whole, 100, "--val-every", "10")
    _assert_same_run(resumed, unbroken)
    assert [e["step"] for e in resumed["history"]] == list(range(10, 101, 10))
    assert [r["step"] for r in resumed["resumes"]] == [50] and resumed["resumes"][0]["changed"] == {}
    # Guard: the comparison can fail: 100 steps are not 50 steps.
    assert not torch.equal(first["model_state"]["body.0.weight"], unbroken["model_state"]["body.0.weight"])


@pytest.mark.parametrize("algo", [["--algo", "metasgd"], ["--algo", "mamlpp", "--inner-steps", "2", "--steps-per-epoch", "3",
                                   "--msl-epochs", "2", "--first-order-epochs", "1"]])
def test_learned_inner_rates_and_schedules_resume_bit_for_bit(tmp_path, algo):
    # Meta-SGD's rates and MAML++'s rates and meta-step counter live in the algorithm: they are
    # checkpointed (algorithm_state), meta-trained by the same optimizer, and restored on resume.
    broken, whole = tmp_path / "broken.pt", tmp_path / "whole.pt"
    first = _train(broken, 5, *algo)
    resumed = _train(broken, 10, *algo, "--resume")
    unbroken = _train(whole, 10, *algo)
    _assert_same_run(resumed, unbroken, end_of_first_run=5)
    ra, ru, r0 = resumed["algorithm_state"], unbroken["algorithm_state"], first["algorithm_state"]
    assert ra.keys() == ru.keys() and len(ra) >= 1
    for k in ra:
        assert torch.equal(torch.as_tensor(ra[k]), torch.as_tensor(ru[k])), k
    rates = "alpha" if "alpha" in ra else "rates"
    # Guard: the rates are really learned (they moved between step 5 and step 10).
    assert not torch.equal(r0[rates], ru[rates])
    if "meta_step" in ra:
        assert ra["meta_step"] == 10


def test_resume_from_a_validation_checkpoint_continues_the_stream(tmp_path, monkeypatch):
    # Stop a 10-step run after its step-6 checkpoint (a fault in step 7), then resume it to 10.
    broken, whole = tmp_path / "broken.pt", tmp_path / "whole.pt"
    from fastmeta.learner import MetaLearner

    real_step = MetaLearner.step
    calls = {"n": 0}

    def dying_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("injected fault: the job dies in step 7")
        return real_step(self, batch)

    monkeypatch.setattr(MetaLearner, "step", dying_step)
    with pytest.raises(RuntimeError, match="injected fault"):  # not a user error: its traceback stays
        main(["train", "--steps", "10", "--val-every", "3", "--out", str(broken), *SINE])
    monkeypatch.setattr(MetaLearner, "step", real_step)
    assert training.load_checkpoint(broken)["step"] == 6 and "summary" not in training.load_checkpoint(broken)
    resumed = _train(broken, 10, "--val-every", "3", "--resume")
    unbroken = _train(whole, 10, "--val-every", "3")
    _assert_same_run(resumed, unbroken)


def test_resume_continues_the_algorithms_own_random_stream(tmp_path):
    # ESharp-MAML draws its SWP masks from its own generator: a resumed run must continue it.
    esam = ["--algo", "esharp-low", "--swp-keep-prob", "0.7", "--val-every", "2", "--strategy", "loop"]
    broken, whole = tmp_path / "broken.pt", tmp_path / "whole.pt"
    _train(broken, 3, *esam)
    resumed = _train(broken, 6, *esam, "--resume")
    assert "_gen" in resumed["rng"]["algorithm"]
    _assert_same_run(resumed, _train(whole, 6, *esam), end_of_first_run=3)


def test_auto_strategy_is_kept_on_resume(tmp_path, capsys):
    out = tmp_path / "auto.pt"
    args = ["--meta-batch", "2", "--shots", "3", "--queries", "3", "--val-every", "0", "--test-tasks", "4",
            "--no-progress", "--out", str(out)]
    assert main(["train", "--steps", "2", *args]) == 0
    chosen = training.load_checkpoint(out)["strategy_chosen"]
    assert chosen in ("vmap", "loop", "bmm")
    capsys.readouterr()
    assert main(["train", "--steps", "4", "--resume", *args]) == 0
    assert f"strategy: {chosen} (measured by 'auto' at the start of the run, kept from the checkpoint)" in \
        capsys.readouterr().out
    assert training.load_checkpoint(out)["strategy_chosen"] == chosen


def test_changed_settings_are_refused_with_every_difference_or_recorded(tmp_path, capsys):
    out = tmp_path / "run.pt"
    base = ["--meta-batch", "2", "--val-every", "0", "--test-tasks", "4", "--strategy", "bmm", "--no-progress",
            "--out", str(out), "--nproc", "1"]
    assert main(["train", "--steps", "3", "--shots", "3", "--queries", "3", *base]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    # --meta-lr, --shots, --queries and --adapt all differ: one refusal lists all four.
    bad = ["train", "--steps", "6", "--resume", "--meta-lr", "0.5", "--shots", "4", "--queries", "2", "--adapt", "head",
           *base]
    assert main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fastmeta train: error: resume:")
    for key in ("meta_lr 0.003 -> 0.5", "shots 3 -> 4", "queries 3 -> 2", "adapt 'all' -> 'head'"):
        assert key in err, err
    assert "--allow-changed" in err
    assert out.read_bytes() == before  # refused before anything was written

    assert main(["train", "--steps", "6", "--resume", "--meta-lr", "0.5", "--shots", "3", "--queries", "3",
                 "--allow-changed", *base]) == 0
    ck = training.load_checkpoint(out)
    assert ck["step"] == 6 and ck["config"]["meta_lr"] == 0.5
    assert [g["lr"] for g in ck["optimizer_state"]["param_groups"]] == [0.5]  # the new rate was used
    assert ck["resumes"][-1] == dict(step=3, world_size=1, changed={"meta_lr": [0.003, 0.5]})


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys):
    out = tmp_path / "new.pt"
    assert main(["train", "--steps", "2", "--val-every", "0", "--resume", "--out", str(out), *SINE]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "no checkpoint" in ln]
    assert lines == [f"resume: no checkpoint at {out} yet; starting a new run"]
    assert training.load_checkpoint(out)["step"] == 2


# --------------------------------------------------------------------------------- two ranks
pytestmark_dist = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                     reason="torch.distributed with gloo is not available")
HARD_LIMIT = 180.0


def _cfg(**kw):
    cfg = dict(task="sinusoid", algo="maml", inner_lr=0.01, meta_lr=1e-2, meta_batch=4, shots=3, queries=3,
               steps=10, inner_steps=1, val_every=3, val_tasks=4, test_tasks=4, seed=0, adapt="all",
               strategy="bmm", float64=False, out=None, progress=False, nproc=2, dist_timeout=60.0)
    cfg.update(kw)
    return cfg


def _worker(rank, world, cfg):
    return training.train(cfg, log=lambda *a, **k: None)["final_params"]


def _launch(cfg, **kw):
    return fd.launch(_worker, 2, (cfg,), timeout=HARD_LIMIT, pg_timeout=cfg["dist_timeout"], start_method="fork",
                     threads=1, **kw)


@pytestmark_dist
def test_two_rank_resume_equals_an_unbroken_run(tmp_path):
    broken, whole = tmp_path / "broken.pt", tmp_path / "whole.pt"
    _launch(_cfg(steps=5, out=str(broken)))
    resumed = _launch(_cfg(steps=10, out=str(broken), resume=True))
    unbroken = _launch(_cfg(steps=10, out=str(whole)))
    assert torch.equal(resumed[0], resumed[1]) and torch.equal(resumed[0], unbroken[0])
    a, b = training.load_checkpoint(broken), training.load_checkpoint(whole)
    _assert_same_run(a, b, end_of_first_run=5)
    assert [e["step"] for e in a["history"]] == [3, 5, 6, 9, 10]
    assert a["config"]["world_size"] == 2 and a["resumes"][0]["step"] == 5


@pytestmark_dist
def test_a_checkpoint_rank0_cannot_read_fails_every_rank(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    res = _launch(_cfg(out=str(bad), resume=True, dist_timeout=20.0), raise_on_error=False)
    for r in res:  # both ranks report rank 0's error; none waits out the timeout in the broadcast
        assert r[0] == "error" and "ckpt:" in r[1] and "truncated or corrupt" in r[1], r[:2]
