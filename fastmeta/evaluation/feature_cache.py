"""Exact ANIL feature caching (Raghu et al. 2020; Sharp-MAML sec. 5.4, eq. 19).

When only the head adapts and the model is ``head(body(x))``, the body's output depends on the
shared parameters and the inputs only, not on the task rows. An evaluator built with a
:class:`FeatureSplit` then computes ``body(shared; x)`` once per (``shared``, ``x``) tensor pair
inside a feature scope (every ``over_tasks`` chunk is one) and runs only the head at each inner
step. The features keep their autograd graph, so the meta-gradient is exact.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..params import ParamLayout


def transforms_active() -> bool:
    """Inside a user's torch.func transform (vmap/grad over the evaluator) cached tensors could
    belong to another transform level: never cache there."""
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


class FeatureCache:
    """Memoized ``body(shared; x)`` per (shared, x) tensor pair, alive only inside feature scopes.

    Entries hold strong references to their key tensors, so an ``id`` can never be reused by a new
    tensor while its entry exists; the tensors' version counters, ``requires_grad`` flags and the
    grad/inference/autocast modes are part of the key.
    """

    SIZE = 4  # support, query and a couple of transient (SDS-subset / per-task) entries

    def __init__(self):
        self.entries: list = []
        self.depth = 0

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
                return feats
        feats = compute()
        self.entries.append((shared, x, key, grad_on, feats))
        if len(self.entries) > self.SIZE:
            self.entries.pop(0)
        return feats


# Losses computed element by element (any shape, no class dimension): Evaluator.losses applies them
# to [T, N, ...] outputs directly. Cross-entropy is not one (it reads dim 1 as the classes).
