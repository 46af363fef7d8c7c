"""Standard few-shot models: Conv-4 (Finn et al. 2017; Vinyals et al. 2016) and the sinusoid MLP."""
from __future__ import annotations

from torch import nn


class Conv4(nn.Module):
    """Four blocks of [conv 3x3 (padding 1), BatchNorm with batch statistics, ReLU, max-pool 2],
    then a linear head.

    Omniglot: ``Conv4(ways, in_channels=1, hidden=64, image_size=28)`` (28 -> 14 -> 7 -> 3 -> 1,
    64 features). mini-ImageNet: ``Conv4(ways, in_channels=3, hidden=32, image_size=84)``
    (84 -> 42 -> 21 -> 10 -> 5, 800 features). Batch norm always uses the batch's statistics
    (``track_running_stats=False``), as in MAML: meta-test tasks are normalized by themselves.

    Input ``[N, C, H, W]``; output logits ``[N, ways]``. The head is the last submodule, so
    ``adapt="head"`` gives ANIL.
    """

    def __init__(self, ways: int, in_channels: int = 1, hidden: int = 64, image_size: int = 28):
        super().__init__()
        layers, c, s = [], in_channels, image_size
        for _ in range(4):
            layers += [nn.Conv2d(c, hidden, 3, padding=1),
                       nn.BatchNorm2d(hidden, track_running_stats=False),
                       nn.ReLU(),
                       nn.MaxPool2d(2)]
            c, s = hidden, s // 2
        if s < 1:
            raise ValueError(f"image_size: {image_size} is too small for four 2x poolings")
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(hidden * s * s, ways)
        self.config = dict(kind="conv4", ways=ways, in_channels=in_channels, hidden=hidden, image_size=image_size)

    def forward(self, x):
        return self.head(self.features(x))


class SineMLP(nn.Module):
    """The sinusoid-regression MLP of Finn et al. 2017: 1-40-40-1 with ReLU. ``[N, 1] -> [N, 1]``."""

    def __init__(self, hidden: int = 40, activation: str = "relu"):
        super().__init__()
        act = {"relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus}[activation]
        self.body = nn.Sequential(nn.Linear(1, hidden), act(), nn.Linear(hidden, hidden), act())
        self.head = nn.Linear(hidden, 1)
        self.config = dict(kind="sine_mlp", hidden=hidden, activation=activation)

    def forward(self, x):
        return self.head(self.body(x))


def build_model(config: dict) -> nn.Module:
    """Rebuild a model from its ``config`` dict (as stored in fastmeta checkpoints)."""
    cfg = dict(config)
    kind = cfg.pop("kind", None)
    if kind == "conv4":
        return Conv4(**cfg)
    if kind == "sine_mlp":
        return SineMLP(**cfg)
    raise ValueError(f"config: unknown model kind {kind!r} (expected 'conv4' or 'sine_mlp')")
