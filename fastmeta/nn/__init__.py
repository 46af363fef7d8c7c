"""Module transforms: ``fuse_conv_blocks(model)`` routes a model's ``BatchNorm2d, ReLU, MaxPool2d(2)``
runs through the fused :func:`fastmeta.ops.bn_relu_pool` (the ``fused=True`` CPU speed mode)."""

from .fusion import FusedSequential, count_fusable, fuse_conv_blocks

__all__ = ["fuse_conv_blocks", "count_fusable", "FusedSequential"]
