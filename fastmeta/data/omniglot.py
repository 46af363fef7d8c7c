"""Omniglot in its standard on-disk layout, and N-way K-shot task sampling.

Layout (Lake et al.'s own release, and the ``images_background`` / ``images_evaluation`` sets):
``<root>/<Alphabet>/characterNN/XXXX_YY.png``. A root may also be a ``.zip`` of that layout
(with or without one top-level folder). Several roots merge; characters are deduplicated by
``(alphabet, character)``. Nothing is ever downloaded: pass your own copy.
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

from ..tasks import TaskBatch


class _NotOmniglot(ValueError):
    """Data that is readable but is not Omniglot (reported as is, not as an unreadable file)."""


# Directory names of a class-folder tree split for few-shot learning (mini-/tieredImageNet).
_SPLIT_DIRS = frozenset({"train", "val", "valid", "validation", "test"})


def _decode(data: bytes, where: str = "") -> torch.Tensor:
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if img.mode not in ("1", "L", "LA", "I", "I;16", "F"):
        # Omniglot is black-and-white; a colour image means another data set (loading it as grey
        # would train on the wrong data without a word). Grey pixels stored as RGB are accepted.
        r, g, b = img.convert("RGB").split()
        if not (r.tobytes() == g.tobytes() == b.tobytes()):
            raise _NotOmniglot(f"roots: the image {where} is in colour ({img.mode}); Omniglot's are black and "
                               f"white (an RGB data set needs its own task, e.g. --task miniimagenet)")
    img = img.convert("L")
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(1, img.height, img.width)


def _read_image(read: Callable[[], bytes], where: str) -> torch.Tensor:
    try:
        return _decode(read(), where)
    except _NotOmniglot:
        raise
    except Exception as e:  # noqa: BLE001 - PIL and zipfile errors do not say which file was bad
        raise ValueError(f"roots: cannot read the image {where}: {type(e).__name__}: {e}") from e


def _decode_resized(img: torch.Tensor, side: int) -> torch.Tensor:
    # Mixed source sizes (a user's own scans): bring each to the first image's size first.
    return (torch.nn.functional.interpolate(img[None].float(), size=(side, side), mode="bilinear")[0]).round().to(torch.uint8)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, 1, H, W]`` uint8 -> ``[N, 1, size, size]`` float in [0, 1], strokes = 1, in one batched call."""
    # Antialiased bilinear resize of the whole stack in one call: the same kernel torchvision's
    # Resize uses on tensors, without importing torchvision (whose import dominates load time).
    x = torch.nn.functional.interpolate(images.float() / 255, size=(size, size), mode="bilinear",
                                        antialias=True, align_corners=False)
    return 1.0 - x.clamp(0, 1)  # strokes are black on white: make strokes 1 and background 0


def _entries(root: Path) -> Iterable[tuple[str, str, str, Callable[[], bytes], str, int]]:
    """``(alphabet, character, file name, read(), where, size in bytes)`` for every PNG under
    ``root``; ``where`` names the file (or the zip and its member) for error messages."""
    if root.is_file() and zipfile.is_zipfile(root):
        zf = zipfile.ZipFile(root)
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            name = info.filename
            parts = name.split("/")
            if name.endswith(".png") and len(parts) >= 3:
                yield (parts[-3], parts[-2], parts[-1], (lambda n=name: zf.read(n)), f"member {name!r} of zip {root}",
                       info.file_size)
        return
    if not root.exists():
        raise FileNotFoundError(f"data_root: {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"data_root: {root} is neither a directory nor a zip file")
    files = sorted(root.glob("*/*/*.png")) or sorted(root.glob("*/*/*/*.png"))
    for f in files:
        yield f.parent.parent.name, f.parent.name, f.name, f.read_bytes, f"file {f}", f.stat().st_size


def _as_list(roots) -> list:
    return [roots] if isinstance(roots, (str, Path)) else list(roots)


def _merged(roots: list) -> tuple[dict[tuple[str, str], dict[str, tuple]], list[dict]]:
    """``{(alphabet, character): {file name: (read, where, size)}}`` over ``roots`` (a file that
    several roots hold is taken from the first), and per root its ``name``, ``images`` and ``bytes``."""
    groups: dict[tuple[str, str], dict[str, tuple]] = {}
    per_root = []
    for r in roots:
        n = total = 0
        alphabets: set[str] = set()
        for alpha, char, fname, read, where, size in _entries(Path(r)):
            groups.setdefault((alpha, char), {}).setdefault(fname, (read, where, size))
            n, total = n + 1, total + size
            alphabets.add(alpha)
        if alphabets and alphabets <= _SPLIT_DIRS:
            raise _NotOmniglot(f"roots: expected Omniglot's <Alphabet>/<character>/*.png layout in {r}, found split "
                               f"folders {sorted(alphabets)} of class folders (a mini-ImageNet or tieredImageNet "
                               f"tree? use --task miniimagenet or tieredimagenet)")
        per_root.append(dict(name=Path(r).name, images=n, bytes=total))
    return groups, per_root


def _fingerprint(groups: dict, per_root: list) -> dict:
    # Names and sizes only: computed from the listings (zip directories, stat), before any image is
    # decoded, so that a mismatch is refused before the expensive load. The merged listing does not
    # depend on where the roots live or on zip versus unpacked folder.
    lines = sorted(f"{a}/{c}/{f}:{v[2]}" for (a, c), files in groups.items() for f, v in files.items())
    return dict(sha256=hashlib.sha256("\n".join(lines).encode()).hexdigest(), images=len(lines),
                classes=len(groups), roots=per_root)


def fingerprint(roots) -> dict:
    """What identifies the Omniglot data under ``roots`` without decoding it: ``sha256`` of the
    merged listing (``alphabet/character/file:size`` lines), the numbers of ``images`` and
    ``classes``, and per root its ``name``, ``images`` and ``bytes``. The same data in another
    place, or zipped versus unpacked, has the same ``sha256``."""
    return _fingerprint(*_merged(_as_list(roots)))


class Omniglot:
    """All characters found under ``roots``, as images ``[n_drawings, 1, size, size]`` per character.

    Attributes:
        classes: list of ``(alphabet, character)``.
        fingerprint: :func:`fingerprint` of ``roots``.
        images: list of tensors ``[n_i, 1, size, size]``, float in [0, 1], strokes = 1.
        alphabets: sorted alphabet names.
    """

    def __init__(self, roots, image_size: int = 28):
        roots = _as_list(roots)
        groups, per_root = _merged(roots)
        if not groups:
            raise ValueError(f"roots: no '<Alphabet>/<character>/*.png' images found under {list(map(str, roots))}")
        self.fingerprint = _fingerprint(groups, per_root)
        self.classes = sorted(groups)
        counts = [len(groups[c]) for c in self.classes]
        raw = [_read_image(read, where) for c in self.classes for _, (read, where, _) in sorted(groups[c].items())]
        if len({r.shape for r in raw}) != 1:
            raw = [_decode_resized(r, raw[0].shape[-1]) for r in raw]
        self.images = list(_resize(torch.stack(raw), image_size).split(counts))
        self.alphabets = sorted({a for a, _ in self.classes})
        self.image_size = image_size

    def class_indices(self, alphabets: Sequence[str]) -> list[int]:
        unknown = set(alphabets) - set(self.alphabets)
        if unknown:
            raise ValueError(f"alphabets: unknown {sorted(unknown)}; available {self.alphabets}")
        keep = set(alphabets)
        return [i for i, (a, _) in enumerate(self.classes) if a in keep]


def split_alphabets(alphabets: Sequence[str], n_test: int, n_val: int = 0, seed: int = 0
                    ) -> tuple[list[str], list[str], list[str]]:
    """Disjoint ``(train, val, test)`` alphabet lists, chosen by a seeded permutation."""
    if n_test < 1 or n_test + n_val >= len(alphabets):
        raise ValueError(f"n_test/n_val: need 1 <= n_test and n_test + n_val < {len(alphabets)} alphabets")
    order = torch.randperm(len(alphabets), generator=torch.Generator().manual_seed(seed)).tolist()
    names = [sorted(alphabets)[i] for i in order]
    return sorted(names[n_test + n_val:]), sorted(names[n_test:n_test + n_val]), sorted(names[:n_test])


class OmniglotTasks:
    """N-way K-shot Omniglot tasks over the characters of ``alphabets``.

    Each task picks ``ways`` characters (with ``rotations=True`` each character in each of the
    four 90-degree rotations is its own class, as in Finn et al. 2017), then ``shots`` support and
    ``queries`` query drawings per class; labels ``0..ways-1`` are assigned in random order.
    ``sample(T)`` -> :class:`TaskBatch` with ``[T, ways*shots, 1, s, s]`` support and
    ``[T, ways*queries, 1, s, s]`` query images.
    """

    def __init__(self, data: Omniglot, alphabets: Sequence[str], ways: int = 5, shots: int = 1,
                 queries: int = 15, rotations: bool = False, seed: Optional[int] = 0,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        self.classes = data.class_indices(alphabets)
        self.rot = 4 if rotations else 1
        n_cls = len(self.classes) * self.rot
        if ways < 2 or ways > n_cls:
            raise ValueError(f"ways: expected 2 <= ways <= {n_cls} classes in {list(alphabets)}, got {ways}")
        min_draw = min(data.images[c].shape[0] for c in self.classes)
        if shots < 1 or queries < 1 or shots + queries > min_draw:
            raise ValueError(f"shots/queries: need shots, queries >= 1 and shots + queries <= {min_draw} drawings per class")
        self.data, self.ways, self.shots, self.queries = data, ways, shots, queries
        self.dtype, self.device = dtype, device
        self.gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())

    def sample(self, num_tasks: int) -> TaskBatch:
        if num_tasks < 1:
            raise ValueError(f"num_tasks: expected >= 1, got {num_tasks}")
        n_per = self.shots + self.queries
        xs = []
        for _ in range(num_tasks):
            picks = torch.randperm(len(self.classes) * self.rot, generator=self.gen)[: self.ways].tolist()
            imgs = []
            for p in picks:
                pool = self.data.images[self.classes[p // self.rot]]
                sel = pool[torch.randperm(pool.shape[0], generator=self.gen)[:n_per]]
                imgs.append(torch.rot90(sel, k=p % self.rot, dims=(-2, -1)))
            xs.append(torch.stack(imgs))  # [ways, shots+queries, 1, s, s]
        x = torch.stack(xs)  # [T, ways, n_per, 1, s, s]
        y = torch.arange(self.ways).view(1, self.ways, 1).expand(num_tasks, self.ways, n_per)
        sx = x[:, :, : self.shots].reshape(num_tasks, self.ways * self.shots, *x.shape[3:])
        qx = x[:, :, self.shots:].reshape(num_tasks, self.ways * self.queries, *x.shape[3:])
        sy = y[:, :, : self.shots].reshape(num_tasks, -1)
        qy = y[:, :, self.shots:].reshape(num_tasks, -1)
        return TaskBatch(sx.to(self.device, self.dtype), sy.to(self.device), qx.to(self.device, self.dtype),
                         qy.to(self.device), ways=self.ways)
