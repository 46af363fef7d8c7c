"""Triton ``row_norm``: ``out[t] = sqrt(sum_d g[t, d]^2)``.

Two-stage reduction so few long rows still fill the machine: stage 1 grid (T, S) writes per-chunk
sums of squares (``_common.sumsq_partial_kernel``), stage 2 (``_row_norm_kernel``) one program per
row adds its S partials and takes the root. One read of g.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import register
from ._common import CHUNK, BLOCK, sumsq_partial_kernel


@triton.jit
def _row_norm_kernel(partial_ptr, out_ptr, S, BLOCK_S: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_S)
    p = tl.load(partial_ptr + t * S + offs, mask=offs < S, other=0.0)
    tl.store(out_ptr + t, tl.sqrt(tl.sum(p, axis=0)))


def row_sumsq_partials(g: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    t, d = g.shape
    s = max(1, triton.cdiv(d, CHUNK))
    partial = torch.empty((t, s), device=g.device, dtype=g.dtype)
    if t > 0:
        sumsq_partial_kernel[(t, s)](g, mask if mask is not None else g, partial, d, s,
                                     HAS_MASK=mask is not None, BLOCK=min(BLOCK, CHUNK), CHUNK=CHUNK)
    return partial


@register("row_norm", "triton")
def row_norm(g: torch.Tensor) -> torch.Tensor:
    g = g.contiguous()
    partial = row_sumsq_partials(g, None)
    out = torch.empty(g.shape[0], device=g.device, dtype=g.dtype)
    if g.shape[0] > 0:
        s = partial.shape[1]
        _row_norm_kernel[(g.shape[0],)](partial, out, s, BLOCK_S=triton.next_power_of_2(s))
    return out
