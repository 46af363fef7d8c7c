"""What both compatibility layers share: running the one original module on fast-weight tensors,
per-view training flags, and argument checks whose errors name the argument."""
from __future__ import annotations

import contextlib
import numbers
from typing import Iterator, Mapping

import torch
from torch import nn
from torch.func import functional_call


class Modes:
    """The ``training`` flag of every submodule of ``module`` as seen by one functional view.

    A learn2learn clone (``clone_module`` copies each submodule's ``__dict__``) and a higher
    patched model (a new module) own their train/eval modes: ``clone.eval()`` leaves the original
    in training mode. Views here share the original module, so each keeps its flags and applies
    them only for the duration of its own forward.
    """

    def __init__(self, module: nn.Module, flags: list | None = None):
        self.flags = flags if flags is not None else [(m, m.training) for m in module.modules()]

    def copy(self) -> "Modes":
        return Modes(None, list(self.flags))  # type: ignore[arg-type]

    def set(self, mode: bool) -> None:
        self.flags = [(m, bool(mode)) for m, _ in self.flags]

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        changed = [(m, m.training) for m, flag in self.flags if m.training != flag]
        for m, was in changed:
            m.training = not was
        try:
            yield
        finally:
            for m, was in changed:
                m.training = was


def call(module: nn.Module, tensors: Mapping[str, torch.Tensor], modes: Modes, args, kwargs):
    """``module(*args, **kwargs)`` with ``tensors`` (``{name: tensor}``, parameters and possibly
    buffers) in place of the module's own; names not given use the module's own tensors. Tied
    parameters stay tied (one entry updates every alias)."""
    with modes.applied():
        return functional_call(module, dict(tensors), tuple(args), kwargs, tie_weights=True, strict=False)


def check_module(model, name: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name}: expected a torch.nn.Module, got {type(model).__name__}")
    return model


def check_lr(lr, name: str = "lr"):
    """A learning rate: a real number (not a bool) or a one-element tensor (possibly learned)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise TypeError(f"{name}: expected a float or a one-element floating tensor, got a "
                            f"{lr.dtype} tensor of shape {tuple(lr.shape)}")
        return lr
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"{name}: expected a float or a one-element floating tensor, got {type(lr).__name__}")
    return lr


def check_loss(loss, name: str = "loss") -> torch.Tensor:
    """The loss of an inner step: a one-element tensor with a graph to the fast weights."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"{name}: expected a scalar loss (reduce it, e.g. with .mean()), got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError(f"{name}: does not require grad: it was not computed from the fast weights "
                         "(computed under torch.no_grad(), or from detached tensors?)")
    return loss
