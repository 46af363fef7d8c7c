"""One second-order MAML meta-training step: fastmeta (``strategy="auto"``) vs the plain per-task loop.

Targets (issue 2), as ratios measured in the same run, interleaved round by round:

* (a) sine MLP 1-40-40-1, 10-shot, meta-batch 25: fastmeta <= 0.2x the loop (vmap wins);
* (b) Conv-4 Omniglot 5-way 1-shot, 15 queries per class, meta-batch 16: fastmeta <= 1.05x the
  loop (the loop is at the compute floor on this CPU; ``auto`` must not pick the slower strategy).

The ratios are printed (and stored in ``extra_info``); wall-clock times are never asserted. The
meta-gradient is checked against the plain loop in float64 before anything is timed.

Full sizes: ``pytest bench/bench_step.py --benchmark-enable -s``; CI smoke (small presets, each
benchmark once): ``pytest bench --benchmark-disable``.
"""
import pytest
import torch

from checks import check_gradient
from oracle import rel_err
from peers import make_fastmeta, make_plain
from timing import summary, time_interleaved
from workloads import smoke, workload

TARGETS = {"sine": 0.2, "conv4": 1.05}
ROUNDS = {"sine": 30, "conv4": 5}


@pytest.mark.parametrize("name", ["sine", "conv4"])
def test_step_second_order(benchmark, request, capsys, name):
    disabled = smoke(request.config)
    wl = workload(name, small=disabled)

    check = check_gradient(wl, make_fastmeta, first_order=False)
    assert check["ok"], f"fastmeta's meta-gradient differs from the plain loop: {check}"

    model, batch = wl.model(), wl.batch()
    fm = make_fastmeta(wl, model, batch, first_order=False)
    loop = make_plain(wl, model, batch, first_order=False)
    # Same numbers in float32 too (a benchmark checks its output once, so a fast wrong step fails).
    assert rel_err(fm().double(), loop().double()) < 1e-3

    benchmark.group = f"step 2nd-order {wl.title}"
    benchmark.extra_info.update(workload=wl.title, data=wl.data_source, threads=torch.get_num_threads(),
                                torch=torch.__version__, strategy=fm.learner.chosen_strategy,
                                strategy_reason=fm.learner.strategy_reason, grad_check=check)
    if disabled:
        benchmark(fm)
        return

    times = time_interleaved({"plain loop": loop, "fastmeta": fm}, ROUNDS[name])
    t_loop, t_fm = summary(times["plain loop"]), summary(times["fastmeta"])
    ratio = t_fm / t_loop
    benchmark.extra_info.update(loop_ms=1e3 * t_loop, fastmeta_ms=1e3 * t_fm, ratio=ratio, target=TARGETS[name])
    with capsys.disabled():
        print(f"\n[bench_step] {wl.title}: plain loop {1e3 * t_loop:.2f} ms, fastmeta ({fm.learner.chosen_strategy}) "
              f"{1e3 * t_fm:.2f} ms -> ratio {ratio:.3f}x (target <= {TARGETS[name]}x: "
              f"{'met' if ratio <= TARGETS[name] else 'MISSED'}); {fm.learner.strategy_reason}")
    benchmark.pedantic(fm, rounds=ROUNDS[name], iterations=1, warmup_rounds=0)
