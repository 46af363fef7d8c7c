"""Task-sharded meta-batches over torch.distributed (gloo over loopback, local processes).

* every rank's meta-gradient equals the single-process meta-gradient over the whole meta-batch
  (float64, 1e-9 relative) for MAML, FO-MAML, HF-MAML and Sharp-MAML_both, with 2 and 3 ranks and
  meta-batch sizes both divisible and not divisible by the world size;
* a 2-process sinusoid training run (with a resume from rank 0's checkpoint) ends at the same
  parameters as the 1-process run with the same seed;
* a rank that dies or stalls makes the other rank raise ``RankFailure`` within the process-group
  timeout.

Ranks start with ``fork`` (they inherit the imported torch: milliseconds instead of a re-import)
and every launch has a hard limit, after which the launcher kills its ranks and fails the test.
"""
import os
import time

import pytest
import torch
import torch.distributed as dist

import fastmeta
from fastmeta import distributed as fd
from fastmeta import training
from fastmeta.data import SinusoidTasks

from reference import rel_err

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

START = "fork"
HARD_LIMIT = 180.0  # s per launch; generous because the CI machine is shared
PG_TIMEOUT = 120.0  # s; collectives of the healthy runs never come close

# name -> (algorithm factory, evaluation strategy). Both strategies appear so that the reduction
# is exercised with one chunk (vmap) and one chunk per task (loop).
ALGOS = {
    "maml": (lambda: fastmeta.MAML(0.05, inner_steps=2), "vmap"),
    "fomaml": (lambda: fastmeta.FOMAML(0.05), "loop"),
    "hfmaml": (lambda: fastmeta.HFMAML(0.05), "vmap"),  # per-task delta rule (Fallah Thm. 4.17)
    "sharp_both": (lambda: fastmeta.SharpMAML(0.05, alpha_low=0.05, alpha_up=0.05), "loop"),  # eqs. 11-15
}
# 5 is divisible by neither 2 nor 3: shards of 2+3 and 1+2+2 tasks.
META_BATCHES = {2: (4, 5), 3: (5, 6)}
STEP = 7


def _learner(name, process_group=None):
    torch.manual_seed(0)
    model = fastmeta.SineMLP(hidden=8, activation="tanh").double()
    make, strategy = ALGOS[name]
    return fastmeta.MetaLearner(model, make(), loss_fn="mse", strategy=strategy, process_group=process_group)


def _sampler(T, rank=None, world_size=None):
    return fd.ShardedTaskSampler(SinusoidTasks(4, 4, seed=0, dtype=torch.float64), T, seed=3,
                                 rank=rank, world_size=world_size)


def _grad_worker(rank, world):
    out = {}
    for T in META_BATCHES[world]:
        sampler = _sampler(T)  # rank and world size from the initialized default group
        for name in ALGOS:
            learner = _learner(name)  # process_group=None: the default group is used
            res = learner.meta_gradient(sampler.sample(STEP))
            out[(name, T)] = (list(sampler.indices), res.grad, learner.reduction.reductions)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_gets_the_single_process_meta_gradient(world):
    results = fd.launch(_grad_worker, world, timeout=HARD_LIMIT, pg_timeout=PG_TIMEOUT, start_method=START, threads=1)
    for T in META_BATCHES[world]:
        full = _sampler(T, 0, 1).full(STEP)
        for name in ALGOS:
            want = _learner(name).meta_gradient(full).grad
            shards = [results[r][(name, T)][0] for r in range(world)]
            assert sorted(sum(shards, [])) == list(range(T)), "shards must be disjoint and cover the meta-batch"
            for r in range(world):
                _, got, reductions = results[r][(name, T)]
                assert rel_err(got, want) < 1e-9, (name, T, r)
                # Sharp-MAML_both: pass 1 (eq. 13 needs the global grad h) and pass 2 (eq. 15).
                assert reductions == (2 if name == "sharp_both" else 1)
            # Guards, so the comparison above can fail: one rank's shard alone gives another
            # gradient, and with uneven shards the mean of per-rank means is not the task mean.
            local = [_learner(name).meta_gradient(full.select(slice(s[0], s[-1] + 1))).grad for s in shards]
            assert rel_err(local[0], want) > 1e-3
            if T % world:
                assert rel_err(torch.stack(local).mean(0), want) > 1e-4


def test_shard_ranges_and_sampler():
    assert [list(fd.shard_range(5, r, 3)) for r in range(3)] == [[0], [1, 2], [3, 4]]
    with pytest.raises(ValueError, match="meta_batch"):
        fd.shard_range(2, 0, 3)
    with pytest.raises(ValueError, match="rank"):
        fd.shard_range(4, 2, 2)
    a = _sampler(5, 1, 2).sample(3)
    b = _sampler(5, 0, 1).full(3)
    assert torch.equal(a.support_x, b.support_x[2:5]) and torch.equal(a.query_y, b.query_y[2:5])
    assert not torch.equal(_sampler(5, 0, 1).full(4).support_x, b.support_x)  # a new step, new tasks
    with pytest.raises(ValueError, match="source"):
        fd.ShardedTaskSampler(object(), 4)
    with pytest.raises(ValueError, match="process_group"):
        _learner("maml", process_group="world")


# ---------------------------------------------------------------------------------------------
def _cfg(**kw):
    cfg = dict(task="sinusoid", algo="maml", inner_lr=0.01, meta_lr=1e-2, meta_batch=5, shots=5, queries=5,
               steps=3, inner_steps=1, val_every=0, val_tasks=4, test_tasks=4, seed=0, adapt="all",
               strategy="auto", float64=False, out=None, progress=False, nproc=1, dist_timeout=PG_TIMEOUT)
    cfg.update(kw)
    return cfg


def _train_worker(rank, world, cfg):
    return training.train(cfg, log=lambda *a, **k: None)["final_params"]


def _quiet_train(cfg):
    return training.train(cfg, log=lambda *a, **k: None)["final_params"]


# float32: the 2 ranks sum their tasks' gradients in another order than one process does (one
# rounding per all-reduce, ~1e-7 relative), and Adam carries it over steps.
TRAIN_TOL = 1e-5


def test_two_process_training_and_resume_match_one_process(tmp_path):
    ckpt = tmp_path / "run.pt"
    init = _quiet_train(_cfg(steps=0))
    one3 = _quiet_train(_cfg(steps=3))
    one6 = _quiet_train(_cfg(steps=6))
    assert rel_err(one3, init) > 1e-3  # training moves the parameters far beyond the tolerance

    two3 = fd.launch(_train_worker, 2, (_cfg(steps=3, out=str(ckpt)),), timeout=HARD_LIMIT,
                     pg_timeout=PG_TIMEOUT, start_method=START, threads=1)
    # Identical all-reduced gradients (and rank 0's "auto" strategy on both) -> identical Adam steps.
    assert torch.equal(two3[0], two3[1])
    assert rel_err(two3[0], one3) < TRAIN_TOL
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 3 and saved["config"]["world_size"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]  # one writer, no temp files left

    # Resume on 2 ranks from rank 0's step-3 checkpoint and continue to step 6.
    two6 = fd.launch(_train_worker, 2, (_cfg(steps=6, out=str(ckpt), resume=True),), timeout=HARD_LIMIT,
                     pg_timeout=PG_TIMEOUT, start_method=START, threads=1)
    assert torch.equal(two6[0], two6[1])
    assert rel_err(two6[0], one6) < TRAIN_TOL
    assert torch.load(ckpt, weights_only=True)["step"] == 6
    with pytest.raises(ValueError, match="resume"):
        _quiet_train(_cfg(steps=7, out=str(ckpt), resume=True, meta_batch=6))


def _limited_train_worker(rank, world, cfg):
    import types

    if rank == 1:
        # Only rank 1's clock runs out (after 7 reads): the ranks must still stop at the same step,
        # or rank 0 would wait forever in the next gradient all-reduce. The loop reads the clock
        # once per step and TaskReduction twice per all-reduce: read 7 is the check before step 3.
        reads = iter(range(10 ** 6))
        clock = types.SimpleNamespace(perf_counter=lambda: 0.0 if next(reads) < 7 else 1e6, monotonic=time.monotonic)
        training.loop.time = fd.reduce.time = clock
    s = training.train(cfg, log=lambda *a, **k: None)
    return s["steps"], s["final_params"]


def test_time_limit_stops_all_ranks_at_the_same_step(tmp_path):
    ckpt = tmp_path / "limited.pt"
    res = fd.launch(_limited_train_worker, 2, (_cfg(steps=6, time_limit=1.0, out=str(ckpt)),),
                    timeout=HARD_LIMIT, pg_timeout=PG_TIMEOUT, start_method=START, threads=1)
    (s0, p0), (s1, p1) = res
    assert s0 == s1 and 1 <= s0 < 6, (s0, s1)
    assert torch.equal(p0, p1)
    assert rel_err(p0, _quiet_train(_cfg(steps=s0))) < TRAIN_TOL  # exactly s0 steps were taken
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == s0 and saved["summary"]["steps"] == s0
    with pytest.raises(ValueError, match="time_limit"):
        _quiet_train(_cfg(time_limit=-1.0))


# ---------------------------------------------------------------------------------------------
FAIL_TIMEOUT = 6.0  # s: the process-group timeout under test


def _failing_worker(rank, world, mode, marks):
    """Rank 1 dies (``die``) or stalls (``stall``) before step 3's all-reduce. Events are recorded as
    marker files in ``marks``, so the test checks their order, not seconds: the dying rank marks
    before exiting; the stalled rank stays stalled until rank 0 has marked its failure (or a cap far
    beyond the timeout), so rank 0's failure cannot have come from the stall ending."""
    import pathlib

    marks = pathlib.Path(marks)
    learner = _learner("maml")
    sampler = _sampler(4)
    # Warm up outside any collective (first-call costs must not count against the timeout).
    learner.algorithm.meta_grad(learner.evaluator(), learner.layout, learner.layout.flatten(learner.model),
                                sampler.sample(0))
    for step in range(1, 6):
        if rank == 1 and step == 3:
            if mode == "die":
                (marks / "rank1-dying").touch()
                os._exit(7)
            (marks / "rank1-stalled").touch()
            cap = time.monotonic() + HARD_LIMIT / 2   # a safety cap only; never asserted
            while not (marks / "rank0-failed").exists() and time.monotonic() < cap:
                time.sleep(0.05)
            held = (marks / "rank0-failed").exists()
            (marks / "rank1-resumed").touch()
            return ("stalled", held)
        try:
            learner.meta_gradient(sampler.sample(step))
        except fd.RankFailure as e:
            before = sorted(p.name for p in marks.iterdir())   # what had happened when rank 0 failed
            (marks / "rank0-failed").touch()
            cause = f"{type(e.__cause__).__name__}: {e.__cause__}"
            return ("failed", step, before, str(e), cause)
    return ("finished",)


@pytest.mark.parametrize("mode", ["die", "stall"])
def test_dead_or_stalled_rank_fails_the_others_within_the_timeout(mode, tmp_path):
    res = fd.launch(_failing_worker, 2, (mode, str(tmp_path)), timeout=HARD_LIMIT, pg_timeout=FAIL_TIMEOUT,
                    start_method=START, threads=1, raise_on_error=False)
    assert res[0][0] == "ok", res[0]
    outcome = res[0][1]
    assert outcome[0] == "failed" and outcome[1] == 3, outcome
    assert "rank 0 of 2" in outcome[3], outcome[3]
    if mode == "die":
        assert res[1] == ("missing", 7)
        # rank 0 failed after rank 1 was gone (the death caused it), not at some other point
        assert outcome[2] == ["rank1-dying"], outcome
    else:
        # rank 0 failed while rank 1 was still stalled: only the process-group timeout can end that
        # wait, and gloo says so in the underlying error
        assert outcome[2] == ["rank1-stalled"], outcome
        assert "timed out" in outcome[4].lower() or "timeout" in outcome[4].lower(), outcome[4]
        assert res[1] == ("ok", ("stalled", True))


def test_launch_reports_a_failing_rank():
    with pytest.raises(fd.LaunchError, match="rank 1: ValueError: boom"):
        fd.launch(_raise_on_rank1, 2, timeout=HARD_LIMIT, pg_timeout=PG_TIMEOUT, start_method=START, threads=1)


def _raise_on_rank1(rank, world):
    if rank == 1:
        raise ValueError("boom")
    return rank


def test_cli_nproc_routes_to_the_launcher(monkeypatch):
    # `fastmeta train --nproc 2` must reach launch_train with the parsed config (the launch itself
    # is covered above with fork; spawn re-imports torch in every rank and is too slow for CI).
    seen = {}

    def fake_launch_train(cfg, nproc, **kw):
        seen.update(cfg=cfg, nproc=nproc)
        return {}

    monkeypatch.setattr(training.loop, "launch_train", fake_launch_train)
    from fastmeta.cli import main

    assert main(["train", "--nproc", "2", "--dist-timeout", "30", "--steps", "1", "--no-progress"]) == 0
    assert seen["nproc"] == 2 and seen["cfg"]["dist_timeout"] == 30.0 and seen["cfg"]["meta_batch"] == 25


# ---------------------------------------------------------------------------------------------
def _reduction_worker(rank, world):
    red = fd.TaskReduction(dist.group.WORLD)
    n_local = rank + 1  # uneven task counts: 1 and 2
    g = red.mean(torch.full((3,), float(rank + 1)) * n_local, n_local)
    return (g, red.reductions, red.comm_seconds, red.agree(f"choice of rank {rank}"),
            fd.any_rank(rank == 1, dist.group.WORLD), fd.any_rank(False, dist.group.WORLD))


def test_task_reduction_mean_agree_and_any_rank():
    res = fd.launch(_reduction_worker, 2, timeout=HARD_LIMIT, pg_timeout=PG_TIMEOUT, start_method=START, threads=1)
    for g, reductions, comm_seconds, agreed, any_true, any_false in res:
        # tasks: one with gradient 1 (rank 0), two with gradient 2 (rank 1): mean 5/3, not (1 + 2) / 2
        assert torch.allclose(g, torch.full((3,), 5.0 / 3.0))
        assert reductions == 1 and comm_seconds > 0
        assert agreed == "choice of rank 0"
        assert any_true is True and any_false is False
    with pytest.raises(ValueError, match="group"):
        fd.TaskReduction(None)
    assert fd.any_rank(True, None) is True  # one process: the flag itself


def test_plain_run_keeps_its_task_stream(tmp_path):
    # Without nproc/resume/torchrun the loop samples src.train.sample(meta_batch), as a hand-written
    # loop does; with nproc (even 1) it samples the sharded stream and records sampler="sharded".
    cfg = _cfg(steps=2, nproc=None, strategy="loop", out=str(tmp_path / "plain.pt"))
    plain = training.train(cfg, log=lambda *a, **k: None)
    sharded = training.train(dict(cfg, nproc=1, out=str(tmp_path / "sharded.pt")), log=lambda *a, **k: None)

    torch.manual_seed(cfg["seed"])
    src = training.TaskSource(cfg)
    model = fastmeta.models.build_model(src.model_config)
    learner = training.learner_from_config(cfg, model, src.loss_fn)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["meta_lr"])
    for _ in range(cfg["steps"]):
        opt.zero_grad()
        learner.step(src.train.sample(cfg["meta_batch"]))
        opt.step()
    by_hand = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(plain["final_params"], by_hand)
    assert rel_err(sharded["final_params"], by_hand) > 1e-4  # another task stream

    plain_cfg = training.load_checkpoint(tmp_path / "plain.pt")["config"]
    sharded_cfg = training.load_checkpoint(tmp_path / "sharded.pt")["config"]
    assert "sampler" not in plain_cfg and "world_size" not in plain_cfg
    assert sharded_cfg["sampler"] == "sharded" and sharded_cfg["world_size"] == 1
    # One summary for every run: the same keys, with no communication in one process.
    assert set(plain) == set(sharded) >= {"world_size", "rank", "comm_seconds", "all_reduces", "final_params",
                                          "pre_adaptation_mse", "test_loss_ci95", "learner"}
    assert (plain["world_size"], plain["rank"], plain["comm_seconds"], plain["all_reduces"]) == (1, 0, 0.0, 0)
    assert plain["learner"].reduction is None
    # A plain run resumes as a plain run (tests/test_resume.py), never onto the sharded stream.
    with pytest.raises(ValueError, match="resume: .*sampler 'plain' -> 'sharded'"):
        training.train(dict(cfg, nproc=1, resume=True), log=lambda *a, **k: None)


def test_python_dash_m_bench_entry_point():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "fastmeta.distributed", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--start-method" in r.stdout


def test_distributed_imports_no_training_learner_or_cli():
    # The learner imports fastmeta.distributed.group / .reduce, and fastmeta.training imports the
    # package: any import back (function-level ones included) would close a circle.
    import ast
    from pathlib import Path

    forbidden = ("fastmeta.training", "fastmeta.learner", "fastmeta.cli", "fastmeta.evaluation")
    pkg = Path(fd.__file__).parent
    for path in sorted(pkg.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = "fastmeta.distributed".split(".")[: 3 - node.level] if node.level else []
                src = ".".join(base + ([node.module] if node.module else []))
                names = [src] + [f"{src}.{a.name}" for a in node.names]
            else:
                continue
            bad = [n for n in names if n.startswith(forbidden)]
            assert not bad, f"{path.name} imports {bad}"


_TORCHRUN_RANK = """
import json, sys
import torch
import torch.distributed as dist
from fastmeta import training
cfg = json.loads(sys.argv[1])
s = training.train(cfg, log=lambda *a, **k: None)
torch.save(dict(params=s["final_params"], rank=s["rank"], world=s["world_size"], backend=dist.get_backend(),
                all_reduces=s["all_reduces"]), sys.argv[2])
"""


def test_torchrun_environment_initializes_env_process_group(tmp_path):
    # What torchrun does: start the ranks with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
    # MASTER_PORT set. train() must then initialize the default group from them (env://, gloo on
    # CPU), shard the meta-batch over the 2 ranks and end where the 1-process sharded run ends.
    import json
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(steps=3, nproc=None, strategy="loop")
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, "-c", _TORCHRUN_RANK, json.dumps(cfg), str(tmp_path / f"r{rank}.pt")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=HARD_LIMIT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    got = [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(2)]
    assert [(g["rank"], g["world"], g["backend"]) for g in got] == [(0, 2, "gloo"), (1, 2, "gloo")]
    assert got[0]["all_reduces"] >= 3                            # one gradient all-reduce per step at least
    assert torch.equal(got[0]["params"], got[1]["params"])
    one = _quiet_train(_cfg(steps=3, strategy="loop"))        # nproc=1: the same sharded task stream
    assert rel_err(got[0]["params"], one) < TRAIN_TOL
    assert rel_err(one, _quiet_train(_cfg(steps=0, strategy="loop"))) > 1e-3   # guard: training moved it
