"""``sds_select`` / ``sds_mask``: ESAM sharpness-sensitive data selection (Sharp-MAML sec. 5.4).

ESAM (Du et al. 2022) computes the perturbed-weights gradient only on the samples whose loss rises
most under the SAM perturbation. Per task the ``k = max(1, round(ratio * N))`` samples with the
largest ``loss_perturbed - loss_clean`` are kept (Python's ``round``: half to even).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _validate

__all__ = ["sds_select", "sds_mask", "sds_k"]


@torch.library.custom_op("fastmeta_ops::sds_select", mutates_args=())
def _sds_select_op(loss_clean: Tensor, loss_perturbed: Tensor, k: int) -> Tensor:
    return _backend.get_impl("sds_select", loss_clean.device)(loss_clean, loss_perturbed, k)


@_sds_select_op.register_fake
def _(loss_clean, loss_perturbed, k):
    return loss_clean.new_empty((loss_clean.shape[0], k), dtype=torch.int64)


def sds_k(n: int, ratio: float) -> int:
    """Samples kept per task: ``max(1, round(ratio * n))`` (ratio in (0, 1])."""
    ratio = _validate.unit_interval(ratio, "ratio")
    return max(1, min(n, round(ratio * n)))


def _check(loss_clean: Tensor, loss_perturbed: Tensor, ratio: float) -> int:
    _validate.tensor(loss_clean, "loss_clean", (2,))
    _validate.tensor(loss_perturbed, "loss_perturbed", (2,))
    _validate.same_device_dtype(loss_clean, "loss_clean", loss_perturbed, "loss_perturbed")
    if loss_perturbed.shape != loss_clean.shape:
        raise ValueError(f"loss_perturbed must have loss_clean's shape {tuple(loss_clean.shape)} ([T, N]), "
                         f"got {tuple(loss_perturbed.shape)}")
    if loss_clean.shape[1] == 0:
        raise ValueError("loss_clean must have at least one sample per task (N >= 1)")
    return sds_k(loss_clean.shape[1], ratio)


def sds_select(loss_clean: Tensor, loss_perturbed: Tensor, ratio: float) -> Tensor:
    """Indices of the samples whose loss increases most under the perturbation.

    Args:
        loss_clean: ``[T, N]`` per-sample losses at the unperturbed weights.
        loss_perturbed: ``[T, N]`` per-sample losses at the perturbed weights.
        ratio: fraction of samples to keep, in (0, 1] (ESAM's ``gamma``).

    Returns:
        int64 ``[T, k]``, ``k = max(1, round(ratio * N))``: per task, sample indices ordered by
        decreasing loss increase, ties broken by the lower index (deterministic on every backend).
        A NaN increase ranks first (as ``torch.sort``), so a NaN loss is never silently dropped.
    """
    k = _check(loss_clean, loss_perturbed, ratio)
    return _backend.call("sds_select", _sds_select_op, loss_clean.device, loss_clean, loss_perturbed, k)


def sds_mask(loss_clean: Tensor, loss_perturbed: Tensor, ratio: float) -> Tensor:
    """Boolean ``[T, N]`` mask of the samples :func:`sds_select` keeps."""
    idx = sds_select(loss_clean, loss_perturbed, ratio)
    mask = torch.zeros(loss_clean.shape, dtype=torch.bool, device=loss_clean.device)
    return mask.scatter(1, idx, True)
