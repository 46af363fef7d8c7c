"""Triton ``fd_hvp_points`` (Fallah eqs. 9, 11): rows ``theta + delta_t v_t``, then ``theta - delta_t v_t``.
One read of v and theta per element writes both output rows."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import register
from ._common import BLOCK, one_config


@triton.autotune(configs=one_config(BLOCK=BLOCK), key=["D"])
@triton.jit
def _fd_hvp_points_kernel(theta_ptr, v_ptr, delta_ptr, out_ptr, T, D, theta_stride, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < D
    th = tl.load(theta_ptr + t.to(tl.int64) * theta_stride + offs, mask=inb, other=0.0)
    step = tl.load(delta_ptr + t) * tl.load(v_ptr + t.to(tl.int64) * D + offs, mask=inb, other=0.0)
    tl.store(out_ptr + t.to(tl.int64) * D + offs, th + step, mask=inb)
    tl.store(out_ptr + (t + T).to(tl.int64) * D + offs, th - step, mask=inb)


@register("fd_hvp_points", "triton")
def fd_hvp_points(theta, v, delta):
    v = v.contiguous()
    theta = theta.contiguous()
    delta = delta.to(v.dtype).contiguous()
    t, d = v.shape
    out = torch.empty((2 * t, d), device=v.device, dtype=v.dtype)
    if t == 0 or d == 0:
        return out
    grid = lambda meta: (t, triton.cdiv(d, meta["BLOCK"]))  # noqa: E731
    _fd_hvp_points_kernel[grid](theta, v, delta, out, t, d, 0 if theta.dim() == 1 else d)
    return out
