"""``import fastmeta.compat.learn2learn as l2l``: learn2learn's MAML and Meta-SGD, without module copies.

Replaces ``import learn2learn as l2l`` in code that uses ``l2l.algorithms.MAML`` or
``l2l.algorithms.MetaSGD`` (``clone()``, ``adapt(loss)``, calling the clone, ``parameters()``),
with learn2learn's semantics: see :mod:`fastmeta.compat.learn2learn.algorithms` and
``docs/compat.md``. ``l2l.data`` and ``l2l.vision`` are not provided.
"""
from . import algorithms
from .algorithms import MAML, MetaSGD

__all__ = ["algorithms", "MAML", "MetaSGD"]
