"""Triton ``fd_hvp_points`` (Fallah eqs. 9, 11): rows ``theta + delta_t v_t``, then ``theta - delta_t v_t``.
One read of v and theta per element writes both output rows."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import register
from . import _common, _launch

row_start = _common.row_start


@triton.jit
def _fd_hvp_points_kernel(theta_ptr, v_ptr, delta_ptr, out_ptr, T, D, theta_stride, BLOCK: tl.constexpr):
    offs = row_start(tl.program_id(0), BLOCK) + tl.arange(0, BLOCK)
    inb = offs < D
    for t in range(tl.program_id(1), T, tl.num_programs(1)):
        th = tl.load(theta_ptr + row_start(t, theta_stride) + offs, mask=inb, other=0.0)
        step = tl.load(delta_ptr + t) * tl.load(v_ptr + row_start(t, D) + offs, mask=inb, other=0.0)
        tl.store(out_ptr + row_start(t, D) + offs, th + step, mask=inb)
        tl.store(out_ptr + row_start(t, D) + row_start(T, D) + offs, th - step, mask=inb)


@register("fd_hvp_points", "triton")
def fd_hvp_points(theta, v, delta):
    v = v.contiguous()
    theta = theta.contiguous()
    delta = delta.to(v.dtype).contiguous()
    t, d = v.shape
    out = torch.empty((2 * t, d), device=v.device, dtype=v.dtype)
    if t == 0 or d == 0:
        return out
    block = _launch.BLOCKS.block
    with _common.device_guard(v.device):
        _fd_hvp_points_kernel[_launch.row_block_grid(t, d, block)](
            theta, v, delta, out, t, d, 0 if theta.dim() == 1 else d, BLOCK=block, num_warps=_launch.NUM_WARPS)
    return out
