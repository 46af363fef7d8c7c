"""Triton ``swp_mask``: ``out[i] = (tl.rand(seed, i) < keep_prob) ? fill : 0`` (Philox, counter-based:
the mask depends only on seed and flat index, not on the launch grid). One write pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import register
from ._common import BLOCK, one_config


@triton.autotune(configs=one_config(BLOCK=BLOCK), key=["N"])
@triton.jit
def _swp_mask_kernel(out_ptr, N, seed, keep_prob, fill, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    u = tl.rand(seed, offs)
    val = tl.where(u < keep_prob, fill, 0.0)
    tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=inb)


@register("swp_mask", "triton")
def swp_mask(rows, cols, keep_prob, seed, rescale, device, dtype):
    out = torch.empty((rows, cols), device=device, dtype=dtype)
    n = rows * cols
    if n >= 2**31:
        raise ValueError("triton swp_mask: more than 2**31 elements (int32 Philox offsets)")
    if n > 0:
        fill = 1.0 / keep_prob if rescale else 1.0
        # keep_prob == 1 must keep everything: tl.rand is in [0, 1), so u < 1 always holds.
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
        _swp_mask_kernel[grid](out, n, seed, keep_prob, fill)
    return out
