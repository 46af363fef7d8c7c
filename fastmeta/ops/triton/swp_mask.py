"""Triton ``swp_mask``: ``out[i] = keep(seed, i) ? fill : 0`` with the keep rule every backend shares
(``fastmeta/ops/swp_mask.py``): ``(splitmix64(splitmix64(seed) + i) >> 11) < ceil(keep_prob * 2**53)``
in uint64 arithmetic. Counter-based: the mask depends only on seed and flat index, not on the grid.
One write pass."""

from __future__ import annotations

import importlib

import torch
import triton
import triton.language as tl

from .._backend import register
from . import _common, _launch

# The op module (fastmeta.ops re-exports a function under the same name): the host half of the rule.
swp = importlib.import_module("fastmeta.ops.swp_mask")
row_start = _common.row_start


@triton.jit
def _splitmix64(z):
    # The constants of swp.SPLITMIX64_* (a jit function reads no Python globals); ints >= 2**63 are
    # uint64 constants, so the arithmetic stays uint64: wrapping mul/add, logical shifts.
    z = z + 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _swp_mask_kernel(out_ptr, N, seed: tl.uint64, threshold: tl.uint64, fill: tl.float64, BLOCK: tl.constexpr):
    offs = row_start(tl.program_id(0), BLOCK) + tl.arange(0, BLOCK)
    h = _splitmix64(seed.to(tl.uint64) + offs.to(tl.uint64))
    keep = (h >> 11) < threshold.to(tl.uint64)
    val = tl.where(keep, tl.full([], fill, tl.float64), 0.0)
    tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=offs < N)


@register("swp_mask", "triton")
def swp_mask(rows, cols, keep_prob, seed, rescale, device, dtype):
    out = torch.empty((rows, cols), device=device, dtype=dtype)
    n = rows * cols
    if n > 0:
        fill = 1.0 / keep_prob if rescale else 1.0
        block = _launch.BLOCKS.block
        with _common.device_guard(out.device):
            _swp_mask_kernel[_launch.flat_grid(n, block)](out, n, swp.splitmix64(seed), swp.keep_threshold(keep_prob),
                                                          fill, BLOCK=block, num_warps=_launch.NUM_WARPS)
    return out
