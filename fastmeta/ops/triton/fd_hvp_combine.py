"""Triton ``fd_hvp_combine`` (Fallah eqs. 10-11):
``mean_t(g_o - inner_lr (g_plus - g_minus) / (2 delta_t))`` or the per-task ``[T, D]`` terms.
Mean: one program per column block walks the T rows (no atomics, one pass over the inputs)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import register
from ._common import BLOCK, one_config


@triton.autotune(configs=one_config(BLOCK=BLOCK), key=["D"])
@triton.jit
def _fd_hvp_combine_mean_kernel(go_ptr, gp_ptr, gm_ptr, delta_ptr, out_ptr, T, D, inner_lr,
                                BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < D
    acc = tl.zeros([BLOCK], dtype=go_ptr.dtype.element_ty)
    for t in range(0, T):
        row = t * D
        coef = -inner_lr / (2.0 * tl.load(delta_ptr + t))
        go = tl.load(go_ptr + row + offs, mask=inb, other=0.0)
        gp = tl.load(gp_ptr + row + offs, mask=inb, other=0.0)
        gm = tl.load(gm_ptr + row + offs, mask=inb, other=0.0)
        acc += go + coef * (gp - gm)
    tl.store(out_ptr + offs, acc / T, mask=inb)


@triton.autotune(configs=one_config(BLOCK=BLOCK), key=["D"])
@triton.jit
def _fd_hvp_combine_none_kernel(go_ptr, gp_ptr, gm_ptr, delta_ptr, out_ptr, D, inner_lr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < D
    row = t.to(tl.int64) * D
    coef = -inner_lr / (2.0 * tl.load(delta_ptr + t))
    go = tl.load(go_ptr + row + offs, mask=inb, other=0.0)
    gp = tl.load(gp_ptr + row + offs, mask=inb, other=0.0)
    gm = tl.load(gm_ptr + row + offs, mask=inb, other=0.0)
    tl.store(out_ptr + row + offs, go + coef * (gp - gm), mask=inb)


@register("fd_hvp_combine", "triton")
def fd_hvp_combine(g_o, g_plus, g_minus, delta, inner_lr, mean):
    g_o, g_plus, g_minus = g_o.contiguous(), g_plus.contiguous(), g_minus.contiguous()
    delta = delta.to(g_o.dtype).contiguous()
    t, d = g_o.shape
    if mean:
        out = torch.empty(d, device=g_o.device, dtype=g_o.dtype)
        if d > 0:
            grid = lambda meta: (triton.cdiv(d, meta["BLOCK"]),)  # noqa: E731
            _fd_hvp_combine_mean_kernel[grid](g_o, g_plus, g_minus, delta, out, t, d, inner_lr)
        return out
    out = torch.empty_like(g_o)
    if t > 0 and d > 0:
        grid = lambda meta: (t, triton.cdiv(d, meta["BLOCK"]))  # noqa: E731
        _fd_hvp_combine_none_kernel[grid](g_o, g_plus, g_minus, delta, out, d, inner_lr)
    return out
