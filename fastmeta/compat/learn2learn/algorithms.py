"""learn2learn's ``MAML`` and ``MetaSGD`` wrappers, implemented on fast-weight tensors.

learn2learn's ``clone()`` copies the module object tree (``clone_module``: every parameter is
``param.clone()``, so gradients flow back to the original) and ``adapt(loss)`` swaps each cloned
parameter for ``p - lr * grad`` (``update_module``). Here a clone is a dict ``{name: tensor}`` of
fast weights plus a reference to the one original module, which is run on those tensors with
``torch.func.functional_call``: the same graph, without re-building Python module trees per task.

Semantics kept from learn2learn:

* a clone's fast weights start as the original parameters, so ``loss.backward()`` on a clone's
  query loss puts the meta-gradient in the original parameters' ``.grad``; clones of clones and
  ``adapt`` on the wrapper itself work the same way;
* ``adapt`` differentiates with ``create_graph=True`` unless ``first_order`` (then the inner
  gradient is a constant, and the fast weights still depend on the initial weights);
* buffers are shared with the original, as ``clone_module`` shares buffers that do not require
  grad: BatchNorm's running statistics are updated in place by a clone's forward, exactly as in
  learn2learn (with ``track_running_stats=False`` there are none);
* each clone owns its train/eval flags (``clone.eval()`` leaves the original in training mode);
* ``allow_unused`` / ``allow_nograd`` as in learn2learn: an unused parameter keeps its value; a
  parameter with ``requires_grad=False`` is not adapted (``allow_nograd``) or refused.

Not kept: a clone is not an ``nn.Module`` tree: ``clone.module`` is the shared original (whose own
parameters are the meta-parameters) and a clone's submodules cannot be called with its fast
weights (``clone.features(x)`` raises; call the clone itself).
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn

from .._functional import Modes, call, check_loss, check_lr, check_module

__all__ = ["MAML", "MetaSGD"]


def _grads(loss: torch.Tensor, fast: dict, names: list, second_order: bool, allow_unused: bool) -> tuple:
    try:
        return torch.autograd.grad(loss, [fast[n] for n in names], retain_graph=second_order,
                                   create_graph=second_order, allow_unused=allow_unused)
    except RuntimeError as e:
        if "not have been used in the graph" in str(e):
            raise RuntimeError(f"loss: does not depend on every parameter ({e}); pass "
                               "allow_unused=True to leave unused parameters unadapted") from e
        raise


def _differentiable(fast: dict, allow_nograd: bool) -> list:
    """The names ``adapt`` differentiates: all, or with ``allow_nograd`` those requiring grad."""
    frozen = [n for n, t in fast.items() if not t.requires_grad]
    if frozen and not allow_nograd:
        raise ValueError(f"allow_nograd: parameters {frozen[:4]} do not require grad; pass "
                         "allow_nograd=True to adapt only the others")
    return [n for n in fast if n not in frozen]


class _Learner(nn.Module):
    """Common machinery: ``_fast`` is ``None`` on the meta-model itself (which then behaves as
    the wrapped module) and ``{name: tensor}`` on a clone or after ``adapt``."""

    def _init_common(self, model: nn.Module) -> None:
        check_module(model, "model")
        self.module = model
        self._fast: Optional[dict] = None
        self._modes: Optional[Modes] = None

    def _spawn(self) -> "_Learner":
        # A clone must not register the shared module as a child: clone.zero_grad(), .to() or
        # .train() would then reach the meta-model's own parameters and flags.
        new = type(self).__new__(type(self))
        nn.Module.__init__(new)
        new.__dict__["module"] = self.module
        new._fast = dict(self._fast) if self._fast is not None else dict(self.module.named_parameters())
        new._modes = self._modes.copy() if self._modes is not None else Modes(self.module)
        new.training = self.training
        return new

    def _start_adapting(self) -> dict:
        if self._fast is None:  # learn2learn allows adapt() on the wrapper itself: it becomes a clone
            self._fast = dict(self.module.named_parameters())
            self._modes = Modes(self.module)
        return self._fast

    def forward(self, *args, **kwargs):
        if self._fast is None:
            return self.module(*args, **kwargs)
        return call(self.module, self._fast, self._modes, args, kwargs)

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """As learn2learn: the meta-model's parameters (``module.*``, then MetaSGD's ``lrs.*``);
        on a clone, its fast weights under the same ``module.*`` names."""
        if self._fast is None:
            yield from super().named_parameters(prefix, recurse, remove_duplicate)
            return
        head = prefix + "." if prefix else ""
        for n, t in self._fast.items():
            yield f"{head}module.{n}", t
        for n, p in super().named_parameters(prefix, recurse, remove_duplicate):
            if not n.startswith(f"{head}module."):
                yield n, p

    def train(self, mode: bool = True):
        if self._fast is None:
            return super().train(mode)
        self.training = bool(mode)
        self._modes.set(mode)
        return self

    def __getattr__(self, attr):
        # learn2learn forwards unknown attributes to the wrapped module. On a clone that would
        # hand out submodules holding the meta-parameters, silently not the fast weights: refuse.
        try:
            return super().__getattr__(attr)
        except AttributeError:
            module = self.__dict__.get("module")
            if module is None:
                module = self.__dict__["_modules"].get("module")
            if self.__dict__.get("_fast") is not None and hasattr(module, attr):
                raise AttributeError(f"{attr}: a fastmeta clone runs only as a whole (call the clone); "
                                     "its submodules would use the meta-parameters, not the fast weights") from None
            return getattr(module, attr)


class MAML(_Learner):
    """Model-Agnostic Meta-Learning (Finn et al. 2017) with learn2learn's interface.

    ``maml = MAML(model, lr)``; per task ``learner = maml.clone()``, then ``learner.adapt(loss)``
    with ``loss`` a scalar computed from ``learner(x)``: the fast weights become
    ``theta' = theta - lr * grad loss(theta)`` (second order: the graph of the gradient is kept).
    ``learner(x)`` runs the model with the fast weights; ``query_loss.backward()`` accumulates
    ``d query_loss / d theta`` into the original parameters' ``.grad``.

    Args:
        model: any ``nn.Module``.
        lr: inner learning rate (float, or a one-element tensor, which may be learned).
        first_order: drop the second-order terms (FOMAML) by default in ``adapt``.
        allow_unused: allow parameters unused by the loss (they keep their value); defaults to
            ``allow_nograd``.
        allow_nograd: leave parameters with ``requires_grad=False`` unadapted instead of refusing.
    """

    def __init__(self, model: nn.Module, lr, first_order: bool = False, allow_unused: Optional[bool] = None,
                 allow_nograd: bool = False):
        super().__init__()
        self._init_common(model)
        self.lr = check_lr(lr)
        self.first_order = bool(first_order)
        self.allow_nograd = bool(allow_nograd)
        self.allow_unused = self.allow_nograd if allow_unused is None else bool(allow_unused)

    def clone(self, first_order: Optional[bool] = None, allow_unused: Optional[bool] = None,
              allow_nograd: Optional[bool] = None) -> "MAML":
        """A learner whose fast weights are this one's (no copy: tensors are never modified in
        place), differentiable back to the original parameters; options default to this one's."""
        new = self._spawn()
        new.lr = self.lr
        new.first_order = self.first_order if first_order is None else bool(first_order)
        new.allow_unused = self.allow_unused if allow_unused is None else bool(allow_unused)
        new.allow_nograd = self.allow_nograd if allow_nograd is None else bool(allow_nograd)
        return new

    def adapt(self, loss: torch.Tensor, first_order: Optional[bool] = None, allow_unused: Optional[bool] = None,
              allow_nograd: Optional[bool] = None) -> None:
        """One inner step ``theta' = theta - lr * d loss / d theta`` on this learner's fast weights.

        ``loss``: a scalar tensor computed from this learner's forward. Options default to the
        learner's own (see :class:`MAML`)."""
        check_loss(loss)
        first_order = self.first_order if first_order is None else first_order
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        fast = self._start_adapting()
        names = _differentiable(fast, allow_nograd)
        grads = _grads(loss, fast, names, not first_order, allow_unused)
        for n, g in zip(names, grads):
            if g is not None:
                fast[n] = fast[n] - self.lr * g

    def extra_repr(self) -> str:
        return f"lr={self.lr}, first_order={self.first_order}" + (", clone" if self._fast is not None else "")


class MetaSGD(_Learner):
    """Meta-SGD (Li et al. 2017) with learn2learn's interface: MAML with a learned learning rate
    per parameter entry.

    ``lrs`` (``nn.ParameterList``, one tensor shaped like each parameter of ``model``, initialized
    to ``lr``) are parameters of this wrapper, so ``optimizer(meta.parameters())`` meta-learns
    them. ``adapt`` sets ``theta'_i = theta_i - lrs_i * grad_i`` (elementwise); clones share the
    original ``lrs`` so the query loss's ``backward()`` reaches them.

    Args:
        model: any ``nn.Module``.
        lr: initial value of every learned rate.
        first_order: hold the inner gradients constant (the rates still get their gradient).
        lrs: explicit initial rates (one tensor per parameter of ``model``), overriding ``lr``.
    """

    def __init__(self, model: nn.Module, lr=1.0, first_order: bool = False, lrs=None):
        super().__init__()
        self._init_common(model)
        self.lr = check_lr(lr)
        params = list(model.parameters())
        if lrs is None:
            lrs = nn.ParameterList([nn.Parameter(torch.ones_like(p) * lr) for p in params])
        elif len(lrs) != len(params) or any(r.shape != p.shape for r, p in zip(lrs, params)):
            raise ValueError(f"lrs: expected one tensor shaped like each of the {len(params)} parameters of model")
        self.lrs = lrs
        self.first_order = bool(first_order)

    def clone(self) -> "MetaSGD":
        """A learner with this one's fast weights and the same learned rates (differentiable)."""
        new = self._spawn()
        new.lr = self.lr
        new.lrs = list(self.lrs)
        new.first_order = self.first_order
        return new

    def adapt(self, loss: torch.Tensor, first_order: Optional[bool] = None) -> None:
        """One inner step ``theta'_i = theta_i - lrs_i * d loss / d theta_i`` (elementwise)."""
        check_loss(loss)
        first_order = self.first_order if first_order is None else first_order
        fast = self._start_adapting()
        names = _differentiable(fast, allow_nograd=False)
        grads = _grads(loss, fast, names, not first_order, allow_unused=False)
        for n, lr, g in zip(names, self.lrs, grads):
            fast[n] = fast[n] - lr * g

    def extra_repr(self) -> str:
        return f"first_order={self.first_order}" + (", clone" if self._fast is not None else "")
