"""Fused ops (cpp backend) vs the same math in eager PyTorch vs a plain copy of the same bytes.

    pytest bench/bench_ops.py --benchmark-enable --benchmark-group-by=group   # pytest-benchmark tables
    python bench/bench_ops.py [rounds]                                        # prints the ratios

Shapes ``[T, D] = [16, 112_000]`` (Conv-4 Omniglot: D ~ 112k adapted parameters, meta-batch 16) and
``[64, 112_000]``, float32, CPU. The eager baseline is ``fastmeta.ops.reference`` (the tests' oracle,
so benchmark and tests never drift); the floor is ``dst.copy_(src)`` of a tensor sized so that the
copy reads + writes as many bytes as the op must minimally move (reads of every input once plus the
output write). ``copy_time / op_time`` is then the fraction of copy bandwidth the op reaches.
Every benchmark checks its output once, so a fast wrong kernel fails: cpp against the reference with
the tests' tolerance rule, eager against the op's formula written out here in float64. The copy
floor has nothing to check and is timed by the script only (pytest collects the cpp and eager rows).
Under ``--benchmark-disable`` (CI smoke) each case runs once.

The script measures two ways in the same rounds (impls interleaved round by round, so load from
other processes hits all alike; minimum over rounds):
- *steady*: the mean of back-to-back calls of one impl, which is what pytest-benchmark times too;
  at 16 rows every operand then sits in L3 (7 MB each; one L3 of this CPU is 32 MB).
- *single*: the first call of an impl right after the other two ran, so part of its operands were
  evicted by them; closer to a call inside a training step, and noisier.
The issue-3 targets are read off the steady columns (the pytest-benchmark methodology).

glibc serves an allocation above its dynamic mmap threshold (which never exceeds 32 MiB) with a fresh
``mmap`` that is faulted in page by page on every call: 14,000 faults (~10 ms) for a 57 MB tensor,
in some rounds and not in others, depending on what the process freed before; the copy floor writes
into a preallocated tensor and never pays it. That hit eager's temporaries hardest and inflated
ratios up to 30x, so the script pins the heap first (``mallopt``: no mmap below 1 GiB, no trimming;
``--glibc-default`` keeps glibc's behaviour). The fault column (median per call) shows what each
call still paid.
"""

from __future__ import annotations

import math
import resource
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastmeta import _extension, ops  # noqa: E402
from fastmeta.ops import reference  # noqa: E402
from fastmeta.testing import assert_oracle_close  # noqa: E402

SHAPES = [(16, 112_000), (64, 112_000)]
OPS = ["row_norm", "sam_perturb", "fd_hvp_points", "fd_hvp_combine", "swp_mask", "sds_select"]
IMPLS = ["cpp", "eager", "copy"]
# Collected as tests: the rows whose output is checked. The copy floor computes nothing to check; it
# is timed by the script (``measure``), beside the same cpp and eager calls.
TEST_IMPLS = ["cpp", "eager"]
# Elements (in units of T*D) the op must read + write at least: the copy moves the same bytes.
MIN_TRAFFIC = {"row_norm": 1, "sam_perturb": 2, "fd_hvp_points": 3, "fd_hvp_combine": 3, "swp_mask": 1,
               "sds_select": 2}
RADIUS, DELTA, LR, KEEP, RATIO = 0.05, 1e-2, 0.1, 0.5, 0.5


def make_inputs(op: str, t: int, d: int, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    rows = lambda: torch.randn(t, d, generator=gen)  # noqa: E731
    if op == "row_norm":
        return (rows(),)
    if op == "sam_perturb":
        return (torch.randn(d, generator=gen), rows())
    if op == "fd_hvp_points":
        return (torch.randn(d, generator=gen), rows())
    if op == "fd_hvp_combine":
        return (rows(), rows(), rows())
    if op == "swp_mask":
        return ()
    if op == "sds_select":
        return (rows(), rows())
    raise KeyError(op)


def public_call(op: str, t: int, d: int, args: tuple):
    """The public op (runs on whatever backend is forced around it)."""
    return {
        "row_norm": lambda: ops.row_norm(*args),
        "sam_perturb": lambda: ops.sam_perturb(args[0], args[1], RADIUS),
        "fd_hvp_points": lambda: ops.fd_hvp_points(args[0], args[1], DELTA),
        "fd_hvp_combine": lambda: ops.fd_hvp_combine(*args, DELTA, LR),
        "swp_mask": lambda: ops.swp_mask((t, d), KEEP, seed=1),
        "sds_select": lambda: ops.sds_select(args[0], args[1], RATIO),
    }[op]


def eager_call(op: str, t: int, d: int, args: tuple):
    """The same math as an eager PyTorch composition (the reference implementation)."""
    radius = torch.full((t,), RADIUS)
    delta = torch.full((t,), DELTA)
    k = ops.sds_k(d, RATIO)
    return {
        "row_norm": lambda: reference.row_norm(*args),
        "sam_perturb": lambda: reference.sam_perturb(args[0], args[1], radius, None, 1e-12, False),
        "fd_hvp_points": lambda: reference.fd_hvp_points(args[0], args[1], delta),
        "fd_hvp_combine": lambda: reference.fd_hvp_combine(*args, delta, LR, True),
        "swp_mask": lambda: reference.swp_mask(t, d, KEEP, 1, False, torch.device("cpu"), torch.float32),
        "sds_select": lambda: reference.sds_select(args[0], args[1], k),
    }[op]


def copy_call(op: str, t: int, d: int):
    n = MIN_TRAFFIC[op] * t * d // 2  # a copy of n elements reads n and writes n
    src, dst = torch.randn(n), torch.empty(n)
    return lambda: dst.copy_(src)


def check_output(op: str, t: int, d: int, args: tuple, out) -> None:
    """Once per benchmark: the cpp result against the reference with the tests' tolerance rule
    (``fastmeta.testing.assert_oracle_close``; sam_perturb on its perturbation ``out - theta``)."""
    if op == "swp_mask":
        check_mask(t, d, out)
        return
    with ops.use_backend("reference"):
        ref = public_call(op, t, d, args)()
        if op == "sds_select":
            assert torch.equal(out, ref)
            return
        oracle = public_call(op, t, d, tuple(a.double() for a in args))()
    # the ulps budgets of tests/ops: a norm summed in another order (row_norm), the difference
    # quotient's amplification of input rounding (fd_hvp_combine), one rounding of the output (else)
    ulps = {"row_norm": 16, "fd_hvp_combine": 64}.get(op, 2)
    assert_oracle_close(out, ref, oracle, ulps=ulps, base=args[0] if op == "sam_perturb" else None,
                        what=f"bench {op} {t}x{d}")


def check_mask(t: int, d: int, out) -> None:
    """An SWP mask: binary, kept at rate KEEP (6 sigma), and the same bits as the cpp kernel's (one
    counter-based generator on every backend, tests/ops/test_swp_mask.py)."""
    assert out.shape == (t, d) and set(out.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(out.mean()) - KEEP) < 6 * math.sqrt(KEEP * (1 - KEEP) / out.numel())
    with ops.use_backend("cpp"):
        assert torch.equal(out, ops.swp_mask((t, d), KEEP, seed=1))


def plain64(op: str, t: int, d: int, args: tuple) -> torch.Tensor:
    """The op's formula written out here in float64 (not ``fastmeta.ops.reference``, which the eager
    row *is*): the oracle of the eager row. sds_select: numpy's lexsort, an independent sort."""
    a = tuple(x.double() for x in args)
    if op == "row_norm":
        return a[0].square().sum(dim=1).sqrt()
    if op == "sam_perturb":  # Sharp-MAML eq. 11 per row: theta + r g / ||g||
        return a[0] + RADIUS * a[1] / a[1].square().sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
    if op == "fd_hvp_points":  # Fallah eq. 11's two points per task
        return torch.cat([a[0] + DELTA * a[1], a[0] - DELTA * a[1]])
    if op == "fd_hvp_combine":  # Fallah eqs. 10-11, mean over tasks
        return (a[0] - LR * (a[1] - a[2]) / (2 * DELTA)).mean(dim=0)
    if op == "sds_select":  # the k samples whose loss rises most (in the losses' dtype), ties to the lower index
        import numpy as np

        rise = (args[1] - args[0]).numpy()
        order = np.lexsort((np.broadcast_to(np.arange(d), rise.shape), -rise), axis=-1)
        return torch.from_numpy(order[:, :ops.sds_k(d, RATIO)].copy())
    raise KeyError(op)


# float32 units of roundoff the eager row may be off its float64 formula, relative to the largest
# entry of the compared quantity: a sum of D <= 112k squares in float32 (torch reduces in blocks and
# lanes: ~log2(D) = 17 units) then a division or sqrt, with a factor 2 of margin.
EAGER_UNITS = 40


def check_eager(op: str, t: int, d: int, args: tuple, out) -> None:
    """Once per benchmark: the eager row against :func:`plain64` (sam_perturb on its perturbation,
    which also carries one rounding of the stored ``theta + eps``)."""
    if op == "swp_mask":
        check_mask(t, d, out)
        return
    want = plain64(op, t, d, args)
    if op == "sds_select":
        assert torch.equal(out, want), f"bench eager {op} {t}x{d}: indices differ"
        return
    got = out.double()
    eps32 = torch.finfo(torch.float32).eps
    slack = 0.0
    if op == "sam_perturb":
        slack = eps32 * float(want.abs().max())  # the rounding of theta + eps to float32
        got, want = got - args[0].double(), want - args[0].double()
    tol = EAGER_UNITS * eps32 * float(want.abs().max()) + slack
    err = float((got - want).abs().max())
    assert err <= tol, f"bench eager {op} {t}x{d}: max error {err:.3e} > {tol:.3e} against the float64 formula"


def _skip_without_cpp():
    if not _extension.available():
        pytest.skip(f"cpp backend unavailable: {_extension.reason()}")


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{t}x{d}" for t, d in SHAPES])
@pytest.mark.parametrize("impl", TEST_IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_bench_ops(benchmark, op, impl, shape):
    _skip_without_cpp()
    t, d = shape
    args = make_inputs(op, t, d)
    benchmark.group = f"{op} {t}x{d}"
    benchmark.extra_info.update(backend=impl, shape=[t, d], dtype="float32", threads=torch.get_num_threads(),
                                torch=torch.__version__, min_traffic_bytes=MIN_TRAFFIC[op] * t * d * 4)
    if impl == "cpp":
        call = public_call(op, t, d, args)
        with ops.use_backend("cpp"):
            check_output(op, t, d, args, call())
            benchmark(call)
    else:
        call = eager_call(op, t, d, args)
        check_eager(op, t, d, args, call())
        benchmark(call)


def measure(rounds: int = 30, batch: int = 8) -> list[dict]:
    """Per round and impl: one *single* call timed alone, then ``batch`` back-to-back calls (*steady*)."""
    rows = []
    for t, d in SHAPES:
        for op in OPS:
            args = make_inputs(op, t, d)
            with ops.use_backend("cpp"):
                cpp = public_call(op, t, d, args)
                check_output(op, t, d, args, cpp())
                eager = eager_call(op, t, d, args)
                check_eager(op, t, d, args, eager())
                fns = {"cpp": cpp, "eager": eager, "copy": copy_call(op, t, d)}
                n = batch if op not in ("swp_mask", "sds_select") else 1  # RNG/sort-bound: tens of ms
                single = {k: [] for k in fns}
                steady = {k: [] for k in fns}
                faults = {k: [] for k in fns}
                for _ in range(3):
                    for f in fns.values():
                        f()
                for _ in range(rounds):
                    for k, f in fns.items():
                        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                        t0 = time.perf_counter()
                        f()
                        t1 = time.perf_counter()
                        for _ in range(n):
                            f()
                        t2 = time.perf_counter()
                        single[k].append(t1 - t0)
                        steady[k].append((t2 - t1) / n)
                        faults[k].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / (n + 1))
            st = {k: min(v) for k, v in steady.items()}
            si = {k: min(v) for k, v in single.items()}
            rows.append(dict(op=op, shape=f"{t}x{d}", **{f"{k}_ms": st[k] * 1e3 for k in st},
                             **{f"{k}_single_ms": si[k] * 1e3 for k in si},
                             cpp_faults=statistics.median(faults["cpp"]), eager_faults=statistics.median(faults["eager"]),
                             speedup=st["eager"] / st["cpp"], bandwidth=st["copy"] / st["cpp"],
                             single_speedup=si["eager"] / si["cpp"], single_bandwidth=si["copy"] / si["cpp"],
                             gbps=MIN_TRAFFIC[op] * t * d * 4 / st["cpp"] / 1e9))
    return rows


def pin_heap() -> bool:
    """glibc: serve every allocation below 1 GiB from the heap and never trim it (see the module doc)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))  # a C int


def main() -> None:
    if not _extension.available():
        sys.exit(f"cpp backend unavailable: {_extension.reason()}")
    args = [a for a in sys.argv[1:] if a != "--glibc-default"]
    pinned = "--glibc-default" not in sys.argv and pin_heap()
    print(f"glibc heap {'pinned (no mmap below 1 GiB, no trim)' if pinned else 'as glibc defaults'}")
    rounds = int(args[0]) if args else 30
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32; minimum over {rounds} "
          "interleaved rounds; steady = back-to-back calls, single = first call after the other impls")
    print(f"{'op':<16}{'shape':<11}{'cpp ms':>9}{'eager ms':>10}{'copy ms':>9}{'eager/cpp':>11}{'copy/cpp':>10}"
          f"{'cpp GB/s':>10}{'single: eager/cpp':>19}{'copy/cpp':>10}{'faults cpp/eager':>18}")
    for r in measure(rounds):
        print(f"{r['op']:<16}{r['shape']:<11}{r['cpp_ms']:>9.3f}{r['eager_ms']:>10.3f}{r['copy_ms']:>9.3f}"
              f"{r['speedup']:>10.2f}x{r['bandwidth']:>10.2f}{r['gbps']:>10.1f}"
              f"{r['single_speedup']:>18.2f}x{r['single_bandwidth']:>10.2f}"
              f"{r['cpp_faults']:>10.1f}/{r['eager_faults']:<7.1f}")


if __name__ == "__main__":
    main()
