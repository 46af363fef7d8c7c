"""CIFAR-FS and FC100: few-shot splits of CIFAR-100, read from its python release.

Layout: ``<root>/cifar-100-python/{train,test}`` (``<root>`` may also be the
``cifar-100-python`` folder itself): the pickled dicts of the CIFAR-100 python release, with
``b'data'`` uint8 ``[N, 3072]`` (the red, green then blue 32 x 32 planes of each image),
``b'fine_labels'`` and ``b'coarse_labels'``. An optional ``meta`` file is checked against
CIFAR-100's class names. Nothing is downloaded.

Both files are merged (600 images per class) and split by class, per
:mod:`fastmeta.data.cifar_splits`: CIFAR-FS (Bertinetto et al. 2019) 64 / 16 / 20 fine classes;
FC100 (Oreshkin et al. 2018) the fine classes of 12 / 4 / 4 superclasses. Classes without
images are left out (so a subset of CIFAR-100 loads, e.g. in tests). Images stay 32 x 32 unless
``image_size`` says otherwise (one antialiased bilinear resize at load), cached as uint8
``[N, 3, s, s]``.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from .cifar_splits import FINE_NAMES, FINE_TO_COARSE, cifar_fs_classes, fc100_classes
from .images import CIFAR100_MEAN_STD, SPLITS, ImageClasses, listing_fingerprint

EXPECTED = ("CIFAR-100 python layout (cifar-100-python/train and cifar-100-python/test, the pickled dicts "
            "with b'data', b'fine_labels', b'coarse_labels')")


def _locate(root) -> Path:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data_root: {root} does not exist")
    for d in (root / "cifar-100-python", root):
        if (d / "train").is_file() and (d / "test").is_file():
            return d
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir()) if root.is_dir() else [root.name]
    raise ValueError(f"root: expected {EXPECTED} in {root}, found {', '.join(found[:8]) or 'an empty folder'}")


def _read(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        data, fine, coarse = d[b"data"], d[b"fine_labels"], d[b"coarse_labels"]
        x = torch.as_tensor(data)
        fine, coarse = torch.as_tensor(fine, dtype=torch.long), torch.as_tensor(coarse, dtype=torch.long)
    except Exception as e:  # noqa: BLE001 - pickle/KeyError messages do not say what was expected
        raise ValueError(f"root: cannot read {path} as a CIFAR-100 python pickle ({EXPECTED}): "
                         f"{type(e).__name__}: {e}") from e
    if x.dtype != torch.uint8 or x.dim() != 2 or x.shape[1] != 3072 or fine.shape != (x.shape[0],) \
            or coarse.shape != (x.shape[0],):
        raise ValueError(f"root: {path}: expected b'data' uint8 [N, 3072] and N fine and coarse labels, got "
                         f"{x.dtype} {tuple(x.shape)}, {tuple(fine.shape)}, {tuple(coarse.shape)}")
    if len(fine) and (fine.min() < 0 or fine.max() > 99):
        raise ValueError(f"root: {path}: fine labels must lie in 0..99 (CIFAR-100)")
    expected_coarse = torch.tensor([FINE_TO_COARSE[i] for i in range(100)])[fine]
    if not torch.equal(expected_coarse, coarse):
        raise ValueError(f"root: {path}: the coarse labels do not match CIFAR-100's superclasses of the fine labels; "
                         f"is this CIFAR-100?")
    return x.view(-1, 3, 32, 32), fine, coarse


class _CifarSplits:
    """Shared by :class:`CIFARFS` and :class:`FC100`: the pickles read once, split by class."""

    name = ""

    def _classes(self, split: str) -> list[int]:
        raise NotImplementedError

    def __init__(self, root, image_size: int = 32):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size: expected an int >= 1, got {image_size!r}")
        self.dir = _locate(root)
        self.root, self.image_size = Path(root), image_size
        files = [self.dir / "train", self.dir / "test"]
        sizes = [f.stat().st_size for f in files]
        # Names and sizes only: the image count is known once the pickles are read (None here).
        self.fingerprint = listing_fingerprint(self.root, [f"cifar-100-python/{f.name}:{s}" for f, s in zip(files, sizes)],
                                               None, 100, sum(sizes))
        self.split_classes = {s: [FINE_NAMES[i] for i in self._classes(s)] for s in SPLITS}
        self._all = None
        self._cache: dict[str, ImageClasses] = {}

    def _load_all(self):
        if self._all is None:
            meta = self.dir / "meta"
            if meta.is_file():
                try:
                    with open(meta, "rb") as f:
                        names = [n.decode() for n in pickle.load(f, encoding="bytes")[b"fine_label_names"]]
                except Exception as e:  # noqa: BLE001
                    raise ValueError(f"root: cannot read {meta}: {type(e).__name__}: {e}") from e
                if tuple(names) != FINE_NAMES:
                    raise ValueError(f"root: {meta} names other fine classes than CIFAR-100's; is this CIFAR-100?")
            parts = [_read(self.dir / "train"), _read(self.dir / "test")]
            x = torch.cat([p[0] for p in parts])
            fine = torch.cat([p[1] for p in parts])
            if self.image_size != 32:
                x = torch.nn.functional.interpolate(x.float(), size=(self.image_size,) * 2, mode="bilinear",
                                                    antialias=True, align_corners=False).round().clamp(0, 255)
                x = x.to(torch.uint8)
            self._all = (x, fine)
        return self._all

    def split(self, name: str) -> ImageClasses:
        """The split ``name`` ('train', 'val' or 'test'): its classes' images from both files, cached."""
        if name not in SPLITS:
            raise ValueError(f"split: expected one of {list(SPLITS)}, got {name!r}")
        if name not in self._cache:
            x, fine = self._load_all()
            present = [c for c in self._classes(name) if bool((fine == c).any())]
            if not present:
                raise ValueError(f"root: {self.dir} holds no image of the {len(self._classes(name))} "
                                 f"{self.name} {name} classes")
            keep = torch.isin(fine, torch.tensor(present))
            remap = torch.full((100,), -1, dtype=torch.long)
            remap[torch.tensor(present)] = torch.arange(len(present))
            self._cache[name] = ImageClasses(f"{self.name} {name}", [FINE_NAMES[c] for c in present],
                                             x[keep].contiguous(), remap[fine[keep]], CIFAR100_MEAN_STD)
        return self._cache[name]


class CIFARFS(_CifarSplits):
    """CIFAR-FS (Bertinetto et al. 2019): 64 / 16 / 20 CIFAR-100 fine classes, 600 images each.

    Attributes: ``split_classes`` (``{split: [fine class name, ...]}``), ``fingerprint`` (names
    and sizes of the two pickles; ``images`` is None), ``image_size``. :meth:`split` reads."""

    name = "CIFAR-FS"

    def _classes(self, split: str) -> list[int]:
        return cifar_fs_classes(split)


class FC100(_CifarSplits):
    """FC100 (Oreshkin et al. 2018): the fine classes of 12 / 4 / 4 CIFAR-100 superclasses
    (60 / 20 / 20 classes). Same attributes as :class:`CIFARFS`."""

    name = "FC100"

    def _classes(self, split: str) -> list[int]:
        return fc100_classes(split)
