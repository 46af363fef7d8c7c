"""What the Triton kernels share: the device guard, int64 row offsets and the two-stage row reduction.

Grids and block sizes are in ``_launch`` (pure Python). Each kernel launches with one configuration
(``num_warps`` = ``_launch.NUM_WARPS``, no autotuning: more than one configuration fails under the
interpreter, "0 active drivers").

Scalar arguments: Triton's JIT types an un-annotated Python float argument as fp32 (the interpreter
keeps it a Python float, exact), so a float64 kernel would see fp32-rounded scalars on a GPU. Float
scalars are therefore annotated ``tl.float64`` and converted with ``tl.full([], x, dtype)`` to the
dtype the math needs, which behaves the same on a GPU and under the interpreter.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


def device_guard(device: torch.device):
    """Launch on ``device``: Triton launches on the *current* CUDA device and its current stream, so
    tensors on ``cuda:1`` while device 0 is current must be launched under ``torch.cuda.device``."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@triton.jit
def row_start(t, D):
    """Offset of row ``t`` of a row-major ``[T, D]`` matrix, in int64 (T * D may pass 2**31)."""
    return tl.cast(t, tl.int64) * D


@triton.jit
def sumsq_partial_kernel(g_ptr, m_ptr, partial_ptr, T, D, S, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
                         CHUNK: tl.constexpr):
    """Stage 1: ``partial[t, s]`` = sum over the CHUNK-wide slice s of row t of (g*m)^2, in the input
    precision. Grid ``_launch.row_block_grid(T, D, CHUNK)``: slices on axis 0, rows on axis 1."""
    s = tl.program_id(0)
    for t in range(tl.program_id(1), T, tl.num_programs(1)):
        row = row_start(t, D)
        acc = tl.zeros([BLOCK], dtype=g_ptr.dtype.element_ty)
        for start in range(0, CHUNK, BLOCK):
            offs = row_start(s, CHUNK) + start + tl.arange(0, BLOCK)
            inb = offs < D
            x = tl.load(g_ptr + row + offs, mask=inb, other=0.0)
            if HAS_MASK:
                x = x * tl.load(m_ptr + row + offs, mask=inb, other=0.0)
            acc += x * x
        tl.store(partial_ptr + row_start(t, S) + s, tl.sum(acc, axis=0))


@triton.jit
def sum_partials_kernel(partial_ptr, out_ptr, R, S, SQRT: tl.constexpr, BLOCK_S: tl.constexpr):
    """Stage 2: ``out[r]`` = sum of the S partials of row r (square-rooted if SQRT), BLOCK_S partials
    per step: the tile stays register-sized for any S. Grid ``_launch.per_row_grid(R)``."""
    for r in range(tl.program_id(0), R, tl.num_programs(0)):
        acc = tl.zeros([BLOCK_S], dtype=partial_ptr.dtype.element_ty)
        for start in range(0, S, BLOCK_S):
            offs = start + tl.arange(0, BLOCK_S)
            acc += tl.load(partial_ptr + row_start(r, S) + offs, mask=offs < S, other=0.0)
        total = tl.sum(acc, axis=0)
        if SQRT:
            total = tl.sqrt(total)
        tl.store(out_ptr + r, total)
