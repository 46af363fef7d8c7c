"""Meta-training and meta-testing behind ``fastmeta train`` / ``fastmeta evaluate``.

* :mod:`.loop`: :func:`train`, the one training loop for one process and for N ranks
  (``--nproc N``, torchrun), and :func:`launch_train`;
* :mod:`.config`: :data:`DEFAULTS`, :class:`TaskSource`, :func:`learner_from_config`,
  :func:`learner_from_checkpoint`;
* :mod:`.checkpoint`: :data:`CHECKPOINT_FORMAT`, :func:`save_checkpoint`, :func:`load_checkpoint`;
* :mod:`.evaluate`: :func:`evaluate_tasks`, :func:`pre_adaptation_loss`.
"""
from .checkpoint import CHECKPOINT_FORMAT, check_resume, load_checkpoint, load_for_resume, payload, save_checkpoint
from .config import DEFAULTS, LOSS_FN, TaskSource, learner_from_checkpoint, learner_from_config
from .evaluate import evaluate_tasks, pre_adaptation_loss
from .loop import launch_train, train

__all__ = ["train", "launch_train", "evaluate_tasks", "pre_adaptation_loss", "save_checkpoint", "load_checkpoint",
           "load_for_resume", "check_resume", "payload", "CHECKPOINT_FORMAT", "DEFAULTS", "LOSS_FN", "TaskSource",
           "learner_from_config", "learner_from_checkpoint"]
