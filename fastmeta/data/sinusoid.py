"""Sinusoid regression tasks (Finn et al. 2017, sec. 5.1)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..tasks import TaskBatch


class SinusoidTasks:
    """Tasks ``y = A sin(x - phi)`` with ``A ~ U[0.1, 5]``, ``phi ~ U[0, pi]``, ``x ~ U[-5, 5]``.

    ``sample(T)`` returns a :class:`TaskBatch` with ``[T, k_shot, 1]`` support and
    ``[T, k_query, 1]`` query tensors. Reproducible through ``seed`` (its own generator).
    """

    def __init__(self, k_shot: int = 10, k_query: int = 10, seed: Optional[int] = 0,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        if k_shot < 1 or k_query < 1:
            raise ValueError(f"k_shot/k_query: expected >= 1, got {k_shot}/{k_query}")
        self.k_shot, self.k_query, self.dtype, self.device = k_shot, k_query, dtype, device
        self.gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())

    def _draw(self, *shape, lo, hi):
        return lo + (hi - lo) * torch.rand(*shape, generator=self.gen, dtype=torch.float64)

    def sample(self, num_tasks: int) -> TaskBatch:
        if num_tasks < 1:
            raise ValueError(f"num_tasks: expected >= 1, got {num_tasks}")
        amp = self._draw(num_tasks, 1, 1, lo=0.1, hi=5.0)
        phase = self._draw(num_tasks, 1, 1, lo=0.0, hi=math.pi)
        n = self.k_shot + self.k_query
        x = self._draw(num_tasks, n, 1, lo=-5.0, hi=5.0)
        y = amp * torch.sin(x - phase)
        x, y = x.to(self.device, self.dtype), y.to(self.device, self.dtype)
        k = self.k_shot
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])
