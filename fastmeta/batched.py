"""The one place where the model is evaluated per task.

Everything an algorithm needs from the model is one of three calls on task rows:

* :meth:`Evaluator.losses` -- per-task losses ``[T]`` (or per-sample ``[T, N]``) at rows ``[T, D]``;
* :meth:`Evaluator.grads` -- per-task losses ``[T]`` and gradients ``[T, D]``, optionally
  differentiable (``create_graph=True``) for second-order meta-gradients;
* :meth:`Evaluator.over_tasks` -- run a per-task computation over the meta-batch in the
  strategy's chunks and sum its results.

Three strategies sit behind those calls (DESIGN.md has the measurements that make both necessary):

``"vmap"``
    ``torch.func.vmap`` over ``functional_call``: one batched call for all T tasks. Wins where
    per-op launch cost dominates (small MLPs: 3.2 ms vs 18-22 ms for the loop on sine 1-40-40-1).
``"loop"``
    a per-task Python loop, one task per chunk. Wins for conv nets on this CPU, where a task's
    activations stay in cache and weights are not grouped (Conv-4: 1.3-1.4 s vs 2.2 s for vmap).

``"bmm"``
    for models made of ``nn.Linear`` layers and elementwise activations only (checked by tracing
    the forward with ``torch.fx``): each ``Linear`` runs as one ``baddbmm`` over all tasks with the
    per-task weights ``[T, out, in]`` viewed straight from the task rows, no ``vmap`` and no
    ``functional_call``. Same math as the other two (exact); on the sine MLP it removes most of
    vmap's per-op overhead (the hand-written ``baddbmm`` compute floor of ``bench/``). ``auto``
    measures it only where the model qualifies.

**The batch-norm trap.** In torch 2.13/2.14 the second-order gradient through ``F.batch_norm``
under ``vmap`` is silently wrong by ~0.5% (pytorch/functorch#534). Under ``vmap`` fastmeta
therefore intercepts ``F.batch_norm`` with a ``TorchFunctionMode`` and computes it from composite
ops (mean, biased var, rsqrt, affine): exact, any user model, same parameter names. Running
statistics are not updated under ``vmap`` (meta-learning models normally use batch statistics,
as fastmeta's Conv-4 does); use ``strategy="loop"`` if you need them updated.

**ANIL feature caching** (Raghu et al. 2020; Sharp-MAML sec. 5.4, eq. 19). When only the head
adapts and the model is ``head(body(x))``, the body's output depends on the shared parameters and
the inputs only, not on the task rows. An evaluator built with a :class:`FeatureSplit` then
computes ``body(shared; x)`` once per (``shared``, ``x``) tensor pair inside a
:meth:`Evaluator.feature_scope` (every :meth:`Evaluator.over_tasks` chunk is one) and runs only the
head at each inner step. The features keep their autograd graph, so the meta-gradient is exact:
see :class:`FeatureSplit`.
"""
from __future__ import annotations

import contextlib
import functools
import operator
from typing import Callable, Optional, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.overrides import TorchFunctionMode

from .params import ParamLayout
from .tasks import TaskBatch

STRATEGIES = ("auto", "vmap", "loop", "bmm")

# What the "bmm" strategy may meet in a traced forward besides nn.Linear: functions and modules that
# act elementwise (or on the last dim alone), so they apply unchanged to [T, N, F] activations.
_BMM_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.GELU, nn.ELU, nn.SiLU, nn.Identity,
                nn.Hardtanh, nn.Softsign, nn.Mish)
_BMM_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.softplus,
                  F.gelu, F.elu, F.silu, F.mish, operator.add, operator.sub, operator.mul, operator.neg,
                  torch.add, torch.sub, torch.mul}


class BmmPlan:
    """A model's forward rewritten as batched matmuls over tasks (the ``"bmm"`` strategy).

    ``BmmPlan.reason(model)`` says why a model does not qualify (``None`` if it does): its forward
    is traced with ``torch.fx.symbolic_trace`` and every node must be an ``nn.Linear``, an
    elementwise activation module or function, or ``+``/``-``/``*`` between activations. No
    parameter or buffer may be read outside a ``Linear`` (``get_attr``), so batch norm, dropout,
    convolutions and custom layers fall back to ``vmap``/``loop``.

    :meth:`run` evaluates the traced graph with per-task parameters ``{name: [T, ...]}`` on
    inputs ``[T, N, in]``: ``Linear`` -> ``baddbmm(b[:, None], h, W^T)``, everything else as is.
    """

    def __init__(self, model: nn.Module):
        # A bare nn.Linear is traced into F.linear on its own attributes: run it as one layer.
        self._root_linear = isinstance(model, nn.Linear)
        graph, why = (None, None) if self._root_linear else self._checked_graph(model)
        if why is not None:
            raise ValueError(f"strategy: 'bmm' needs a model of nn.Linear layers and elementwise activations: {why}")
        # The graph as (kind, node, a, b) steps, resolved once: a forward then costs a few dict
        # operations per layer (it runs twice per MAML step, where ~1 ms is the whole step).
        modules = dict(model.named_modules())
        self._steps = []
        for node in graph.nodes if graph is not None else []:
            if node.op == "call_module":
                m = modules[node.target]
                # Activation modules run through their forward: Module.__call__'s hook handling costs
                # ~1.5 us per call, and hooks are not run here anyway (the Linear layers are replaced).
                self._steps.append(("linear", node, (f"{node.target}.weight", f"{node.target}.bias"), node.args[0])
                                   if isinstance(m, nn.Linear)
                                   else ("module", node, m.forward, node.args[0]))
            elif node.op == "placeholder":
                self._steps.append(("input", node, None, None))
            elif node.op == "call_function":
                self._steps.append(("function", node, None, None))
            elif node.op == "output":
                self._steps.append(("output", node, None, None))

    @classmethod
    def reason(cls, model: nn.Module) -> Optional[str]:
        return None if isinstance(model, nn.Linear) else cls._checked_graph(model)[1]

    @staticmethod
    def _checked_graph(model: nn.Module) -> tuple[Optional[torch.fx.Graph], Optional[str]]:
        """``(traced graph, None)`` if the model qualifies, else ``(None, why not)``: one trace
        serves both the check and the plan."""
        try:
            graph = torch.fx.symbolic_trace(model).graph
        except Exception as e:  # noqa: BLE001 - untraceable forward: not a bmm model
            return None, f"torch.fx cannot trace its forward ({type(e).__name__}: {e})"
        modules = dict(model.named_modules())
        placeholders = 0
        for node in graph.nodes:
            if node.op == "placeholder":
                placeholders += 1
            elif node.op == "call_module":
                m = modules[node.target]
                if not isinstance(m, (nn.Linear,) + _BMM_MODULES):
                    return None, f"module {node.target!r} is a {type(m).__name__}"
                if len(node.args) != 1 or node.kwargs:
                    return None, f"module {node.target!r} is not called on exactly one input"
            elif node.op == "call_function":
                if node.target not in _BMM_FUNCTIONS:
                    return None, f"function {getattr(node.target, '__name__', node.target)!r} is not elementwise-known"
            elif node.op == "get_attr":
                return None, f"the forward reads {node.target!r} directly"
            elif node.op == "call_method":
                return None, f"the forward calls tensor method {node.target!r}"
        if placeholders != 1:
            return None, f"the forward takes {placeholders} inputs (expected 1)"
        if not any(isinstance(m, nn.Linear) for m in modules.values()):
            return None, "it has no nn.Linear layer"
        return graph, None

    def run(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Outputs ``[T, N, out]`` for per-task parameters ``{name: [T, ...]}`` and ``x`` ``[T, N, in]``."""
        if x.dim() != 3:
            raise ValueError(f"x: the 'bmm' strategy needs per-task inputs [T, N, features], got shape {tuple(x.shape)}")
        if self._root_linear:
            return self._linear(params, ("weight", "bias"), x)
        env: dict = {}
        load = functools.partial(torch.fx.node.map_arg, fn=lambda n: env[n])
        for kind, node, a, b in self._steps:
            if kind == "linear":
                env[node] = self._linear(params, a, env[b])
            elif kind == "module":
                env[node] = a(env[b])
            elif kind == "function":
                env[node] = node.target(*load(node.args), **load(node.kwargs))
            elif kind == "input":
                env[node] = x
            else:
                return load(node.args)[0]
        raise RuntimeError("BmmPlan: traced graph has no output")  # unreachable for fx graphs

    @staticmethod
    def _linear(params: dict[str, torch.Tensor], keys: tuple[str, str], h: torch.Tensor) -> torch.Tensor:
        w = params[keys[0]].transpose(1, 2)  # [T, in, out]
        b = params.get(keys[1])
        return torch.bmm(h, w) if b is None else torch.baddbmm(b.unsqueeze(1), h, w)


def candidate_strategies(model: nn.Module) -> tuple[str, ...]:
    """The strategies ``"auto"`` measures for ``model``: ``loop`` and ``vmap``, plus ``bmm`` where the
    model qualifies (:meth:`BmmPlan.reason`)."""
    return ("loop", "vmap") + (("bmm",) if BmmPlan.reason(model) is None else ())


LossFn = Callable[..., torch.Tensor]


def resolve_loss(loss_fn) -> tuple[LossFn, bool]:
    """``(fn(output, target, reduction=...), is_classification)`` from a name or a callable."""
    if loss_fn in ("cross_entropy", "ce", None):
        return F.cross_entropy, True
    if loss_fn in ("mse", "mse_loss"):
        return F.mse_loss, False
    if isinstance(loss_fn, str):
        raise ValueError(f"loss_fn: unknown name {loss_fn!r}; use 'cross_entropy', 'mse' or a callable")
    if isinstance(loss_fn, nn.Module):
        raise ValueError("loss_fn: pass a functional loss that takes reduction=... (e.g. F.cross_entropy), not a module")
    if not callable(loss_fn):
        raise ValueError(f"loss_fn: expected a name or a callable, got {type(loss_fn).__name__}")
    return loss_fn, loss_fn in (F.cross_entropy, F.nll_loss)


def _batch_norm_composite(input, running_mean, running_var, weight=None, bias=None,
                          training=False, momentum=0.1, eps=1e-5):
    # Same math as F.batch_norm (biased variance, eps inside the rsqrt), from ops whose
    # double-backward is correct under vmap.
    dims = [0] + list(range(2, input.dim()))
    shape = [1, -1] + [1] * (input.dim() - 2)
    if training or running_mean is None:
        mean = input.mean(dims, keepdim=True)
        var = input.var(dims, correction=0, keepdim=True)
    else:
        mean, var = running_mean.view(shape), running_var.view(shape)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


def _instance_norm_composite(input, running_mean=None, running_var=None, weight=None, bias=None,
                             use_input_stats=True, momentum=0.1, eps=1e-5):
    dims = list(range(2, input.dim()))
    shape = [1, -1] + [1] * (input.dim() - 2)
    if use_input_stats or running_mean is None:
        mean = input.mean(dims, keepdim=True)
        var = input.var(dims, correction=0, keepdim=True)
    else:
        mean, var = running_mean.view(shape), running_var.view(shape)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


class CompositeNorm(TorchFunctionMode):
    """Replace ``F.batch_norm`` / ``F.instance_norm`` by composite ops (see the module docstring)."""

    _REPLACE = {F.batch_norm: _batch_norm_composite, F.instance_norm: _instance_norm_composite}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        impl = self._REPLACE.get(func, func)
        return impl(*args, **(kwargs or {}))


class ChannelsLast(TorchFunctionMode):
    """Run every ``conv2d`` with input and weight in ``torch.channels_last`` (NHWC) memory format.

    oneDNN's NHWC convolution kernels (and their backward) are faster on this CPU than NCHW;
    converting inside the call keeps any user model unchanged. The conversion is a differentiable
    copy, so gradients (including second order) are exactly those of the NCHW convolution.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d and len(args) >= 2 and args[0].dim() == 4:
            x, w, *rest = args
            args = (x.contiguous(memory_format=torch.channels_last),
                    w.contiguous(memory_format=torch.channels_last), *rest)
        return func(*args, **kwargs)


def _task_rows(row: torch.Tensor, T: int) -> torch.Tensor:
    """``[D] -> [T, D]`` (a view). For one task ``unsqueeze`` rather than ``expand``: both backwards
    are then views, where expand's sums over the task dim and the loop's ``rows[t]`` select writes
    its gradient into a zero-filled ``[1, D]`` buffer (Conv-4 MAML step, D = 112k: the ops touching
    D-sized tensors went from 6.4 to 4.6 ms per step, of ~600 ms)."""
    return row.unsqueeze(0) if T == 1 else row.expand(T, -1)


def _transforms_active() -> bool:
    # Inside a user's torch.func transform (vmap/grad over the evaluator) cached tensors could
    # belong to another transform level: never cache there.
    return torch._C._functorch.maybe_current_level() is not None


class FeatureSplit:
    """The body/head split of a model for exact ANIL feature caching (Raghu et al. 2020, ANIL;
    Sharp-MAML sec. 5.4, eq. 19: Sharp-MAML with only the head adapted).

    A model **qualifies** when

    * the adapted parameters (``layout.adapted``) are exactly the trainable parameters of one
      direct child module, the *head*;
    * exactly one other direct child owns parameters, the *body* (parameter-free children such as
      activations may exist), the model has no parameters of its own, and body and head share none;
    * ``model(x) == head(body(x))``: checked once numerically, by :meth:`verify`, on the first
      inputs the evaluator sees (the forward itself is not inspected).

    Then the model output at task rows ``[T, D]`` is ``head(row_t; body(shared; x_t))`` and the
    features ``body(shared; x)`` ``[T, N, ...]`` do not depend on the rows: the evaluator computes
    them once per (``shared``, ``x``) pair and re-applies only the head at every inner step, SAM
    ascent step and SDS evaluation. Exactness: the features are the very tensors the uncached
    forward would compute, with their autograd graph; a gradient w.r.t. the head rows only never
    enters (so never frees) the body's graph, and the outer ``autograd.grad(q.sum(), theta)``
    traverses the body's graph once per (shared, x) pair, summing what each inner step sends back.

    Attributes:
        head_name, body_name: the direct children (``None`` when the model does not qualify).
        required: ``feature_cache=True`` was asked: failures raise ``ValueError`` instead of
            turning the cache off.
        enabled: the cache is (still) on. verified: ``None`` until :meth:`verify` ran.
        reason: why the cache is on or off, for ``MetaLearner.feature_cache_reason``.
    """

    def __init__(self, model: nn.Module, layout: ParamLayout, required: bool = False):
        self.model, self.layout, self.required = model, layout, bool(required)
        self.body_name: Optional[str] = None
        self.head_name: Optional[str] = None
        self.verified: Optional[bool] = None
        why = self._detect()
        self.enabled = why is None
        if why is not None:
            self.reason = f"off: {why}"
            if self.required:
                raise ValueError(f"feature_cache: cannot apply: {why}")
        else:
            self.reason = (f"on: body {self.body_name!r} computed once per (body parameters, inputs), "
                           f"head {self.head_name!r} adapted (to be verified on the first inputs)")
        self._prepare()

    def _detect(self) -> Optional[str]:
        model, layout = self.model, self.layout
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        adapted = set(layout.adapted)
        own = [n for n, _ in model.named_parameters(recurse=False)]
        if own:
            return f"the model has parameters of its own ({own}) outside its child modules"
        children = list(model.named_children())
        head = None
        for name, child in children:
            names = {f"{name}.{n}" for n, p in child.named_parameters() if p.requires_grad}
            if names and names == adapted:
                head = name
        if head is None:
            if adapted == trainable:
                return ("every trainable parameter adapts (adapt='all', MAML): the body changes at every "
                        "inner step, so there are no fixed features to cache; use adapt='head' (ANIL)")
            return (f"the adapted parameters {sorted(adapted)} are not exactly the trainable parameters "
                    "of one direct child module (the head)")
        # The body may be frozen (requires_grad=False): its features are then constants.
        others = [name for name, child in children
                  if name != head and any(True for _ in child.parameters())]
        if len(others) != 1:
            return (f"expected exactly one direct child besides the head {head!r} that owns parameters "
                    f"(the body), found {others}")
        body = others[0]
        head_ids = {id(p) for p in getattr(model, head).parameters()}
        if any(id(p) in head_ids for p in getattr(model, body).parameters()):
            return f"the body {body!r} and the head {head!r} share parameters"
        self.body_name, self.head_name = body, head
        return None

    def _prepare(self) -> None:
        # Offsets of the body's (shared) and the head's (adapted) parameters in the flat layout,
        # under their names relative to the submodule, for functional_call on the submodule.
        self.body = self.head = None
        self._body_slots, self._head_slots = [], []
        if not self.enabled:
            return
        self.body, self.head = getattr(self.model, self.body_name), getattr(self.model, self.head_name)
        n_ad = len(self.layout.adapted)
        for i, s in enumerate(self.layout.slots):
            prefix = self.head_name if i < n_ad else self.body_name
            local = s.name[len(prefix) + 1:]
            if i < n_ad:
                self._head_slots.append((local, s.offset, s.numel, s.shape))
            else:
                self._body_slots.append((local, s.offset - self.layout.D, s.numel, s.shape))

    def body_params(self, shared: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named views of the body's parameters from ``shared`` ``[P-D]`` (frozen ones: the module's)."""
        return {n: shared[o: o + k].view(shape) for n, o, k, shape in self._body_slots}

    def head_params(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views of the head's parameters from one task row ``[D]``."""
        return {n: row[o: o + k].view(shape) for n, o, k, shape in self._head_slots}

    def disable(self, why: str) -> None:
        self.enabled = self.verified = False
        self.reason = f"off: {why}"
        if self.required:
            raise ValueError(f"feature_cache: cannot apply: {why}")

    def verify(self, x: torch.Tensor) -> bool:
        """Check ``model(x) == head(body(x))`` once on a few samples ``x`` ``[n, ...]`` of one task.

        Runs the module with its own parameters, without autograd, autocast, buffer updates (batch
        norm running statistics are restored) or RNG consumption. A mismatch (skip connections,
        a forward that is not ``head(body(x))``, random layers such as dropout) turns the cache off
        and records why (``required``: raises ``ValueError`` naming ``feature_cache``).
        """
        if self.verified is not None or not self.enabled:
            return self.enabled
        model, dev = self.model, self.layout.device
        x = x.detach()
        if x.is_floating_point():
            x = x.to(self.layout.dtype)
        buffers = [(b, b.clone()) for b in model.buffers()]
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), \
                    torch.autocast(dev.type, enabled=False):
                whole = model(x)
                split = self.head(self.body(x))
        except Exception as e:  # noqa: BLE001 - a model we cannot split this way just runs uncached
            self.disable(f"head(body(x)) could not be evaluated ({type(e).__name__}: {e})")
            return False
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
        self.verified = True
        if not (isinstance(whole, torch.Tensor) and isinstance(split, torch.Tensor)) or whole.shape != split.shape:
            self.disable("model(x) and head(body(x)) differ in type or shape")
            return False
        if whole.is_floating_point():
            # Same ops in the same order give the same numbers; a few ulps of slack for kernels
            # that pick another blocking for another call site. A skip connection is far off.
            tol = 64 * torch.finfo(whole.dtype).eps * (1.0 + float(whole.abs().max()))
            err = float((whole - split).abs().max())
            ok = err <= tol
        else:
            ok, err = torch.equal(whole, split), float("nan")
        if not ok:
            self.disable(f"model(x) != {self.head_name}({self.body_name}(x)) on the first inputs (max abs difference "
                         f"{err:.3g}): the forward is not head(body(x)) (skip connection? random layers?)")
            return False
        self.reason = self.reason.replace("to be verified on the first inputs", "verified on the first inputs")
        return True

    def __repr__(self) -> str:
        return f"FeatureSplit(body={self.body_name!r}, head={self.head_name!r}, {self.reason})"


class _FeatureCache:
    """Memoized ``body(shared; x)`` per (shared, x) tensor pair, alive only inside feature scopes.

    Entries hold strong references to their key tensors, so an ``id`` can never be reused by a new
    tensor while its entry exists; the tensors' version counters, ``requires_grad`` flags and the
    grad/inference/autocast modes are part of the key. Shared (by reference) between an evaluator
    and its wrappers (``DistributedEvaluator`` copies the evaluator's ``__dict__``).
    """

    SIZE = 4  # support, query and a couple of transient (SDS-subset / per-task) entries

    def __init__(self):
        self.entries: list = []
        self.depth = 0
        self.hits = self.misses = 0

    def clear(self) -> None:
        self.entries.clear()

    @staticmethod
    def _key(shared, x, device_type: str):
        return (None if shared is None else (shared._version, shared.requires_grad), x._version, x.requires_grad,
                torch.is_inference_mode_enabled(), torch.is_autocast_enabled(device_type),
                torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None)

    def get(self, shared, x, device_type: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = self._key(shared, x, device_type)
        grad_on = torch.is_grad_enabled()
        for i, (sh, xx, k, with_graph, feats) in enumerate(self.entries):
            # Features computed without autograd serve a call that records a graph only when
            # nothing they depend on requires grad (then the graph would be empty anyway).
            if sh is shared and xx is x and k == key and (with_graph or not grad_on or not (
                    (shared is not None and shared.requires_grad) or x.requires_grad)):
                self.entries.append(self.entries.pop(i))  # most recently used last
                self.hits += 1
                return feats
        self.misses += 1
        feats = compute()
        self.entries.append((shared, x, key, grad_on, feats))
        if len(self.entries) > self.SIZE:
            self.entries.pop(0)
        return feats


# Losses computed element by element (any shape, no class dimension): Evaluator.losses applies them
# to [T, N, ...] outputs directly. Cross-entropy is not one (it reads dim 1 as the classes).
_ELEMENTWISE_LOSSES = (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.binary_cross_entropy_with_logits)


def _with_speed_modes(forward):
    """Wrap :meth:`Evaluator.forward` in the evaluator's opt-in CPU speed modes.

    ``bf16``: the model runs under ``torch.autocast(dtype=bfloat16)`` (convolutions and matmuls in
    bf16 on AVX-512-bf16/AMX units) while the task rows, the inner SGD updates and every gradient
    stay float32 (float32 master weights); outputs are cast back to float32 so losses and the
    meta-gradient sums are float32. ``channels_last``: see :class:`ChannelsLast` (loop strategy;
    under vmap convolutions become grouped convolutions whose layout vmap chooses). ``fused``: the
    model's ``BatchNorm2d, ReLU, MaxPool2d(2)`` runs go through :func:`fastmeta.fused.bn_relu_pool`
    (see :class:`fastmeta.fused.FusionPlan`; it steps aside under vmap, bf16 and channels_last
    inputs, where its conditions do not hold).
    """
    @functools.wraps(forward)
    def wrapped(self, rows, shared, x):
        cl, bf16 = getattr(self, "channels_last", False), getattr(self, "bf16", False)
        plan = getattr(self, "_fusion", None)
        if not (cl or bf16 or plan):
            return forward(self, rows, shared, x)
        with plan.active() if plan else contextlib.nullcontext(), \
                ChannelsLast() if cl and self.strategy == "loop" else contextlib.nullcontext():
            with torch.autocast(self.layout.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = forward(self, rows, shared, x)
        return out.to(self.layout.dtype) if bf16 and out.is_floating_point() else out

    return wrapped


class Evaluator:
    """Evaluates ``model`` at task rows with one strategy (``"vmap"``, ``"loop"`` or ``"bmm"``).

    Args:
        model: the ``nn.Module``; its parameters are never modified here.
        layout: the :class:`ParamLayout` (adapted rows ``[T, D]``, shared ``[P - D]``).
        loss_fn: a functional loss accepting ``reduction=`` (``F.cross_entropy``, ``F.mse_loss``).
        strategy: ``"vmap"``, ``"loop"`` or ``"bmm"`` (``ValueError`` naming ``strategy`` for a model
            that is not Linear layers and elementwise activations).
        channels_last: opt-in CPU speed mode: convolutions in NHWC memory format (exact; loop
            strategy only). See :class:`ChannelsLast`.
        bf16: opt-in CPU speed mode: bf16 autocast with float32 master weights and float32
            meta-gradient accumulation (approximate: ~1e-2 relative gradient error). Needs
            float32 parameters.
        fused: opt-in CPU speed mode: ``BatchNorm2d (batch statistics), ReLU, MaxPool2d(2)`` runs
            inside ``nn.Sequential`` use the fused C++ kernels of :mod:`fastmeta.fused` (same
            function; float32 results differ from ATen's by rounding, ~1e-6 relative; second
            order through ATen's double backward).
        feature_cache: ANIL feature caching (exact; see :class:`FeatureSplit`): ``False`` (off),
            ``True`` (build the split; ``ValueError`` naming ``feature_cache`` if the model does
            not qualify), or a :class:`FeatureSplit` shared by several evaluators (one numerical
            verification for all). Caching happens only inside :meth:`feature_scope`.
    """

    def __init__(self, model: nn.Module, layout: ParamLayout, loss_fn: LossFn, strategy: str, *,
                 channels_last: bool = False, bf16: bool = False, fused: bool = False,
                 feature_cache: Union[bool, FeatureSplit] = False):
        if strategy not in ("vmap", "loop", "bmm"):
            raise ValueError(f"strategy: expected 'vmap', 'loop' or 'bmm', got {strategy!r}")
        self._bmm = BmmPlan(model) if strategy == "bmm" else None
        if not isinstance(channels_last, bool):
            raise ValueError(f"channels_last: expected a bool, got {channels_last!r}")
        if not isinstance(bf16, bool):
            raise ValueError(f"bf16: expected a bool, got {bf16!r}")
        if bf16 and layout.dtype != torch.float32:
            raise ValueError(f"bf16: needs float32 parameters (they are the float32 master weights), got {layout.dtype}")
        if not isinstance(fused, bool):
            raise ValueError(f"fused: expected a bool, got {fused!r}")
        if isinstance(feature_cache, FeatureSplit):
            if feature_cache.model is not model or feature_cache.layout is not layout:
                raise ValueError("feature_cache: this FeatureSplit was built for another model or layout")
            split = feature_cache
        elif isinstance(feature_cache, bool):
            split = FeatureSplit(model, layout, required=True) if feature_cache else None
        else:
            raise ValueError(f"feature_cache: expected a bool or a FeatureSplit, got {feature_cache!r}")
        self.model, self.layout, self.loss_fn, self.strategy = model, layout, loss_fn, strategy
        self.channels_last, self.bf16, self.fused = channels_last, bf16, fused
        self._fusion = None
        if fused:
            from .fused import FusionPlan

            plan = FusionPlan(model)
            self._fusion = plan if plan.blocks else None
        self.features: Optional[FeatureSplit] = split
        self._feature_cache: Optional[_FeatureCache] = None if split is None else _FeatureCache()
        # The composite-norm mode routes every torch call of the forward through Python, which
        # costs more than the whole forward of a small MLP: enter it only for models that have
        # batch/instance-norm modules (the only callers of F.batch_norm / F.instance_norm in torch).
        self._norm_mode = CompositeNorm if any(
            isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm))
            for m in model.modules()) else contextlib.nullcontext

    # ------------------------------------------------------------------ forward
    @_with_speed_modes
    def forward(self, rows: torch.Tensor, shared: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Model outputs ``[T, N, ...]`` for task rows ``[T, D]`` (or ``[D]``, broadcast) on ``x`` ``[T, N, ...]``.

        ``rows`` may also be per-parameter task tensors ``{name: [T, ...]}`` (``bmm`` strategy only:
        what ``inner_loop(structured=True)`` returns there).
        ``shared`` is ``[P-D]`` (one value for all tasks) or ``[T, P-D]`` (per task). With ANIL
        feature caching inside a :meth:`feature_scope`, the body's features for this (``shared``,
        ``x``) pair are computed once and only the head runs on the rows (same values, same graph).
        """
        T = x.shape[0]
        if isinstance(rows, dict):
            return self._forward_params(rows, shared, x)
        if rows.dim() == 1:
            rows = _task_rows(rows, T)
        if rows.shape[0] != T:
            raise ValueError(f"rows: has {rows.shape[0]} task rows but x has {T} tasks")
        model, layout = self.model, self.layout
        # Per-task shared values ``[T, P-D]`` (one copy of the non-adapted parameters per task
        # row) let a caller get per-task gradients w.r.t. the shared parameters from one backward
        # (HF-MAML's finite differences of the shared gradient, per-task gradient norms).
        per_task_shared = shared is not None and shared.dim() == 2
        if per_task_shared and shared.shape[0] != T:
            raise ValueError(f"shared: has {shared.shape[0]} per-task rows but x has {T} tasks")
        if self.caches_features and not _transforms_active() and self.features.verify(x[0, :8]):
            return self._forward_split(rows, shared, x, per_task_shared, self._feature_cache)
        if self.strategy == "loop":
            if T == 1:  # the loop's chunks: views both ways, no select/stack nodes (see _task_rows)
                sh = shared[0] if per_task_shared else shared
                return functional_call(model, layout.named(rows.squeeze(0), sh), (x.squeeze(0),)).unsqueeze(0)
            return torch.stack([functional_call(model, layout.named(rows[t], shared[t] if per_task_shared else shared),
                                                (x[t],)) for t in range(T)])
        if self.strategy == "bmm":
            return self._forward_params(layout.named_adapted(rows), shared, x)

        if per_task_shared:
            def one_shared(row, sh, xt):
                return functional_call(model, layout.named(row, sh), (xt,))

            with self._norm_mode():
                return vmap(one_shared, in_dims=(0, 0, 0), randomness="different")(rows, shared, x)

        def one(row, xt):
            return functional_call(model, layout.named(row, shared), (xt,))

        with self._norm_mode():
            return vmap(one, in_dims=(0, 0), randomness="different")(rows, x)

    def _forward_params(self, params: dict, shared: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        # The bmm forward on per-parameter task tensors {name: [T, ...]}: the views of task rows, or
        # what inner_loop(structured=True) returns (then there are no flat rows to split at all).
        # Shared parameters ([P-D], one for all tasks) are broadcast over T; [T, P-D] are per task.
        if self._bmm is None:
            raise ValueError(f"rows: per-parameter task tensors need the 'bmm' strategy, this evaluator runs {self.strategy!r}")
        T = x.shape[0]
        named = dict(params)
        for n, v in self.layout.named_shared(shared).items():
            named[n] = v.expand(T, *v.shape) if shared.dim() == 1 else v
        return self._bmm.run(named, x)

    def _inner_loop_params(self, rows: torch.Tensor, shared: Optional[torch.Tensor], x: torch.Tensor,
                           y: torch.Tensor, lr: float, steps: int, create_graph: bool) -> dict:
        # inner_loop on {name: [T, ...]} tensors (see its structured=True). Same updates, same values.
        T = x.shape[0]
        params = self.layout.named_adapted(rows)
        if rows.dim() == 1:
            params = {n: p.expand(T, *p.shape) for n, p in params.items()}
        with torch.enable_grad():
            for _ in range(steps):
                ps = [p if p.requires_grad else p.detach().requires_grad_() for p in params.values()]
                loss = self.losses(dict(zip(params, ps)), shared, x, y)
                gs = torch.autograd.grad(loss.sum(), ps, create_graph=create_graph)
                params = {n: p - lr * g for n, p, g in zip(params, ps, gs)}
        return params

    def _forward_split(self, rows, shared, x, per_task_shared: bool, cache: "_FeatureCache") -> torch.Tensor:
        # head(row_t; body(shared; x_t)) with the body's features memoized per (shared, x) pair.
        # The body always runs per task (loop) or vmapped over tasks, never on T*N samples at once:
        # batch norm uses each task's own batch statistics.
        fs, T = self.features, x.shape[0]

        def body_features() -> torch.Tensor:
            if self.strategy == "loop":
                return torch.stack([functional_call(fs.body, fs.body_params(shared[t] if per_task_shared else shared),
                                                    (x[t],)) for t in range(T)])
            with self._norm_mode():
                if per_task_shared:
                    return vmap(lambda sh, xt: functional_call(fs.body, fs.body_params(sh), (xt,)),
                                in_dims=(0, 0), randomness="different")(shared, x)
                params = fs.body_params(shared)
                return vmap(lambda xt: functional_call(fs.body, params, (xt,)), randomness="different")(x)

        feats = cache.get(shared, x, self.layout.device.type, body_features)
        if self.strategy == "loop":
            return torch.stack([functional_call(fs.head, fs.head_params(rows[t]), (feats[t],)) for t in range(T)])
        with self._norm_mode():
            return vmap(lambda row, f: functional_call(fs.head, fs.head_params(row), (f,)),
                        in_dims=(0, 0), randomness="different")(rows, feats)

    @property
    def caches_features(self) -> bool:
        """Whether calls made now memoize the body's features (ANIL feature caching is on for this
        evaluator and a :meth:`feature_scope` is open; see :class:`FeatureSplit`)."""
        return (self._feature_cache is not None and self._feature_cache.depth > 0
                and self.features.enabled)

    @contextlib.contextmanager
    def feature_scope(self):
        """Within this context the body's features are memoized (ANIL feature caching); the cache
        is emptied whenever a scope is entered or left, so cached features (and the autograd graphs
        they carry) never outlive one task chunk. No-op without feature caching.

        Inside a scope, do not backpropagate through the body (w.r.t. ``shared``) and then evaluate
        the same ``shared`` and ``x`` tensor objects again: the second call would reuse features
        whose graph was freed. Gradients w.r.t. the head rows only never touch the body's graph.
        """
        cache = self._feature_cache
        if cache is None:
            yield
            return
        cache.clear()
        cache.depth += 1
        try:
            yield
        finally:
            cache.depth -= 1
            cache.clear()

    def losses(self, rows: torch.Tensor, shared: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               per_sample: bool = False, return_outputs: bool = False):
        """Per-task mean losses ``[T]`` (``per_sample=True``: ``[T, N]``); with outputs if asked."""
        out = self.forward(rows, shared, x)
        if self.loss_fn in _ELEMENTWISE_LOSSES and out.shape == y.shape:
            # Element-wise losses take [T, N, ...] as they are: no reshapes (and no view nodes for
            # them on every backward), one reduction.
            per = self.loss_fn(out, y, reduction="none")
            dims = tuple(range(2 if per_sample else 1, per.dim()))
            loss = per.mean(dims) if dims else per
            return (loss, out) if return_outputs else loss
        T, N = y.shape[0], y.shape[1]
        flat = self.loss_fn(out.reshape(T * N, *out.shape[2:]), y.reshape(T * N, *y.shape[2:]), reduction="none")
        # The task mean in one reduction (equal weights, so the mean over N*k elements equals the
        # mean over samples of the per-sample means): one autograd node fewer on the
        # double-backward path of every MAML step.
        loss = flat.reshape(T, N, -1).mean(-1) if per_sample else flat.reshape(T, -1).mean(1)
        return (loss, out) if return_outputs else loss

    def grads(self, rows: torch.Tensor, shared: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
              create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-task losses ``[T]`` and gradients ``[T, D]`` w.r.t. the adapted rows.

        With ``create_graph=True`` the gradients are differentiable (second-order MAML);
        otherwise they are constants. ``rows`` ``[D]`` is broadcast to all tasks.
        """
        T = x.shape[0]
        if rows.dim() == 1:
            rows = _task_rows(rows, T)
        with torch.enable_grad():
            if not rows.requires_grad:
                rows = rows.detach().requires_grad_()
            loss = self.losses(rows, shared, x, y)
            (g,) = torch.autograd.grad(loss.sum(), rows, create_graph=create_graph)
        return (loss if create_graph else loss.detach()), g

    # ------------------------------------------------------------------ task chunks
    def chunks(self, batch: TaskBatch) -> list[TaskBatch]:
        """The sub-batches one pass runs on: all tasks at once (vmap, bmm) or one task each (loop)."""
        if self.strategy != "loop":
            return [batch]
        return [batch.select(t) for t in range(batch.num_tasks)]

    def over_tasks(self, fn: Callable[[TaskBatch], tuple], batch: TaskBatch):
        """Run ``fn(sub_batch) -> (grad_sum [P], *per_task tensors)`` over the chunks.

        Returns the mean gradient over all T tasks (meta-gradients average over tasks, not sum)
        and the per-task tensors concatenated along dim 0. One chunk's graph is freed before the
        next is built, which is what keeps the loop strategy at one task's memory. Each chunk runs in
        its own :meth:`feature_scope` (ANIL feature caching: the body's features live for one chunk).
        """
        if self.strategy != "loop" and self._feature_cache is None:  # one chunk, nothing to scope
            g, *rest = fn(batch)
            return (g / batch.num_tasks, *rest)
        total, extras = None, None
        for sub in self.chunks(batch):
            with self.feature_scope():
                g, *rest = fn(sub)
            total = g if total is None else total + g
            extras = [[r] for r in rest] if extras is None else [e + [r] for e, r in zip(extras, rest)]
        extras = [e[0] if len(e) == 1 else torch.cat(e) for e in (extras or [])]
        return (total / batch.num_tasks, *extras)


def inner_loop(ev: Evaluator, rows: torch.Tensor, shared: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               lr: float, steps: int, create_graph: bool,
               grad_hook: Optional[Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]] = None,
               structured: bool = False):
    """``steps`` SGD steps ``w <- w - lr * grad L(w; x, y)`` on task rows (MAML inner loop, Sharp-MAML eq. 9).

    Returns the adapted rows ``[T, D]`` and the list of iterates ``[w_0, ..., w_{steps-1}]``
    (each ``[T, D]``) at which the inner gradients were taken. ``grad_hook(k, w_k, g_k)`` may
    replace the gradient (Sharp-MAML_low's SAM step). Without ``create_graph`` the gradients are
    constants, which is first-order MAML (Fallah eq. 8).

    ``structured=True`` is for callers that only pass the adapted weights on to
    :meth:`Evaluator.losses`/:meth:`Evaluator.forward`: on the ``bmm`` strategy (and without a
    ``grad_hook``) the loop then runs on per-parameter task tensors ``{name: [T, ...]}`` and returns
    those instead of the rows, and no iterates. Same updates and values; the autograd graph loses
    the split of the rows and its concatenating backward (measured: the second-order sine step at
    1.05x its hand-written floor with rows, 1.00x with per-parameter tensors). Other strategies
    return rows as usual.
    """
    if structured and grad_hook is None and ev.strategy == "bmm":
        return ev._inner_loop_params(rows, shared, x, y, lr, steps, create_graph), []
    T = x.shape[0]
    w = _task_rows(rows, T) if rows.dim() == 1 else rows
    iterates = []
    for k in range(steps):
        iterates.append(w)
        _, g = ev.grads(w, shared, x, y, create_graph=create_graph)
        if grad_hook is not None:
            g = grad_hook(k, w, g)
        w = w - lr * g
    return w, iterates
