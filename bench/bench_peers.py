"""Peer comparison: one MAML meta-gradient through higher, torchopt, learn2learn (when importable),
the plain per-task loop, fastmeta (default and CPU speed modes) and the compute floor.

Before anything is timed, each implementation's meta-gradient is compared with the plain loop's
on a fixed seed (float64; bf16 modes against bf16 tolerances, see ``checks.check_gradient``): a
wrong one is reported as wrong and not timed. Missing peers are skipped with the reason.

Then all rows of a workload are timed round-robin in one process (ratios to the fastest peer and
to the floor are only meaningful within one run), and printed with the achieved GFLOP/s of each
row as a fraction of the same-run GEMM rate (``compare.measure``). ``fastmeta bench`` runs the
same suite and writes the markdown table and chart.

Full sizes: ``pytest bench/bench_peers.py --benchmark-enable -s``; CI smoke: ``--benchmark-disable``.
"""
import pytest

from compare import format_rows, measure
from peers import make_fastmeta
from workloads import smoke, workload

CASES = [("sine", False), ("conv4", False), ("conv4", True)]


@pytest.mark.parametrize("name,first_order", CASES, ids=[f"{n}-{'fo' if fo else 'so'}" for n, fo in CASES])
def test_peers(benchmark, request, capsys, name, first_order):
    disabled = smoke(request.config)
    wl = workload(name, small=disabled)
    res = measure(wl, first_order, rounds=1 if disabled else (20 if name == "sine" else 3),
                  modes=not disabled, log=lambda *a: None)
    wrong = [n for n, r in res["rows"].items() if not r["check"]["ok"]]
    with capsys.disabled():
        print("\n[bench_peers] " + format_rows(res))
    # fastmeta and the floor are ours: they must be right. A wrong peer is reported, not failed.
    assert not [n for n in wrong if n.startswith("fastmeta") or n in ("plain loop", "compute floor")], wrong
    benchmark.group = f"peers {wl.title} {res['order']} order"
    benchmark.extra_info.update({k: v for k, v in res.items() if k != "rows"})
    benchmark.extra_info["ms"] = {n: r.get("ms") for n, r in res["rows"].items()}
    fm = make_fastmeta(wl, wl.model(), wl.batch(), first_order)
    benchmark.pedantic(fm, rounds=1 if disabled else 3, iterations=1)
