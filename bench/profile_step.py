"""Profile N meta-training steps of fastmeta.

With CUDA present, the N steps are bracketed by ``torch.cuda.profiler.start()/stop()`` so that

    nsys profile --capture-range=cudaProfilerApi --trace=cuda,nvtx,osrt \\
        python bench/profile_step.py --workload conv4 --steps 5

captures exactly those steps, with fastmeta's NVTX ranges (domain ``fastmeta``: ``step``,
``meta_gradient``, ``inner``, ``outer``, ``perturb``, ``hvp``, ...; see ``fastmeta/profiling.py``) on the timeline. Without
CUDA (this CPU machine) it writes a ``torch.profiler`` Chrome trace (open in chrome://tracing or
https://ui.perfetto.dev) and prints the top operators; the same ranges appear there through
``record_function``.

Examples::

    python bench/profile_step.py --workload conv4 --steps 3 --out conv4_trace.json
    python bench/profile_step.py --workload conv4 --bf16 --channels-last --out conv4_bf16.json
    python bench/profile_step.py --workload sine --algo fomaml
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# An uninstalled checkout still finds fastmeta; appended, so nothing installed is shadowed.
if importlib.util.find_spec("fastmeta") is None:
    sys.path.append(str(HERE.parent))

import fastmeta  # noqa: E402
from workloads import workload  # noqa: E402


def build(args):
    wl = workload(args.workload, small=args.small)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    model = wl.model().to(device)
    batch = wl.batch()
    batch = type(batch)(*(t.to(device) for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)),
                        ways=batch.ways)
    algo = fastmeta.FOMAML(wl.inner_lr) if args.algo == "fomaml" else fastmeta.MAML(wl.inner_lr)
    learner = fastmeta.MetaLearner(model, algo, wl.loss_fn, strategy=args.strategy,
                                   channels_last=args.channels_last, bf16=args.bf16, fused=args.fused)
    return wl, learner, batch, device


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="conv4", choices=["sine", "conv4"])
    p.add_argument("--small", action="store_true", help="the CI smoke preset (few tasks)")
    p.add_argument("--algo", default="maml", choices=["maml", "fomaml"])
    p.add_argument("--strategy", default="auto", choices=["auto", "vmap", "loop", "bmm"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--fused", action="store_true", help="fused BatchNorm+ReLU+MaxPool tails (the bn_relu_pool op)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after 1 warm-up step)")
    p.add_argument("--cpu", action="store_true", help="stay on CPU even if CUDA is present")
    p.add_argument("--out", default="fastmeta_trace.json", help="torch.profiler Chrome trace (CPU path)")
    p.add_argument("--top", type=int, default=15, help="operators to print (CPU path)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps: expected >= 1")

    wl, learner, batch, device = build(args)
    learner.step(batch)  # warm-up: strategy choice (auto), allocator, oneDNN primitive caches
    print(f"{wl.title}: strategy {learner.chosen_strategy} ({learner.strategy_reason}), device {device}")

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        for _ in range(args.steps):
            learner.step(batch)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(f"profiled {args.steps} steps between cudaProfilerStart/Stop "
              "(run under nsys profile --capture-range=cudaProfilerApi)")
        return 0

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            learner.step(batch)
    prof.export_chrome_trace(args.out)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.top))
    print(f"wrote {args.out} ({args.steps} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
