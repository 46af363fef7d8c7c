"""``fastmeta bench``: where fastmeta stands against the plain loop, the peers and the compute floor.

Runs the peer comparison of ``compare.py`` on a preset of workloads (fast by default, ``--full``
for the README table), which checks every implementation's meta-gradient against the plain
per-task loop before timing it, and writes ``<out>/bench.md`` (markdown table: step time, ratio to
the fastest peer and to the compute floor, achieved GFLOP/s as a fraction of the same-run GEMM
rate, peak RSS, gradient check), ``<out>/bench.png`` (bar chart) and ``<out>/bench.json``.
``--full`` also meta-trains Conv-4 on Omniglot in float32, in the fused float32 speed mode and in
the fused bf16 speed mode from the same seed and reports their meta-test accuracies.

``fastmeta/cli/bench.py`` loads this file by path from the source checkout and registers its
options (``add_arguments``) and ``run`` as the ``bench`` subcommand. Only the standard library is
imported at load, so building the command line stays cheap; the suite's modules are imported by
``run``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (workload, first order, timing rounds) per case; whether to measure peak RSS and accuracy.
FAST = dict(cases=[("sine", False, 10), ("conv4-mb4", False, 2)], rss=False, accuracy=False)
FULL = dict(cases=[("sine", False, 30), ("conv4", False, 8), ("conv4", True, 8), ("conv4-84", False, 3),
                   ("resnet12", False, 2)], rss=True, accuracy=True)
# --smoke (not in --help): the tiny sine preset, one round; checks that the command works end to end.
SMOKE = dict(cases=[("sine-small", False, 1)], rss=False, accuracy=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` options (the caller sets ``func``)."""
    p.add_argument("--full", action="store_true", help="full-size workloads, first+second order, RSS, speed-mode accuracy")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench_results", help="output folder for bench.md, bench.png, bench.json")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds per row (default: per workload)")
    p.add_argument("--no-peers", dest="peers", action="store_false", help="skip higher/torchopt/learn2learn")
    p.add_argument("--no-rss", dest="rss", action="store_false", default=None, help="skip peak-RSS subprocesses")
    p.add_argument("--accuracy-steps", type=int, default=200, help="--full: meta-training steps per mode")
    p.add_argument("--accuracy-seeds", type=int, default=4, help="--full: training seeds per mode")


def _import_suite() -> None:
    # The suite's modules import each other by plain name (as pytest and the scripts in bench/
    # see them); first on the path, so an installed module of the same name cannot stand in.
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))


def run(args) -> int:
    _import_suite()
    from compare import format_rows, measure
    from memory import peak_rss_subprocess
    from timing import machine
    from workloads import workload

    preset = SMOKE if args.smoke else FULL if args.full else FAST
    rss = preset["rss"] if args.rss is None else args.rss
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mach = machine()
    command = "fastmeta bench" + (" --smoke" if args.smoke else " --full" if args.full else "")
    print(f"{command}: {mach}")
    results = []
    for key, fo, rounds in preset["cases"]:
        wl = workload(key)
        print(f"{wl.title}, {'first' if fo else 'second'} order:", flush=True)
        res = measure(wl, fo, rounds=args.rounds or rounds, peers=args.peers)
        res["key"] = key
        if rss:
            for name, row in res["rows"].items():
                if "ms" in row:
                    row["rss_mib"] = peak_rss_subprocess(key, name, fo)
        print(format_rows(res), flush=True)
        results.append(res)
    acc = accuracy_check(args.accuracy_steps, args.accuracy_seeds) if preset["accuracy"] else None
    payload = dict(command=command, machine=mach, results=results, accuracy=acc,
                   date=time.strftime("%Y-%m-%d %H:%M"))
    (out / "bench.json").write_text(json.dumps(payload, indent=1, default=str))
    (out / "bench.md").write_text(markdown(payload))
    chart(payload, out / "bench.png")
    print(f"wrote {out / 'bench.md'}, {out / 'bench.png'}, {out / 'bench.json'}")
    return 0


# ---------------------------------------------------------------------------------------- accuracy
# Two-sided 95% Student t quantiles for the mean over a few seeds (degrees of freedom = seeds - 1).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def accuracy_check(steps: int, seeds: int = 4, meta_batch: int = 8, test_tasks: int = 400) -> dict | None:
    """Meta-train Conv-4 MAML on Omniglot 5w1s in float32, in the fused float32 speed mode and in
    the fused bf16 speed mode, each from the same seeds on the same tasks; meta-test all on the same
    held-out-alphabet tasks. The differences to float32 are paired per seed (same initial weights,
    same task stream, same test tasks); the seed-to-seed spread of those differences gives the 95%
    interval (Student t), because training itself amplifies rounding differences: two runs of the
    same function in float32 that differ only in summation order end up a point or more apart."""
    import torch

    import fastmeta
    from fastmeta.data import OmniglotTasks, split_alphabets

    _import_suite()
    from workloads import omniglot_data

    data = omniglot_data()
    if data is None:
        return dict(skipped="Omniglot subsets not found")
    train, _, test = split_alphabets(data.alphabets, n_test=max(1, len(data.alphabets) // 4))
    test_batch = OmniglotTasks(data, test, ways=5, shots=1, queries=15, seed=1).sample(test_tasks)
    modes = (("fp32", {}), ("fp32 fused", dict(fused=True)), ("bf16+fused", dict(bf16=True, fused=True)))
    runs = {label: [] for label, _ in modes}
    for seed in range(seeds):
        for label, mode in modes:
            torch.manual_seed(seed)
            model = fastmeta.Conv4(5)
            learner = fastmeta.MetaLearner(model, fastmeta.MAML(0.4), strategy="loop", **mode)
            opt = torch.optim.Adam(model.parameters(), 1e-3)
            tasks = OmniglotTasks(data, train, ways=5, shots=1, queries=15, rotations=True, seed=seed)
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.zero_grad()
                learner.step(tasks.sample(meta_batch))
                opt.step()
            secs = time.perf_counter() - t0
            r = learner.evaluate(test_batch)
            runs[label].append(dict(accuracy=float(r.accuracy), train_s=secs))
            print(f"  seed {seed} accuracy {label}: {100 * r.accuracy:.2f}% ({secs:.0f} s training)", flush=True)
    res = {label: dict(accuracy=sum(x["accuracy"] for x in v) / seeds, per_seed=[x["accuracy"] for x in v],
                       train_s=sum(x["train_s"] for x in v) / seeds) for label, v in runs.items()}
    diffs = {}
    for label in res:
        if label == "fp32":
            continue
        d = torch.tensor(res[label]["per_seed"]) - torch.tensor(res["fp32"]["per_seed"])
        half = _T95.get(seeds - 1, 1.96) * float(d.std()) / seeds ** 0.5 if seeds > 1 else float("nan")
        diffs[label] = dict(diff=float(d.mean()), ci95=half, per_seed=d.tolist())
    return dict(modes=res, diffs=diffs, steps=steps, seeds=seeds, meta_batch=meta_batch, test_tasks=test_tasks)


# ---------------------------------------------------------------------------------------- output
def _fmt(x, spec):
    return "—" if x is None or x != x else format(x, spec)


def markdown(payload: dict) -> str:
    m = payload["machine"]
    lines = [f"Command: `{payload['command']}` ({payload['date']})", "",
             f"Machine: {m['cpu']} ({m['isa']}), {m['cores']} cores, torch {m['torch']} with {m['threads']} threads, "
             f"Python {m['python']}, 1-min load average {m['load1']} at start, CUDA {'present' if m['cuda'] else 'absent'}.", ""]
    for res in payload["results"]:
        lines += [f"**{res['workload']}, {res['order']} order** — {res['flops'] / 1e9:.2f} GFLOP per step "
                  f"(torch.utils.flop_counter); same-run GEMM: fp32 {res['gemm_gflops']['fp32']:.0f}, "
                  f"bf16 {res['gemm_gflops']['bf16']:.0f} GFLOP/s; data: {res['data']}; fastest peer: "
                  f"{res.get('fastest_peer') or '—'}; min of {res['rounds']} interleaved rounds.", "",
                  "| implementation | step (ms) | × fastest peer | × compute floor | GFLOP/s | % of GEMM | peak RSS (MiB) | gradient check |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for name, r in res["rows"].items():
            c = r["check"]
            chk = (f"ok ({c['dtype']}, rel err {c['rel_err']:.1e})" if c["ok"]
                   else f"**wrong** (rel err {c['rel_err']:.1e}), not timed")
            lines.append(f"| {name} | {_fmt(r.get('ms'), '.2f')} | {_fmt(r.get('ratio_fastest_peer'), '.2f')} | "
                         f"{_fmt(r.get('ratio_floor'), '.2f')} | {_fmt(r.get('gflops'), '.1f')} | "
                         f"{_fmt(None if r.get('frac_gemm') is None else 100 * r['frac_gemm'], '.0f')} | "
                         f"{_fmt(r.get('rss_mib'), '.0f')} | {chk} |")
        for name, reason in res["skipped"].items():
            lines.append(f"| {name} | — | — | — | — | — | — | skipped: {reason} |")
        lines.append("")
    acc = payload.get("accuracy")
    if acc and "modes" in acc:
        lines += [f"**Speed-mode accuracy check** (Conv-4 MAML, Omniglot 5w1s, {acc['steps']} steps × meta-batch "
                  f"{acc['meta_batch']}, seeds 0-{acc['seeds'] - 1}, the same seeds and task streams for every mode; "
                  f"meta-test on the same {acc['test_tasks']} held-out-alphabet tasks):", ""]
        for label, v in acc["modes"].items():
            per = ", ".join(f"{100 * a:.2f}" for a in v["per_seed"])
            lines.append(f"- {label}: {100 * v['accuracy']:.2f}% mean over seeds ({per}); "
                         f"training {v['train_s']:.0f} s per run")
        for label, d in acc.get("diffs", {}).items():
            per = ", ".join(f"{100 * x:+.2f}" for x in d["per_seed"])
            lines.append(f"- paired difference {label} − fp32: {100 * d['diff']:+.2f} ± {100 * d['ci95']:.2f} points "
                         f"(95% t-interval over seeds; per seed {per})")
        lines.append("")
    elif acc:
        lines += [f"speed-mode accuracy check skipped: {acc['skipped']}", ""]
    return "\n".join(lines)


def chart(payload: dict, path: Path) -> None:
    """One panel per workload: step time per implementation, labelled with × fastest peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = payload["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, res in zip(axes[0], results):
        names = [n for n, r in res["rows"].items() if "ms" in r]
        ms = [res["rows"][n]["ms"] for n in names]
        colors = ["tab:blue" if n.startswith("fastmeta") else "tab:gray" if n == "compute floor" else "tab:orange"
                  for n in names]
        bars = ax.barh(range(len(names)), ms, color=colors)
        for b, n in zip(bars, names):
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" ×{res['rows'][n]['ratio_fastest_peer']:.2f}",
                    va="center", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("ms per meta-training step (lower is better)", fontsize=7)
        ax.set_title(f"{res['workload']}\n{res['order']} order", fontsize=8)
        ax.set_xlim(0, max(ms) * 1.3 if ms else 1)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{payload['command']} — {payload['machine']['cpu']}, {payload['machine']['threads']} threads "
                 "(× = time / fastest peer)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
