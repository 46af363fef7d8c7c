"""CIFAR-100's class names and the standard few-shot class splits drawn from it.

* CIFAR-100 (Krizhevsky 2009): 100 fine classes, indexed alphabetically (``fine_label_names``
  of the release's ``meta`` file), grouped into 20 superclasses of 5 (``coarse_label_names``).
* CIFAR-FS (Bertinetto et al. 2019, "Meta-learning with differentiable closed-form solvers",
  the split files of their R2D2 code, ``data/cifar-fs/splits/bertinetto``): 64 / 16 / 20 fine
  classes for meta-training / validation / testing.
* FC100 (Oreshkin et al. 2018, "TADAM", supplementary material and their ``ElementAI/TADAM``
  preprocessing script): 12 / 4 / 4 superclasses (60 / 20 / 20 fine classes), so that the
  test classes share no superclass with the training ones.

The lists were cross-checked against peers' copies (TADAM's script, several public CIFAR-FS
loaders). Every image of a class is used: CIFAR-100's train and test files are merged (600
images per class).
"""
from __future__ import annotations

FINE_NAMES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)

COARSE_NAMES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
)

# Superclass index -> its five fine class indices (CIFAR-100's own grouping).
COARSE_TO_FINE = {
    0: (4, 30, 55, 72, 95), 1: (1, 32, 67, 73, 91), 2: (54, 62, 70, 82, 92), 3: (9, 10, 16, 28, 61),
    4: (0, 51, 53, 57, 83), 5: (22, 39, 40, 86, 87), 6: (5, 20, 25, 84, 94), 7: (6, 7, 14, 18, 24),
    8: (3, 42, 43, 88, 97), 9: (12, 17, 37, 68, 76), 10: (23, 33, 49, 60, 71), 11: (15, 19, 21, 31, 38),
    12: (34, 63, 64, 66, 75), 13: (26, 45, 77, 79, 99), 14: (2, 11, 35, 46, 98), 15: (27, 29, 44, 78, 93),
    16: (36, 50, 65, 74, 80), 17: (47, 52, 56, 59, 96), 18: (8, 13, 48, 58, 90), 19: (41, 69, 81, 85, 89),
}
FINE_TO_COARSE = {f: c for c, fs in COARSE_TO_FINE.items() for f in fs}

CIFAR_FS_SPLIT = {
    "train": (
        "apple", "aquarium_fish", "bear", "bee", "bottle", "bowl", "boy", "bridge", "bus", "can", "castle",
        "caterpillar", "chair", "clock", "cloud", "cockroach", "couch", "cup", "dinosaur", "dolphin", "elephant",
        "forest", "girl", "hamster", "house", "kangaroo", "keyboard", "lawn_mower", "lion", "lizard", "lobster",
        "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "palm_tree", "pear", "pine_tree", "plate",
        "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "seal", "shrew", "skunk", "skyscraper", "snake",
        "spider", "squirrel", "streetcar", "sunflower", "tank", "tiger", "train", "trout", "tulip", "turtle",
        "willow_tree", "wolf",
    ),
    "val": (
        "otter", "motorcycle", "television", "lamp", "crocodile", "shark", "butterfly", "beaver", "beetle",
        "tractor", "flatfish", "maple_tree", "camel", "crab", "sea", "cattle",
    ),
    "test": (
        "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain", "poppy",
        "rocket", "rose", "snail", "sweet_pepper", "table", "telephone", "wardrobe", "whale", "woman", "worm",
    ),
}

FC100_SUPERCLASS_SPLIT = {
    "train": (1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19),
    "val": (8, 11, 13, 16),
    "test": (0, 7, 12, 14),
}


def cifar_fs_classes(split: str) -> list[int]:
    """The fine class indices (0..99) of a CIFAR-FS ``split`` ('train', 'val' or 'test'), sorted."""
    return sorted(FINE_NAMES.index(n) for n in CIFAR_FS_SPLIT[split])


def fc100_classes(split: str) -> list[int]:
    """The fine class indices (0..99) of an FC100 ``split``: the fine classes of its superclasses, sorted."""
    return sorted(f for c in FC100_SUPERCLASS_SPLIT[split] for f in COARSE_TO_FINE[c])
