"""Task sources producing :class:`fastmeta.TaskBatch` meta-batches."""
from .cifar import CIFARFS, FC100
from .imagenet import MiniImageNet, TieredImageNet
from .images import ImageClasses, ImageTasks
from .omniglot import Omniglot, OmniglotTasks, split_alphabets
from .sinusoid import SinusoidTasks

__all__ = ["SinusoidTasks", "Omniglot", "OmniglotTasks", "split_alphabets", "ImageClasses", "ImageTasks",
           "MiniImageNet", "TieredImageNet", "CIFARFS", "FC100"]
