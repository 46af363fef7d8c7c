"""Peer comparison: one MAML meta-gradient through higher, torchopt, learn2learn (when importable),
the plain per-task loop, fastmeta (default and CPU speed modes) and the compute floor.

Before anything is timed, each implementation's meta-gradient is compared with the plain loop's
on a fixed seed (float64; bf16 modes against bf16 tolerances, see ``common.check_gradient``): a
wrong one is reported as wrong and not timed. Missing peers are skipped with the reason.

Then all rows of a workload are timed round-robin in one process (ratios to the fastest peer and
to the floor are only meaningful within one run), and printed with the achieved GFLOP/s of each
row as a fraction of the same-run GEMM rate. ``fastmeta bench`` runs the same suite and writes
the markdown table and chart.

Full sizes: ``pytest bench/bench_peers.py --benchmark-enable -s``; CI smoke: ``--benchmark-disable``.
"""
import pytest
import torch

import common as C

CASES = [("sine", False), ("conv4", False), ("conv4", True)]


def measure(wl, first_order: bool, rounds: int, peers: bool = True, modes: bool = True, log=print) -> dict:
    """Check, then time every implementation of ``wl``. Returns a dict with per-row results:
    ``rows[name] = {check, ms, ratio_fastest_peer, ratio_floor, gflops, frac_gemm}``."""
    impls = C.implementations(wl, peers=peers, modes=modes)
    status = C.peer_status()
    skipped = {n: r for n, (ok, r) in status.items() if not ok} if peers else {}
    model, batch = wl.model(), wl.batch()
    checks, runs = {}, {}
    for name, make in impls.items():
        checks[name] = C.check_gradient(wl, make, first_order, bf16=C.is_bf16(name))
        log(f"  check {name:28s} {'ok' if checks[name]['ok'] else 'WRONG'} (rel err {checks[name]['rel_err']:.1e})")
        if checks[name]["ok"]:
            runs[name] = make(wl, model, batch, first_order)
    flops = C.count_flops(runs["plain loop"]) if "plain loop" in runs else 0
    gemm = {"fp32": C.gemm_gflops(torch.float32), "bf16": C.gemm_gflops(torch.bfloat16)}
    times = C.time_interleaved(runs, rounds)
    ms = {k: 1e3 * C.summary(v) for k, v in times.items()}
    # "fastest peer" = the fastest library among higher/torchopt/learn2learn that passed its
    # check; without any, the plain loop stands in (and the table says so).
    peer_ms = {p: ms[p] for p in C.PEERS if p in ms}
    if not peer_ms and "plain loop" in ms:
        peer_ms = {"plain loop": ms["plain loop"]}
    fastest_name = min(peer_ms, key=peer_ms.get) if peer_ms else None
    fastest_peer = peer_ms[fastest_name] if peer_ms else float("nan")
    rows = {}
    for name in impls:
        row = dict(check=checks[name])
        if name in ms:
            gf = flops / (ms[name] / 1e3) / 1e9
            row.update(ms=ms[name], ratio_fastest_peer=ms[name] / fastest_peer,
                       ratio_floor=ms[name] / ms.get("compute floor", float("nan")), gflops=gf,
                       frac_gemm=gf / gemm["bf16" if C.is_bf16(name) else "fp32"])
        rows[name] = row
    strategy = getattr(runs.get("fastmeta"), "learner", None)
    return dict(workload=wl.title, order="first" if first_order else "second", data=wl.data_source, rows=rows,
                skipped=skipped, fastest_peer=fastest_name, flops=flops, gemm_gflops=gemm, rounds=rounds,
                strategy=strategy.strategy_reason if strategy else "")


def format_rows(res: dict) -> str:
    lines = [f"{res['workload']}, {res['order']} order ({res['data']}; {res['flops'] / 1e9:.2f} GFLOP/step; "
             f"GEMM fp32 {res['gemm_gflops']['fp32']:.0f}, bf16 {res['gemm_gflops']['bf16']:.0f} GFLOP/s)"]
    for name, r in res["rows"].items():
        chk = "grad ok" if r["check"]["ok"] else f"WRONG (rel err {r['check']['rel_err']:.2e}) - not timed"
        if "ms" in r:
            lines.append(f"  {name:28s} {r['ms']:9.2f} ms  x{r['ratio_fastest_peer']:.2f} fastest peer  "
                         f"x{r['ratio_floor']:.2f} floor  {r['gflops']:6.1f} GFLOP/s ({100 * r['frac_gemm']:.0f}% GEMM)  {chk}")
        else:
            lines.append(f"  {name:28s} {'-':>9s}     {chk}")
    for name, reason in res["skipped"].items():
        lines.append(f"  {name:28s} skipped: {reason}")
    return "\n".join(lines)


@pytest.mark.parametrize("name,first_order", CASES, ids=[f"{n}-{'fo' if fo else 'so'}" for n, fo in CASES])
def test_peers(benchmark, request, capsys, name, first_order):
    disabled = C.smoke(request.config)
    wl = C.workload(name, small=disabled)
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
    fm = C.make_fastmeta(wl, wl.model(), wl.batch(), first_order)
    benchmark.pedantic(fm, rounds=1 if disabled else 3, iterations=1)
