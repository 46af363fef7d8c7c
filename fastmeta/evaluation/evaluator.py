"""The one place where the model is evaluated per task: :class:`Evaluator`.

Everything an algorithm needs from the model is one of three calls on task rows:

* :meth:`Evaluator.losses` -- per-task losses ``[T]`` (or per-sample ``[T, N]``) at rows ``[T, D]``;
* :meth:`Evaluator.grads` -- per-task losses ``[T]`` and gradients ``[T, D]``, optionally
  differentiable (``create_graph=True``) for second-order meta-gradients;
* :meth:`Evaluator.over_tasks` -- run a per-task computation over the meta-batch in the
  strategy's chunks and reduce its results to the mean over tasks.

Three strategies sit behind those calls (docs/design.md has the measurements that make each necessary):

``"vmap"``
    ``torch.func.vmap`` over ``functional_call``: one batched call for all T tasks. Wins where
    per-op launch cost dominates (small MLPs).
``"loop"``
    a per-task Python loop, one task per chunk. Wins for conv nets on the CPU, where a task's
    activations stay in cache and weights are not grouped.
``"bmm"``
    for models made of ``nn.Linear`` layers and elementwise activations only: see
    :mod:`fastmeta.evaluation.bmm`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Union

import torch
from torch import nn
from torch.func import functional_call, vmap

from ..params import ParamLayout
from ..tasks import TaskBatch
from .bmm import BmmPlan
from .feature_cache import FeatureCache, FeatureSplit, transforms_active
from .losses import LossFn, task_losses
from .modes import CompositeNorm, with_speed_modes

EVALUATION_STRATEGIES = ("vmap", "loop", "bmm")


def task_rows(row: torch.Tensor, T: int) -> torch.Tensor:
    """``[D] -> [T, D]`` (a view). For one task ``unsqueeze`` rather than ``expand``: both backwards
    are then views, where expand's sums over the task dim and the loop's ``rows[t]`` select writes
    its gradient into a zero-filled ``[1, D]`` buffer (fewer D-sized copies per Conv-4 step)."""
    return row.unsqueeze(0) if T == 1 else row.expand(T, -1)


class Evaluator:
    """Evaluates ``model`` at task rows with one strategy (``"vmap"``, ``"loop"`` or ``"bmm"``).

    Args:
        model: the ``nn.Module``; its parameters are never modified here.
        layout: the :class:`ParamLayout` (adapted rows ``[T, D]``, shared ``[P - D]``).
        loss_fn: a functional loss accepting ``reduction=`` (``F.cross_entropy``, ``F.mse_loss``).
        strategy: ``"vmap"``, ``"loop"`` or ``"bmm"`` (``ValueError`` naming ``strategy`` for a model
            that is not Linear layers and elementwise activations).
        channels_last: opt-in CPU speed mode: convolutions in NHWC memory format (exact; loop
            strategy only). See :class:`~fastmeta.evaluation.modes.ChannelsLast`.
        bf16: opt-in CPU speed mode: bf16 autocast with float32 master weights and float32
            meta-gradient accumulation (approximate: ~1e-2 relative gradient error). Needs
            float32 parameters.
        fused: opt-in CPU speed mode: ``BatchNorm2d (batch statistics) -> ReLU/LeakyReLU
            [-> MaxPool2d(2)]`` chains (in ``nn.Sequential`` containers or found by torch.fx tracing)
            go through the fused ``bn_relu_pool`` op: the evaluator runs
            :func:`fastmeta.nn.fuse_conv_blocks` ``(model)``, which shares the model's parameters
            and leaves the model object alone (same function; float32 results differ from ATen's
            by rounding, ~1e-6 relative).
        feature_cache: ANIL feature caching (exact; see :class:`FeatureSplit`): ``False`` (off),
            ``True`` (build the split; ``ValueError`` naming ``feature_cache`` if the model does
            not qualify), or a :class:`FeatureSplit` shared by several evaluators (one numerical
            verification for all). Caching happens only inside :meth:`feature_scope`.

    ``reduction``: ``None`` (one process: :meth:`over_tasks` divides the task sum by T) or an
    object with ``mean(grad_sum [P], n_local) -> [P]`` that returns the mean over the tasks of all
    processes (:class:`fastmeta.distributed.TaskReduction`, set by ``MetaLearner``).
    """

    def __init__(self, model: nn.Module, layout: ParamLayout, loss_fn: LossFn, strategy: str, *,
                 channels_last: bool = False, bf16: bool = False, fused: bool = False,
                 feature_cache: Union[bool, FeatureSplit] = False):
        if strategy not in EVALUATION_STRATEGIES:
            raise ValueError(f"strategy: expected 'vmap', 'loop' or 'bmm', got {strategy!r}")
        self._bmm = BmmPlan(model) if strategy == "bmm" else None
        for name, value in (("channels_last", channels_last), ("bf16", bf16), ("fused", fused)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}: expected a bool, got {value!r}")
        if bf16 and layout.dtype != torch.float32:
            raise ValueError(f"bf16: needs float32 parameters (they are the float32 master weights), got {layout.dtype}")
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
        if fused:
            from ..nn import fuse_conv_blocks

            self.net = fuse_conv_blocks(model)  # shares the model's parameters; model untouched
        else:
            self.net = model
        self.features: Optional[FeatureSplit] = split
        self._feature_cache: Optional[FeatureCache] = None if split is None else FeatureCache()
        self.reduction = None
        # The composite-norm mode routes every torch call of the forward through Python, which
        # costs more than the whole forward of a small MLP: enter it only for models that have
        # batch/instance-norm modules (the only callers of F.batch_norm / F.instance_norm in torch).
        norms = [m for m in model.modules()
                 if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm))]
        self._has_norm = bool(norms)
        # Batch norm's forward counts batches before it calls F.batch_norm; under vmap the composite
        # norm updates no running statistics, so the counters must not move either.
        self._bn_counters = [m.num_batches_tracked for m in norms if getattr(m, "num_batches_tracked", None) is not None]

    # ------------------------------------------------------------------ forward
    @with_speed_modes
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
            return self.forward_params(rows, shared, x)
        if rows.dim() == 1:
            rows = task_rows(rows, T)
        if rows.shape[0] != T:
            raise ValueError(f"rows: has {rows.shape[0]} task rows but x has {T} tasks")
        net, layout = self.net, self.layout
        # Per-task shared values ``[T, P-D]`` (one copy of the non-adapted parameters per task
        # row) let a caller get per-task gradients w.r.t. the shared parameters from one backward
        # (HF-MAML's finite differences of the shared gradient, per-task gradient norms).
        per_task_shared = shared is not None and shared.dim() == 2
        if per_task_shared and shared.shape[0] != T:
            raise ValueError(f"shared: has {shared.shape[0]} per-task rows but x has {T} tasks")
        if self.caches_features and not transforms_active() and self.features.verify(x[0, :8]):
            return self._forward_split(rows, shared, x, per_task_shared)
        if self.strategy == "loop":
            if T == 1:  # the loop's chunks: views both ways, no select/stack nodes (see task_rows)
                sh = shared[0] if per_task_shared else shared
                return functional_call(net, layout.named(rows.squeeze(0), sh), (x.squeeze(0),)).unsqueeze(0)
            return torch.stack([functional_call(net, layout.named(rows[t], shared[t] if per_task_shared else shared),
                                                (x[t],)) for t in range(T)])
        if self.strategy == "bmm":
            return self.forward_params(layout.named_adapted(rows), shared, x)

        if per_task_shared:
            def one_shared(row, sh, xt):
                return functional_call(net, layout.named(row, sh), (xt,))

            with self._norm_mode():
                return vmap(one_shared, in_dims=(0, 0, 0), randomness="different")(rows, shared, x)

        def one(row, xt):
            return functional_call(net, layout.named(row, shared), (xt,))

        with self._norm_mode():
            return vmap(one, in_dims=(0, 0), randomness="different")(rows, x)

    def forward_params(self, params: dict, shared: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The ``bmm`` forward on per-parameter task tensors ``{name: [T, ...]}``: the views of task
        rows, or what ``inner_loop(structured=True)`` returns (then there are no flat rows to split
        at all). Shared parameters ``[P-D]`` are broadcast over T; ``[T, P-D]`` are per task."""
        if self._bmm is None:
            raise ValueError(f"rows: per-parameter task tensors need the 'bmm' strategy, this evaluator runs {self.strategy!r}")
        T = x.shape[0]
        named = dict(params)
        for n, v in self.layout.named_shared(shared).items():
            named[n] = v.expand(T, *v.shape) if shared.dim() == 1 else v
        return self._bmm.run(named, x)

    def _forward_split(self, rows, shared, x, per_task_shared: bool) -> torch.Tensor:
        # head(row_t; body(shared; x_t)) with the body's features memoized per (shared, x) pair.
        # The body always runs per task (loop) or vmapped over tasks, never on T*N samples at once:
        # batch norm uses each task's own batch statistics.
        fs, T = self.features, x.shape[0]
        body, head = getattr(self.net, fs.body_name), getattr(self.net, fs.head_name)

        def body_features() -> torch.Tensor:
            if self.strategy == "loop":
                return torch.stack([functional_call(body, fs.body_params(shared[t] if per_task_shared else shared),
                                                    (x[t],)) for t in range(T)])
            with self._norm_mode():
                if per_task_shared:
                    return vmap(lambda sh, xt: functional_call(body, fs.body_params(sh), (xt,)),
                                in_dims=(0, 0), randomness="different")(shared, x)
                params = fs.body_params(shared)
                return vmap(lambda xt: functional_call(body, params, (xt,)), randomness="different")(x)

        feats = self._feature_cache.get(shared, x, self.layout.device.type, body_features)
        if self.strategy == "loop":
            return torch.stack([functional_call(head, fs.head_params(rows[t]), (feats[t],)) for t in range(T)])
        with self._norm_mode():
            return vmap(lambda row, f: functional_call(head, fs.head_params(row), (f,)),
                        in_dims=(0, 0), randomness="different")(rows, feats)

    @contextlib.contextmanager
    def _norm_mode(self):
        # The vmap forward's batch/instance norm: composite ops (the double-backward trap, see
        # modes.py), running statistics and their counters untouched.
        if not self._has_norm:
            yield
            return
        counts = [c.clone() for c in self._bn_counters]
        try:
            with CompositeNorm():
                yield
        finally:
            with torch.no_grad():
                for c, n in zip(self._bn_counters, counts):
                    c.copy_(n)

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

    # ------------------------------------------------------------------ losses and gradients
    def losses(self, rows: torch.Tensor, shared: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               per_sample: bool = False, return_outputs: bool = False):
        """Per-task mean losses ``[T]`` (``per_sample=True``: ``[T, N]``); with outputs if asked."""
        out = self.forward(rows, shared, x)
        loss = task_losses(self.loss_fn, out, y, per_sample)
        return (loss, out) if return_outputs else loss

    def grads(self, rows: torch.Tensor, shared: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
              create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-task losses ``[T]`` and gradients ``[T, D]`` w.r.t. the adapted rows.

        With ``create_graph=True`` the gradients are differentiable (second-order MAML);
        otherwise they are constants. ``rows`` ``[D]`` is broadcast to all tasks.
        """
        T = x.shape[0]
        if rows.dim() == 1:
            rows = task_rows(rows, T)
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

        Returns the mean gradient over all T tasks (meta-gradients average over tasks, not sum;
        under a :attr:`reduction`, over the tasks of every process) and the per-task tensors
        concatenated along dim 0. One chunk's graph is freed before the next is built, which is
        what keeps the loop strategy at one task's memory. Each chunk runs in its own
        :meth:`feature_scope` (ANIL feature caching: the body's features live for one chunk).
        """
        if self.strategy != "loop" and self._feature_cache is None:  # one chunk, nothing to scope
            total, *extras = fn(batch)
        else:
            total, parts = None, None
            for sub in self.chunks(batch):
                with self.feature_scope():
                    g, *rest = fn(sub)
                total = g if total is None else total + g
                parts = [[r] for r in rest] if parts is None else [p + [r] for p, r in zip(parts, rest)]
            extras = [p[0] if len(p) == 1 else torch.cat(p) for p in (parts or [])]
        n = batch.num_tasks
        mean = total / n if self.reduction is None else self.reduction.mean(total, n)
        return (mean, *extras)
