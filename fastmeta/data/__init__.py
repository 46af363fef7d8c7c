"""Task sources producing :class:`fastmeta.TaskBatch` meta-batches."""
from .omniglot import Omniglot, OmniglotTasks, split_alphabets
from .sinusoid import SinusoidTasks

__all__ = ["SinusoidTasks", "Omniglot", "OmniglotTasks", "split_alphabets"]
