"""MAML++ (Antoniou, Edwards, Storkey, "How to train your MAML", ICLR 2019): per-layer per-step
learned inner rates (LSLR), the annealed multi-step loss (MSL) and derivative-order annealing."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._checks import positive_int
from ..evaluation import Evaluator
from ..evaluation.inner_optim import InnerOptimizerSpec, make_inner_optimizer
from ..params import ParamLayout
from ..tasks import TaskBatch
from .base import Algorithm, MetaResult
from .metasgd import as_parameter, learned_rates_meta_grad, load_rates

# The floor of the non-final MSL weights, times 1/K (the authors' code: 0.03 / K).
MSL_FLOOR = 0.03


def _nonnegative_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    return value


def msl_weights(steps: int, epoch: int, msl_epochs: int, floor: float = MSL_FLOOR) -> list[float]:
    """MAML++'s multi-step-loss weights ``[w_1, ..., w_K]`` at ``epoch`` (paper sec. 4 "Multi-Step
    Loss Optimization"; the authors' ``get_per_step_loss_importance_vector``):

        decay = 1 / (K * msl_epochs)
        w_k = max(1/K - epoch * decay, floor / K)                           k < K
        w_K = min(1/K + epoch * (K - 1) * decay, 1 - (K - 1) * floor / K)

    Uniform ``1/K`` at epoch 0; the non-final weights fall linearly to ``floor/K`` at
    ``epoch = msl_epochs`` and the final one takes the rest (they always sum to 1)."""
    K = steps
    decay = 1.0 / K / msl_epochs
    lo = floor / K
    w = [max(1.0 / K - epoch * decay, lo) for _ in range(K - 1)]
    w.append(min(1.0 / K + epoch * (K - 1) * decay, 1.0 - (K - 1) * lo))
    return w


class MAMLPlusPlus(Algorithm):
    """MAML++ (Antoniou et al. 2019), the parts that change the meta-gradient:

    * **LSLR** (sec. 4, "Learning Per-Layer Per-Step Learning Rates and Gradient Directions"):
      a learned rate ``alpha[k, l]`` per inner step k and adapted parameter tensor l, shape
      ``[inner_steps, len(layout.adapted)]``, initialised to ``inner_lr``; the step is
      ``theta^l_{k+1} = theta^l_k - alpha[k, l] grad_{theta^l} L(theta_k; D_m)``.
      ``lslr=False``: the fixed ``inner_lr``.
    * **MSL** (sec. 4, "Multi-Step Loss Optimization"): the meta-objective per task is
      ``sum_{k=1..K} w_k L(theta_k; D'_m)`` over the query losses after every inner step, with the
      weights of :func:`msl_weights` at the current epoch while ``epoch < msl_epochs``; from
      ``msl_epochs`` on, the final query loss alone (``w = [0, ..., 0, 1]``), as the authors' code
      switches (``epoch < multi_step_loss_num_epochs``). ``msl_epochs=0``: never MSL.
    * **Derivative-order annealing** (sec. 4, "Derivative-Order Annealing"): first order
      (inner gradients constant; the rates still get their gradient through the update) while
      ``epoch < first_order_epochs``, second order after. The authors' code uses second order when
      ``epoch > first_order_to_second_order_epoch``, i.e. ``first_order_epochs = that + 1`` here.
      ``first_order=True``: always first order.

    ``epoch = meta_step // steps_per_epoch``; :attr:`meta_step` counts the :meth:`meta_grad`
    calls (training only; :meth:`adapt` does not count) and is saved by :meth:`state_dict`. The
    defaults follow the authors' configs: 500 iterations per epoch, MSL over 15 epochs (the MSL
    weights then change once per 500 meta-steps; ``steps_per_epoch=1`` anneals per meta-step).

    **Not implemented**: per-step batch-norm statistics and weights (BNRS/BNWB) and the cosine
    meta-rate schedule (use ``torch.optim.lr_scheduler.CosineAnnealingLR`` on the meta-optimizer).
    Batch norm here uses each task's batch statistics at every step (Conv-4's
    ``track_running_stats=False``).

    The meta-gradient is ``[P + K*L]``: theta's, then the rates' (row-major over ``[K, L]``; mean
    over tasks). At meta-test (:meth:`adapt`) step k uses ``alpha[min(k, K-1)]``.
    """

    name = "mamlpp"

    def __init__(self, inner_lr: float, inner_steps: int = 5, first_order: bool = False, lslr: bool = True,
                 msl_epochs: int = 15, first_order_epochs: int = 0, steps_per_epoch: int = 500,
                 inner_optimizer: InnerOptimizerSpec = None):
        super().__init__(inner_lr, inner_steps)
        self.first_order = bool(first_order)
        if not isinstance(lslr, bool):
            raise TypeError(f"lslr: expected a bool, got {lslr!r}")
        self.lslr = lslr
        self.msl_epochs = _nonnegative_int(msl_epochs, "msl_epochs")
        self.first_order_epochs = _nonnegative_int(first_order_epochs, "first_order_epochs")
        self.steps_per_epoch = positive_int(steps_per_epoch, "steps_per_epoch")
        self.inner_optimizer = make_inner_optimizer(inner_optimizer)
        self.meta_step = 0
        self._rates: Optional[nn.Parameter] = None
        self._numels: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ schedule
    @property
    def epoch(self) -> int:
        return self.meta_step // self.steps_per_epoch

    def step_weights(self, epoch: Optional[int] = None) -> list[float]:
        """MSL weights ``[w_1..w_K]`` at ``epoch`` (default: the current one); ``[0, .., 0, 1]`` once
        ``epoch >= msl_epochs``."""
        e = self.epoch if epoch is None else epoch
        if e < self.msl_epochs:
            return msl_weights(self.inner_steps, e, self.msl_epochs)
        return [0.0] * (self.inner_steps - 1) + [1.0]

    def second_order(self, epoch: Optional[int] = None) -> bool:
        """Whether the meta-gradient at ``epoch`` (default: the current one) is second order."""
        e = self.epoch if epoch is None else epoch
        return not self.first_order and e >= self.first_order_epochs

    # ------------------------------------------------------------------ learned rates
    @property
    def rates(self) -> Optional[nn.Parameter]:
        """The LSLR rates ``[inner_steps, num adapted tensors]`` (``None`` before :meth:`bind` or without LSLR)."""
        return self._rates

    def bind(self, layout: ParamLayout, model: Optional[nn.Module] = None) -> None:
        if self.lslr:
            self._rates = as_parameter(self._rates, (self.inner_steps, len(layout.adapted)), self.inner_lr, layout)
        self._numels = torch.tensor([s.numel for s in layout.slots[:len(layout.adapted)]], device=layout.device)

    def meta_parameters(self) -> list[nn.Parameter]:
        return [] if self._rates is None else [self._rates]

    def state_dict(self) -> dict:
        sd = {"meta_step": self.meta_step}
        if self._rates is not None:
            sd["rates"] = self._rates.detach().clone()
        return sd

    def load_state_dict(self, state: dict) -> None:
        want = {"meta_step", "rates"} if self.lslr else {"meta_step"}
        if set(state) != want:
            raise ValueError(f"state_dict: MAMLPlusPlus(lslr={self.lslr}) expects keys {sorted(want)}, got {sorted(state)}")
        self.meta_step = _nonnegative_int(int(state["meta_step"]), "meta_step")
        if self.lslr:
            r = state["rates"]
            if not isinstance(r, torch.Tensor) or r.dim() != 2 or r.shape[0] != self.inner_steps:
                raise ValueError(f"state_dict: 'rates' must be [inner_steps={self.inner_steps}, L], got "
                                 f"{tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__}")
            self._rates = load_rates(self._rates, r, "rates", None if self._rates is None else tuple(self._rates.shape))

    def _bind_check(self, layout: ParamLayout) -> None:
        n = len(layout.adapted)
        if self._numels is None or (self.lslr and self._rates is None):
            self.bind(layout)
        elif self._numels.numel() != n or (self._rates is not None and self._rates.shape[1] != n):
            raise ValueError(f"layout: MAMLPlusPlus's rates are bound to another layout ({self._numels.numel()} "
                             f"adapted tensors, this one has {n}); call bind(layout, model) for the new model")
        elif self._numels.device != layout.device or (
                self._rates is not None and (self._rates.dtype != layout.dtype or self._rates.device != layout.device)):
            self.bind(layout)

    def _per_step(self, rates: torch.Tensor, layout: ParamLayout, steps: int) -> list:
        # Row k of [K, L] -> a [D] rate vector, each tensor's rate repeated over its entries
        # (output_size avoids a device sync); steps past K reuse the last row.
        rows = [rates[k].repeat_interleave(self._numels, output_size=layout.D) for k in range(min(steps, self.inner_steps))]
        return rows + [rows[-1]] * (steps - len(rows))

    # ------------------------------------------------------------------ meta-gradient
    def meta_grad(self, ev: Evaluator, layout: ParamLayout, theta: torch.Tensor, batch: TaskBatch) -> MetaResult:
        self._bind_check(layout)
        weights = self.step_weights()
        second = self.second_order()
        K = self.inner_steps
        if self.lslr:
            leaves, make_lr = [self._rates], (lambda ls: self._per_step(ls[0], layout, K))
        else:
            leaves, make_lr = [], (lambda ls: self.inner_lr)
        res = learned_rates_meta_grad(ev, layout, theta, batch, leaves, make_lr, K, second, self.inner_optimizer,
                                      step_weights=weights if weights[:-1] != [0.0] * (K - 1) else None)
        self.meta_step += 1
        return res

    def adapt_rates(self, layout: ParamLayout, steps: int):
        if not self.lslr:
            return self.inner_lr
        self._bind_check(layout)
        return self._per_step(self._rates.detach(), layout, steps)
