"""Triton ``sam_perturb`` (Sharp-MAML eqs. 11, 13):
``out[t] = theta + radius_t (g*m)_t / max(||(g*m)_t||, eps)`` (or one norm over all of g).

Stage 1: per-chunk sums of squares (``_common.sumsq_partial_kernel``). Stage 2 is fused into the
elementwise kernel: each program adds its row's S partials (or all T*S for the global norm, a few
hundred numbers at most), so there is no separate finish launch. g/mask are read twice, theta once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import register
from ._common import BLOCK, one_config
from .row_norm import row_sumsq_partials


@triton.autotune(configs=one_config(BLOCK=BLOCK), key=["D"])
@triton.jit
def _sam_perturb_kernel(theta_ptr, g_ptr, m_ptr, radius_ptr, partial_ptr, out_ptr, D, S, theta_stride, eps,
                        HAS_MASK: tl.constexpr, GLOBAL_NORM: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK: tl.constexpr):
    t = tl.program_id(0)
    pid = tl.program_id(1)
    p_offs = tl.arange(0, BLOCK_P)
    if GLOBAL_NORM:
        n_partials = tl.num_programs(0) * S
        p = tl.load(partial_ptr + p_offs, mask=p_offs < n_partials, other=0.0)
    else:
        p = tl.load(partial_ptr + t * S + p_offs, mask=p_offs < S, other=0.0)
    norm = tl.sqrt(tl.sum(p, axis=0))
    scale = tl.load(radius_ptr + t) / tl.maximum(norm, eps)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < D
    row = t.to(tl.int64) * D
    x = tl.load(g_ptr + row + offs, mask=inb, other=0.0)
    if HAS_MASK:
        x = x * tl.load(m_ptr + row + offs, mask=inb, other=0.0)
    th = tl.load(theta_ptr + t.to(tl.int64) * theta_stride + offs, mask=inb, other=0.0)
    tl.store(out_ptr + row + offs, th + scale * x, mask=inb)


@register("sam_perturb", "triton")
def sam_perturb(theta, g, radius, mask, eps, global_norm):
    g = g.contiguous()
    theta = theta.contiguous()
    mask = mask.contiguous() if mask is not None else None
    radius = radius.to(g.dtype).contiguous()
    t, d = g.shape
    out = torch.empty_like(g)
    if t == 0 or d == 0:
        return out + theta
    partial = row_sumsq_partials(g, mask)
    s = partial.shape[1]
    block_p = triton.next_power_of_2(t * s if global_norm else s)
    grid = lambda meta: (t, triton.cdiv(d, meta["BLOCK"]))  # noqa: E731
    _sam_perturb_kernel[grid](theta, g, mask if mask is not None else g, radius, partial, out, d, s,
                              0 if theta.dim() == 1 else d, eps, HAS_MASK=mask is not None,
                              GLOBAL_NORM=bool(global_norm), BLOCK_P=block_p)
    return out
