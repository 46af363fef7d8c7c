"""The benchmark workloads: a model, its loss, the MAML inner rate and a fixed batch of tasks.

* sine MLP 1-40-40-1, 10-shot, meta-batch 25;
* Conv-4 Omniglot 5-way 1-shot, 15 queries per class, meta-batch 16: real images from the shared
  Omniglot subsets when found, otherwise random images of the same shape (which cost the same to
  convolve);
* the small presets of both for the CI smoke run (``smoke``), and Conv-4 at meta-batch 4.

Every implementation in ``bench/`` returns its meta-gradient as one flat vector in fastmeta's
parameter-layout order (``flat_in_layout``), so any two can be compared.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fastmeta.models import Conv4, SineMLP
from fastmeta.params import ParamLayout
from fastmeta.tasks import TaskBatch

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------- data
def omniglot_roots() -> list[Path]:
    """The shared Omniglot subsets (``$FASTMETA_OMNIGLOT`` or ``<repo>/../shared/data/omniglot``)."""
    base = Path(os.environ.get("FASTMETA_OMNIGLOT", REPO.parent / "shared" / "data" / "omniglot"))
    return sorted(base.glob("images_background_small*.zip")) if base.is_dir() else []


_OMNIGLOT = {}


def omniglot_data():
    """``fastmeta.data.Omniglot`` over the shared subsets (cached per process), or None."""
    roots = omniglot_roots()
    if not roots:
        return None
    key = tuple(map(str, roots))
    if key not in _OMNIGLOT:
        from fastmeta.data import Omniglot

        _OMNIGLOT[key] = Omniglot(roots)
    return _OMNIGLOT[key]


# ---------------------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    """One benchmark configuration: a model, its loss, the MAML inner rate and a fixed batch."""

    name: str
    title: str
    model_fn: Callable[[], torch.nn.Module]
    loss_fn: str
    inner_lr: float
    meta_batch: int
    sample: Callable[[int, torch.dtype], TaskBatch]
    data_source: str = ""
    conv: bool = False
    extra: dict = field(default_factory=dict)

    def batch(self, dtype=torch.float32, num_tasks: Optional[int] = None) -> TaskBatch:
        return self.sample(num_tasks or self.meta_batch, dtype)

    def model(self, dtype=torch.float32, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self.model_fn().to(dtype)


def sine_workload(meta_batch: int = 25, shots: int = 10) -> Workload:
    from fastmeta.data import SinusoidTasks

    def sample(T, dtype):
        return SinusoidTasks(shots, shots, seed=0, dtype=dtype).sample(T)

    return Workload("sine", f"sine MLP 1-40-40-1, {shots}-shot, meta-batch {meta_batch}", SineMLP, "mse", 0.01,
                    meta_batch, sample, "synthetic sinusoids")


def conv4_workload(meta_batch: int = 16, ways: int = 5, shots: int = 1, queries: int = 15) -> Workload:
    data = omniglot_data()

    def sample(T, dtype):
        if data is not None:
            from fastmeta.data import OmniglotTasks

            return OmniglotTasks(data, data.alphabets, ways=ways, shots=shots, queries=queries, seed=0,
                                 dtype=dtype).sample(T)
        g = torch.Generator().manual_seed(0)
        sx = torch.rand(T, ways * shots, 1, 28, 28, generator=g, dtype=torch.float64).to(dtype)
        qx = torch.rand(T, ways * queries, 1, 28, 28, generator=g, dtype=torch.float64).to(dtype)
        lab = torch.arange(ways)
        return TaskBatch(sx, lab.repeat_interleave(shots).expand(T, -1), qx,
                         lab.repeat_interleave(queries).expand(T, -1), ways=ways)

    src = "shared Omniglot subsets" if data is not None else "random 28x28 images (Omniglot subsets not found)"
    return Workload("conv4", f"Conv-4 Omniglot {ways}w{shots}s, {queries} queries, meta-batch {meta_batch}",
                    lambda: Conv4(ways), "cross_entropy", 0.4, meta_batch, sample, src, conv=True)


def image_workload(name: str, model_fn, title: str, size: int, meta_batch: int, ways: int = 5, shots: int = 1,
                   queries: int = 15, check_twin: Optional[Workload] = None) -> Workload:
    """An 84x84-RGB-class few-shot workload on random images (speed does not depend on the pixels):
    mini-ImageNet-shaped Conv-4 or ResNet-12. ``check_twin``: the same network at a size float64
    affords, on which :func:`checks.check_gradient` checks the meta-gradients (exactness does not
    depend on the widths)."""
    def sample(T, dtype):
        g = torch.Generator().manual_seed(0)
        sx = torch.rand(T, ways * shots, 3, size, size, generator=g, dtype=torch.float64).to(dtype)
        qx = torch.rand(T, ways * queries, 3, size, size, generator=g, dtype=torch.float64).to(dtype)
        lab = torch.arange(ways)
        return TaskBatch(sx, lab.repeat_interleave(shots).expand(T, -1), qx,
                         lab.repeat_interleave(queries).expand(T, -1), ways=ways)

    extra = {} if check_twin is None else {"check_twin": check_twin}
    return Workload(name, f"{title} {size}x{size} {ways}w{shots}s, {queries} queries, meta-batch {meta_batch}",
                    model_fn, "cross_entropy", 0.01, meta_batch, sample, "random RGB images", conv=True, extra=extra)


def conv4_84_workload(small: bool = False) -> Workload:
    from fastmeta import Conv4

    if small:
        return image_workload("conv4-84", lambda: Conv4(5, 3, 4, 16), "Conv-4 (hidden 4)", 16, 2, queries=2)
    twin = image_workload("conv4-84", lambda: Conv4(5, 3, 8, 32), "Conv-4 (hidden 8)", 32, 2, queries=3)
    return image_workload("conv4-84", lambda: Conv4(5, 3, 32, 84), "Conv-4 (hidden 32)", 84, 4, check_twin=twin)


def resnet12_workload(small: bool = False) -> Workload:
    from fastmeta import ResNet12

    if small:
        return image_workload("resnet12", lambda: ResNet12(5, 3, (4, 4, 4, 4)), "ResNet-12 4-4-4-4", 16, 2,
                              queries=2)
    twin = image_workload("resnet12", lambda: ResNet12(5, 3, (8, 12, 16, 20)), "ResNet-12 8-12-16-20", 32, 2,
                          queries=3)
    return image_workload("resnet12", lambda: ResNet12(5, 3), "ResNet-12 64-160-320-640", 84, 2, check_twin=twin)


def workload(name: str, small: bool = False) -> Workload:
    """``"sine"``, ``"conv4"``, ``"conv4-84"`` or ``"resnet12"``; ``small=True`` (or the suffix ``-small``) is the CI smoke preset
    (a few tasks, few queries); ``"conv4-mb4"`` is Conv-4 at meta-batch 4 (``fastmeta bench``'s
    fast preset)."""
    if name.endswith("-small"):
        return workload(name[: -len("-small")], small=True)
    if name == "conv4-mb4":
        return conv4_workload(meta_batch=4)
    if name == "sine":
        return sine_workload(meta_batch=4) if small else sine_workload()
    if name == "conv4":
        return conv4_workload(meta_batch=2, queries=2) if small else conv4_workload()
    if name == "conv4-84":
        return conv4_84_workload(small)
    if name == "resnet12":
        return resnet12_workload(small)
    raise ValueError(f"name: unknown workload {name!r} (expected 'sine', 'conv4', 'conv4-84' or 'resnet12')")


def smoke(config) -> bool:
    """True for the CI smoke run (small presets, each benchmark once). pyproject's addopts pass
    ``--benchmark-disable``; an explicit ``--benchmark-enable`` on the command line wins, as it
    does in pytest-benchmark itself (checking ``benchmark_disable`` alone ignored it)."""
    return bool(config.getoption("benchmark_disable")) and not config.getoption("benchmark_enable")


def loss_of(wl: Workload):
    """The workload's loss as a ``torch.nn.functional`` callable."""
    return F.mse_loss if wl.loss_fn == "mse" else F.cross_entropy


def flat_in_layout(model, layout: ParamLayout, grads: list) -> torch.Tensor:
    """``grads`` (one per ``model.named_parameters()``) as one flat vector in ``layout``'s order."""
    by_name = dict(zip([n for n, _ in model.named_parameters()], grads))
    return torch.cat([by_name[s.name].reshape(-1) for s in layout.slots])
