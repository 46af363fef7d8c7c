"""Evaluating a model at many task rows: the :class:`Evaluator` and what it is built from.

* :mod:`.evaluator` -- :class:`Evaluator` (forward / losses / grads / over_tasks) with the
  ``vmap`` and ``loop`` strategies; :mod:`.bmm` -- the ``bmm`` strategy;
* :mod:`.strategy` -- ``strategy="auto"``: which strategies qualify and the timing that picks one;
* :mod:`.losses` -- loss names and per-task reduction; :mod:`.modes` -- the composite-norm mode
  (the vmap batch-norm trap) and the CPU speed modes; :mod:`.feature_cache` -- exact ANIL
  feature caching; :mod:`.inner_loop` -- the inner SGD loop on task rows.
"""
from .bmm import BmmPlan
from .evaluator import Evaluator
from .feature_cache import FeatureSplit
from .inner_loop import inner_loop
from .inner_optim import InnerAdam, InnerOptimizer, InnerSGD, make_inner_optimizer
from .losses import resolve_loss
from .modes import ChannelsLast, CompositeNorm
from .strategy import STRATEGIES, StrategyChoice, candidate_strategies, time_strategies

__all__ = ["Evaluator", "BmmPlan", "FeatureSplit", "inner_loop", "InnerOptimizer", "InnerSGD", "InnerAdam",
           "make_inner_optimizer", "resolve_loss", "ChannelsLast", "CompositeNorm",
           "STRATEGIES", "StrategyChoice", "candidate_strategies", "time_strategies"]
