"""Module transforms: ``fuse_conv_blocks(model)`` routes a model's ``BatchNorm2d -> ReLU/LeakyReLU ->
[MaxPool2d(2)]`` chains through the fused :func:`fastmeta.ops.bn_relu_pool` (the ``fused=True`` CPU
speed mode); ``count_fusable`` and ``fusion_report`` say what it found."""

from .fusion import FusedSequential, count_fusable, fuse_conv_blocks, fusion_report

__all__ = ["fuse_conv_blocks", "count_fusable", "fusion_report", "FusedSequential"]
