"""Meta-learning algorithms on task rows."""
from .base import Algorithm, MetaResult
from .maml import FOMAML, MAML

__all__ = ["Algorithm", "MetaResult", "MAML", "FOMAML"]
