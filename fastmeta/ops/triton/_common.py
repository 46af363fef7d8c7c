"""Block sizes and the shared first stage of the Triton row reductions.

Under the interpreter the cost grows with programs x block steps (docs/building.md), so blocks are large
there; on a GPU a 1024-wide block with 4 warps is the usual choice. One autotune config each
(more than one fails under the interpreter: "0 active drivers").
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK = 4096 if INTERPRET else 1024
# Elements one program reduces in the first stage of a two-stage row reduction.
CHUNK = 16384 if INTERPRET else 8192


def one_config(**kwargs) -> list:
    return [triton.Config(dict(kwargs), num_warps=4)]


@triton.jit
def sumsq_partial_kernel(g_ptr, m_ptr, partial_ptr, D, S, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
                         CHUNK: tl.constexpr):
    """partial[t, s] = sum over one CHUNK slice of row t of (g*m)^2 (input precision)."""
    t = tl.program_id(0)
    s = tl.program_id(1)
    acc = tl.zeros([BLOCK], dtype=g_ptr.dtype.element_ty)
    row = t.to(tl.int64) * D
    for start in range(0, CHUNK, BLOCK):
        offs = s * CHUNK + start + tl.arange(0, BLOCK)
        inb = offs < D
        x = tl.load(g_ptr + row + offs, mask=inb, other=0.0)
        if HAS_MASK:
            x = x * tl.load(m_ptr + row + offs, mask=inb, other=0.0)
        acc += x * x
    tl.store(partial_ptr + t * S + s, tl.sum(acc, axis=0))
