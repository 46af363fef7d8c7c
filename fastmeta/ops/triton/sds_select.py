"""Triton ``sds_select``: per row, the k samples with the largest loss increase (ties: lower index;
NaN first, as torch.sort). A selection without a sort: program (i-block, t) counts, for each of its
elements i, how many elements j of the row rank ahead of it (tiles of j, so any N works), and every
element with rank < k writes its index to ``out[t, rank]``. O(N^2) compares per row, which is cheap
for per-task sample counts (tens to a few thousands)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import register
from . import _common, _launch

row_start = _common.row_start


@triton.jit
def _sds_select_kernel(clean_ptr, pert_ptr, out_ptr, T, N, K, TILE: tl.constexpr):
    ii = tl.program_id(0) * TILE + tl.arange(0, TILE)
    valid_i = ii < N
    for t in range(tl.program_id(1), T, tl.num_programs(1)):
        row = row_start(t, N)
        di = tl.load(pert_ptr + row + ii, mask=valid_i, other=0.0) - tl.load(clean_ptr + row + ii, mask=valid_i,
                                                                             other=0.0)
        ni = di != di
        rank = tl.zeros([TILE], dtype=tl.int32)
        for start in range(0, N, TILE):
            jj = start + tl.arange(0, TILE)
            valid_j = jj < N
            dj = tl.load(pert_ptr + row + jj, mask=valid_j, other=0.0) - tl.load(clean_ptr + row + jj,
                                                                                 mask=valid_j, other=0.0)
            nj = dj != dj
            # ahead[j, i]: element j ranks ahead of element i.
            lower = jj[:, None] < ii[None, :]
            ordered = (dj[:, None] > di[None, :]) | ((dj[:, None] == di[None, :]) & lower)
            ahead = (nj[:, None] & (~ni[None, :] | lower)) | (~nj[:, None] & ~ni[None, :] & ordered)
            ahead = ahead & valid_j[:, None]
            rank += tl.sum(ahead.to(tl.int32), axis=0)
        tl.store(out_ptr + row_start(t, K) + rank, ii.to(tl.int64), mask=valid_i & (rank < K))


@register("sds_select", "triton")
def sds_select(loss_clean, loss_perturbed, k):
    loss_clean, loss_perturbed = loss_clean.contiguous(), loss_perturbed.contiguous()
    t, n = loss_clean.shape
    out = torch.empty((t, k), device=loss_clean.device, dtype=torch.int64)
    if t > 0 and n > 0:
        tile = min(_launch.BLOCKS.tile, triton.next_power_of_2(n))
        with _common.device_guard(loss_clean.device):
            _sds_select_kernel[_launch.row_block_grid(t, n, tile)](loss_clean, loss_perturbed, out, t, n, k,
                                                                  TILE=tile, num_warps=_launch.NUM_WARPS)
    return out
