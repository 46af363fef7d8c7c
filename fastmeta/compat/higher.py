"""``import fastmeta.compat.higher as higher``: higher's ``innerloop_ctx`` for SGD and Adam, on
fast-weight tensors.

higher (Grefenstette et al. 2019) builds a "monkey-patched" copy of the module tree whose
parameters are swapped for fast weights on every call; here the one original module is run on the
fast weights with ``torch.func.functional_call``. Semantics kept from higher 0.2.1:

* ``copy_initial_weights=True`` (the default): the initial fast weights are detached copies, so
  NO gradient reaches the model's parameters through the inner loop (the classic gotcha: for MAML
  pass ``copy_initial_weights=False``, or read gradients from ``fmodel.parameters(time=0)``);
  ``False``: the initial fast weights are ``p.clone()``, differentiable back to ``p``;
* buffers (BatchNorm running statistics) are detached copies taken at entry: the inner loop
  updates the copies, never the model's own;
* ``diffopt.step(loss)`` differentiates ``loss`` with respect to the latest fast weights
  (``create_graph=track_higher_grads``; parameters that do not require grad, or that the loss
  does not use, are left unchanged) and applies the optimizer's update rule with the
  hyperparameters of each parameter group of ``opt``, its existing state (e.g. momentum
  buffers) copied and detached, and ``override`` applied;
* ``track_higher_grads=False``: each new fast weight is ``detach().requires_grad_()`` (test mode /
  first order: no gradient flows through the steps);
* ``fmodel.parameters(time=t)`` / ``fmodel.fast_params`` / ``fmodel.init_fast_params`` and
  ``fmodel(x, params=[...])`` as in higher.

Supported optimizers: ``torch.optim.SGD`` (lr, momentum, dampening, nesterov, weight_decay) and
``torch.optim.Adam`` (lr, betas, eps, weight_decay, amsgrad). Others raise ``TypeError``.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

from ._functional import Modes, call, check_loss, check_module

__all__ = ["innerloop_ctx", "monkeypatch", "get_diff_optim", "PatchedModule", "DifferentiableOptimizer",
           "DifferentiableSGD", "DifferentiableAdam"]


class PatchedModule:
    """A stateless view of ``module`` (higher's ``fmodel``): ``fmodel(x)`` runs the module with the
    latest fast weights and this view's own copies of the buffers and train/eval flags.

    ``fast_params``: list of tensors in ``module.parameters()`` order (tied parameters once).
    With ``track_higher_grads`` every list ever set is kept (``parameters(time=t)``: ``t = 0`` the
    initial weights, ``-1``/``None`` the latest); otherwise only the latest.
    """

    def __init__(self, module: nn.Module, params: list, buffers: dict, track_higher_grads: bool = True):
        self.module = module
        self._names = [n for n, _ in module.named_parameters()]
        self._buffers = buffers
        self._modes = Modes(module)
        self.training = module.training
        self._fast_params: list = []
        self.track_higher_grads = track_higher_grads
        self.update_params(params)

    @property
    def track_higher_grads(self) -> bool:
        return self._track_higher_grads

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"track_higher_grads: expected a bool, got {type(value).__name__}")
        self._track_higher_grads = value

    @property
    def fast_params(self) -> list:
        return self._fast_params[-1]

    @fast_params.setter
    def fast_params(self, value: Iterable[torch.Tensor]) -> None:
        value = list(value)
        if len(value) != len(self._names):
            raise ValueError(f"params: expected {len(self._names)} tensors (one per parameter of the model), got {len(value)}")
        if self._track_higher_grads or not self._fast_params:
            self._fast_params.append(value)
        else:
            self._fast_params[0] = value

    @property
    def init_fast_params(self) -> list:
        if not self._track_higher_grads:
            raise ValueError("track_higher_grads: the initial fast weights are kept only when tracking higher grads")
        return self._fast_params[0]

    def update_params(self, params: Iterable[torch.Tensor]) -> None:
        """Make ``params`` (one tensor per model parameter) the latest fast weights."""
        self.fast_params = params

    def parameters(self, recurse: bool = True, time: Optional[int] = None) -> Iterator[torch.Tensor]:
        time = -1 if time is None else time
        if not self._track_higher_grads and time not in (-1, 0):
            raise ValueError("time: only the latest fast weights are kept when not tracking higher grads")
        return iter(self._fast_params[time])

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(zip(self._names, self.fast_params))

    def buffers(self) -> Iterator[torch.Tensor]:
        return iter(self._buffers.values())

    def named_buffers(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self._buffers.items())

    def train(self, mode: bool = True) -> "PatchedModule":
        self.training = bool(mode)
        self._modes.set(mode)
        return self

    def eval(self) -> "PatchedModule":
        return self.train(False)

    def __call__(self, *args, params: Optional[Iterable[torch.Tensor]] = None, **kwargs):
        if params is not None:
            self.fast_params = params
        tensors = dict(zip(self._names, self.fast_params))
        tensors.update(self._buffers)
        return call(self.module, tensors, self._modes, args, kwargs)

    forward = __call__

    def __repr__(self) -> str:
        return f"PatchedModule({type(self.module).__name__}, {len(self._names)} fast weights, step {len(self._fast_params) - 1})"


def monkeypatch(module: nn.Module, device=None, copy_initial_weights: bool = True,
                track_higher_grads: bool = True) -> PatchedModule:
    """higher's ``monkeypatch``: a :class:`PatchedModule` over ``module`` whose initial fast weights
    are detached copies (``copy_initial_weights=True``) or ``p.clone()`` (``False``), and whose
    buffers are detached copies, all moved to ``device`` when given."""
    check_module(module, "module")
    move = (lambda t: t) if device is None else (lambda t: t.to(device))
    if copy_initial_weights:
        params = [move(p.clone().detach().requires_grad_(p.requires_grad)) for p in module.parameters()]
    else:
        params = [move(p.clone()) for p in module.parameters()]
    buffers = {n: move(b.clone().detach()) for n, b in module.named_buffers()}
    return PatchedModule(module, params, buffers, track_higher_grads)


def _override_values(override, n_groups: int, known: set, opt_name: str) -> dict:
    if not isinstance(override, Mapping):
        raise TypeError(f"override: expected a dict of optimizer settings, got {type(override).__name__}")
    out = {}
    for k, v in override.items():
        if k not in known:
            raise ValueError(f"override: {opt_name} has no setting {k!r} (settings: {sorted(known)})")
        seq = isinstance(v, (list, tuple)) or (isinstance(v, torch.Tensor) and v.dim() > 0)
        vals = v if seq else [v]  # a bare value applies to every group (higher needs a one-element list)
        if len(vals) not in (1, n_groups):
            raise ValueError(f"override: {k!r} has {len(vals)} values for {n_groups} parameter groups (give 1, or one per group)")
        out[k] = [vals[0] if len(vals) == 1 else vals[i] for i in range(n_groups)]
    return out


class DifferentiableOptimizer:
    """A differentiable copy of ``other`` (higher's ``DifferentiableOptimizer``): hyperparameters
    per parameter group and state are copied at construction; :meth:`step` returns new fast
    weights with a graph through the update (unless ``track_higher_grads=False``)."""

    _required: dict = {}  # setting -> value the update rule needs (others are refused)

    def __init__(self, other: torch.optim.Optimizer, reference_params: Iterable[torch.Tensor],
                 fmodel: Optional[PatchedModule] = None, device=None, override=None,
                 grad_callback: Optional[Callable] = None, track_higher_grads: bool = True):
        reference_params = list(reference_params)
        self.param_groups, self._group_to_param_list = [], []
        self.state: list = []
        for group in other.param_groups:
            self.param_groups.append({k: copy.deepcopy(v) for k, v in group.items() if k != "params"})
            self.state.append({})
            idx = []
            for j, p in enumerate(group["params"]):
                where = next((i for i, r in enumerate(reference_params) if r is p), None)
                if where is None:
                    raise ValueError(f"opt: optimizes a tensor of shape {tuple(p.shape)} that is not a parameter of the model")
                idx.append(where)
                if p in other.state:
                    self.state[-1][j] = {k: (v.clone().detach().requires_grad_(v.requires_grad) if device is None
                                             else v.clone().detach().requires_grad_(v.requires_grad).to(device))
                                         if torch.is_tensor(v) else v for k, v in other.state[p].items()}
            self._group_to_param_list.append(idx)
            self.param_groups[-1]["params"] = [None] * len(idx)
        self._name = f"torch.optim.{type(other).__name__}"
        if override is not None:
            self._apply_override(override)
        self._check_settings()
        self._fmodel = fmodel
        self._grad_callback = grad_callback
        self._track_higher_grads = bool(track_higher_grads)

    def _apply_override(self, override) -> None:
        known = set(self.param_groups[0]) - {"params"}
        for k, vals in _override_values(override, len(self.param_groups), known, self._name).items():
            for g, v in zip(self.param_groups, vals):
                g[k] = v

    def _check_settings(self) -> None:
        for i, g in enumerate(self.param_groups):
            for k, ok in self._required.items():
                if k in g and bool(g[k]) != ok:
                    raise ValueError(f"opt: {k}={g[k]!r} in parameter group {i} is not supported by the "
                                     f"differentiable {self._name} (higher ignores it silently)")

    def step(self, loss: torch.Tensor, params: Optional[Iterable[torch.Tensor]] = None, override=None,
             grad_callback: Optional[Callable] = None) -> list:
        """One differentiable update from ``loss`` (a scalar); returns the new fast weights and,
        when a patched model was given, makes them its latest. ``params`` replaces the model's
        fast weights as the starting point; ``override`` changes settings from now on (as higher);
        ``grad_callback(grads) -> grads`` edits the gradients (e.g. clipping)."""
        check_loss(loss)
        if override is not None:
            self._apply_override(override)
            self._check_settings()
        if params is None:
            if self._fmodel is None:
                raise ValueError("params: required when the differentiable optimizer has no patched model")
            params = self._fmodel.fast_params
        params = list(params)
        targets = [p if p.requires_grad else torch.empty(0, requires_grad=True) for p in params]
        grads = torch.autograd.grad(loss, targets, create_graph=self._track_higher_grads, allow_unused=True)
        callback = grad_callback if grad_callback is not None else self._grad_callback
        if callback is not None:
            grads = callback(grads)
        new = params[:]
        for gi, (group, mapping) in enumerate(zip(self.param_groups, self._group_to_param_list)):
            for j, index in enumerate(mapping):
                p, g = params[index], grads[index]
                if g is not None:
                    p = self._update(group, self.state[gi].setdefault(j, {}), p, g)
                group["params"][j] = p
                new[index] = p if self._track_higher_grads else p.detach().requires_grad_()
        if self._fmodel is not None:
            self._fmodel.update_params(new)
        return new

    def _update(self, group: dict, state: dict, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DifferentiableSGD(DifferentiableOptimizer):
    """torch.optim.SGD's rule, differentiably: ``g += wd * p``; with momentum ``buf = g`` at the
    first step, then ``buf = momentum * buf + (1 - dampening) * g``; ``g = g + momentum * buf``
    (nesterov) or ``buf``; ``p - lr * g``."""

    _required = {"maximize": False}

    def _update(self, group, state, p, g):
        wd, momentum = group["weight_decay"], group["momentum"]
        if wd != 0:
            g = g + wd * p
        if momentum != 0:
            buf = state.get("momentum_buffer")
            buf = g if buf is None else buf * momentum + (1 - group["dampening"]) * g
            state["momentum_buffer"] = buf
            g = g + momentum * buf if group["nesterov"] else buf
        return p + (-group["lr"]) * g


def _sqrt_zero_safe(v: torch.Tensor) -> torch.Tensor:
    # d sqrt(v)/dv is infinite at v = 0 (an entry whose gradient has always been 0), which would
    # turn the meta-gradient into NaN; higher zeroes the gradient into such entries with a hook.
    # Same values: the gradient through sqrt at those entries is 0 and every other path into them
    # is multiplied by the (zero) inner gradient.
    zero = v == 0
    return torch.where(zero, torch.zeros_like(v), torch.where(zero, torch.ones_like(v), v).sqrt())


class DifferentiableAdam(DifferentiableOptimizer):
    """torch.optim.Adam's rule (L2 weight decay added to the gradient), differentiably:
    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, ``p - lr sqrt(1 - b2^t) / (1 - b1^t)
    * m / (sqrt(v) + eps)`` (``amsgrad``: the running max of ``v``)."""

    _required = {"maximize": False, "decoupled_weight_decay": False}

    def _update(self, group, state, p, g):
        beta1, beta2 = group["betas"]
        if "step" not in state:
            state.update(step=0, exp_avg=torch.zeros_like(p).detach(), exp_avg_sq=torch.zeros_like(p).detach())
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p).detach()
        # A step count copied from torch's own Adam state is a tensor: kept as one, as higher does
        # (the bias corrections then round like higher's).
        state["step"] = step = state["step"] + 1
        if group["weight_decay"] != 0:
            g = g + group["weight_decay"] * p
        state["exp_avg"] = m = state["exp_avg"] * beta1 + (1 - beta1) * g
        state["exp_avg_sq"] = v = state["exp_avg_sq"] * beta2 + (1 - beta2) * g * g
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = v = torch.max(state["max_exp_avg_sq"], v)
        root = _sqrt_zero_safe(v) if self._track_higher_grads else v.sqrt()
        step_size = group["lr"] * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
        return p + (-step_size) * (m / (root + group["eps"]))


_OPTIMIZERS = {torch.optim.SGD: DifferentiableSGD, torch.optim.Adam: DifferentiableAdam}


def get_diff_optim(opt: torch.optim.Optimizer, reference_params: Iterable[torch.Tensor],
                   fmodel: Optional[PatchedModule] = None, device=None, override=None,
                   track_higher_grads: bool = True, grad_callback: Optional[Callable] = None) -> DifferentiableOptimizer:
    """higher's ``get_diff_optim``: the differentiable version of ``opt`` (SGD or Adam) over the
    parameters ``reference_params`` (``model.parameters()``), updating ``fmodel`` when given."""
    cls = _OPTIMIZERS.get(type(opt))
    if cls is None:
        raise TypeError(f"opt: {type(opt).__module__}.{type(opt).__qualname__} is not supported by "
                        "fastmeta.compat.higher (supported: torch.optim.SGD, torch.optim.Adam); "
                        "use the higher package for other optimizers")
    return cls(opt, reference_params, fmodel=fmodel, device=device, override=override,
               grad_callback=grad_callback, track_higher_grads=track_higher_grads)


@contextlib.contextmanager
def innerloop_ctx(model: nn.Module, opt: torch.optim.Optimizer, device=None, copy_initial_weights: bool = True,
                  override=None, track_higher_grads: bool = True):
    """higher's ``innerloop_ctx``: yields ``(fmodel, diffopt)`` for a differentiable inner loop.

    ``fmodel(x)`` runs ``model`` with the fast weights; ``diffopt.step(loss)`` updates them with
    ``opt``'s rule and hyperparameters (``override``: ``{setting: value or [one per group]}``).
    ``copy_initial_weights=True`` (default, as higher) detaches the initial fast weights from
    ``model``: gradients of a loss on ``fmodel`` do NOT reach ``model.parameters()``; MAML wants
    ``False``. ``track_higher_grads=False`` detaches the fast weights after every step (first
    order / test mode); as in higher it does not apply to ``fmodel`` itself.
    """
    check_module(model, "model")
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"opt: expected a torch.optim.Optimizer (SGD or Adam), got {type(opt).__name__}")
    fmodel = monkeypatch(model, device, copy_initial_weights=copy_initial_weights)
    diffopt = get_diff_optim(opt, model.parameters(), fmodel=fmodel, device=device, override=override,
                             track_higher_grads=track_higher_grads)
    yield fmodel, diffopt
