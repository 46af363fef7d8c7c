"""mini-ImageNet and tieredImageNet from their common on-disk layouts (nothing is downloaded).

mini-ImageNet (Vinyals et al. 2016; the 64 / 16 / 20 class split of Ravi & Larochelle 2017),
either layout:

* ``<root>/images/*.jpg`` with ``<root>/{train,val,test}.csv`` (header ``filename,label``; the
  label is the class's wnid), as produced by Ravi & Larochelle's split files;
* ``<root>/{train,val,test}/<wnid>/*.jpg`` (class folders per split).

tieredImageNet (Ren et al. 2018; 351 / 97 / 160 classes): ``<root>/{train,val,test}/<class>/*.jpg``.

Image files may be ``.jpg``, ``.jpeg`` or ``.png``. The split is the layout's: the classes of
``train.csv`` / ``train/`` are the meta-training classes, and so on; a class found in two splits
is refused. Images are decoded on first use of a split, converted to RGB, resized to
``image_size`` (default 84) and cached as uint8 ``[N, 3, s, s]`` (see :mod:`.images`).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import torch

from .images import IMAGENET_MEAN_STD, SPLITS, ImageClasses, decode_all, is_image, listing_fingerprint

MINI_EXPECTED = ("mini-ImageNet layout (images/ + train.csv, val.csv, test.csv with columns filename,label; "
                 "or train/<class>/*.jpg, val/<class>/*.jpg, test/<class>/*.jpg)")
TIERED_EXPECTED = "tieredImageNet layout (train/<class>/*.jpg, val/<class>/*.jpg, test/<class>/*.jpg)"


def _found(root: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    more = f" and {len(names) - 8} more" if len(names) > 8 else ""
    return (", ".join(names[:8]) + more) if names else "an empty folder"


def _root(root) -> Path:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data_root: {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"root: {root} is not a directory")
    return root


# A listing: {split: [(class name, [image paths])]}, classes sorted, paths sorted.
Listing = dict


def _folder_listing(root: Path, expected: str) -> Optional[Listing]:
    if not all((root / s).is_dir() for s in SPLITS):
        return None
    listing = {}
    for s in SPLITS:
        classes = []
        for d in sorted(p for p in (root / s).iterdir() if p.is_dir()):
            files = sorted(f for f in d.iterdir() if f.is_file() and is_image(f))
            if files:
                classes.append((d.name, files))
        if not classes:
            raise ValueError(f"root: expected {expected}, but {root / s} holds no <class>/*.jpg images")
        listing[s] = classes
    return listing


def _csv_listing(root: Path) -> Optional[Listing]:
    if not ((root / "images").is_dir() and all((root / f"{s}.csv").is_file() for s in SPLITS)):
        return None
    listing = {}
    for s in SPLITS:
        path = root / f"{s}.csv"
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
            raise ValueError(f"root: {path} must start with the header 'filename,label', found {rows[:1]}")
        groups: dict[str, list[Path]] = {}
        for i, row in enumerate(rows[1:], start=2):
            if not row:
                continue
            if len(row) != 2:
                raise ValueError(f"root: {path} line {i}: expected 'filename,label', found {row}")
            groups.setdefault(row[1].strip(), []).append(root / "images" / row[0].strip())
        if not groups:
            raise ValueError(f"root: {path} lists no images")
        listing[s] = [(c, sorted(groups[c])) for c in sorted(groups)]
    return listing


def _check_disjoint(listing: Listing, root: Path) -> None:
    seen: dict[str, str] = {}
    for s in SPLITS:
        for c, _ in listing[s]:
            if c in seen:
                raise ValueError(f"root: the class {c!r} is in both the {seen[c]} and the {s} split of {root}; "
                                 f"few-shot splits must have disjoint classes")
            seen[c] = s


class _FolderDataset:
    """Shared by :class:`MiniImageNet` and :class:`TieredImageNet`: a listing, its fingerprint
    and per-split decoding on first use."""

    name = ""

    def __init__(self, image_size: int, listing: Listing):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size: expected an int >= 1, got {image_size!r}")
        _check_disjoint(listing, self.root)
        self.image_size = image_size
        self._listing = listing
        self.split_classes = {s: [c for c, _ in listing[s]] for s in SPLITS}
        lines, total = [], 0
        for s in SPLITS:
            for c, files in listing[s]:
                for f in files:
                    try:
                        size = f.stat().st_size
                    except OSError as e:
                        raise ValueError(f"root: the image {f} of class {c!r} ({s} split) cannot be read: "
                                         f"{type(e).__name__}: {e}") from e
                    lines.append(f"{s}/{c}/{f.name}:{size}")
                    total += size
        n_classes = sum(len(v) for v in listing.values())
        # Names and sizes only (no decoding), so a mismatch is found before the expensive load.
        self.fingerprint = listing_fingerprint(self.root, lines, len(lines), n_classes, total)
        self._cache: dict[str, ImageClasses] = {}

    def split(self, name: str) -> ImageClasses:
        """The split ``name`` ('train', 'val' or 'test'), decoded on first use and then cached."""
        if name not in SPLITS:
            raise ValueError(f"split: expected one of {list(SPLITS)}, got {name!r}")
        if name not in self._cache:
            classes = self._listing[name]
            paths = [f for _, files in classes for f in files]
            targets = torch.cat([torch.full((len(files),), i, dtype=torch.long)
                                 for i, (_, files) in enumerate(classes)])
            self._cache[name] = ImageClasses(f"{self.name} {name}", [c for c, _ in classes],
                                             decode_all(paths, self.image_size), targets, IMAGENET_MEAN_STD)
        return self._cache[name]


class MiniImageNet(_FolderDataset):
    """mini-ImageNet under ``root`` in either of its two layouts (module docstring).

    Listing and fingerprint happen at construction (cheap); :meth:`split` decodes.
    Attributes: ``layout`` ('csv' or 'folders'), ``split_classes`` (``{split: [wnid, ...]}``),
    ``fingerprint`` (as :func:`fastmeta.data.omniglot.fingerprint`: ``sha256`` of the
    ``split/class/file:size`` lines, ``images``, ``classes``, ``roots``), ``image_size``.
    """

    name = "mini-ImageNet"

    def __init__(self, root, image_size: int = 84):
        self.root = _root(root)
        listing = _csv_listing(self.root)
        self.layout = "csv"
        if listing is None:
            listing, self.layout = _folder_listing(self.root, MINI_EXPECTED), "folders"
        if listing is None:
            raise ValueError(f"root: expected {MINI_EXPECTED} in {self.root}, found {_found(self.root)}")
        super().__init__(image_size, listing)


class TieredImageNet(_FolderDataset):
    """tieredImageNet under ``root``: ``{train,val,test}/<class>/*.jpg``. Same attributes as
    :class:`MiniImageNet` (``layout`` is always 'folders')."""

    name = "tieredImageNet"

    def __init__(self, root, image_size: int = 84):
        self.root = _root(root)
        listing = _folder_listing(self.root, TIERED_EXPECTED)
        if listing is None:
            raise ValueError(f"root: expected {TIERED_EXPECTED} in {self.root}, found {_found(self.root)}")
        self.layout = "folders"
        super().__init__(image_size, listing)
