"""Triton ``sam_perturb`` (Sharp-MAML eqs. 11, 13):
``out[t] = theta + radius_t (g*m)_t / max(||(g*m)_t||, eps)`` (or one norm over all of g).

Stage 1: per-chunk sums of squares ``[T, S]`` (``_common.sumsq_partial_kernel``). Stage 2: each row's
S partials summed in bounded tiles (``_common.sum_partials_kernel``); for the global norm the T row
sums are summed once more the same way, so no program ever holds more than one tile of partials (a
global norm over [64, 10M] has 78,000 partials). Stage 3 (``_sam_perturb_kernel``): the elementwise
axpy, each program turning its row's sum of squares into the scale. g/mask are read twice, theta once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import register
from . import _common, _launch
from .row_norm import row_sumsq_partials, sum_rows

row_start = _common.row_start


@triton.jit
def _sam_perturb_kernel(theta_ptr, g_ptr, m_ptr, radius_ptr, sumsq_ptr, out_ptr, T, D, theta_stride,
                        eps: tl.float64, HAS_MASK: tl.constexpr, GLOBAL_NORM: tl.constexpr,
                        BLOCK: tl.constexpr):
    dtype = g_ptr.dtype.element_ty
    offs = row_start(tl.program_id(0), BLOCK) + tl.arange(0, BLOCK)
    inb = offs < D
    for t in range(tl.program_id(1), T, tl.num_programs(1)):
        # max(norm, eps) that keeps a NaN norm NaN, as the reference's clamp_min (maximum would pick eps).
        if GLOBAL_NORM:
            norm = tl.sqrt(tl.load(sumsq_ptr))
        else:
            norm = tl.sqrt(tl.load(sumsq_ptr + t))
        floor = tl.full([], eps, dtype)
        scale = tl.load(radius_ptr + t) / tl.where(norm < floor, floor, norm)
        row = row_start(t, D)
        x = tl.load(g_ptr + row + offs, mask=inb, other=0.0)
        if HAS_MASK:
            x = x * tl.load(m_ptr + row + offs, mask=inb, other=0.0)
        th = tl.load(theta_ptr + row_start(t, theta_stride) + offs, mask=inb, other=0.0)
        tl.store(out_ptr + row + offs, th + scale * x, mask=inb)


@register("sam_perturb", "triton")
def sam_perturb(theta, g, radius, mask, eps, global_norm):
    g = g.contiguous()
    theta = theta.contiguous()
    mask = mask.contiguous() if mask is not None else None
    radius = radius.to(g.dtype).contiguous()
    t, d = g.shape
    if t == 0 or d == 0:
        return torch.empty_like(g) + theta
    out = torch.empty_like(g)
    with _common.device_guard(g.device):
        sumsq = sum_rows(row_sumsq_partials(g, mask), sqrt=False)
        if global_norm:
            sumsq = sum_rows(sumsq.view(1, t), sqrt=False)
        block = _launch.BLOCKS.block
        _sam_perturb_kernel[_launch.row_block_grid(t, d, block)](
            theta, g, mask if mask is not None else g, radius, sumsq, out, t, d, 0 if theta.dim() == 1 else d,
            float(eps), HAS_MASK=mask is not None, GLOBAL_NORM=bool(global_norm), BLOCK=block,
            num_warps=_launch.NUM_WARPS)
    return out
