"""Triton ``row_norm``: ``out[t] = sqrt(sum_d g[t, d]^2)``.

Two-stage reduction so few long rows still fill the machine: stage 1 (``_common.sumsq_partial_kernel``)
writes per-chunk sums of squares ``[T, S]``, stage 2 (``_common.sum_partials_kernel``) adds each row's
S partials in bounded tiles and takes the root. One read of g.
"""

from __future__ import annotations

import torch

from .._backend import register
from . import _common, _launch


def row_sumsq_partials(g: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[T, S]`` partial sums of squares of ``g*mask`` (contiguous ``[T, D]``), S = cdiv(D, chunk)."""
    b = _launch.BLOCKS
    t, d = g.shape
    s = max(1, _launch.cdiv(d, b.chunk))
    partial = torch.empty((t, s), device=g.device, dtype=g.dtype)
    if t > 0:
        _common.sumsq_partial_kernel[_launch.row_block_grid(t, d, b.chunk)](
            g, mask if mask is not None else g, partial, t, d, s, HAS_MASK=mask is not None,
            BLOCK=min(b.block, b.chunk), CHUNK=b.chunk, num_warps=_launch.NUM_WARPS)
    return partial


def sum_rows(partial: torch.Tensor, sqrt: bool) -> torch.Tensor:
    """``[R, S] -> [R]``: the sum of each row (its square root if ``sqrt``), in bounded tiles."""
    r, s = partial.shape
    out = torch.empty(r, device=partial.device, dtype=partial.dtype)
    if r > 0:
        _common.sum_partials_kernel[_launch.per_row_grid(r)](partial, out, r, s, SQRT=sqrt,
                                                            BLOCK_S=_launch.reduce_tile(s, _launch.BLOCKS.reduce),
                                                            num_warps=_launch.NUM_WARPS)
    return out


@register("row_norm", "triton")
def row_norm(g: torch.Tensor) -> torch.Tensor:
    g = g.contiguous()
    with _common.device_guard(g.device):
        return sum_rows(row_sumsq_partials(g, None), sqrt=True)
