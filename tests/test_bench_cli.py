"""``fastmeta bench``: the subcommand exists, and it writes a table and a chart from a real (tiny) run."""
import json

import pytest

from fastmeta.cli import bench as bench_cmd
from fastmeta.cli import build_parser


def test_bench_subcommand_registered():
    args = build_parser().parse_args(["bench", "--full", "--out", "x", "--no-rss"])
    assert args.full and args.out == "x" and args.rss is False and args.func is bench_cmd.run
    assert build_parser().parse_args(["bench"]).full is False


def test_bench_writes_table_and_chart(tmp_path, monkeypatch, capsys):
    # A real run of the suite on the tiny sine preset (peers skipped to keep it quick): every row
    # is gradient-checked, timed, and lands in bench.md / bench.png / bench.json.
    monkeypatch.setattr(bench_cmd.suite(), "FAST", dict(cases=[("sine-small", False, 1)], rss=False, accuracy=False))
    args = build_parser().parse_args(["bench", "--out", str(tmp_path), "--no-peers"])
    assert args.func(args) == 0
    md = (tmp_path / "bench.md").read_text()
    assert "| plain loop |" in md and "| fastmeta |" in md and "| compute floor |" in md
    assert "**wrong**" not in md and "Command: `fastmeta bench`" in md
    png = (tmp_path / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    payload = json.loads((tmp_path / "bench.json").read_text())
    rows = payload["results"][0]["rows"]
    assert all(r["check"]["ok"] and r["ms"] > 0 for r in rows.values())
    # without peers, the plain loop is the baseline the ratios are taken against
    assert payload["results"][0]["fastest_peer"] == "plain loop"
    assert rows["plain loop"]["ratio_fastest_peer"] == pytest.approx(1.0)


def test_markdown_reports_wrong_and_skipped_rows():
    check_ok = dict(ok=True, rel_err=1e-16, dtype="float64")
    payload = dict(command="fastmeta bench --full", date="d", accuracy=None,
                   machine=dict(cpu="cpu", isa="avx512f", cores=2, threads=2, torch="t", python="p", load1=1.0, cuda=False),
                   results=[dict(workload="w", order="second", data="d", flops=2e9, rounds=3, fastest_peer="higher",
                                 gemm_gflops=dict(fp32=100.0, bf16=200.0),
                                 skipped={"learn2learn": "does not build"},
                                 rows={"higher": dict(check=check_ok, ms=10.0, ratio_fastest_peer=1.0, ratio_floor=2.0,
                                                      gflops=200.0, frac_gemm=2.0),
                                       "bad": dict(check=dict(ok=False, rel_err=0.5, dtype="float64"))})])
    md = bench_cmd.suite().markdown(payload)
    assert "| bad | — |" in md and "**wrong** (rel err 5.0e-01), not timed" in md
    assert "| learn2learn | — |" in md and "skipped: does not build" in md


def test_markdown_reports_accuracy_per_seed():
    acc = dict(steps=10, seeds=2, meta_batch=4, test_tasks=50,
               modes={"fp32": dict(accuracy=0.75, per_seed=[0.74, 0.76], train_s=3.0),
                      "bf16+fused": dict(accuracy=0.74, per_seed=[0.73, 0.75], train_s=1.0)},
               diffs={"bf16+fused": dict(diff=-0.01, ci95=0.02, per_seed=[-0.01, -0.01])})
    payload = dict(command="c", date="d", accuracy=acc, results=[],
                   machine=dict(cpu="cpu", isa="", cores=2, threads=2, torch="t", python="p", load1=1.0, cuda=False))
    md = bench_cmd.suite().markdown(payload)
    assert "- bf16+fused: 74.00% mean over seeds (73.00, 75.00)" in md
    assert "paired difference bf16+fused − fp32: -1.00 ± 2.00 points" in md and "per seed -1.00, -1.00" in md


def test_profile_step_writes_trace_with_fastmeta_ranges(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "profile_step.py"
    spec = importlib.util.spec_from_file_location("profile_step", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "trace.json"
    assert mod.main(["--workload", "sine", "--small", "--steps", "1", "--cpu", "--out", str(out)]) == 0
    trace = out.read_text()
    assert "fastmeta/inner" in trace and "fastmeta/outer" in trace


def test_accuracy_check_runs_and_its_numbers_follow_from_its_runs(omniglot_data, monkeypatch):
    # The speed-mode accuracy check of `fastmeta bench --full`, on a tiny budget. The oracle: the
    # float32 run of seed 1 redone by hand (same seed, model, MAML(0.4), Adam(1e-3), task stream and
    # test tasks, as the docstring says), and the paired differences / t-intervals recomputed from
    # the per-seed accuracies with scipy's t quantile.
    import math

    import torch

    import fastmeta
    from fastmeta.data import OmniglotTasks, split_alphabets

    suite = bench_cmd.suite()
    suite._import_suite()
    import workloads

    monkeypatch.setattr(workloads, "omniglot_data", lambda: omniglot_data)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps, seeds, mb, test_tasks = 1, 2, 2, 4
        acc = suite.accuracy_check(steps, seeds, meta_batch=mb, test_tasks=test_tasks)
        assert set(acc["modes"]) == {"fp32", "fp32 fused", "bf16+fused"}
        assert (acc["steps"], acc["seeds"], acc["meta_batch"], acc["test_tasks"]) == (steps, seeds, mb, test_tasks)

        train, _, test = split_alphabets(omniglot_data.alphabets, n_test=max(1, len(omniglot_data.alphabets) // 4))
        test_batch = OmniglotTasks(omniglot_data, test, ways=5, shots=1, queries=15, seed=1).sample(test_tasks)
        torch.manual_seed(1)
        model = fastmeta.Conv4(5)
        learner = fastmeta.MetaLearner(model, fastmeta.MAML(0.4), strategy="loop")
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        tasks = OmniglotTasks(omniglot_data, train, ways=5, shots=1, queries=15, rotations=True, seed=1)
        for _ in range(steps):
            opt.zero_grad()
            learner.step(tasks.sample(mb))
            opt.step()
        want = float(learner.evaluate(test_batch).accuracy)
    finally:
        torch.set_num_threads(n)
    assert acc["modes"]["fp32"]["per_seed"][1] == want
    scipy_stats = pytest.importorskip("scipy.stats")
    for label, v in acc["modes"].items():
        assert len(v["per_seed"]) == seeds and all(0 <= a <= 1 for a in v["per_seed"])
        # accuracies over 4 tasks x 75 queries are multiples of 1/300
        assert all(abs(a * 300 - round(a * 300)) < 1e-6 for a in v["per_seed"])
        assert v["accuracy"] == pytest.approx(sum(v["per_seed"]) / seeds, rel=1e-12)
    assert set(acc["diffs"]) == {"fp32 fused", "bf16+fused"}
    for label, d in acc["diffs"].items():
        per = [a - b for a, b in zip(acc["modes"][label]["per_seed"], acc["modes"]["fp32"]["per_seed"])]
        assert d["per_seed"] == pytest.approx(per, abs=1e-7)
        assert d["diff"] == pytest.approx(sum(per) / seeds, abs=1e-7)
        sd = math.sqrt(sum((x - sum(per) / seeds) ** 2 for x in per) / (seeds - 1))
        assert d["ci95"] == pytest.approx(scipy_stats.t.ppf(0.975, seeds - 1) * sd / math.sqrt(seeds), rel=1e-3, abs=1e-7)
