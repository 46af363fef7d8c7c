"""Flat parameter layout: a module's meta-parameters as one vector, task parameters as rows.

fastmeta keeps every meta-parameter of a model in one flat vector ``Theta`` of length ``P``,
ordered *adapted parameters first*:

    Theta = [ theta_adapted (D) | theta_shared (P - D) ]

* **adapted** parameters are updated by the inner loop, so each task has its own copy; a
  meta-batch of T tasks holds them as rows of a ``[T, D]`` tensor (docs/design.md, "the one idea").
* **shared** parameters are not adapted in the inner loop (ANIL's body) but are still
  meta-learned: the outer gradient reaches them through the adapted head.

Parameters with ``requires_grad=False`` are constants and not part of the layout; buffers are
left to the module (``functional_call`` falls back to them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import nn

Adapt = Union[str, Sequence[str]]


@dataclass(frozen=True)
class _Slot:
    name: str
    shape: torch.Size
    offset: int
    numel: int


def _head_names(module: nn.Module) -> list[str]:
    """Names of the parameters of the last submodule (in registration order) that owns any."""
    last: list[str] = []
    for prefix, sub in module.named_modules():
        own = [n for n, p in sub.named_parameters(recurse=False) if p.requires_grad]
        if own:
            last = [f"{prefix}.{n}" if prefix else n for n in own]
    return last


class ParamLayout:
    """How a module's meta-parameters map onto a flat vector ``[P]`` and task rows ``[T, D]``.

    Args:
        module: the model.
        adapt: ``"all"`` (MAML: every trainable parameter adapts), ``"head"`` (ANIL: only the
            parameters of the last submodule that owns parameters, normally the final
            ``nn.Linear``), or an explicit list of parameter names.

    Attributes:
        adapted, shared: parameter names in flat order.
        D: number of adapted scalars (row length). P: number of meta-parameter scalars.
    """

    def __init__(self, module: nn.Module, adapt: Adapt = "all"):
        named = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if not named:
            raise ValueError("model: it has no trainable parameters (requires_grad=True)")
        if isinstance(adapt, str):
            if adapt == "all":
                adapted = list(named)
            elif adapt == "head":
                adapted = _head_names(module)
            else:
                raise ValueError(f"adapt: expected 'all', 'head' or a list of parameter names, got {adapt!r}")
        else:
            adapted = list(adapt)
            unknown = [n for n in adapted if n not in named]
            if unknown:
                raise ValueError(f"adapt: unknown or frozen parameter names {unknown}; trainable: {list(named)}")
            if len(set(adapted)) != len(adapted):
                raise ValueError("adapt: parameter names must be unique")
        if not adapted:
            raise ValueError("adapt: selects no parameters to adapt")
        adapted_set = set(adapted)
        shared = [n for n in named if n not in adapted_set]
        dtypes = {p.dtype for p in named.values()}
        devices = {p.device for p in named.values()}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"model: all trainable parameters must share one dtype and device, got {dtypes}, {devices}")

        self.adapted: list[str] = adapted
        self.shared: list[str] = shared
        self.slots: list[_Slot] = []
        offset = 0
        for n in adapted + shared:
            p = named[n]
            self.slots.append(_Slot(n, p.shape, offset, p.numel()))
            offset += p.numel()
        self.D: int = sum(s.numel for s in self.slots[: len(adapted)])
        self._adapted_numels: tuple[int, ...] = tuple(s.numel for s in self.slots[: len(adapted)])
        self.P: int = offset
        self.dtype: torch.dtype = dtypes.pop()
        self.device: torch.device = devices.pop()

    # ------------------------------------------------------------------ flat <-> named
    def flatten(self, module: nn.Module) -> torch.Tensor:
        """The module's current meta-parameters as a detached flat vector ``[P]``."""
        named = dict(module.named_parameters())
        with torch.no_grad():  # cheaper than one detach per tensor
            return torch.cat([named[s.name].reshape(-1) for s in self.slots])

    def split(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[P] -> ([D] adapted, [P-D] shared)`` (views; one split node, see :meth:`named`)."""
        if self.P == self.D:  # nothing shared (MAML): no split node on the path of every gradient
            return theta, theta[self.D:]
        adapted, shared = theta.split([self.D, self.P - self.D])
        return adapted, shared

    def named(self, row: torch.Tensor, shared: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Named views for ``functional_call``: adapted from ``row`` (``[D]``), shared from ``shared``.

        ``row`` may carry leading batch dims (``[..., D]``), and so may ``shared`` (``[..., P-D]``,
        e.g. one copy per task); the views keep them.
        """
        out = self.named_adapted(row)
        out.update(self.named_shared(shared))
        return out

    def named_adapted(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        """The adapted half of :meth:`named`: ``{name: [..., *shape]}`` views of ``row`` ``[..., D]``."""
        if row.shape[-1] != self.D:
            raise ValueError(f"row: expected last dim D={self.D}, got shape {tuple(row.shape)}")
        lead = row.shape[:-1]
        # One split instead of a slice per tensor: each slice's backward zero-fills a full [D]
        # buffer and adds into it (18 x 448 KB per backward on Conv-4, ~5% of a MAML step), the
        # split's backward is a single concatenation.
        parts = row.split(self._adapted_numels, dim=-1)
        return {s.name: part.reshape(*lead, *s.shape) for s, part in zip(self.slots, parts)}

    def named_shared(self, shared: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The shared half of :meth:`named`: views of ``shared`` ``[..., P-D]`` (empty if nothing is shared)."""
        n_ad = len(self.adapted)
        if n_ad == len(self.slots):
            return {}
        if shared is None or shared.dim() == 0 or shared.shape[-1] != self.P - self.D:
            raise ValueError(f"shared: expected last dim P-D={self.P - self.D}, got "
                             f"{None if shared is None else tuple(shared.shape)}")
        sizes = [s.numel for s in self.slots[n_ad:]]
        sh_lead = shared.shape[:-1]
        return {s.name: part.reshape(*sh_lead, *s.shape)
                for s, part in zip(self.slots[n_ad:], shared.split(sizes, dim=-1))}

    def write_grad(self, module: nn.Module, grad: torch.Tensor, accumulate: bool = False) -> None:
        """Write a flat meta-gradient ``[P]`` into the parameters' ``.grad``."""
        if grad.shape != (self.P,):
            raise ValueError(f"grad: expected shape ({self.P},), got {tuple(grad.shape)}")
        named = dict(module.named_parameters())
        for s in self.slots:
            g = grad[s.offset: s.offset + s.numel].view(s.shape).to(named[s.name].dtype)
            p = named[s.name]
            if accumulate and p.grad is not None:
                p.grad.add_(g)
            else:
                p.grad = g.clone()

    def load(self, module: nn.Module, theta: torch.Tensor) -> None:
        """Copy a flat vector ``[P]`` into the module's parameters (in place, no grad)."""
        named = dict(module.named_parameters())
        with torch.no_grad():
            for s in self.slots:
                named[s.name].copy_(theta[s.offset: s.offset + s.numel].view(s.shape))

    def __repr__(self) -> str:
        return f"ParamLayout(D={self.D}, P={self.P}, adapted={len(self.adapted)} tensors, shared={len(self.shared)} tensors)"

