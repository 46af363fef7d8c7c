"""Meta-training and meta-testing behind ``fastmeta train`` / ``fastmeta evaluate``.

* :mod:`.loop`: :func:`train`, the one training loop for one process and for N ranks
  (``--nproc N``, torchrun), and :func:`launch_train`;
* :mod:`.config`: :data:`DEFAULTS`, :func:`check_config`, :class:`TaskSource`,
  :func:`source_from_checkpoint`, :func:`learner_from_config`, :func:`learner_from_checkpoint`;
* :mod:`.checkpoint`: :data:`CHECKPOINT_FORMAT`, :func:`save_checkpoint`, :func:`load_checkpoint`
  (checksum verified), :class:`CheckpointError`, :func:`check_resume`;
* :mod:`.evaluate`: :func:`evaluate_tasks`, :func:`pre_adaptation_loss`.
"""
from .checkpoint import (CHECKPOINT_FORMAT, CheckpointError, check_resume, checksum, load_checkpoint, load_for_resume,
                         payload, save_checkpoint, with_summary)
from .config import (DEFAULTS, LOSS_FN, TaskSource, check_config, learner_from_checkpoint, learner_from_config,
                     source_from_checkpoint)
from .evaluate import evaluate_tasks, pre_adaptation_loss
from .loop import launch_train, train

__all__ = ["train", "launch_train", "evaluate_tasks", "pre_adaptation_loss", "save_checkpoint", "load_checkpoint",
           "load_for_resume", "check_resume", "payload", "with_summary", "checksum", "CHECKPOINT_FORMAT",
           "CheckpointError", "DEFAULTS", "LOSS_FN", "TaskSource", "check_config", "source_from_checkpoint",
           "learner_from_config", "learner_from_checkpoint"]
