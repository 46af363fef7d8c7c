"""Meta-learning algorithms on task rows."""
from .base import Algorithm, MetaResult
from .fallah import FallahStepSize
from .hfmaml import HFMAML
from .maml import FOMAML, MAML
from .mamlpp import MAMLPlusPlus
from .metasgd import MetaSGD
from .sharp import SharpMAML

__all__ = ["Algorithm", "MetaResult", "MAML", "FOMAML", "HFMAML", "SharpMAML", "FallahStepSize", "MetaSGD",
           "MAMLPlusPlus"]
