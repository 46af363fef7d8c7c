"""Validate fastmeta's GPU path end to end, in one run of a few minutes on one GPU (docs/gpu.md).

    python bench/gpu_check.py --out gpu_check.json             # on a machine with a CUDA GPU
    python bench/gpu_check.py --cpu-smoke --out smoke.json     # the same checks on CPU tensors (CI)

Checks, each printed as PASS / FAIL / SKIP (with the reason) and written to the JSON:

* environment: torch, CUDA, cuDNN, triton, the device, its compute capability, the build record
  (nvcc's CUDA version beside torch's) and ``python -m fastmeta.info``;
* every op x {triton, cuda} against the reference backend over the shape grid of the op tests
  (``fastmeta.testing.row_cases``: T = 1, 3, 8; D straddling the block sizes; zero rows; strided
  inputs; float32 and float64) plus the GPU block sizes, a large D (70M: more blocks than grid
  axis 1 holds), a large T (70,000 rows: more than grid axis y holds) and T*D > 2^31;
* float64 precision: Python float arguments must reach the kernel as doubles;
* the current stream: ops issued inside ``torch.cuda.stream(s)`` run on ``s`` (their input is
  produced on ``s`` behind a busy-wait, so a kernel on another stream reads it too early);
* ``torch.autograd.gradcheck`` and ``torch.library.opcheck`` on the device;
* ``torch.compile(fullgraph=True)`` through the public ops;
* the whole ``MetaLearner.step`` on the device for MAML (1 and 2 inner steps), FO-MAML,
  Sharp-MAML with SDS and with SWP, and HF-MAML, under every strategy the model qualifies for
  (sine MLP: loop, vmap, bmm; Conv-4: loop, vmap), per backend, with float64 meta-gradients equal
  to the CPU's (reference backend) to 1e-7 relative; ``strategy="auto"``; ``fused=True`` (a CPU
  speed mode) stepping aside on the device with the same result as unfused;
* ``cuda:1`` while the current device is 0 (when two GPUs exist);
* timings: each op against eager PyTorch (the reference backend), and the Conv-4 MAML step against
  the plain loop, torchopt and higher (those installed), with CUDA events after a warm-up.

``--cpu-smoke`` runs the same code on CPU tensors with small sizes and the backends a CPU has
(cpp, and triton under ``TRITON_INTERPRET=1``, which it sets); the checks that need CUDA SKIP with
the reason. ``tests/test_gpu_check.py`` runs it in CI so this script cannot rot. Exit status: 1 if
any check FAILed, else 0.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

if __name__ == "__main__" and "--cpu-smoke" in sys.argv[1:]:
    # Triton reads this when its kernels are defined, i.e. when it is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import fastmeta  # noqa: E402
from fastmeta import ops  # noqa: E402
from fastmeta.algorithms.hfmaml import _full_fp32  # noqa: E402  (TF32 off, restored after; one definition)
from fastmeta.evaluation import candidate_strategies  # noqa: E402
from fastmeta.tasks import TaskBatch  # noqa: E402
from fastmeta.testing import RowCase, as_float64, assert_oracle_close, first_mismatch, row_cases  # noqa: E402

HERE = Path(__file__).resolve().parent
ROW_OPS = ("row_norm", "sam_perturb", "fd_hvp_points", "fd_hvp_combine", "swp_mask", "sds_select")
STEP_RTOL = 1e-7  # float64 meta-gradient on the device vs on the CPU, relative (L2)


class Skip(Exception):
    """A check that cannot run here; the message says why."""


# ---------------------------------------------------------------------------------------- setup
@dataclass
class Config:
    """What one run checks: the device, the backends under test and the sizes."""

    smoke: bool
    device: torch.device
    backends: tuple[str, ...]
    cases: list[RowCase]
    large_d: tuple[int, int]          # (T, D) with D past grid axis 1 (GPU: 70M)
    large_t: tuple[int, int]          # (T, D) with T past grid axis y (GPU: 70,000)
    sds_n: tuple[int, ...]            # samples per task for sds_select (multi-tile past 64)
    timing_shape: tuple[int, int]
    timing_reps: int
    conv_hidden: int
    only: Optional[str] = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self, device: Optional[torch.device] = None) -> None:
        if self.cuda:
            torch.cuda.synchronize(device or self.device)


def make_config(args) -> Config:
    if args.cpu_smoke:
        return Config(smoke=True, device=torch.device("cpu"), backends=("cpp", "triton"),
                      cases=row_cases(ts=(1, 3), ds=(1, 7, 1025)), large_d=(2, 70_000), large_t=(100, 8),
                      sds_n=(7, 65), timing_shape=(4, 4096), timing_reps=2, conv_hidden=8, only=args.only)
    device = torch.device(args.device)
    gpu_ds = (8191, 8192, 8193, 16385)  # around the GPU block sizes (1024 and 8192 elements)
    cases = row_cases() + [RowCase(t, d, dt) for t in (3,) for d in gpu_ds for dt in (torch.float32, torch.float64)]
    return Config(smoke=False, device=device, backends=("triton", "cuda"), cases=cases,
                  large_d=(2, 70_000_000), large_t=(70_000, 8), sds_n=(1, 7, 63, 64, 65, 200, 1025, 5000),
                  timing_shape=(16, 1 << 20), timing_reps=20, conv_hidden=32, only=args.only)


# ---------------------------------------------------------------------------------------- results
@dataclass
class Result:
    name: str
    status: str
    detail: str
    seconds: float
    data: dict = field(default_factory=dict)
    traceback: str = ""


class Runner:
    """Runs checks one by one: an exception is that check's FAIL, never the end of the run. After
    each check on a GPU the device is synchronized inside it, so an asynchronous CUDA error is
    charged to the check that caused it. The JSON is rewritten after every check, so a crash
    leaves the results so far."""

    def __init__(self, cfg: Config, out: Optional[Path]):
        self.cfg, self.out = cfg, out
        self.results: list[Result] = []
        self.environment: dict = {}
        self.t0 = time.perf_counter()

    def check(self, name: str, fn: Callable[[], object], *, devices: tuple = ()) -> Optional[Result]:
        if self.cfg.only and self.cfg.only not in name:
            return None
        t0 = time.perf_counter()
        data, tb = {}, ""
        try:
            got = fn()
            for d in devices or ((self.cfg.device,) if self.cfg.cuda else ()):
                torch.cuda.synchronize(d)
            if isinstance(got, tuple):
                detail, data = got
            else:
                detail = "" if got is None else str(got)
            status = "PASS"
        except Skip as e:
            status, detail = "SKIP", str(e)
        except Exception as e:  # noqa: BLE001 - a failing check is reported, the run goes on
            status, detail = "FAIL", f"{type(e).__name__}: {e}"
            tb = traceback.format_exc(limit=8)
        dt = time.perf_counter() - t0
        r = Result(name, status, detail, round(dt, 3), data, tb)
        self.results.append(r)
        first = detail.strip().splitlines()[0] if detail.strip() else ""
        print(f"{status:<4}  {name}  ({dt:.1f} s)" + (f"  {first[:400]}" if first else ""), flush=True)
        self.write()
        return r

    def write(self) -> None:
        if self.out is None:
            return
        counts = {s: sum(r.status == s for r in self.results) for s in ("PASS", "FAIL", "SKIP")}
        doc = {
            "mode": "cpu-smoke" if self.cfg.smoke else "gpu",
            "device": str(self.cfg.device),
            "backends": list(self.cfg.backends),
            "environment": self.environment,
            "summary": counts,
            "wall_seconds": round(time.perf_counter() - self.t0, 1),
            "checks": [r.__dict__ for r in self.results],
        }
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(self.out.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        tmp.replace(self.out)


# ---------------------------------------------------------------------------------------- environment
def environment(cfg: Config) -> dict:
    from fastmeta import _extension
    from fastmeta.info import report

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _dist_version("triton"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
        "FASTMETA_BACKEND": os.environ.get("FASTMETA_BACKEND", ""),
        "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "nvcc_version": _extension.nvcc_version(),
        "build_record": _extension.build_status(),
    }
    if torch.cuda.is_available():
        env["devices"] = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            env["devices"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                   "memory_gib": round(p.total_memory / 2**30, 1),
                                   "multiprocessors": p.multi_processor_count})
        try:
            env["driver"] = torch._C._cuda_getDriverVersion()
        except Exception:  # noqa: BLE001 - informational only
            pass
    env["fastmeta_info"] = report()
    return env


def _dist_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return "not installed"


def check_environment(cfg: Config, runner: Runner):
    env = runner.environment = environment(cfg)
    lines = [f"torch {env['torch']} (CUDA {env['torch_cuda']}, cuDNN {env['cudnn']}), triton {env['triton']}, "
             f"nvcc {env['nvcc_version'] or 'not used'}"]
    for d in env.get("devices", []):
        lines.append(f"cuda:{d['index']} {d['name']}, capability {d['capability']}, {d['memory_gib']} GiB")
    print("\n".join("      " + ln for ln in lines))
    print("\n".join("      | " + ln for ln in env["fastmeta_info"].splitlines()))
    if cfg.smoke:
        return f"CPU smoke: {lines[0]}", {}
    problems = []
    if not torch.cuda.is_available():
        problems.append("torch sees no CUDA device")
    if env["TRITON_INTERPRET"] == "1":
        problems.append("TRITON_INTERPRET=1 is set: Triton would run on CPU tensors only; unset it")
    if problems:
        raise RuntimeError("; ".join(problems))
    return "; ".join(lines), {}


def check_backends_available(cfg: Config):
    # On a GPU every backend under test must run every row op; say why not, per cell.
    missing = {f"{op}/{b}": ops.unavailable_reason(op, b, cfg.device) for op in ROW_OPS for b in cfg.backends}
    missing = {k: v for k, v in missing.items() if v is not None}
    if missing and not cfg.smoke:
        raise RuntimeError("; ".join(f"{k}: {v}" for k, v in missing.items()))
    if missing:
        raise Skip("; ".join(f"{k}: {v}" for k, v in missing.items()))
    return f"{', '.join(cfg.backends)} run all of {', '.join(ROW_OPS)} on {cfg.device.type}"


def _require(cfg: Config, op: str, backend: str) -> None:
    reason = ops.unavailable_reason(op, backend, cfg.device)
    if reason is not None:
        if cfg.smoke:
            raise Skip(f"{backend}/{op}: {reason}")
        raise RuntimeError(f"{backend} cannot run {op} on {cfg.device}: {reason}")


# ---------------------------------------------------------------------------------------- op cases
def _rows(t: int, d: int, dtype, device, seed: int, zero_row=False, noncontiguous=False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if noncontiguous:  # a transposed view, made on the device so that it stays strided
        x = torch.randn(d, t, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).T
    else:
        x = torch.randn(t, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    if zero_row:
        x[0] = 0
    return x


def _rows_fast(t: int, d: int, dtype, device, seed: int) -> torch.Tensor:
    # Large cases: generated on the device (a CPU randn of 140M values would dominate the run).
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(t, d, generator=g, device=device, dtype=dtype)


def _vector(d: int, dtype, device, seed: int, noncontiguous=False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if noncontiguous:
        return torch.randn(2 * d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)[::2]
    return torch.randn(d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


@dataclass
class Variant:
    """One call of an op: ``fn(*inputs)``; ``exact``: the result must equal the reference bit for bit."""

    label: str
    fn: Callable
    inputs: tuple
    exact: bool = False
    ulps: float = 16.0
    base: Optional[int] = None  # index of the input the compared quantity is taken against (sam_perturb: theta)


def op_variants(op: str, t: int, d: int, dtype, device, zero_row=False, noncontiguous=False, large=False):
    make = (lambda s: _rows_fast(t, d, dtype, device, s)) if large else (
        lambda s: _rows(t, d, dtype, device, s, zero_row and s == 0, noncontiguous))
    if op == "row_norm":
        return [Variant("", ops.row_norm, (make(0),))]
    if op == "sam_perturb":
        g = make(0)
        theta = _vector(d, dtype, device, 1, noncontiguous) if not large else make(1)[0]
        radii = torch.linspace(0.01, 0.1, t, dtype=dtype, device=device)
        mask = (make(2) > 0).to(dtype)
        # Compared on the perturbation (out - theta), the quantity that matters (fastmeta.testing's rule).
        return [Variant("theta[D]", lambda th, g: ops.sam_perturb(th, g, 0.05), (theta, g), ulps=2, base=0),
                Variant("theta[T,D] radii[T]", lambda th, g, r: ops.sam_perturb(th, g, r), (make(3), g, radii),
                        ulps=2, base=0),
                Variant("mask", lambda th, g, m: ops.sam_perturb(th, g, 0.05, mask=m), (theta, g, mask), ulps=2,
                        base=0),
                Variant("global_norm", lambda th, g: ops.sam_perturb(th, g, 0.05, global_norm=True), (theta, g),
                        ulps=2, base=0)]
    if op == "fd_hvp_points":
        v = make(0)
        theta = _vector(d, dtype, device, 1, noncontiguous) if not large else make(1)[0]
        delta = torch.linspace(1e-3, 1e-1, t, dtype=dtype, device=device)
        return [Variant("theta[D] delta[T]", ops.fd_hvp_points, (theta, v, delta)),
                Variant("theta[T,D] delta=0.01", lambda th, v: ops.fd_hvp_points(th, v, 0.01), (make(2), v))]
    if op == "fd_hvp_combine":
        g_o, g_p, g_m = make(0), make(1), make(2)
        delta = torch.linspace(1e-2, 1e-1, t, dtype=dtype, device=device)
        # the difference quotient amplifies input rounding by inner_lr / (2 delta) (= 20 here)
        return [Variant(f"reduce={r}", lambda a, b, c, dl, r=r: ops.fd_hvp_combine(a, b, c, dl, 0.4, r),
                        (g_o, g_p, g_m, delta), ulps=64) for r in ("mean", "none")]
    if op == "swp_mask":
        segs = [d] if d < 2 else [d // 2, d - d // 2]
        return [Variant("element", lambda: ops.swp_mask((t, d), 0.7, seed=1234 + d, device=device, dtype=dtype), (),
                        exact=True),
                Variant("tensor rescale", lambda: ops.swp_mask((t, d), 0.3, seed=99, mode="tensor", segments=segs,
                                                               rescale=True, device=device, dtype=dtype), (),
                        exact=True)]
    if op == "sds_select":
        clean = make(0)
        pert = (clean + make(1).abs()).round(decimals=1)  # ties: the lower index must win everywhere
        return [Variant("ratio=0.3", lambda c, p: ops.sds_select(c, p, 0.3), (clean.round(decimals=1), pert),
                        exact=True),
                Variant("ratio=1", lambda c, p: ops.sds_select(c, p, 1.0), (clean, pert), exact=True)]
    raise ValueError(op)


def compare(backend: str, v: Variant, what: str) -> None:
    with ops.use_backend(backend):
        out = v.fn(*v.inputs)
    with ops.use_backend("reference"):
        ref = v.fn(*v.inputs)
        if v.exact:
            assert out.shape == ref.shape and out.dtype == ref.dtype, (
                f"{what}: {tuple(out.shape)} {out.dtype} != reference {tuple(ref.shape)} {ref.dtype}")
            if not torch.equal(out, ref):
                raise AssertionError(f"{what}: differs from the reference; {first_mismatch(out, ref, 0.0)}")
            return
        oracle = v.fn(*as_float64(*v.inputs))
    assert_oracle_close(out, ref, oracle, ulps=v.ulps, what=what,
                        base=None if v.base is None else v.inputs[v.base])


def check_op(cfg: Config, op: str, backend: str):
    _require(cfg, op, backend)
    n = 0
    if op == "sds_select":
        for t in sorted({c.t for c in cfg.cases}):
            for n_samples in cfg.sds_n:
                for dtype in (torch.float32, torch.float64):
                    for v in op_variants(op, t, n_samples, dtype, cfg.device):
                        compare(backend, v, f"{op} {backend} T{t}-N{n_samples}-{dtype} {v.label}")
                        n += 1
        return f"{n} calls equal to the reference (T x N x dtype x ratio, ties included)"
    for c in cfg.cases:
        for v in op_variants(op, c.t, c.d, c.dtype, cfg.device, c.zero_row, c.noncontiguous):
            compare(backend, v, f"{op} {backend} {c.id} {v.label}")
            n += 1
    return f"{n} calls within the tolerance rule over {len(cfg.cases)} shapes"


def check_op_large(cfg: Config, op: str, backend: str, shape: tuple[int, int]):
    _require(cfg, op, backend)
    t, d = shape
    n = 0
    for v in op_variants(op, t, d, torch.float32, cfg.device, large=True):
        compare(backend, v, f"{op} {backend} T{t}-D{d} {v.label}")
        n += 1
    _free(cfg)
    return f"T={t}, D={d}: {n} call{'s' if n != 1 else ''} matched the reference"


def check_huge_index(cfg: Config, backend: str):
    # T*D > 2^31 elements: index arithmetic in int32 wraps (row t starts at t*D). Every row holds
    # values near 1 + t/T, so reading another row (or out of bounds) shows; float32 inputs of
    # ~8.6 GB each, compared chunk by chunk with a float64 oracle.
    # The CPU smoke run checks the same arithmetic at T=100, D=64.
    for op in ("row_norm", "fd_hvp_combine"):
        _require(cfg, op, backend)
    if cfg.smoke:
        t, d = 100, 64
    else:
        free, _ = torch.cuda.mem_get_info(cfg.device)
        if free < 48 * 2**30:
            raise Skip(f"needs ~48 GiB of free device memory, {free / 2**30:.0f} GiB free")
        t, d = 65_600, 32_768  # 2,149,580,800 elements > 2^31; the last 64 rows lie past it
    lr = 1e-3
    level = (1 + torch.arange(t, device=cfg.device, dtype=torch.float32) / t)[:, None]
    g_o = _rows_fast(t, d, torch.float32, cfg.device, 0).mul_(0.01).add_(level)
    g_p, g_m = (_rows_fast(t, d, torch.float32, cfg.device, s) for s in (1, 2))
    delta = torch.linspace(1e-2, 1e-1, t, device=cfg.device)
    with ops.use_backend(backend):
        norms = ops.row_norm(g_o)
        mean = ops.fd_hvp_combine(g_o, g_p, g_m, delta, lr, "mean")
        last = ops.fd_hvp_combine(g_o, g_p, g_m, delta, lr, "none")[-128:].double()
    want_norms = torch.empty(t, dtype=torch.float64, device=cfg.device)
    want_mean = torch.zeros(d, dtype=torch.float64, device=cfg.device)
    for s in range(0, t, 4096):
        sl = slice(s, min(t, s + 4096))
        a, b, c = g_o[sl].double(), g_p[sl].double(), g_m[sl].double()
        terms = a - lr * (b - c) / (2 * delta[sl].double()[:, None])
        want_norms[sl] = torch.linalg.vector_norm(a, dim=1)
        want_mean += terms.sum(0)
        if sl.stop == t:
            want_last = terms[-128:]
    want_mean /= t
    errors = {
        "row_norm": float(((norms.double() - want_norms).abs() / want_norms).max()),
        "fd_hvp_combine none, last 128 rows": float((last - want_last).abs().max() / want_last.abs().max()),
        "fd_hvp_combine mean": float((mean.double() - want_mean).abs().max() / want_mean.abs().max()),
    }
    bounds = {"row_norm": 1e-5, "fd_hvp_combine none, last 128 rows": 1e-6, "fd_hvp_combine mean": 1e-4}
    del g_o, g_p, g_m, last
    _free(cfg)
    bad = {k: v for k, v in errors.items() if not v <= bounds[k]}
    if bad:
        raise AssertionError(f"T={t}, D={d}: relative errors {bad} exceed {bounds}: rows past 2^31 elements are read "
                             f"wrong")
    return (f"T={t}, D={d} (T*D = {t * d:,}{', smoke size' if cfg.smoke else ''}): relative errors "
            + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()), {"errors": errors})


def _free(cfg: Config) -> None:
    if cfg.cuda:
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------- precision
def check_float64_scalars(cfg: Config, backend: str):
    # A Python float that reaches a kernel as float32 (Triton types untyped float arguments as fp32
    # on a GPU) costs ~1e-8 relative: float64 results must be as exact as the reference's.
    for op in ("fd_hvp_combine", "sam_perturb", "fd_hvp_points", "swp_mask"):
        _require(cfg, op, backend)
    dev, f64 = cfg.device, torch.float64
    t, d = 3, 1025
    g_o, g_p, g_m = (_rows(t, d, f64, dev, s) for s in (0, 1, 2))
    theta = _vector(d, f64, dev, 3)
    calls = {
        "fd_hvp_combine(inner_lr=0.1, delta=1e-3)": lambda: ops.fd_hvp_combine(g_o, g_p, g_m, 1e-3, 0.1, "none"),
        "sam_perturb(radius=0.1)": lambda: ops.sam_perturb(theta, g_o, 0.1),
        "fd_hvp_points(delta=0.1)": lambda: ops.fd_hvp_points(theta, g_o, 0.1),
    }
    worst = {}
    for label, fn in calls.items():
        with ops.use_backend(backend):
            out = fn()
        with ops.use_backend("reference"):
            ref = fn()
        err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
        worst[label] = err
        if err > 1e-13:
            raise AssertionError(f"{label}: float64 relative error {err:.2e} > 1e-13 (a float32-rounded argument "
                                 f"gives ~1e-8)")
    with ops.use_backend(backend):
        mask = ops.swp_mask((t, d), 0.3, seed=5, rescale=True, device=dev, dtype=f64)
    kept = mask[mask != 0]
    if kept.numel() and not bool((kept == 1 / 0.3).all()):
        raise AssertionError(f"swp_mask float64 rescale: kept value {kept[0].item()!r} != 1/0.3 = {1 / 0.3!r}")
    return ", ".join(f"{k}: {v:.0e}" for k, v in worst.items()) + "; swp_mask 1/0.3 exact"


# ---------------------------------------------------------------------------------------- streams
def check_current_stream(cfg: Config, backend: str):
    if not cfg.cuda:
        raise Skip("needs a CUDA device (streams)")
    for op in ROW_OPS:
        _require(cfg, op, backend)
    dev = cfg.device
    t, d = 8, 1 << 22
    src = _rows_fast(t, d, torch.float32, dev, 0)
    theta = src[1].clone()
    delta = torch.full((t,), 0.01, device=dev)
    calls = {
        "row_norm": lambda g: ops.row_norm(g),
        "sam_perturb": lambda g: ops.sam_perturb(theta, g, 0.05),
        "fd_hvp_points": lambda g: ops.fd_hvp_points(theta, g, delta),
        "fd_hvp_combine": lambda g: ops.fd_hvp_combine(g, g * 0.5, g * 0.25, delta, 0.4, "none"),
        "sds_select": lambda g: ops.sds_select(g[:, :4096], g[:, 4096:8192], 0.3),
        "swp_mask": lambda g: ops.swp_mask((t, d), 0.5, seed=7, device=dev) * (g * 0 + 1),
    }
    s = torch.cuda.Stream(dev)
    with torch.cuda.device(dev):
        for i, (name, fn) in enumerate(calls.items()):
            torch.cuda.synchronize(dev)
            scale = 2.0 + i  # a recycled block never already holds this input
            with torch.cuda.stream(s):
                # The input is written on s behind ~50 ms of busy-waiting: a kernel launched on
                # another stream would read it before it is there.
                torch.cuda._sleep(100_000_000)
                g = src * scale
                with ops.use_backend(backend):
                    out = fn(g)
                out = out.clone()
            s.synchronize()
            with ops.use_backend("reference"):
                want = fn(src * scale)
            if out.dtype.is_floating_point:
                ok = torch.allclose(out, want, rtol=1e-4, atol=1e-5)
            else:
                ok = torch.equal(out, want)
            if not ok:
                raise AssertionError(f"{name} inside torch.cuda.stream(s): wrong result after s.synchronize() "
                                     f"(the kernel did not run on the current stream)")
            del g, out
    return f"{', '.join(calls)} ran on the current stream"


# ---------------------------------------------------------------------------------------- autograd / opcheck
def check_gradcheck(cfg: Config, backend: str):
    for op in ROW_OPS:
        _require(cfg, op, backend)
    dev, f64 = cfg.device, torch.float64
    t, d = 3, 5
    g = _rows(t, d, f64, dev, 0).requires_grad_()
    theta = _vector(d, f64, dev, 1).requires_grad_()
    v = _rows(t, d, f64, dev, 2).requires_grad_()
    delta = torch.tensor([0.1, 0.2, 0.3], dtype=f64, device=dev, requires_grad=True)
    g_o, g_p, g_m = (_rows(t, d, f64, dev, s).requires_grad_() for s in (3, 4, 5))
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(ops.row_norm, (g,))
        assert torch.autograd.gradcheck(lambda th: ops.sam_perturb(th, g.detach(), 0.3), (theta,))
        assert torch.autograd.gradcheck(ops.fd_hvp_points, (theta, v, delta))
        for reduce in ("mean", "none"):
            assert torch.autograd.gradcheck(lambda *a: ops.fd_hvp_combine(*a, 0.4, reduce), (g_o, g_p, g_m, delta))
        lib = torch.ops.fastmeta_ops
        leaf = lambda x: x.detach().clone().requires_grad_()  # noqa: E731
        torch.library.opcheck(lib.row_norm.default, (leaf(g),))
        torch.library.opcheck(lib.sam_perturb.default, (leaf(theta), g.detach(), torch.full((t,), 0.3, dtype=f64,
                                                                                              device=dev), None, 1e-12,
                                                        False))
        torch.library.opcheck(lib.fd_hvp_points.default, (leaf(theta), leaf(v), leaf(delta)))
        torch.library.opcheck(lib.fd_hvp_combine.default, (leaf(g_o), leaf(g_p), leaf(g_m), leaf(delta), 0.4, True))
        clean, pert = _rows(t, 7, torch.float32, dev, 6), _rows(t, 7, torch.float32, dev, 7)
        torch.library.opcheck(lib.sds_select.default, (clean, pert, 3))
        torch.library.opcheck(lib.swp_mask.default, (3, 10, 0.5, 4, False, dev, torch.float32))
    return "gradcheck (float64): row_norm, sam_perturb, fd_hvp_points, fd_hvp_combine; opcheck: all six ops"


def check_compile(cfg: Config):
    # One compiled function through three public ops. The smoke run compiles with aot_eager (graph
    # capture, fake tensors, no graph break: the part that concerns the ops) instead of inductor,
    # whose cold compile alone costs ~15 s on a CPU.
    def step(theta, g, g_o, g_p, g_m):
        perturbed = ops.sam_perturb(theta, g, 0.05)
        norms = ops.row_norm(perturbed)
        meta = ops.fd_hvp_combine(g_o, g_p, g_m, 1e-2, 0.1)
        return perturbed.sum(0) * 2 + meta, norms

    backend = "aot_eager" if cfg.smoke else "inductor"
    dev = cfg.device
    theta = _vector(33, torch.float32, dev, 0)
    rows = [_rows(4, 33, torch.float32, dev, s) for s in range(4)]
    rows[0][1] = 0
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    got = compiled(theta, *rows)
    with ops.use_backend("reference"):
        want = step(theta, *rows)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    chosen = {op: ops.resolve(op, dev) for op in ("sam_perturb", "row_norm", "fd_hvp_combine")}
    return f"fullgraph=True, backend={backend}; ops ran on {chosen}"


# ---------------------------------------------------------------------------------------- learner steps
def sine_batch(T=4, dtype=torch.float64) -> TaskBatch:
    from fastmeta.data import SinusoidTasks

    return SinusoidTasks(5, 5, seed=0, dtype=dtype).sample(T)


def conv_batch(T=2, ways=3, shots=1, queries=2, dtype=torch.float64) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    sx = torch.rand(T, ways * shots, 1, 28, 28, generator=g, dtype=torch.float64).to(dtype)
    qx = torch.rand(T, ways * queries, 1, 28, 28, generator=g, dtype=torch.float64).to(dtype)
    lab = torch.arange(ways)
    return TaskBatch(sx, lab.repeat_interleave(shots).expand(T, -1).contiguous(), qx,
                     lab.repeat_interleave(queries).expand(T, -1).contiguous(), ways=ways)


WORKLOADS = {
    # name: (model factory, loss, inner_lr, batch)
    "sine": (lambda cfg: fastmeta.SineMLP(), "mse", 0.01, sine_batch),
    "conv4": (lambda cfg: fastmeta.Conv4(3, hidden=cfg.conv_hidden), "cross_entropy", 0.4, conv_batch),
}


def algorithms(lr: float) -> dict[str, Callable[[], fastmeta.Algorithm]]:
    return {
        "maml-1": lambda: fastmeta.MAML(lr),
        "maml-2": lambda: fastmeta.MAML(lr, inner_steps=2),
        "fomaml": lambda: fastmeta.FOMAML(lr),
        "sharp-sds": lambda: fastmeta.SharpMAML(lr, alpha_low=0.05, alpha_up=0.05, sds_ratio=0.5, seed=0),
        "sharp-swp": lambda: fastmeta.SharpMAML(lr, alpha_low=0.05, alpha_up=0.05, swp_keep_prob=0.7, seed=0),
        "hfmaml": lambda: fastmeta.HFMAML(lr),
    }


def _model(cfg: Config, workload: str, device, dtype=torch.float64):
    torch.manual_seed(0)
    return WORKLOADS[workload][0](cfg).to(device=device, dtype=dtype)


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).detach().cpu()


def run_step(cfg: Config, workload: str, algo: str, strategy: str, device, backend: Optional[str], **kw):
    """One MetaLearner.step in float64 on ``device``; returns (flat .grad in parameter order, loss)."""
    _, loss, lr, batch_fn = WORKLOADS[workload]
    model = _model(cfg, workload, device)
    learner = fastmeta.MetaLearner(model, algorithms(lr)[algo](), loss_fn=loss, strategy=strategy, **kw)
    batch = batch_fn().to(device)
    if backend is None:
        res = learner.step(batch)
    else:
        with ops.use_backend(backend):
            res = learner.step(batch)
    return _grads(model), res.loss, learner


_CPU_ORACLE: dict = {}


def cpu_oracle(cfg: Config, workload: str, algo: str, strategy: str):
    key = (workload, algo, strategy)
    if key not in _CPU_ORACLE:
        _CPU_ORACLE[key] = run_step(cfg, workload, algo, strategy, torch.device("cpu"), "reference")[:2]
    return _CPU_ORACLE[key]


def check_step(cfg: Config, workload: str, algo: str, strategy: str, backend: str):
    for op in ROW_OPS:
        _require(cfg, op, backend)
    grad, loss, _ = run_step(cfg, workload, algo, strategy, cfg.device, backend)
    want, want_loss = cpu_oracle(cfg, workload, algo, strategy)
    rel = float((grad - want).norm() / want.norm().clamp_min(1e-300))
    if not (rel <= STEP_RTOL) or not math.isclose(loss, want_loss, rel_tol=1e-9, abs_tol=1e-12):
        raise AssertionError(f"float64 meta-gradient relative error {rel:.2e} (bound {STEP_RTOL:.0e}); loss {loss!r} "
                             f"vs CPU {want_loss!r}")
    return f"rel err vs CPU {rel:.1e}", {"rel_err": rel}


def check_auto(cfg: Config, workload: str):
    _, _, learner = run_step(cfg, workload, "maml-1", "auto", cfg.device, None)
    if learner.chosen_strategy not in candidate_strategies(learner.model):
        raise AssertionError(f"auto chose {learner.chosen_strategy!r}")
    return f"chose {learner.chosen_strategy}: {learner.strategy_reason}", {"timings_s": learner.strategy_timings}


def check_fused(cfg: Config):
    # fused=True is a CPU speed mode: on a GPU it must step aside and give the unfused result.
    plain, loss, _ = run_step(cfg, "conv4", "maml-1", "loop", cfg.device, None)
    fused, fused_loss, learner = run_step(cfg, "conv4", "maml-1", "loop", cfg.device, None, fused=True)
    rel = float((fused - plain).norm() / plain.norm())
    if not rel <= 1e-10:
        raise AssertionError(f"fused=True differs from fused=False by {rel:.2e} (float64)")
    if cfg.cuda:
        return f"same meta-gradient as unfused (rel {rel:.0e}): the fused blocks step aside on {cfg.device.type}"
    return f"same meta-gradient as unfused (rel {rel:.0e}): the fused C++ blocks ran (CPU)"


def check_second_device(cfg: Config, backend: str):
    if not cfg.cuda:
        raise Skip("needs CUDA devices")
    n = torch.cuda.device_count()
    if n < 2:
        raise Skip(f"needs two GPUs, found {n}")
    for op in ROW_OPS:
        _require(cfg, op, backend)
    other = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    n_calls = 0
    for op in ROW_OPS:
        for v in op_variants(op, 3, 1025, torch.float32, other):
            compare(backend, v, f"{op} {backend} on cuda:1 {v.label}")
            n_calls += 1
    for workload, algo in (("sine", "sharp-sds"), ("sine", "hfmaml"), ("conv4", "sharp-swp")):
        grad, _, _ = run_step(cfg, workload, algo, "vmap", other, backend)
        want, _ = cpu_oracle(cfg, workload, algo, "vmap")
        rel = float((grad - want).norm() / want.norm())
        if not rel <= STEP_RTOL:
            raise AssertionError(f"{workload} {algo} on cuda:1: relative error {rel:.2e}")
    if torch.cuda.current_device() != 0:
        raise AssertionError(f"the current device moved to {torch.cuda.current_device()}")
    return f"{n_calls} op calls and 3 learner steps on cuda:1 with the current device 0"


# ---------------------------------------------------------------------------------------- timings
class Clock:
    """Seconds per call: CUDA events on a GPU (after a warm-up), perf_counter on the CPU."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def time(self, fn: Callable, reps: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        if not self.cfg.cuda:
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts)
        self.cfg.sync()
        ts = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ts.append(start.elapsed_time(end) / 1e3)
        return statistics.median(ts)


def check_op_timings(cfg: Config):
    t, d = cfg.timing_shape
    clock = Clock(cfg)
    table, lines = {}, []
    for op in ROW_OPS:
        if op == "sds_select":
            variants = op_variants(op, t, 1024, torch.float32, cfg.device)[:1]
        else:
            variants = op_variants(op, t, d, torch.float32, cfg.device, large=True)[:1]
        v = variants[0]
        row = {}
        for backend in ("reference",) + cfg.backends:
            if ops.unavailable_reason(op, backend, cfg.device) is not None:
                continue
            with ops.use_backend(backend):
                row[backend] = clock.time(lambda: v.fn(*v.inputs), cfg.timing_reps)
        table[op] = row
        eager = row["reference"]
        lines.append(f"{op}: eager {eager * 1e3:.3f} ms, " + ", ".join(
            f"{b} {s * 1e3:.3f} ms ({eager / s:.2f}x)" for b, s in row.items() if b != "reference"))
    _free(cfg)
    for ln in lines:
        print("      " + ln)
    kind = "CUDA events, median" if cfg.cuda else "perf_counter on the CPU (smoke: sizes too small to mean anything)"
    return f"T={t}, D={d} float32, {kind} of {cfg.timing_reps}", {"seconds": table}


def check_step_timings(cfg: Config):
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from peers import make_fastmeta, make_plain, peer_status, PEERS  # noqa: E402  (bench/ modules)
    from workloads import conv4_workload, workload  # noqa: E402

    wl = workload("conv4", small=True) if cfg.smoke else conv4_workload(meta_batch=16)
    model = wl.model().to(cfg.device)
    batch = wl.batch().to(cfg.device)
    makers = {"plain loop": make_plain, "fastmeta": make_fastmeta}
    skipped = {}
    for name, (ok, why) in peer_status().items():
        if name in ("torchopt", "higher"):
            if ok:
                makers[name] = PEERS[name]
            else:
                skipped[name] = why
    runs = {name: make(wl, model, batch, False) for name, make in makers.items()}
    clock = Clock(cfg)
    reps = 1 if cfg.smoke else 5
    # Timed as users run them (TF32 convolutions where that is the default)...
    out = {name: {"seconds": clock.time(fn, reps, warmup=1)} for name, fn in runs.items()}
    # ... compared in full float32, where two correct implementations agree to ~1e-5.
    with _full_fp32(cfg.device.type):
        ref = runs["fastmeta"]()
        for name, fn in runs.items():
            if name != "fastmeta":
                g = fn()
                out[name]["rel_err_vs_fastmeta"] = float((g - ref).norm() / ref.norm())
    bad = {k: v["rel_err_vs_fastmeta"] for k, v in out.items() if v.get("rel_err_vs_fastmeta", 0) > 1e-3}
    base = out["fastmeta"]["seconds"]
    line = ", ".join(f"{k} {v['seconds'] * 1e3:.1f} ms ({v['seconds'] / base:.2f}x fastmeta)" for k, v in out.items())
    print("      " + line)
    if bad:
        raise AssertionError(f"meta-gradients disagree with fastmeta's (float32, relative): {bad}")
    chosen = runs["fastmeta"].learner.chosen_strategy
    detail = f"{wl.title} on {cfg.device.type}, MAML second order, strategy auto -> {chosen}"
    if skipped:
        detail += "; not installed: " + ", ".join(f"{k} ({v})" for k, v in skipped.items())
    return detail, {"seconds": out, "skipped": skipped}


# ---------------------------------------------------------------------------------------- main
def run(cfg: Config, out: Optional[Path], timings: bool = True) -> Runner:
    runner = Runner(cfg, out)
    runner.check("environment", lambda: check_environment(cfg, runner))
    runner.check("backends available", lambda: check_backends_available(cfg))
    for op in ROW_OPS:
        for backend in cfg.backends:
            runner.check(f"op {op} [{backend}] shape grid", lambda op=op, b=backend: check_op(cfg, op, b))
    for label, shape in (("large D", cfg.large_d), ("large T", cfg.large_t)):
        for op in ROW_OPS:
            if op == "sds_select" and label == "large D":
                continue
            for backend in cfg.backends:
                runner.check(f"op {op} [{backend}] {label} {shape}",
                             lambda op=op, b=backend, s=shape: check_op_large(cfg, op, b, s))
    for backend in cfg.backends:
        runner.check(f"T*D > 2^31 [{backend}]", lambda b=backend: check_huge_index(cfg, b))
        runner.check(f"float64 scalar arguments [{backend}]", lambda b=backend: check_float64_scalars(cfg, b))
        runner.check(f"current stream [{backend}]", lambda b=backend: check_current_stream(cfg, b))
        runner.check(f"gradcheck/opcheck [{backend}]", lambda b=backend: check_gradcheck(cfg, b))
    runner.check("torch.compile fullgraph", lambda: check_compile(cfg))
    for workload in WORKLOADS:
        model = _model(cfg, workload, "cpu")
        for strategy in candidate_strategies(model):
            for algo in algorithms(0.1):
                for backend in cfg.backends:
                    runner.check(f"step {workload} {algo} {strategy} [{backend}]",
                                 lambda w=workload, a=algo, s=strategy, b=backend: check_step(cfg, w, a, s, b))
        runner.check(f"step {workload} strategy=auto", lambda w=workload: check_auto(cfg, w))
    runner.check("step conv4 fused=True", lambda: check_fused(cfg))
    for backend in cfg.backends:
        devices = (torch.device("cuda", 0), torch.device("cuda", 1)) if torch.cuda.device_count() > 1 else ()
        runner.check(f"cuda:1 with current device 0 [{backend}]", lambda b=backend: check_second_device(cfg, b),
                     devices=devices)
    if timings:
        runner.check("timing: ops vs eager PyTorch", lambda: check_op_timings(cfg))
        runner.check("timing: Conv-4 MAML step vs peers", lambda: check_step_timings(cfg))
    else:
        runner.check("timing", lambda: (_ for _ in ()).throw(Skip("--no-timing")))
    return runner


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run the checks on CPU tensors with small sizes (CI); CUDA-only checks SKIP")
    parser.add_argument("--device", default="cuda:0", help="the GPU to check (default cuda:0)")
    parser.add_argument("--only", help="run only the checks whose name contains this text")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing checks")
    args = parser.parse_args(argv)
    if args.cpu_smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("note: TRITON_INTERPRET is not 1: the triton backend will SKIP", file=sys.stderr)
    cfg = make_config(args)
    t0 = time.perf_counter()
    print(f"fastmeta GPU check: {'CPU smoke' if cfg.smoke else cfg.device}, backends {', '.join(cfg.backends)}")
    runner = run(cfg, args.out, timings=not args.no_timing)
    counts = {s: sum(r.status == s for r in runner.results) for s in ("PASS", "FAIL", "SKIP")}
    print(f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
          f"in {time.perf_counter() - t0:.1f} s" + (f"; results in {args.out}" if args.out else ""))
    for r in runner.results:
        if r.status == "FAIL":
            print(f"FAIL  {r.name}: {r.detail}")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
