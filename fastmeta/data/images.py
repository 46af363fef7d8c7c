"""RGB few-shot image data held in memory, and N-way K-shot task sampling over it.

The loaders (:mod:`.imagenet`, :mod:`.cifar`) decode every image of a split once, resize it to
``image_size`` and keep the split as one uint8 tensor ``[N, 3, s, s]`` (84 x 84 x 3 bytes per
mini-ImageNet image: 1.3 GB for all 60,000). :class:`ImageTasks` gathers a meta-batch with one
index operation and converts to float (``(x / 255 - mean) / std`` per channel) only then.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..tasks import TaskBatch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "val", "test")

# Per-channel statistics used to standardise pixels at sampling time.
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's ImageNet values
CIFAR100_MEAN_STD = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))  # CIFAR-100 training set


def is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES


def decode_rgb(path: Path, size: int) -> torch.Tensor:
    """One image file -> uint8 ``[3, size, size]`` (grey and CMYK files converted to RGB; PIL's
    bilinear resize, which filters when it shrinks)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            data = img.tobytes()
    except Exception as e:  # noqa: BLE001 - PIL's errors do not say which file was bad
        raise ValueError(f"root: cannot read the image {path}: {type(e).__name__}: {e}") from e
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1).contiguous()


def decode_all(paths: Sequence[Path], size: int) -> torch.Tensor:
    """Image files -> uint8 ``[N, 3, size, size]`` in the order given (decoded on a thread pool:
    PIL releases the GIL while it decodes and resizes)."""
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, img in enumerate(pool.map(lambda p: decode_rgb(p, size), paths)):
            out[i] = img
    return out


def listing_fingerprint(root: Path, lines: list[str], n_images: int, n_classes: int, n_bytes: int) -> dict:
    """Fingerprint of a data root from its listing (``name:size`` lines): ``sha256``, ``images``,
    ``classes`` and ``roots`` (one entry: ``name``, ``images``, ``bytes``), the same keys as
    :func:`fastmeta.data.omniglot.fingerprint`. Where the root lives does not change it."""
    digest = hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()
    return dict(sha256=digest, images=n_images, classes=n_classes,
                roots=[dict(name=root.name, images=n_images, bytes=n_bytes)])


class ImageClasses:
    """One split of a few-shot image data set, decoded once and cached in memory.

    Attributes:
        name: e.g. ``"mini-ImageNet test"``, for messages.
        classes: the class names ``[C]`` (wnids, CIFAR-100 fine names, ...).
        images: uint8 ``[N, 3, s, s]``.
        targets: int64 ``[N]``, the class index (into ``classes``) of each image.
        image_size: ``s``.
        mean, std: per-channel statistics (3 floats each) :class:`ImageTasks` standardises with.
    """

    def __init__(self, name: str, classes: Sequence[str], images: torch.Tensor, targets: torch.Tensor,
                 mean_std: tuple = IMAGENET_MEAN_STD):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if targets.shape != (images.shape[0],):
            raise ValueError(f"targets: expected [{images.shape[0]}], got {tuple(targets.shape)}")
        self.name, self.classes, self.images, self.targets = name, list(classes), images, targets.long()
        self.image_size = images.shape[-1]
        self.mean, self.std = (tuple(float(v) for v in m) for m in mean_std)

    def __len__(self) -> int:
        return self.images.shape[0]

    def per_class(self) -> list[torch.Tensor]:
        """Image indices of each class, ``C`` int64 tensors in ascending order."""
        order = torch.argsort(self.targets, stable=True)
        counts = torch.bincount(self.targets, minlength=len(self.classes)).tolist()
        return list(order.split(counts))


class ImageTasks:
    """N-way K-shot tasks over the classes of an :class:`ImageClasses` split.

    Each task picks ``ways`` classes, then ``shots`` support and ``queries`` query images per
    class (without replacement); the classes get labels ``0..ways-1`` in random order, so a
    label means a different class in every task. Deterministic: the draws come from the
    sampler's own generator ``gen``, seeded with ``seed``. The same interface as
    :class:`~fastmeta.data.OmniglotTasks`.

    ``sample(T)`` -> :class:`TaskBatch` with support ``[T, ways*shots, 3, s, s]`` and query
    ``[T, ways*queries, 3, s, s]`` images in ``dtype``, standardised per channel
    (``(x / 255 - mean) / std``), and int64 labels ``[T, ways*shots]`` / ``[T, ways*queries]``
    ordered by label (``support_y[t] = [0]*shots + [1]*shots + ...``).
    """

    def __init__(self, data: ImageClasses, ways: int = 5, shots: int = 1, queries: int = 15,
                 seed: Optional[int] = 0, dtype: torch.dtype = torch.float32, device="cpu"):
        n_cls = len(data.classes)
        if isinstance(ways, bool) or not isinstance(ways, int) or ways < 2 or ways > n_cls:
            raise ValueError(f"ways: expected 2 <= ways <= {n_cls} (the classes of {data.name}), got {ways!r}")
        self.pools = data.per_class()
        min_n = min(len(p) for p in self.pools)
        if shots < 1 or queries < 1 or shots + queries > min_n:
            raise ValueError(f"shots/queries: need shots, queries >= 1 and shots + queries <= {min_n} "
                             f"(the fewest images of a class in {data.name}), got {shots} + {queries}")
        self.data, self.ways, self.shots, self.queries = data, ways, shots, queries
        self.dtype, self.device = dtype, device
        self.gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())

    def sample(self, num_tasks: int) -> TaskBatch:
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks: expected an int >= 1, got {num_tasks!r}")
        n_per = self.shots + self.queries
        idx = torch.empty(num_tasks, self.ways, n_per, dtype=torch.long)
        for t in range(num_tasks):
            picks = torch.randperm(len(self.pools), generator=self.gen)[: self.ways].tolist()
            for label, c in enumerate(picks):
                pool = self.pools[c]
                idx[t, label] = pool[torch.randperm(len(pool), generator=self.gen)[:n_per]]
        x = self.data.images[idx.view(-1)].to(self.device)  # uint8 until here: a quarter of float32's bytes
        mean = torch.tensor(self.data.mean, dtype=self.dtype, device=self.device).view(3, 1, 1)
        std = torch.tensor(self.data.std, dtype=self.dtype, device=self.device).view(3, 1, 1)
        x = ((x.to(self.dtype) / 255 - mean) / std).view(num_tasks, self.ways, n_per, *x.shape[1:])
        y = torch.arange(self.ways, device=self.device).view(1, self.ways, 1).expand(num_tasks, self.ways, n_per)
        s = self.shots
        return TaskBatch(x[:, :, :s].reshape(num_tasks, self.ways * s, *x.shape[3:]),
                         y[:, :, :s].reshape(num_tasks, -1),
                         x[:, :, s:].reshape(num_tasks, self.ways * self.queries, *x.shape[3:]),
                         y[:, :, s:].reshape(num_tasks, -1), ways=self.ways)
