"""The Triton kernels as a GPU runs them, on the CPU (under ``TRITON_INTERPRET=1``).

The other op tests run the interpreter's default launch configuration: large blocks, and Python
float arguments kept exact. Here (fixtures in ``tests/ops/conftest.py``):

* ``gpu_launch``: the GPU block sizes (1024 / 8192 / 64, so D = 1025 and 8193 cross block and chunk
  edges and N = 300 takes sds_select's multi-tile path), or tiny blocks with axis 1 capped at 2 rows
  (every grid-stride and second-stage loop runs several times); every launch inside the device
  guard, with a grid within CUDA's limits;
* ``compiled_scalars``: scalar arguments typed as the compiled JIT types them (an un-annotated
  Python float becomes fp32), so a float64 kernel that would see fp32-rounded scalars on a GPU
  fails here too.
"""

import pytest
import torch

from fastmeta import ops
from fastmeta.testing import RowCase, as_float64, assert_oracle_close, make_rows, make_vector, require_backend

# The interpreter's cost grows with programs x block steps: tiny blocks get small shapes (D = 257 is
# 17 blocks of 16 and 5 chunks of 64, more than one 4-partial reduce step; T = 5 rows walk 3 times).
GPU_CASES = [RowCase(1, 1), RowCase(3, 7, torch.float64), RowCase(8, 1025, zero_row=True),
             RowCase(3, 1025, torch.float64, noncontiguous=True), RowCase(3, 8193), RowCase(5, 4099, torch.float64)]
TINY_CASES = [RowCase(1, 1), RowCase(5, 257), RowCase(5, 257, torch.float64, zero_row=True),
              RowCase(3, 130, torch.float64, noncontiguous=True), RowCase(8, 17)]
CASES = [("gpu", c) for c in GPU_CASES] + [("tiny", c) for c in TINY_CASES]


def _check(fn, *args, what="", ulps=2.0, **kwargs):
    """fastmeta.testing's rule; sam_perturb on its perturbation out - theta (the quantity that matters)."""
    out = fn(*args, **kwargs)
    with ops.use_backend("reference"):
        ref = fn(*args, **kwargs)
        oracle = fn(*as_float64(*args), **kwargs)
    assert_oracle_close(out, ref, oracle, ulps=ulps, what=what, base=args[0] if fn is ops.sam_perturb else None)
    return out


@pytest.mark.parametrize("gpu_launch,case", CASES, ids=[f"{p}-{c.id}" for p, c in CASES], indirect=["gpu_launch"])
def test_row_ops_at_gpu_launch_sizes(gpu_launch, case):
    g = make_rows(case, seed=0)
    theta = make_vector(case.d, case.dtype, noncontiguous=case.noncontiguous)
    theta_rows = make_rows(case, seed=4, zero=False)
    delta = torch.linspace(1e-2, 1e-1, case.t, dtype=case.dtype)
    radius = torch.linspace(0.01, 0.3, case.t, dtype=case.dtype)
    mask = (make_rows(case, seed=5, zero=False) > 0).to(case.dtype)
    what = f"{gpu_launch} {case.id}"
    with ops.use_backend("triton"):
        _check(ops.row_norm, g, what=f"row_norm {what}", ulps=16)  # summation order (test_row_norm.py)
        for th in (theta, theta_rows):
            _check(ops.sam_perturb, th, g, 0.05, what=f"sam_perturb {what}")
            _check(ops.sam_perturb, th, g, radius, mask, what=f"sam_perturb masked {what}")
            _check(ops.sam_perturb, th, g, 0.1, global_norm=True, what=f"sam_perturb global {what}")
            _check(ops.fd_hvp_points, th, g, delta, what=f"fd_hvp_points {what}")
        g_p, g_m = make_rows(case, seed=1, zero=False), make_rows(case, seed=2, zero=False)
        for reduce in ("mean", "none"):
            _check(ops.fd_hvp_combine, g, g_p, g_m, delta, 0.4, reduce, what=f"fd_hvp_combine {reduce} {what}", ulps=64)


SDS_SIZES = [("gpu", 1, 1), ("gpu", 3, 64), ("gpu", 3, 65), ("gpu", 2, 300), ("tiny", 1, 1), ("tiny", 5, 40)]


@pytest.mark.parametrize("gpu_launch,t,n", SDS_SIZES, indirect=["gpu_launch"])
def test_sds_select_at_gpu_tile_sizes(gpu_launch, t, n):
    gen = torch.Generator().manual_seed(n)
    clean = torch.rand(t, n, generator=gen)
    pert = torch.randint(0, 4, (t, n), generator=gen).float()  # many ties: the index order decides
    pert[0, n // 2] = float("nan")
    for ratio in (0.01, 0.5, 1.0):
        with ops.use_backend("triton"):
            out = ops.sds_select(clean, pert, ratio)
        with ops.use_backend("reference"):
            ref = ops.sds_select(clean, pert, ratio)
        assert torch.equal(out, ref), f"{gpu_launch} T={t} N={n} ratio={ratio}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_swp_mask_at_gpu_block_size(gpu_launch, dtype):
    for shape in [(1, 1), (3, 1025), (2, 8193)] if gpu_launch == "gpu" else [(1, 1), (5, 33)]:
        with ops.use_backend("triton"):
            out = ops.swp_mask(shape, 0.3, seed=99, rescale=True, dtype=dtype)
        with ops.use_backend("reference"):
            ref = ops.swp_mask(shape, 0.3, seed=99, rescale=True, dtype=dtype)
        assert torch.equal(out, ref), f"{gpu_launch} {shape}"


def test_nan_and_zero_tasks_at_gpu_launch_sizes(gpu_launch):
    g = torch.randn(3, 1030)
    g[1, 3] = float("nan")
    with ops.use_backend("triton"):
        out = ops.sam_perturb(torch.zeros(1030), g, 0.05)
        mean = ops.fd_hvp_combine(*(torch.empty(0, 1030),) * 3, 1e-2, 0.1)
    assert out[1].isnan().all() and not out[[0, 2]].isnan().any()
    assert mean.shape == (1030,) and mean.isnan().all()


def test_float64_scalars_reach_the_kernels_in_float64(compiled_scalars):
    """inner_lr, eps and the swp_mask fill in a float64 call must not be rounded to fp32 on the way
    into the kernel (what an un-annotated Python float argument gets on a GPU)."""
    require_backend("triton", "fd_hvp_combine")
    case = RowCase(3, 1025, torch.float64)
    g_o, g_p, g_m = (make_rows(case, seed=s, zero=False) for s in (0, 1, 2))
    delta = torch.tensor([1e-3, 1e-2, 3e-2], dtype=torch.float64)
    with ops.use_backend("triton"):
        for reduce in ("mean", "none"):
            # 0.1 is not an fp32 number: rounding it shows as ~1e-9 relative error, amplified by 1/(2 delta)
            _check(ops.fd_hvp_combine, g_o, g_p, g_m, delta, 0.1, reduce, what=f"fd_hvp_combine {reduce}")
        small = g_o * 1e-3  # row norms below eps: the result is radius / eps * g, eps = 0.1 in float64
        _check(ops.sam_perturb, make_vector(case.d, torch.float64), small, 0.5, eps=0.1, what="sam_perturb eps")
        mask = ops.swp_mask((3, 1025), 0.3, seed=5, rescale=True, dtype=torch.float64)
    assert set(mask.unique().tolist()) == {0.0, 1.0 / 0.3}
    float64_launches = [types for _, types in compiled_scalars]
    assert float64_launches and all("fp32" not in types.values() for types in float64_launches), compiled_scalars


def test_device_guard():
    """Launches go under torch.cuda.device of the tensors' device (current device 0, tensors on
    cuda:1 would otherwise launch on device 0); a CPU tensor (the interpreter) needs no guard."""
    pytest.importorskip("triton")
    from fastmeta.ops.triton import _common

    guard = _common.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with _common.device_guard(torch.device("cpu")):
        pass


# Compiles every kernel with Triton's real compiler (to a cubin, with the ptxas Triton ships) for
# sm_80 and sm_90, float32 and float64: what the interpreter never does (uint64 constants, dynamic
# grid-stride loops, fp64 scalar parameters must all lower). Then reads the PTX: the swp_mask hash
# shifts logically and compares unsigned, and the float scalars arrive as .f64 parameters.
COMPILE_SCRIPT = r"""
import os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastmeta.ops.triton import _common, fd_hvp_combine, fd_hvp_points, sam_perturb, sds_select, swp_mask

failures = []
for dt in ("fp32", "fp64"):
    p = f"*{dt}"
    kernels = [
        (_common.sumsq_partial_kernel, dict(g_ptr=p, m_ptr=p, partial_ptr=p, T="i32", D="i64", S="i32"),
         dict(HAS_MASK=True, BLOCK=1024, CHUNK=8192)),
        (_common.sum_partials_kernel, dict(partial_ptr=p, out_ptr=p, R="i32", S="i32"), dict(SQRT=True, BLOCK_S=1024)),
        (sam_perturb._sam_perturb_kernel, dict(theta_ptr=p, g_ptr=p, m_ptr=p, radius_ptr=p, sumsq_ptr=p, out_ptr=p,
                                               T="i32", D="i64", theta_stride="i32", eps="float"),
         dict(HAS_MASK=True, GLOBAL_NORM=True, BLOCK=1024)),
        (fd_hvp_points._fd_hvp_points_kernel, dict(theta_ptr=p, v_ptr=p, delta_ptr=p, out_ptr=p, T="i32", D="i32",
                                                   theta_stride="i32"), dict(BLOCK=1024)),
        (fd_hvp_combine._fd_hvp_combine_mean_kernel, dict(go_ptr=p, gp_ptr=p, gm_ptr=p, delta_ptr=p, out_ptr=p,
                                                          T="i32", D="i32", inner_lr="float"), dict(BLOCK=1024)),
        (fd_hvp_combine._fd_hvp_combine_none_kernel, dict(go_ptr=p, gp_ptr=p, gm_ptr=p, delta_ptr=p, out_ptr=p,
                                                          T="i32", D="i32", inner_lr="float"), dict(BLOCK=1024)),
        (sds_select._sds_select_kernel, dict(clean_ptr=p, pert_ptr=p, out_ptr="*i64", T="i32", N="i32", K="i32"),
         dict(TILE=64)),
        (swp_mask._swp_mask_kernel, dict(out_ptr=p, N="i64", seed="int", threshold="int", fill="float"),
         dict(BLOCK=1024)),
    ]
    for arch in (80, 90):
        for fn, types, consts in kernels:
            name = f"{fn.__name__} {dt} sm_{arch}"
            # Scalars a wrapper passes as Python floats/ints get what the JIT gives them at launch: the
            # parameter's annotation, else fp32 (a float) or i64 (a large int).
            annotated = {kp.name: kp.annotation_type for kp in fn.params if kp.annotation_type}
            signature = {a: annotated.get(a) or {"float": "fp32", "int": "i64"}.get(types.get(a), types.get(a))
                         or "constexpr" for a in fn.arg_names}
            try:
                k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                                   target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4))
            except Exception as exc:
                failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:1500]}")
                continue
            ptx = k.asm["ptx"]
            assert k.asm["cubin"], name
            params = re.findall(r"\.param \.(\w+) \w+_param_(\d+)", ptx)
            for arg in ("eps", "inner_lr", "fill"):
                if arg in fn.arg_names:
                    index = [a for a in fn.arg_names if signature[a] != "constexpr"].index(arg)
                    if ("f64", str(index)) not in params:
                        failures.append(f"{name}: {arg} is not an .f64 parameter: {params}")
            if fn is swp_mask._swp_mask_kernel:
                if "shr.s64" in ptx or "shr.u64" not in ptx or "setp.lt.u64" not in ptx:
                    failures.append(f"{name}: the hash must shift logically and compare unsigned")
print("\n".join(failures) or "OK")
sys.exit(1 if failures else 0)
"""


def test_kernels_compile_for_sm80_and_sm90(tmp_path):
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[2], timeout=600)
    if out.returncode != 0 and "ptxas" in out.stdout + out.stderr and "OK" not in out.stdout:
        if "not found" in out.stdout + out.stderr or "No such file" in out.stdout + out.stderr:
            pytest.skip(f"Triton's ptxas is unavailable here: {(out.stdout + out.stderr)[-500:]}")
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stdout[-5000:] + out.stderr[-3000:]
