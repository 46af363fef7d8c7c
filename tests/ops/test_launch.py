"""Launch configurations at GPU-sized shapes, on the CPU: grids within CUDA's limits for D = 70M,
T = 70,000 and T * D > 2**31 (Triton: the pure functions of ``fastmeta/ops/triton/_launch.py``; CUDA:
``launch_config.h`` through ``torch.ops.fastmeta_cuda.launch_grid``), every row and column covered,
and the kernels' int64 offsets past 2**31 elements (file-backed sparse tensors, nothing allocated)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastmeta import _extension

ROOT = Path(__file__).resolve().parents[2]
MAX_X, MAX_YZ = 2**31 - 1, 65_535
# (T, D): D past 65,535 blocks of 1024, T past 65,535 rows, T * D past 2**31 elements (all of them
# fit in an H200's 141 GB as float32).
GPU_SHAPES = [(64, 70_000_000), (70_000, 4099), (70_000, 70_000), (1, 3_000_000_000), (100_000, 100_000)]


def _within_cuda_limits(grid):
    assert 1 <= len(grid) <= 3
    assert 1 <= grid[0] <= MAX_X, grid
    assert all(1 <= g <= MAX_YZ for g in grid[1:]), grid


@pytest.fixture
def launch():
    pytest.importorskip("triton")
    from fastmeta.ops.triton import _launch

    return _launch


@pytest.mark.parametrize("t,d", GPU_SHAPES)
def test_triton_grids_within_cuda_limits(launch, t, d):
    for blocks in (launch.GPU, launch.INTERPRETER):
        for block in (blocks.block, blocks.chunk, blocks.tile):
            grid = launch.row_block_grid(t, d, block)
            _within_cuda_limits(grid)
            assert grid[0] * block >= d  # axis 0 covers every column
            # axis 1 walks every row exactly once
            if t <= 200_000:
                rows = sorted(r for p in range(grid[1]) for r in launch.grid_rows(grid[1], t, p))
                assert rows == list(range(t))
        _within_cuda_limits(launch.flat_grid(t * d, blocks.block))
        assert launch.flat_grid(t * d, blocks.block)[0] * blocks.block >= t * d
        _within_cuda_limits(launch.per_row_grid(t))
        tile = launch.reduce_tile(launch.cdiv(d, blocks.chunk), blocks.reduce)
        assert tile <= blocks.reduce  # the second stage's tile is bounded for any D


def test_triton_grid_caps_at_the_gpu_sizes(launch):
    # D = 70M in 1024-element blocks is 68,360 programs: axis 0, never axis 1 (65,535).
    assert launch.row_block_grid(64, 70_000_000, 1024) == (68_360, 64)
    assert launch.row_block_grid(70_000, 7, 1024) == (1, 65_535)
    assert launch.per_row_grid(3_000_000_000) == (MAX_X,)
    assert launch.reduce_tile(1, 1024) == 1 and launch.reduce_tile(1221, 1024) == 1024
    with pytest.raises(ValueError, match="axis 0"):
        launch.flat_grid(2**31 * 1024 + 1, 1024)


needs_cuda_lib = pytest.mark.skipif(not _extension.cuda_library_loaded(),
                                    reason=f"CUDA library not loaded: {_extension.cuda_reason()}")


@needs_cuda_lib
@pytest.mark.parametrize("t,d", GPU_SHAPES)
def test_cuda_grids_within_cuda_limits(t, d):
    grid = torch.ops.fastmeta_cuda.launch_grid
    for kernel in ("row_elementwise", "sumsq_partial", "flat", "thread_per_row", "block_per_row"):
        gx, gy = grid(kernel, t, d)
        _within_cuda_limits((gx, gy))
    gx, gy = grid("sumsq_partial", t, d)
    assert gx * 8192 >= d  # one block per 8192-element slice (a grid-stride loop beyond 2**31 - 1)
    assert gy == min(t, MAX_YZ)  # rows on y, walked with a grid-stride loop past 65,535


@needs_cuda_lib
def test_cuda_grid_rule_values():
    grid = torch.ops.fastmeta_cuda.launch_grid
    assert grid("row_elementwise", 70_000, 70_000_000) == [1024, 65_535]
    assert grid("flat", 1, 70_000_000) == [4096, 1]
    assert grid("sumsq_partial", 64, 70_000_000) == [8545, 64]
    assert grid("block_per_row", 70_000, 7) == [70_000, 1]
    with pytest.raises(RuntimeError, match="unknown kernel family"):
        grid("rows_on_y", 1, 1)


# Each kernel runs on one column block (grid axis 0 = 1) of T = 3 rows of D = 2**30 + 16 elements:
# row 2 starts at element 2**31 + 32, past int32. The [T, D] operands are views of one 90 GiB mapping
# that commits no memory (only the touched pages exist), so a wrapped offset reads or writes 8 GB
# before the buffer: a crash or a wrong value, caught here in a subprocess.
INT64_SCRIPT = r"""
import mmap, sys
import torch
from fastmeta.ops.triton import _common, _launch
from fastmeta.ops.triton import fd_hvp_combine, fd_hvp_points, sam_perturb

T, D, B = 3, 2**30 + 16, 16
try:  # MAP_NORESERVE (0x4000 on Linux): no memory is committed, pages appear when touched
    mapped = mmap.mmap(-1, 4 * 7 * T * D, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000)
except OSError as exc:
    print(f"SKIP: cannot map {4 * 7 * T * D / 2**30:.0f} GiB without committing it: {exc}")
    sys.exit(0)
mats = torch.frombuffer(mapped, dtype=torch.float32).view(7, T, D)
go, gp, gm, out = mats[0], mats[1], mats[2], mats[3]
out2 = mats[4:6].reshape(2 * T, D)  # fd_hvp_points writes [2T, D]
for t in range(T):
    go[t, :B] = t + 1.0
    gp[t, :B] = 2.0 * (t + 1)
    gm[t, :B] = 0.0
delta = torch.ones(T)
radius = torch.ones(T)
theta = mats[6, 0]  # [D] zeros, untouched pages

mean = torch.zeros(B)
fd_hvp_combine._fd_hvp_combine_mean_kernel[(1,)](go, gp, gm, delta, mean, T, D, 0.5, BLOCK=B)
# mean_t(g_o - 0.5 * g_plus / 2) = mean_t(0.5 * (t + 1)) = 1
assert torch.equal(mean, torch.ones(B)), ("mean", mean)

fd_hvp_combine._fd_hvp_combine_none_kernel[(1, T)](go, gp, gm, delta, out, T, D, 0.5, BLOCK=B)
assert torch.equal(out[:, :B], 0.5 * go[:, :B]), ("none", out[:, :B])

fd_hvp_points._fd_hvp_points_kernel[(1, T)](theta, go, delta, out2, T, D, 0, BLOCK=B)
assert torch.equal(out2[T:, :B], -go[:, :B]) and torch.equal(out2[:T, :B], go[:, :B]), "points"

partial = torch.zeros(T, 1)
_common.sumsq_partial_kernel[(1, T)](go, go, partial, T, D, 1, HAS_MASK=False, BLOCK=B, CHUNK=B)
assert torch.equal(partial[:, 0], B * torch.tensor([1.0, 4.0, 9.0])), ("sumsq", partial)

sumsq = partial[:, 0].contiguous()
sam_perturb._sam_perturb_kernel[(1, T)](theta, go, go, radius, sumsq, out, T, D, 0, 1e-12,
                                        HAS_MASK=False, GLOBAL_NORM=False, BLOCK=B)
assert torch.allclose(out[:, :B], torch.full((T, B), 0.25)), ("sam", out[:, :B])
print("OK")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux's MAP_NORESERVE")
def test_triton_kernels_offset_rows_in_int64():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(INT64_SCRIPT)], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=300)
    if out.returncode == 0 and out.stdout.startswith("SKIP"):
        pytest.skip(out.stdout.strip())
    assert out.returncode == 0 and "OK" in out.stdout, f"rc {out.returncode}\n{out.stdout}\n{out.stderr[-3000:]}"
