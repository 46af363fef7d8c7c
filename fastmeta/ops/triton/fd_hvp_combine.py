"""Triton ``fd_hvp_combine`` (Fallah eqs. 10-11):
``mean_t(g_o - inner_lr (g_plus - g_minus) / (2 delta_t))`` or the per-task ``[T, D]`` terms.
Mean: one program per column block walks the T rows (no atomics, one pass over the inputs); the
mean over zero tasks is NaN, as ``torch.mean`` of an empty tensor (and every other backend).

The coefficient ``-inner_lr / (2 delta_t)`` is computed in float64 (``inner_lr`` is a float64
argument, see ``_common``) and rounded once to the data dtype, as the cpp kernel does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import register
from . import _common, _launch

row_start = _common.row_start


@triton.jit
def _coef(delta_ptr, t, inner_lr, dtype: tl.constexpr):
    lr = tl.full([], inner_lr, tl.float64)
    return (-lr / (2.0 * tl.load(delta_ptr + t).to(tl.float64))).to(dtype)


@triton.jit
def _fd_hvp_combine_mean_kernel(go_ptr, gp_ptr, gm_ptr, delta_ptr, out_ptr, T, D, inner_lr: tl.float64,
                                BLOCK: tl.constexpr):
    dtype = go_ptr.dtype.element_ty
    offs = row_start(tl.program_id(0), BLOCK) + tl.arange(0, BLOCK)
    inb = offs < D
    acc = tl.zeros([BLOCK], dtype=dtype)
    for t in range(0, T):
        row = row_start(t, D)
        coef = _coef(delta_ptr, t, inner_lr, dtype)
        go = tl.load(go_ptr + row + offs, mask=inb, other=0.0)
        gp = tl.load(gp_ptr + row + offs, mask=inb, other=0.0)
        gm = tl.load(gm_ptr + row + offs, mask=inb, other=0.0)
        acc += go + coef * (gp - gm)
    tl.store(out_ptr + offs, acc / T, mask=inb)


@triton.jit
def _fd_hvp_combine_none_kernel(go_ptr, gp_ptr, gm_ptr, delta_ptr, out_ptr, T, D, inner_lr: tl.float64,
                                BLOCK: tl.constexpr):
    dtype = go_ptr.dtype.element_ty
    offs = row_start(tl.program_id(0), BLOCK) + tl.arange(0, BLOCK)
    inb = offs < D
    for t in range(tl.program_id(1), T, tl.num_programs(1)):
        row = row_start(t, D)
        coef = _coef(delta_ptr, t, inner_lr, dtype)
        go = tl.load(go_ptr + row + offs, mask=inb, other=0.0)
        gp = tl.load(gp_ptr + row + offs, mask=inb, other=0.0)
        gm = tl.load(gm_ptr + row + offs, mask=inb, other=0.0)
        tl.store(out_ptr + row + offs, go + coef * (gp - gm), mask=inb)


@register("fd_hvp_combine", "triton")
def fd_hvp_combine(g_o, g_plus, g_minus, delta, inner_lr, mean):
    g_o, g_plus, g_minus = g_o.contiguous(), g_plus.contiguous(), g_minus.contiguous()
    delta = delta.to(g_o.dtype).contiguous()
    t, d = g_o.shape
    block = _launch.BLOCKS.block
    if mean:
        if t == 0:
            return torch.full((d,), float("nan"), device=g_o.device, dtype=g_o.dtype)
        out = torch.empty(d, device=g_o.device, dtype=g_o.dtype)
        if d > 0:
            with _common.device_guard(g_o.device):
                _fd_hvp_combine_mean_kernel[_launch.flat_grid(d, block)](
                    g_o, g_plus, g_minus, delta, out, t, d, float(inner_lr), BLOCK=block, num_warps=_launch.NUM_WARPS)
        return out
    out = torch.empty_like(g_o)
    if t > 0 and d > 0:
        with _common.device_guard(g_o.device):
            _fd_hvp_combine_none_kernel[_launch.row_block_grid(t, d, block)](
                g_o, g_plus, g_minus, delta, out, t, d, float(inner_lr), BLOCK=block, num_warps=_launch.NUM_WARPS)
    return out
