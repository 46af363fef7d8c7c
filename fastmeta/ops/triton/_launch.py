"""Launch configurations of the Triton kernels: block sizes and grids, as pure functions.

CUDA caps a grid at 2**31 - 1 programs on axis 0 and 65,535 on axes 1 and 2 (a bigger grid fails to
launch with "invalid argument"). The rule every kernel here follows:

* axis 0 carries the long axis: blocks of columns of a ``[T, D]`` matrix, or blocks of a flat range
  (D = 70M at 1024 per block is 68,360 programs, over the 65,535 of axis 1);
* axis 1 carries the task rows, capped at :data:`MAX_GRID_YZ`: program ``p`` of axis 1 walks rows
  ``p, p + grid[1], ...`` (a grid-stride loop), so T = 70,000 runs, and T <= 65,535 is one row each;
* one-program-per-row kernels (the second stage of a row reduction) put rows on axis 0, capped at
  :data:`MAX_GRID_X`, with the same grid-stride loop.

Element offsets are int64 in the kernels (``_common.row_start``): T * D may pass 2**31.

Block sizes: a GPU runs 1024-element blocks (4 warps), 8192-element reduction chunks and 64 x 64
``sds_select`` compare tiles. Under ``TRITON_INTERPRET=1`` the cost grows with programs x block steps
(docs/building.md), so the interpreter runs larger blocks by default; tests also run the GPU sizes
(``tests/ops/conftest.py``). The wrappers read :data:`BLOCKS` at every call for that reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65_535


@dataclass(frozen=True)
class Blocks:
    """Block sizes of one launch configuration (all powers of two)."""

    block: int  # elements per program of the elementwise kernels
    chunk: int  # elements one program sums in the first stage of a row reduction
    reduce: int  # partial sums one step of the second stage adds (a bounded tile for any D)
    tile: int  # sds_select compares a [tile, tile] block of sample pairs per step


GPU = Blocks(block=1024, chunk=8192, reduce=1024, tile=64)
INTERPRETER = Blocks(block=4096, chunk=16384, reduce=1024, tile=512)
BLOCKS = INTERPRETER if os.environ.get("TRITON_INTERPRET", "0") == "1" else GPU
NUM_WARPS = 4


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _axis0(programs: int, what: str) -> int:
    if programs > MAX_GRID_X:
        raise ValueError(f"{what}: {programs} programs exceed CUDA's grid limit of {MAX_GRID_X} on axis 0")
    return max(1, programs)


def row_block_grid(rows: int, n: int, block: int) -> tuple[int, int]:
    """Grid of a kernel over (block of ``block`` columns of an ``n``-wide row, row): column blocks on
    axis 0, rows on axis 1 up to :data:`MAX_GRID_YZ` (the kernel loops over the rest)."""
    return _axis0(cdiv(n, block), f"{n} columns in blocks of {block}"), max(1, min(rows, MAX_GRID_YZ))


def flat_grid(n: int, block: int) -> tuple[int]:
    """Grid of a kernel over ``n`` elements (or columns) in blocks of ``block``, on axis 0."""
    return (_axis0(cdiv(n, block), f"{n} elements in blocks of {block}"),)


def per_row_grid(rows: int) -> tuple[int]:
    """Grid of a kernel with one program per row: rows on axis 0 up to :data:`MAX_GRID_X`."""
    return (max(1, min(rows, MAX_GRID_X)),)


def reduce_tile(partials: int, reduce: int) -> int:
    """Tile of a second-stage sum over ``partials`` values: the next power of two, at most ``reduce``."""
    return min(reduce, 1 << max(0, partials - 1).bit_length())


def grid_rows(grid_axis: int, rows: int, program: int) -> range:
    """The rows program ``program`` of a ``grid_axis``-wide axis visits (the kernels' row loop)."""
    return range(program, rows, grid_axis)
