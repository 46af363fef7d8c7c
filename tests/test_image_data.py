"""The RGB few-shot data sets (mini-ImageNet, tieredImageNet, CIFAR-FS, FC100) on tiny generated
trees in each layout, and the refusal of every other layout (Omniglot's included).

Every generated image is one flat colour whose red value encodes its class (and green its index
within the class), so that a sampled image's class can be read back from its pixels."""
import pickle

import pytest
import torch

from fastmeta.data import CIFARFS, FC100, ImageTasks, MiniImageNet, Omniglot, TieredImageNet
from fastmeta.data.cifar_splits import FINE_NAMES, FINE_TO_COARSE

SPLIT_NAMES = ("train", "val", "test")


def _wnid(cid: int) -> str:
    return f"n{cid:08d}"


def _red(cid: int) -> int:
    return 20 * cid + 10


def _save(path, cid: int, i: int, size: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (_red(cid), 15 * i + 5, 128)).save(path, quality=95)


def imagenet_tree(root, layout: str, per_split=(3, 3, 3), per_class: int = 4, size: int = 20):
    """A tiny mini-/tieredImageNet tree: ``layout`` 'csv' (images/ + split CSVs) or 'folders'
    (split/<wnid>/*.jpg). Class ids run 0.. over train, val, test. Returns ``{split: [wnid]}``."""
    cid, classes = 0, {}
    for split, n in zip(SPLIT_NAMES, per_split):
        classes[split] = []
        rows = ["filename,label"]
        for _ in range(n):
            w = _wnid(cid)
            classes[split].append(w)
            for i in range(per_class):
                name = f"{w}_{i:04d}.jpg"
                if layout == "csv":
                    _save(root / "images" / name, cid, i, size)
                    rows.append(f"{name},{w}")
                else:
                    _save(root / split / w / name, cid, i, size)
            cid += 1
        if layout == "csv":
            (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return classes


# Fine classes of the tiny CIFAR-100: three of each CIFAR-FS split and three of each FC100 split.
CIFAR_CLASSES = sorted({0, 3, 6, 55, 40, 73, 2, 5, 8} | {1, 32, 67, 88, 42, 43, 4, 30, 72})


def cifar_tree(root, per_class: int = 6, classes=CIFAR_CLASSES):
    """``root/cifar-100-python/{train,test}`` pickles holding ``per_class`` 32 x 32 images per fine
    class (two thirds in train), red = 2 * fine label."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    parts = {"train": ([], []), "test": ([], [])}
    for c in classes:
        for i in range(per_class):
            img = torch.empty(3, 32, 32, dtype=torch.uint8)
            img[0], img[1], img[2] = 2 * c, 10 * i, 7
            data, labels = parts["train" if i < 2 * per_class // 3 else "test"]
            data.append(img.reshape(-1))
            labels.append(c)
    for name, (data, labels) in parts.items():
        with open(d / name, "wb") as f:
            pickle.dump({b"data": torch.stack(data).numpy(), b"fine_labels": labels,
                         b"coarse_labels": [FINE_TO_COARSE[c] for c in labels]}, f)
    return d


def _pixels(batch_x, data):
    """Normalised images ``[..., 3, s, s]`` -> their uint8 values (undoing the standardisation)."""
    mean = torch.tensor(data.mean, dtype=batch_x.dtype).view(3, 1, 1)
    std = torch.tensor(data.std, dtype=batch_x.dtype).view(3, 1, 1)
    return ((batch_x * std + mean) * 255).round()


def check_tasks(tasks: ImageTasks, class_of, allowed: set, ways: int, shots: int, queries: int, size: int):
    """Shapes, dtype, labels 0..ways-1, and every image's class (read from its pixels by
    ``class_of``) the one its task label stands for, with distinct labels distinct classes."""
    T = 3
    b = tasks.sample(T)
    assert b.support_x.shape == (T, ways * shots, 3, size, size)
    assert b.query_x.shape == (T, ways * queries, 3, size, size)
    assert b.support_x.dtype == torch.float32 and b.support_y.dtype == torch.int64 and b.ways == ways
    assert torch.equal(b.support_y[0], torch.arange(ways).repeat_interleave(shots))
    px_s, px_q = _pixels(b.support_x, tasks.data), _pixels(b.query_x, tasks.data)
    for t in range(T):
        label_class = {}
        for px, ys in ((px_s[t], b.support_y[t]), (px_q[t], b.query_y[t])):
            for img, y in zip(px, ys.tolist()):
                assert img.std(dim=(-2, -1)).max() < 2  # one flat colour: the class survived the resize
                c = class_of(img)
                assert c in allowed
                assert label_class.setdefault(y, c) == c
        assert sorted(label_class) == list(range(ways)) and len(set(label_class.values())) == ways
        # support and query images of a class are different images (green = index in the class)
        for y in range(ways):
            s_idx = {int(p[1].mean()) for p in px_s[t][b.support_y[t] == y]}
            q_idx = {int(p[1].mean()) for p in px_q[t][b.query_y[t] == y]}
            assert not (s_idx & q_idx)
    return b


def _imagenet_class(img) -> str:
    return _wnid(round((float(img[0].mean()) - 10) / 20))


@pytest.mark.parametrize("layout", ["csv", "folders"])
def test_mini_imagenet_layouts_sample_labelled_tasks(tmp_path, layout):
    classes = imagenet_tree(tmp_path, layout)
    data = MiniImageNet(tmp_path, image_size=16)
    assert data.layout == layout and data.split_classes == classes
    assert data.fingerprint["images"] == 36 and data.fingerprint["classes"] == 9
    test = data.split("test")
    assert test.images.shape == (12, 3, 16, 16) and test.images.dtype == torch.uint8
    tasks = ImageTasks(test, ways=3, shots=1, queries=2, seed=5)
    b = check_tasks(tasks, _imagenet_class, set(classes["test"]), 3, 1, 2, 16)
    again = ImageTasks(test, ways=3, shots=1, queries=2, seed=5).sample(3)
    assert torch.equal(again.query_x, b.query_x) and torch.equal(again.query_y, b.query_y)
    other = ImageTasks(test, ways=3, shots=1, queries=2, seed=6).sample(3)
    assert not torch.equal(other.query_x, b.query_x)
    with pytest.raises(ValueError, match="ways"):
        ImageTasks(test, ways=4)
    with pytest.raises(ValueError, match="shots/queries"):
        ImageTasks(test, ways=2, shots=2, queries=3)


def test_mini_imagenet_layouts_share_a_fingerprint(tmp_path):
    imagenet_tree(tmp_path / "a", "csv")
    imagenet_tree(tmp_path / "b", "folders")
    fa, fb = MiniImageNet(tmp_path / "a").fingerprint, MiniImageNet(tmp_path / "b").fingerprint
    assert fa["sha256"] == fb["sha256"]
    imagenet_tree(tmp_path / "c", "folders", per_class=5)
    assert MiniImageNet(tmp_path / "c").fingerprint["sha256"] != fa["sha256"]


def test_tiered_imagenet_samples_labelled_tasks_in_float64(tmp_path):
    classes = imagenet_tree(tmp_path, "folders", per_split=(4, 2, 3), per_class=5, size=24)
    data = TieredImageNet(tmp_path)
    assert data.image_size == 84 and data.split_classes == classes
    train = data.split("train")
    assert train.images.shape == (20, 3, 84, 84)
    tasks = ImageTasks(train, ways=4, shots=2, queries=3, seed=0, dtype=torch.float64)
    assert tasks.sample(1).support_x.dtype == torch.float64
    check_tasks(ImageTasks(train, ways=4, shots=2, queries=3, seed=0), _imagenet_class, set(classes["train"]),
                4, 2, 3, 84)


def _cifar_class(img) -> str:
    return FINE_NAMES[round(float(img[0].mean()) / 2)]


@pytest.mark.parametrize("cls", [CIFARFS, FC100])
def test_cifar_splits_sample_labelled_tasks(tmp_path, cls):
    cifar_tree(tmp_path)
    data = cls(tmp_path)
    for split in SPLIT_NAMES:
        part = data.split(split)
        # only the classes of the standard split that the tiny file holds
        assert part.classes == [FINE_NAMES[c] for c in CIFAR_CLASSES if FINE_NAMES[c] in data.split_classes[split]]
        assert len(part.classes) >= 3 and part.images.shape == (6 * len(part.classes), 3, 32, 32)
        check_tasks(ImageTasks(part, ways=3, shots=2, queries=3, seed=1), _cifar_class, set(part.classes),
                    3, 2, 3, 32)
    # The published splits (checked by hand against Bertinetto et al.'s and Oreshkin et al.'s lists).
    sc = data.split_classes
    assert [len(sc[s]) for s in SPLIT_NAMES] == ([64, 16, 20] if cls is CIFARFS else [60, 20, 20])
    assert len(set(sc["train"]) | set(sc["val"]) | set(sc["test"])) == 100
    if cls is CIFARFS:
        assert "otter" in sc["val"] and "baby" in sc["test"] and "apple" in sc["train"]
    else:  # FC100: test = aquatic mammals, insects, medium mammals, people
        assert {"otter", "bee", "fox", "baby"} <= set(sc["test"]) and "aquarium_fish" in sc["train"]
        assert "leopard" in sc["val"]  # large carnivores


def test_cifar_resizes_once_at_load(tmp_path):
    cifar_tree(tmp_path)
    part = CIFARFS(tmp_path / "cifar-100-python", image_size=20).split("test")
    assert part.images.shape[-2:] == (20, 20)
    check_tasks(ImageTasks(part, ways=3, shots=1, queries=1), _cifar_class, set(part.classes), 3, 1, 1, 20)


def _omniglot_like(root, mode="L"):
    from PIL import Image

    for a in ("Latin", "Greek"):
        for c in ("character01", "character02"):
            (root / a / c).mkdir(parents=True)
            for i in range(3):
                colour = 200 if mode == "L" else (200, 10, 30)
                Image.new(mode, (8, 8), colour).save(root / a / c / f"{i}.png")


def test_every_loader_refuses_the_other_layouts(tmp_path):
    mini, tiered, cifar, omni = (tmp_path / n for n in ("mini", "tiered", "cifar", "omni"))
    imagenet_tree(mini, "csv")
    imagenet_tree(tiered, "folders")
    cifar_tree(cifar)
    _omniglot_like(omni)
    assert len(Omniglot(omni).classes) == 4  # grey Omniglot-like images still load
    for root in (cifar, omni):
        with pytest.raises(ValueError, match=r"root: expected mini-ImageNet layout \(images/ \+ train.csv.*found"):
            MiniImageNet(root)
    for root in (mini, cifar, omni):
        with pytest.raises(ValueError, match="root: expected tieredImageNet layout .*found"):
            TieredImageNet(root)
    for root in (mini, tiered, omni):
        for cls in (CIFARFS, FC100):
            with pytest.raises(ValueError, match="root: expected CIFAR-100 python layout"):
                cls(root)
    for root in (mini, tiered, cifar):  # no <Alphabet>/<character>/*.png (PNG class folders: the next test)
        with pytest.raises(ValueError, match="roots: no"):
            Omniglot(root)
    with pytest.raises(FileNotFoundError, match="data_root"):
        MiniImageNet(tmp_path / "missing")


def test_omniglot_refuses_colour_images_and_split_folders(tmp_path):
    from PIL import Image

    colour = tmp_path / "colour"
    _omniglot_like(colour, mode="RGB")
    with pytest.raises(ValueError, match="roots: the image .* is in colour"):
        Omniglot(colour)
    grey_rgb = tmp_path / "grey_rgb"  # grey pixels stored as RGB are Omniglot-like enough
    for c in ("character01", "character02"):
        (grey_rgb / "Latin" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), (90, 90, 90)).save(grey_rgb / "Latin" / c / "0.png")
    assert len(Omniglot(grey_rgb).classes) == 2
    split_png = tmp_path / "split_png"  # an RGB class-folder tree saved as PNG
    for s in ("train", "val"):
        (split_png / s / "n01").mkdir(parents=True)
        Image.new("RGB", (8, 8), (90, 90, 90)).save(split_png / s / "n01" / "0.png")
    with pytest.raises(ValueError, match=r"split folders \['train', 'val'\]"):
        Omniglot(split_png)


def test_bad_csv_and_overlapping_classes_are_refused(tmp_path):
    imagenet_tree(tmp_path / "a", "csv")
    (tmp_path / "a" / "val.csv").write_text("file,class\nx.jpg,n1\n")
    with pytest.raises(ValueError, match="header 'filename,label'"):
        MiniImageNet(tmp_path / "a")
    imagenet_tree(tmp_path / "b", "csv")
    (tmp_path / "b" / "test.csv").write_text("filename,label\nmissing.jpg,n00000099\n")
    with pytest.raises(ValueError, match="missing.jpg"):
        MiniImageNet(tmp_path / "b")
    imagenet_tree(tmp_path / "c", "folders")
    (tmp_path / "c" / "test" / _wnid(0)).mkdir()
    _save(tmp_path / "c" / "test" / _wnid(0) / "x.jpg", 0, 0, 8)
    with pytest.raises(ValueError, match="in both the train and the test split"):
        TieredImageNet(tmp_path / "c")
