"""``swp_mask``: Bernoulli keep-masks for ESAM's stochastic weight perturbation (SWP).

ESAM (Du et al. 2022), used by Sharp-MAML sec. 5.4, perturbs only a random subset of the weights.
Two granularities exist and both are offered:

* ``mode="element"`` - one Bernoulli(keep_prob) draw per element: ESAM paper, Algorithm 1.
* ``mode="tensor"`` - one draw per parameter tensor (``segments`` gives each parameter's numel along
  the flat ``D`` axis), every element of a kept tensor is kept: ESAM's public code, which also
  rescales kept entries by ``1/keep_prob`` (``rescale=True``) so the mask is unbiased in expectation.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from . import _backend, _validate

__all__ = ["swp_mask"]

_SEED_BOUND = 2**62

# The keep rule, implemented bit for bit by every backend (reference.py, triton/swp_mask.py,
# csrc/cpu/swp_mask_cpu.cpp and csrc/cuda/swp_mask_kernel.cu, the last two through one shared
# function in csrc/cuda/swp_mask_keep.h), so a seed gives the same mask on every backend and device:
#   h_i    = splitmix64(splitmix64(seed) + i)      uint64 arithmetic, i = flat index into [rows, cols]
#   keep_i = (h_i >> 11) < ceil(keep_prob * 2**53)
# i.e. u_i = (h_i >> 11) / 2**53 is a uniform double in [0, 1) with 53 random bits, kept when
# u_i < keep_prob (keep_prob = 1 keeps everything). A counter-based hash: the mask depends on
# (seed, index) only, never on threads, grids or block sizes.
SPLITMIX64_GAMMA = 0x9E3779B97F4A7C15
SPLITMIX64_MUL1 = 0xBF58476D1CE4E5B9
SPLITMIX64_MUL2 = 0x94D049BB133111EB
_MASK64 = 2**64 - 1


def splitmix64(z: int) -> int:
    """splitmix64's finalizer of one uint64 (Python ints, arithmetic mod 2**64)."""
    z = (z + SPLITMIX64_GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * SPLITMIX64_MUL1) & _MASK64
    z = ((z ^ (z >> 27)) * SPLITMIX64_MUL2) & _MASK64
    return z ^ (z >> 31)


def keep_threshold(keep_prob: float) -> int:
    """Keep element i when ``(h_i >> 11) < keep_threshold(keep_prob)``: ``ceil(keep_prob * 2**53)``,
    exact in float64 (a power-of-two scaling)."""
    return math.ceil(math.ldexp(keep_prob, 53))


@torch.library.custom_op("fastmeta_ops::swp_mask", mutates_args=())
def _swp_mask_op(rows: int, cols: int, keep_prob: float, seed: int, rescale: bool, device: torch.device,
                 dtype: torch.dtype) -> Tensor:
    return _backend.get_impl("swp_mask", device)(rows, cols, keep_prob, seed, rescale, device, dtype)


@_swp_mask_op.register_fake
def _(rows, cols, keep_prob, seed, rescale, device, dtype):
    return torch.empty((rows, cols), device=device, dtype=dtype)


def _draw_seed(generator: torch.Generator | None) -> int:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, _SEED_BOUND, (1,), generator=generator, device=gen_device).item())


def swp_mask(shape: int | Sequence[int], keep_prob: float, seed: int | None = None,
             generator: torch.Generator | None = None, mode: str = "element",
             segments: Sequence[int] | None = None, rescale: bool = False,
             device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Random keep-mask for ESAM SWP, to pass as ``mask`` to :func:`sam_perturb`.

    Args:
        shape: mask shape, e.g. ``[T, D]`` (each task row gets independent draws) or ``[D]``.
        keep_prob: probability of keeping an element (or a tensor), in (0, 1]. ESAM's ``beta``.
        seed: integer seed in ``[0, 2**62)``. Same seed and shape -> the same mask, bit for bit, on
            every backend and device: element i is kept when a counter-based splitmix64 hash of
            (seed, i), read as a uniform double in [0, 1), is below ``keep_prob``.
        generator: a ``torch.Generator`` to draw the seed from (instead of ``seed``). With neither,
            the seed comes from torch's default generator, so ``torch.manual_seed`` makes it repeatable.
        mode: ``"element"`` (ESAM Alg. 1) or ``"tensor"`` (ESAM code; one draw per segment per row).
        segments: for ``mode="tensor"``, the numel of each parameter along the last dim; sums to D.
        rescale: kept entries are ``1/keep_prob`` instead of 1.
        device, dtype: of the mask (default: the generator's device, else CPU; float32).

    Returns:
        A ``shape`` tensor of 0 and 1 (or ``1/keep_prob``). Not differentiable (a constant).
    """
    keep_prob = _validate.unit_interval(keep_prob, "keep_prob")
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if len(dims) == 0 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in dims):
        raise ValueError(f"shape must be a non-empty sequence of non-negative ints, got {shape!r}")
    if dtype not in _validate.FLOAT_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if mode not in ("element", "tensor"):
        raise ValueError(f"mode must be 'element' or 'tensor', got {mode!r}")
    if seed is not None and generator is not None:
        raise ValueError("seed and generator: pass at most one")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _SEED_BOUND):
        raise ValueError(f"seed must be an int in [0, 2**62), got {seed!r}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if seed is None:
        seed = _draw_seed(generator)
    rows, cols = math.prod(dims[:-1]), dims[-1]
    if mode == "element":
        if segments is not None:
            raise ValueError("segments is only used with mode='tensor'")
        return _swp_mask_op(rows, cols, keep_prob, seed, bool(rescale), device, dtype).reshape(dims)
    if segments is None or len(segments) == 0:
        raise ValueError("segments (per-parameter numels along D) is required with mode='tensor'")
    segs = [int(s) for s in segments]
    if any(s <= 0 for s in segs) or sum(segs) != cols:
        raise ValueError(f"segments must be positive and sum to D={cols}, got sum {sum(segs)}")
    draws = _swp_mask_op(rows, len(segs), keep_prob, seed, bool(rescale), device, dtype)
    repeats = torch.tensor(segs, device=device)
    return draws.repeat_interleave(repeats, dim=1, output_size=cols).reshape(dims)
