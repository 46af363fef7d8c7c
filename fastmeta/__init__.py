"""fastmeta: fast, correct gradient-based meta-learning for PyTorch.

Task parameters are rows of a ``[T, D]`` matrix; every algorithm is algebra on those rows,
evaluated per task by ``vmap``, batched matmuls or a per-task loop (see ``fastmeta.evaluation``).
"""
import torch  # noqa: F401  (must precede the native extension: it needs libc10/libtorch loaded)

from .algorithms import FOMAML, MAML, Algorithm, MetaResult
from .algorithms import HFMAML, FallahStepSize, MAMLPlusPlus, MetaSGD, SharpMAML
from .evaluation import InnerAdam, InnerOptimizer, InnerSGD
from .evaluation import Evaluator
from .learner import EvalResult, MetaLearner, StepResult
from .models import Conv4, ResNet12, SineMLP
from .params import ParamLayout
from .tasks import TaskBatch

__version__ = "0.1.0"

__all__ = ["MAML", "FOMAML", "Algorithm", "MetaResult", "MetaLearner", "StepResult", "EvalResult",
           "Evaluator", "ParamLayout", "TaskBatch", "Conv4", "ResNet12", "SineMLP", "__version__"]
__all__ += ["HFMAML", "SharpMAML", "FallahStepSize", "MetaSGD", "MAMLPlusPlus", "InnerSGD", "InnerAdam", "InnerOptimizer"]
