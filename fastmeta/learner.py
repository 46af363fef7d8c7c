"""``MetaLearner``: the drop-in driver that replaces a hand-written MAML step."""
from __future__ import annotations

import copy
import logging
from typing import Iterator, Optional, Union

import torch
from torch import nn

from ._checks import check_batch, positive_int
from .algorithms.base import Algorithm, MetaResult
from .distributed.group import resolve_group
from .distributed.reduce import TaskReduction
from .evaluation import STRATEGIES, Evaluator, FeatureSplit, candidate_strategies, resolve_loss, time_strategies
from .evaluation.losses import target_mismatch, task_losses
from .evaluation.strategy import no_trace
from .metrics import accuracy
from .params import Adapt, ParamLayout
from .profiling import annotate
from .results import EvalResult, StepResult, check_finite, finiteness
from .tasks import RaggedTaskBatch, TaskBatch

__all__ = ["MetaLearner", "StepResult", "EvalResult"]

logger = logging.getLogger(__name__)


_COMPILE_REFUSAL = (
    "torch.compile cannot compile a meta-gradient step: it differentiates through "
    "torch.autograd.grad(create_graph=True), and AOTAutograd does not support double backward. Run the step "
    "eagerly (call it outside the compiled function); for speed use strategy='auto'/'vmap'/'bmm' and the CPU "
    "speed modes (fused=True, bf16=True, channels_last=True)")


class MetaLearner:
    """Meta-train and meta-test ``model`` with ``algorithm`` on :class:`TaskBatch` meta-batches.

    Args:
        model: any ``nn.Module`` mapping ``[N, ...]`` inputs to ``[N, ...]`` outputs.
        algorithm: e.g. ``fastmeta.MAML(inner_lr=0.4)``.
        loss_fn: ``"cross_entropy"`` (default; accuracy is reported), ``"mse"``, a functional loss
            (``F.cross_entropy``), a torch loss module (``nn.CrossEntropyLoss(label_smoothing=0.1)``)
            or any callable ``loss(output [N, ...], target [N, ...]) -> scalar``, applied per task
            (see :func:`fastmeta.evaluation.resolve_loss`).
        adapt: which parameters the inner loop adapts: ``"all"``, ``"head"`` (ANIL) or names.
        strategy: ``"auto"`` (time ``loop``, ``vmap`` and, for Linear/activation models, ``bmm``
            on the first batch, keep the fastest), ``"vmap"``, ``"loop"`` or ``"bmm"``. See
            :mod:`fastmeta.evaluation`.
        channels_last: opt-in CPU speed mode for conv nets: convolutions run in NHWC memory
            format (exact gradients; applies under the loop strategy).
        bf16: opt-in CPU speed mode: the model runs under bf16 autocast while the parameters,
            inner-loop updates and the meta-gradient (accumulated over tasks) stay float32.
            Gradients are approximate: ~0.2 relative L2 error on Conv-4, ~0.25 on ResNet-12 (cosine
            0.97); check accuracy on your task (on Omniglot 5-way 1-shot, ``fastmeta bench --full``
            reports meta-test accuracy beside float32; on ResNet-12 it has not been validated).
        fused: opt-in CPU speed mode for conv nets: every ``BatchNorm2d (batch statistics) ->
            ReLU/LeakyReLU [-> MaxPool2d(2)]`` chain (each block of Conv-4; two per ResNet-12 block),
            found in ``nn.Sequential`` containers and by torch.fx tracing of other forwards, goes
            through one fused C++ kernel per pass (the ``bn_relu_pool`` op, applied by
            :func:`fastmeta.nn.fuse_conv_blocks`); the model object is not modified. Same function;
            float32 gradients differ from ATen's by rounding (~1e-6 relative); the second-order
            terms come from the op's closed-form double backward.
        process_group: shard the meta-batch's tasks over the ranks of a ``torch.distributed``
            group. ``None``: the default group when torch.distributed is initialized with more
            than one rank, else one process. Each rank passes ITS shard to ``step``/
            ``meta_gradient`` and gets the mean meta-gradient over all ranks' tasks (one
            all-reduce per reduction; see :mod:`fastmeta.distributed`). ``learner.reduction``
            (a :class:`fastmeta.distributed.TaskReduction`, ``None`` in one process) counts them.
        feature_cache: ANIL feature caching (Raghu et al. 2020; Sharp-MAML sec. 5.4, eq. 19): with
            only the head adapted and a model computing ``head(body(x))``, the body runs once per
            (body parameters, inputs) -- once on the support set and once on the query set per
            task -- instead of at every inner step; the meta-gradient is exactly the same.
            ``None`` (auto): on when the model qualifies (see :class:`fastmeta.evaluation.FeatureSplit`;
            checked numerically on the first batch) and ``adapt`` selects the head; ``True``:
            required, ``ValueError`` naming ``feature_cache`` with the reason when it cannot apply;
            ``False``: off. ``learner.feature_cache`` / ``learner.feature_cache_reason`` report it.

    ``step(batch)`` adds the meta-gradient (mean over tasks) to ``.grad`` of the model's parameters
    (like ``backward()``), so any ``torch.optim`` optimizer can step it. Device and dtype follow the
    model at every call (``model.double()``, ``model.to(device)``, or ``learner.to(...)``); only
    data that disagrees with the model is an error::

        learner = fastmeta.MetaLearner(model, fastmeta.MAML(inner_lr=0.4))
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        for batch in tasks:
            opt.zero_grad()
            learner.step(batch)
            opt.step()
    """

    def __init__(self, model: nn.Module, algorithm: Algorithm, loss_fn="cross_entropy",
                 adapt: Adapt = "all", strategy: str = "auto", channels_last: bool = False, bf16: bool = False,
                 fused: bool = False, process_group=None, feature_cache: Optional[bool] = None):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not isinstance(algorithm, Algorithm):
            raise ValueError(f"algorithm: expected a fastmeta algorithm (e.g. fastmeta.MAML), got {type(algorithm).__name__}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
        self.model = model
        self.algorithm = algorithm
        self.loss_fn, self.classification = resolve_loss(loss_fn)
        resolve_group(process_group)  # validates (ValueError naming process_group)
        self.process_group = process_group
        # The reduction over processes (None in one process): fixed at the first meta-gradient,
        # when the group is resolved; it counts the all-reduces and the time spent in them.
        self.reduction: Optional[TaskReduction] = None
        if feature_cache not in (None, True, False):
            raise ValueError(f"feature_cache: expected None (auto), True or False, got {feature_cache!r}")
        self._adapt, self._feature_cache_arg = adapt, feature_cache
        self.strategy = strategy
        self._compiling: Optional[str] = None
        self.strategy_timings: dict[str, float] = {}
        self.strategy_reason: str = "" if strategy == "auto" else "chosen by the caller"
        # Opt-in CPU speed modes, passed to every Evaluator (validated there: bf16 needs float32).
        # Exact ANIL feature caching travels with them (every Evaluator of this learner is built
        # from this dict).
        self.speed_modes = dict(channels_last=channels_last, bf16=bf16, fused=fused)
        self._build()
        algorithm.bind(self.layout, model)  # learned inner rates (Meta-SGD, MAML++) are made here
        self._new_evaluator("loop")  # validates the speed modes now, not at the first batch
        self._ev: Optional[Evaluator] = None if strategy == "auto" else self._new_evaluator(strategy)

    def _build(self) -> None:
        # Everything that depends on the model's parameters' dtype and device: rebuilt by
        # _follow_model when the model moves (model.double(), model.to("cuda")).
        self.layout = ParamLayout(self.model, self._adapt)
        # One split shared by every evaluator of this learner: verified once, on the first batch.
        self._feature_split: Optional[FeatureSplit] = None
        self._feature_cache_off = "off: feature_cache=False"
        self.speed_modes.pop("feature_cache", None)
        if self._feature_cache_arg is not False:
            split = FeatureSplit(self.model, self.layout, required=self._feature_cache_arg is True)
            if split.enabled:
                self._feature_split = split
                self.speed_modes["feature_cache"] = split
            else:
                self._feature_cache_off = split.reason
        # Per input/target signature: the model's number of classes (None for regression), from
        # the up-front probe of the first batch with that signature (see _probe).
        self._probed: dict[tuple, Optional[int]] = {}

    def _follow_model(self) -> None:
        # Device and dtype follow the model at each call: after model.double() or model.to(...)
        # the layout, evaluators and learned algorithm tensors are rebuilt on the new ones (the
        # strategy already chosen is kept).
        ps = [p for p in self.model.parameters() if p.requires_grad]
        if all(p.dtype == self.layout.dtype and p.device == self.layout.device for p in ps):
            return
        strategy = self._ev.strategy if self._ev is not None else None
        self._build()
        with torch.no_grad():
            for p in self.algorithm.meta_parameters():
                p.data = p.data.to(self.layout.device, self.layout.dtype)
        self._new_evaluator("loop")
        self._ev = None if strategy is None else self._new_evaluator(strategy)

    def to(self, *args, **kwargs) -> "MetaLearner":
        """``model.to(*args, **kwargs)`` and the same for the algorithm's learned tensors; returns self."""
        self.model.to(*args, **kwargs)
        with torch.no_grad():
            for p in self.algorithm.meta_parameters():
                p.data = p.data.to(*args, **kwargs)
        self._follow_model()
        return self

    def parameters(self) -> Iterator[nn.Parameter]:
        """The model's parameters, then the algorithm's learned ones (Meta-SGD's or MAML++'s inner
        rates; none for MAML): what the meta-optimizer steps, e.g. ``Adam(learner.parameters())``."""
        yield from self.model.parameters()
        yield from self.algorithm.meta_parameters()

    # ------------------------------------------------------------------ feature caching
    @property
    def feature_cache(self) -> bool:
        """Whether ANIL feature caching is on (it may turn off when verified on the first batch)."""
        return self._feature_split is not None and self._feature_split.enabled

    @property
    def feature_cache_reason(self) -> str:
        """Why feature caching is on or off."""
        return self._feature_split.reason if self._feature_split is not None else self._feature_cache_off

    def _verify_features(self, x: torch.Tensor) -> None:
        # Before any algorithm runs: model(x) == head(body(x)) on the first task's first inputs
        # ``x`` ``[T, N, ...]``, so that a required cache fails here with its reason (not inside the
        # strategy measurement) and an auto cache turns off before anything is cached.
        if self._feature_split is not None:
            self._feature_split.verify(x[0, :8])

    # ------------------------------------------------------------------ strategy
    def evaluator(self, batch: Optional[TaskBatch] = None) -> Evaluator:
        """The evaluator in use; under ``"auto"`` the first call with a batch measures both."""
        if batch is not None:
            self._verify_features(batch.support_x)
        if self._ev is None:
            if batch is None:
                raise ValueError("batch: strategy='auto' needs a first batch to measure on")
            self._ev = self._choose(batch)
        return self._ev

    def _new_evaluator(self, strategy: str) -> Evaluator:
        return Evaluator(self.model, self.layout, self.loss_fn, strategy, **self.speed_modes)

    def _choose(self, batch: TaskBatch) -> Evaluator:
        # Time the meta-gradient of each strategy on (up to) 4 tasks and keep the fastest; per-task
        # costs scale the same way for every strategy, so a small sub-batch suffices and keeps the
        # measurement cheap on conv nets. Cheap steps get up to 7 rounds within ~1 s, expensive
        # ones 1 (see time_strategies). A strategy that fails (e.g. a model vmap cannot trace) is
        # skipped with its reason.
        sub = batch.select(slice(0, min(4, batch.num_tasks)))
        theta = self.layout.flatten(self.model)
        candidates = candidate_strategies(self.model)
        # Timing passes must not move running statistics, the RNG or a schedule counted in meta-steps
        # (MAML++'s multi-step-loss weights and derivative-order annealing).
        meta_step = getattr(self.algorithm, "meta_step", None)
        with no_trace(self.model):
            choice = time_strategies(candidates, self._new_evaluator,
                                     lambda ev: self.algorithm.meta_grad(ev, self.layout, theta, sub))
        if meta_step is not None:
            self.algorithm.meta_step = meta_step
        self.strategy_timings.update(choice.timings)
        if choice.strategy is None:
            raise RuntimeError(f"strategy: none of {candidates} could evaluate this model: {choice.errors}")
        times = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in self.strategy_timings.items())
        self.strategy_reason = f"auto: measured on {sub.num_tasks} tasks, best of {choice.rounds} ({times})" + (
            f"; failed: {choice.errors}" if choice.errors else "")
        logger.info("strategy %r chosen (%s)", choice.strategy, self.strategy_reason)
        return choice.evaluator

    def _probe(self, batch: TaskBatch) -> None:
        # Before any algorithm runs on a batch of a new input/target signature: evaluate the first
        # task's support and query sets once (no graph, no trace) so that a model that cannot take
        # the inputs, or targets that the loss would broadcast, fail here with the field's name.
        # Per batch after that: integer labels within the model's number of classes (no sync:
        # TaskBatch measured the label range when it was built).
        sig = tuple((tuple(t.shape[1:]), t.dtype) for t in
                    (batch.support_x, batch.support_y, batch.query_x, batch.query_y))
        if sig not in self._probed:
            ev = self._ev or self._new_evaluator("loop")
            adapted, shared = self.layout.split(self.layout.flatten(self.model))
            classes = None
            with torch.no_grad(), no_trace(self.model):
                for xn, yn in (("support_x", "support_y"), ("query_x", "query_y")):
                    x, y = getattr(batch, xn)[:1], getattr(batch, yn)[:1]
                    try:
                        out = ev.forward(adapted, shared, x)
                    except Exception as e:  # noqa: BLE001 - reported with the input that caused it
                        raise ValueError(f"{xn}: the model cannot evaluate inputs of shape {tuple(x.shape[1:])} "
                                         f"per task and dtype {x.dtype} ({type(e).__name__}: {e})") from e
                    why = target_mismatch(self.loss_fn, out, y)
                    if why is not None:
                        raise ValueError(f"{yn}: {why}")
                    per_task = task_losses(self.loss_fn, out, y)  # a non-scalar user loss fails here
                    if per_task.shape != (1,):
                        raise ValueError(f"loss_fn: expected one loss value per task, got shape "
                                         f"{tuple(per_task.shape)} for one task")
                    if self.classification and out.dim() >= 3:
                        classes = out.shape[2]
            self._probed[sig] = classes
        classes = self._probed[sig]
        if classes is not None and batch.label_range is not None and batch.label_range[1] >= classes:
            raise ValueError(f"query_y/support_y: labels must lie in [0, {classes}) for the model's {classes} "
                             f"outputs, found labels up to {batch.label_range[1]}")

    def _current_reduction(self) -> Optional[TaskReduction]:
        # Resolved per call (a default group may be initialized after the learner was built).
        group = resolve_group(self.process_group)
        if group is None:
            return None
        if self.reduction is None or self.reduction.group is not group:
            first, old = self.reduction is None, self.reduction
            self.reduction = TaskReduction(group)
            if old is not None:
                self.reduction.comm_seconds, self.reduction.reductions = old.comm_seconds, old.reductions
            if first and self.strategy == "auto" and self._ev is not None:
                # Each rank timed its own shard: all adopt rank 0's choice, so that they run the same
                # code (and the same floating-point summation order).
                chosen = self.reduction.agree(self._ev.strategy)
                if chosen != self._ev.strategy:
                    self._ev = self._new_evaluator(chosen)
                    self.strategy_reason += f"; rank 0 chose {chosen!r}, adopted by all ranks"
        return self.reduction

    @property
    def chosen_strategy(self) -> Optional[str]:
        return None if self._ev is None else self._ev.strategy

    # ------------------------------------------------------------------ training
    def meta_gradient(self, batch: Union[TaskBatch, RaggedTaskBatch]) -> MetaResult:
        """The flat meta-gradient without touching ``.grad``: ``[P + R]``, the model's ``[P]``
        (mean over tasks) followed by the gradients of the algorithm's learned tensors (``R = 0``
        for MAML). ``FloatingPointError`` if a query loss or the meta-gradient is not finite."""
        if torch.compiler.is_compiling():
            self._compiling = "meta_gradient"
        return self._checked_meta_gradient(batch)

    @torch.compiler.disable
    def _checked_meta_gradient(self, batch) -> MetaResult:
        self._refuse_compile()
        with annotate("meta_gradient"):
            res = self._meta_gradient(batch)
            # One host sync on the happy path (step() folds this read into its own).
            check_finite(res, float(finiteness(res)))
        return res

    def _meta_gradient(self, batch, reduce: bool = True) -> MetaResult:
        # Everything but the finiteness check, which needs a host read.
        self._follow_model()
        if isinstance(batch, RaggedTaskBatch):
            return self._ragged_meta_gradient(batch)
        check_batch(batch, self.layout)
        self._probe(batch)
        self.evaluator(batch)
        # Under a process group: the mean over ALL ranks' tasks (one process: over this batch's).
        reduction = self._current_reduction()
        ev = self._ev
        theta = self.layout.flatten(self.model)
        ev.reduction = reduction if reduce else None
        try:
            return self.algorithm.meta_grad(ev, self.layout, theta, batch)
        finally:
            ev.reduction = None

    def _ragged_meta_gradient(self, batch: RaggedTaskBatch) -> MetaResult:
        # The mean over all T tasks of unequal sizes: each equal-shape group's task mean, weighted
        # by its task count (the same sum over tasks, divided once by T).
        if self._current_reduction() is not None:
            raise ValueError("batch: a RaggedTaskBatch cannot be sharded over a process group; give each rank "
                             "tasks of equal sizes (a TaskBatch)")
        total, losses, accs = None, [], []
        meta_step = getattr(self.algorithm, "meta_step", None)  # one meta-step, however many groups
        for g in batch.groups:
            if meta_step is not None:
                self.algorithm.meta_step = meta_step
            r = self._meta_gradient(g)
            total = r.grad * g.num_tasks if total is None else total + r.grad * g.num_tasks
            losses.append(r.query_loss)
            if self.classification:
                accs.append(accuracy(r.query_out, g.query_y))
        return MetaResult(total / batch.num_tasks, batch.reorder(losses), None,
                          extras={"accuracy": batch.reorder(accs)} if accs else None)

    def _write_grad(self, grad: torch.Tensor) -> None:
        # Accumulates like backward(): a regulariser's gradient already in .grad is kept.
        P = self.layout.P
        self.layout.write_grad(self.model, grad[:P], accumulate=True)
        offset = P
        for p in self.algorithm.meta_parameters():
            g = grad[offset: offset + p.numel()].view(p.shape).to(p.dtype)
            offset += p.numel()
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)

    def step(self, batch: Union[TaskBatch, RaggedTaskBatch]) -> StepResult:
        """Compute the meta-gradient on ``batch`` and **add** it to the ``.grad`` of the model's
        parameters (and of the algorithm's learned tensors), as ``loss.backward()`` would: call
        ``optimizer.zero_grad()`` between steps, and a regulariser's ``backward()`` before or after
        adds to it. Returns the mean post-adaptation query loss (and accuracy).
        ``FloatingPointError`` (before ``.grad`` is touched) if a query loss or the meta-gradient
        is not finite. ``batch``: a :class:`TaskBatch`, or tasks of unequal sizes from
        :meth:`TaskBatch.from_tasks`.

        Under ``torch.compile`` it raises ``RuntimeError`` saying why and what to do instead."""
        if torch.compiler.is_compiling():
            # Dynamo turns a raise in traced code into a graph break and an eager rerun (where
            # is_compiling() is False): the flag, a side effect it replays, reaches the eager _step.
            self._compiling = "step"
        return self._step(batch)

    def _refuse_compile(self) -> None:
        where, self._compiling = self._compiling, None
        if where is not None:
            raise RuntimeError(f"MetaLearner.{where}: {_COMPILE_REFUSAL}")

    @torch.compiler.disable
    def _step(self, batch) -> StepResult:
        self._refuse_compile()
        with annotate("step"):
            with annotate("meta_gradient"):
                res = self._meta_gradient(batch)
            # The finiteness check, the mean loss and the mean accuracy in ONE host read: on a GPU
            # each read waits for the device to drain, so separate reads cost a sync each.
            stats = [finiteness(res).double(), res.query_loss.mean().double()]
            if self.classification:
                acc = res.extras["accuracy"] if res.query_out is None else accuracy(res.query_out, batch.query_y)
                stats.append(acc.mean().double())
            values = torch.stack(stats).tolist()
            check_finite(res, values[0])
            self._write_grad(res.grad)
        return StepResult(values[1], values[2] if self.classification else None, res.query_loss)

    # ------------------------------------------------------------------ meta-testing
    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: Optional[int] = None) -> nn.Module:
        """A copy of the model adapted to one task's support set ``[N, ...]`` (no graph kept; for
        an inner loop that meta-gradients flow through, see :mod:`fastmeta.compat`)."""
        self._follow_model()
        with annotate("adapt"):
            if support_x.dim() < 1 or support_y.shape[:1] != support_x.shape[:1]:
                raise ValueError(f"support_y: expected {support_x.shape[0]} labels for {support_x.shape[0]} support "
                                 f"samples, got shape {tuple(support_y.shape)}")
            ev = self._ev or self._new_evaluator("loop")
            theta = self.layout.flatten(self.model)
            self._verify_features(support_x[None])
            with ev.feature_scope():
                w = self.algorithm.adapt(ev, self.layout, theta, support_x[None], support_y[None], steps)
            fast = copy.deepcopy(self.model)
            self.layout.load(fast, torch.cat([w[0], theta[self.layout.D:]]))
            return fast

    def evaluate(self, batch: Union[TaskBatch, RaggedTaskBatch], steps: Optional[int] = None) -> EvalResult:
        """Adapt on each task's support set (``steps`` inner steps, an int >= 1; default: the
        algorithm's), score its query set: mean ± 95% CI over tasks. ``FloatingPointError`` if a
        task's query loss is not finite."""
        self._follow_model()
        if isinstance(batch, RaggedTaskBatch):
            parts = [self.evaluate(g, steps) for g in batch.groups]
            accs = [r.per_task_accuracy for r in parts]
            return EvalResult.from_tasks(batch.reorder([r.per_task_loss for r in parts]),
                                         batch.reorder(accs) if accs[0] is not None else None)
        with annotate("evaluate"):
            check_batch(batch, self.layout)
            if steps is not None:
                positive_int(steps, "steps")
            self._probe(batch)
            ev = self.evaluator(batch)
            theta = self.layout.flatten(self.model)
            losses, accs = [], []
            for sub in ev.chunks(batch):
                with ev.feature_scope():  # ANIL: the body runs once on the support and once on the query
                    w = self.algorithm.adapt(ev, self.layout, theta, sub.support_x, sub.support_y, steps)
                    with torch.no_grad():
                        q, out = ev.losses(w, theta[self.layout.D:], sub.query_x, sub.query_y, return_outputs=True)
                losses.append(q)
                if self.classification:
                    accs.append(accuracy(out, sub.query_y))
            loss = torch.cat(losses)
            bad = ~torch.isfinite(loss)
            if bad.any():
                # A NaN loss would otherwise print as "loss nan, accuracy 20.00%" (argmax of NaN logits).
                raise FloatingPointError(
                    f"loss: non-finite post-adaptation query loss for tasks {bad.nonzero().flatten().tolist()[:8]} "
                    f"(values {loss[bad][:4].tolist()}); the model or its adapted parameters are not finite")
            return EvalResult.from_tasks(loss, torch.cat(accs) if accs else None)
