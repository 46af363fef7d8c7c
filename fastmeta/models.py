"""Standard few-shot models: Conv-4 (Finn et al. 2017; Vinyals et al. 2016), ResNet-12 (Lee et al.
2019, MetaOptNet; Oreshkin et al. 2018) and the sinusoid MLP.

Every classifier is ``head(features(x))`` with two children, ``features`` (the body) and ``head``
(an ``nn.Linear``), so ``adapt="head"`` is ANIL and its feature cache applies
(:class:`fastmeta.evaluation.feature_cache.FeatureSplit`). Batch norm layers are plain
``nn.BatchNorm2d`` using batch statistics, activations are their own ``nn.ReLU`` /
``nn.LeakyReLU`` modules and forwards are straight-line code, so that ``torch.fx`` can trace them
and fuse the BatchNorm -> activation -> max-pool runs.
"""
from __future__ import annotations

from typing import Sequence

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


class ResidualBlock(nn.Module):
    """One ResNet-12 block (MetaOptNet's ``BasicBlock`` without DropBlock): three
    [conv 3x3 (no bias), BatchNorm, LeakyReLU(0.1)] with the last activation after the residual
    add, the shortcut a [conv 1x1, BatchNorm], then max-pool 2. ``[N, C_in, H, W] -> [N, C_out, H//2, W//2]``.
    """

    def __init__(self, in_channels: int, out_channels: int, slope: float = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels, track_running_stats=False)
        self.relu1 = nn.LeakyReLU(slope)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, track_running_stats=False)
        self.relu2 = nn.LeakyReLU(slope)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels, track_running_stats=False)
        self.shortcut_conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(out_channels, track_running_stats=False)
        self.relu3 = nn.LeakyReLU(slope)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + self.shortcut_bn(self.shortcut_conv(x))
        return self.pool(self.relu3(out))


class ResNet12(nn.Module):
    """ResNet-12 as in MetaOptNet (Lee et al. 2019): four :class:`ResidualBlock` of widths
    ``widths`` (default 64-160-320-640), global average pooling, then a linear head on
    ``widths[-1]`` features. Batch norm uses the batch's statistics, as in :class:`Conv4`; no
    DropBlock (the meta-gradient stays a deterministic function of the parameters).

    84 x 84 input: 84 -> 42 -> 21 -> 10 -> 5, pooled to 1; any input of at least 16 x 16 works.
    Input ``[N, C, H, W]``; output logits ``[N, ways]``.
    """

    def __init__(self, ways: int, in_channels: int = 3, widths: Sequence[int] = (64, 160, 320, 640)):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"widths: expected four positive channel counts, got {widths}")
        blocks, c = [], in_channels
        for w in widths:
            blocks.append(ResidualBlock(c, w))
            c = w
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, ways)
        self.config = dict(kind="resnet12", ways=ways, in_channels=in_channels, widths=widths)

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
    if kind == "resnet12":
        return ResNet12(**cfg)
    if kind == "sine_mlp":
        return SineMLP(**cfg)
    raise ValueError(f"config: unknown model kind {kind!r} (expected 'conv4', 'resnet12' or 'sine_mlp')")
