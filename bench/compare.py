"""The peer comparison of one workload: every row of ``peers.implementations`` is gradient-checked
against the plain loop (``checks``), the rows that pass are timed round-robin in one process
(``timing``), and each gets its ratio to the fastest peer and to the compute floor and its achieved
GFLOP/s as a fraction of the same-run GEMM rate. ``bench_peers.py`` (pytest) and ``fastmeta bench``
(``cli.py``) both run this.
"""
from __future__ import annotations

import torch

from checks import check_gradient
from peers import PEERS, implementations, is_bf16, peer_status
from timing import count_flops, gemm_gflops, summary, time_interleaved


def measure(wl, first_order: bool, rounds: int, peers: bool = True, modes: bool = True, log=print) -> dict:
    """Check, then time every implementation of ``wl``. Returns a dict with per-row results:
    ``rows[name] = {check, ms, ratio_fastest_peer, ratio_floor, gflops, frac_gemm}``."""
    impls = implementations(wl, peers=peers, modes=modes)
    status = peer_status()
    skipped = {n: r for n, (ok, r) in status.items() if not ok} if peers else {}
    model, batch = wl.model(), wl.batch()
    checks, runs = {}, {}
    for name, make in impls.items():
        checks[name] = check_gradient(wl, make, first_order, bf16=is_bf16(name))
        log(f"  check {name:28s} {'ok' if checks[name]['ok'] else 'WRONG'} (rel err {checks[name]['rel_err']:.1e})")
        if checks[name]["ok"]:
            runs[name] = make(wl, model, batch, first_order)
    flops = count_flops(runs["plain loop"]) if "plain loop" in runs else 0
    gemm = {"fp32": gemm_gflops(torch.float32), "bf16": gemm_gflops(torch.bfloat16)}
    times = time_interleaved(runs, rounds)
    ms = {k: 1e3 * summary(v) for k, v in times.items()}
    # "fastest peer" = the fastest library among higher/torchopt/learn2learn that passed its
    # check; without any, the plain loop stands in (and the table says so).
    peer_ms = {p: ms[p] for p in PEERS if p in ms}
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
                       frac_gemm=gf / gemm["bf16" if is_bf16(name) else "fp32"])
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
