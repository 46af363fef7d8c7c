"""Equal-compute comparison of MAML, Sharp-MAML_low and Sharp-MAML_both on the shared Omniglot
subsets (5-way 1-shot, Conv-4), several seeds, meta-test accuracy with 95% CI over >= 600 tasks.

"Equal compute": every algorithm gets the same training wall-clock budget expressed in MAML steps.
MAML trains ``--maml-steps`` steps; each Sharp variant trains ``maml_steps / r`` steps where ``r`` is
its step-time ratio to MAML measured by ``bench/bench_algorithms.py`` in the same process at start
(or given with ``--ratios``). The paper (Sharp-MAML sec. 5.1) instead gives MAML twice the epochs.

    python bench/compare_sharp_omniglot.py --maml-steps 600 --seeds 0 1 2 --test-tasks 600
    python bench/compare_sharp_omniglot.py --maml-steps 40 --seeds 0 --test-tasks 100 --meta-batch 4  # smoke

Prints one line per (algorithm, seed) and the mean over seeds; ``--json`` writes all results.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from fastmeta.training import DEFAULTS, train  # noqa: E402

DATA = sorted((REPO.parent / "shared" / "data" / "omniglot").glob("images_background_small*.zip"))
ALGOS = {"maml": {}, "sharp-low": {"alpha_low": 0.05}, "sharp-both": {"alpha_low": 0.05, "alpha_up": 0.05}}


def measured_ratios(meta_batch: int) -> dict[str, float]:
    from bench_algorithms import measure

    t = measure(["maml", "sharp-low", "sharp-both"], rounds=2)
    return {"maml": 1.0, "sharp-low": t["sharp-low"] / t["maml"], "sharp-both": t["sharp-both"] / t["maml"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--maml-steps", type=int, default=600)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--meta-batch", type=int, default=16)
    p.add_argument("--ratios", type=float, nargs=2, metavar=("LOW", "BOTH"),
                   help="step-time ratios of sharp-low / sharp-both to MAML (default: measure now)")
    p.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS))
    p.add_argument("--json", help="write all results here")
    p.add_argument("--out-dir", help="keep each run's checkpoint here as <algo>_seed<seed>.pt (for fastmeta landscape)")
    a = p.parse_args()
    if not DATA:
        sys.exit("Omniglot subsets not found under ../shared/data/omniglot")
    ratios = ({"maml": 1.0, "sharp-low": a.ratios[0], "sharp-both": a.ratios[1]} if a.ratios
              else measured_ratios(a.meta_batch))
    print(f"step-time ratios to MAML: {ratios}")
    results = []
    for algo in a.algos:
        steps = max(1, int(round(a.maml_steps / ratios[algo])))
        for seed in a.seeds:
            cfg = dict(DEFAULTS["omniglot"], task="omniglot", data_root=[str(d) for d in DATA], algo=algo,
                       inner_steps=1, seed=seed, steps=steps, meta_batch=a.meta_batch, test_tasks=a.test_tasks,
                       val_every=0, strategy="loop",
                       out=str(Path(a.out_dir) / f"{algo}_seed{seed}.pt") if a.out_dir else None, progress=False, rotations=True, **ALGOS[algo])
            t0 = time.perf_counter()
            s = train(cfg, log=lambda *_: None)
            r = dict(algo=algo, seed=seed, steps=steps, acc=s["test_accuracy"], ci95=s["test_accuracy_ci95"],
                     tasks=s["test_tasks"], train_seconds=s["train_seconds"], wall=time.perf_counter() - t0)
            results.append(r)
            print(f"{algo:<11} seed {seed}: {steps:5d} steps, {r['train_seconds']:7.0f} s train, "
                  f"meta-test acc {100 * r['acc']:.2f}% ± {100 * r['ci95']:.2f}% ({r['tasks']} tasks)", flush=True)
    for algo in a.algos:
        accs = [r["acc"] for r in results if r["algo"] == algo]
        m = sum(accs) / len(accs)
        sd = math.sqrt(sum((x - m) ** 2 for x in accs) / (len(accs) - 1)) if len(accs) > 1 else float("nan")
        print(f"{algo:<11} mean over {len(accs)} seeds: {100 * m:.2f}% (seed std {100 * sd:.2f})")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(ratios=ratios, results=results), indent=1))


if __name__ == "__main__":
    main()
