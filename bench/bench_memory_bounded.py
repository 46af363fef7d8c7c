"""Memory-bounded second-order MAML (``MAML(recompute=True)``, docs/memory.md) against the default
mode: peak memory and step time, as ratios, on Conv-4 84x84 (hidden 32) and ResNet-12.

    python bench/bench_memory_bounded.py                 # both models, 1 and 5 inner steps
    python bench/bench_memory_bounded.py --smoke         # tiny shapes, one round: does it run?
    python bench/bench_memory_bounded.py --models conv4 --steps 5 --rounds 5 --json out.json

The issue's targets (5 inner steps, both models): peak memory <= 0.5x the default's, time <= 1.4x.

Memory is measured three ways, each named in the output:

* ``saved``: the peak of bytes autograd holds as saved tensors during one meta-gradient (distinct
  storages, counted by ``saved_tensors_hooks``: deterministic, the same measure as
  tests/test_recompute.py). The recompute mode also keeps the inner iterates ``K x [T, D]``
  outside autograd; they are added to its peak (``+iterates``) so the ratio is fair.
* ``rss``: growth of the resident set over two steps in a fresh process per configuration
  (``bench/memory.py``'s ``step_peak_rss``: VmHWM after clear_refs, Linux). Includes the
  allocator's slack and every other tensor; CPU only. (``tracemalloc`` sees none of torch's
  allocations, so it is not used.)
* ``cuda``: ``torch.cuda.max_memory_allocated`` above the memory allocated before the step (GPU).

Time: the two modes' steps interleaved round by round (``timing.time_interleaved``), minimum over
rounds. Each configuration first checks once that both modes return the same meta-gradient.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]  # timing/memory; the test's byte counter

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fastmeta  # noqa: E402
from fastmeta.evaluation import Evaluator  # noqa: E402
from fastmeta.params import ParamLayout  # noqa: E402
from fastmeta.tasks import TaskBatch  # noqa: E402

TARGET_MEMORY, TARGET_TIME = 0.5, 1.4


# ------------------------------------------------------------------ models (fastmeta's if present)
def build(name: str, a) -> nn.Module:
    if name == "conv4":
        return fastmeta.Conv4(a.ways, in_channels=3, hidden=a.hidden, image_size=a.image)
    return fastmeta.ResNet12(a.ways, in_channels=3, widths=tuple(a.widths))


def make_batch(a, device) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    n_s, n_q = a.ways * a.shots, a.ways * a.queries
    x = torch.randn(a.tasks, n_s + n_q, 3, a.image, a.image, generator=g)
    ys = torch.arange(a.ways).repeat_interleave(a.shots).expand(a.tasks, -1).contiguous()
    yq = torch.arange(a.ways).repeat_interleave(a.queries).expand(a.tasks, -1).contiguous()
    return TaskBatch(x[:, :n_s], ys, x[:, n_s:], yq, ways=a.ways).to(device)


def setup(name: str, steps: int, recompute: bool, a):
    """``run() -> MetaResult`` of one configuration, and its layout."""
    torch.manual_seed(0)
    device = torch.device(a.device)
    model = build(name, a).to(device)
    batch = make_batch(a, device)
    layout = ParamLayout(model)
    ev = Evaluator(model, layout, F.cross_entropy, a.strategy)
    algo = fastmeta.MAML(a.inner_lr, steps, recompute=recompute)
    theta = layout.flatten(model)
    return (lambda: algo.meta_grad(ev, layout, theta, batch)), layout


# ------------------------------------------------------------------ measures
def saved_peak(run) -> int:
    from test_recompute import SavedBytes  # the test's counter: the two never drift

    counter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        run()
    return counter.peak


def cuda_peak(run, device) -> int:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def rss_growth(name: str, steps: int, recompute: bool, a):
    """Step RSS growth (MiB) measured in a fresh process (see the module docstring), or None."""
    cmd = [sys.executable, __file__, "--child-rss", name, str(steps), str(int(recompute))] + a.passthrough
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=a.rss_timeout, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])["step_growth_mib"]
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError):
        return None


def measure(name: str, steps: int, a) -> dict:
    from timing import summary, time_interleaved

    run_d, layout = setup(name, steps, False, a)
    run_r, _ = setup(name, steps, True, a)
    gd, gr = run_d().grad, run_r().grad
    err = float((gr - gd).norm() / gd.norm())
    if not err < 1e-4:  # float32: a wrong chain is off by far more (tests check float64 to 1e-9)
        raise AssertionError(f"{name} K={steps}: recompute meta-gradient differs from the default's by {err:.3g}")
    iterates = steps * a.tasks * layout.D * gd.element_size()
    if a.strategy == "loop":
        iterates //= a.tasks  # one task per chunk
    row = dict(model=name, steps=steps, grad_rel_err=err, D=layout.D, iterates_mib=iterates / 2 ** 20)
    sd, sr = saved_peak(run_d), saved_peak(run_r)
    row.update(saved_default_mib=sd / 2 ** 20, saved_recompute_mib=(sr + iterates) / 2 ** 20,
               saved_ratio=(sr + iterates) / sd)
    if a.device.startswith("cuda"):
        dev = torch.device(a.device)
        cd, cr = cuda_peak(run_d, dev), cuda_peak(run_r, dev)
        row.update(cuda_default_mib=cd / 2 ** 20, cuda_recompute_mib=cr / 2 ** 20, cuda_ratio=cr / cd)
    elif a.rss:
        rd, rr = rss_growth(name, steps, False, a), rss_growth(name, steps, True, a)
        row.update(rss_default_mib=rd, rss_recompute_mib=rr, rss_ratio=rr / rd if rd and rr is not None else None)
    sync = (lambda: torch.cuda.synchronize(a.device)) if a.device.startswith("cuda") else (lambda: None)
    times = time_interleaved({"default": lambda: (run_d(), sync()), "recompute": lambda: (run_r(), sync())},
                             rounds=a.rounds)
    td, tr = summary(times["default"]), summary(times["recompute"])
    row.update(time_default_s=td, time_recompute_s=tr, time_ratio=tr / td)
    return row


def report(rows: list[dict]) -> bool:
    mem_keys = [k for k in ("saved_ratio", "rss_ratio", "cuda_ratio") if any(r.get(k) is not None for r in rows)]
    head = f"{'model':9} {'K':>2} " + " ".join(f"{k[:-6] + ' mem':>10}" for k in mem_keys) + \
        f" {'time':>6}  {'default s':>9} {'recomp s':>9} {'saved MiB def/rec':>18} {'grad err':>9}"
    print(head)
    ok = True
    for r in rows:
        mems = " ".join(f"{r[k]:>9.2f}x" if r.get(k) is not None else f"{'n/a':>10}" for k in mem_keys)
        print(f"{r['model']:9} {r['steps']:>2} {mems} {r['time_ratio']:>5.2f}x  {r['time_default_s']:>9.3f} "
              f"{r['time_recompute_s']:>9.3f} {r['saved_default_mib']:>8.1f}/{r['saved_recompute_mib']:<9.1f} "
              f"{r['grad_rel_err']:>9.1e}")
        if r["steps"] == 5:
            mem = max(r[k] for k in mem_keys if r.get(k) is not None)
            hit = mem <= TARGET_MEMORY and r["time_ratio"] <= TARGET_TIME
            ok &= hit
            print(f"   target K=5 ({r['model']}): memory {mem:.2f}x <= {TARGET_MEMORY} and time "
                  f"{r['time_ratio']:.2f}x <= {TARGET_TIME}: {'PASS' if hit else 'MISS'}")
    return ok


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="conv4,resnet12")
    p.add_argument("--steps", default="1,5", help="inner step counts, comma-separated")
    p.add_argument("--tasks", type=int, default=2, help="meta-batch size")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--queries", type=int, default=15, help="query samples per class")
    p.add_argument("--image", type=int, default=84)
    p.add_argument("--hidden", type=int, default=32, help="Conv-4 channels")
    p.add_argument("--widths", type=int, nargs=4, default=[64, 160, 320, 640], help="ResNet-12 block widths")
    p.add_argument("--inner-lr", type=float, default=0.01)
    p.add_argument("--strategy", default="loop", choices=["loop", "vmap"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-rss", dest="rss", action="store_false", help="skip the per-process RSS measure")
    p.add_argument("--rss-timeout", type=float, default=1800)
    p.add_argument("--smoke", action="store_true", help="tiny shapes and one round (checks that it runs)")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--child-rss", nargs=3, default=None, metavar=("MODEL", "K", "RECOMPUTE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke:
        a.tasks, a.ways, a.shots, a.queries, a.image, a.hidden, a.rounds = 2, 3, 1, 2, 16, 4, 1
        a.widths = [4, 4, 8, 8]
    # The shape options a child process needs to rebuild the same configuration.
    a.passthrough = ["--tasks", str(a.tasks), "--ways", str(a.ways), "--shots", str(a.shots), "--queries",
                     str(a.queries), "--image", str(a.image), "--hidden", str(a.hidden), "--inner-lr",
                     str(a.inner_lr), "--strategy", a.strategy, "--widths", *map(str, a.widths)]
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.child_rss is not None:
        from memory import step_peak_rss

        name, steps, recompute = a.child_rss
        run, _ = setup(name, int(steps), bool(int(recompute)), a)
        print(json.dumps(step_peak_rss(run)))
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {a.device}, strategy {a.strategy}, "
          f"{a.tasks} tasks of {a.ways}-way {a.shots}-shot {a.queries}-query {a.image}x{a.image}")
    rows = [measure(m, int(k), a) for m in a.models.split(",") for k in a.steps.split(",")]
    ok = report(rows)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0 if ok or a.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
