"""Drop-in compatibility layers for code written against other meta-learning libraries.

* :mod:`fastmeta.compat.learn2learn`: ``import fastmeta.compat.learn2learn as l2l`` in place of
  ``import learn2learn as l2l`` (``l2l.algorithms.MAML`` and ``MetaSGD``).
* :mod:`fastmeta.compat.higher`: ``import fastmeta.compat.higher as higher`` in place of
  ``import higher`` (``higher.innerloop_ctx`` with SGD and Adam).

Both keep the peer's semantics (the meta-gradients match to float64 rounding; see
``docs/compat.md``) but never copy a module: a clone or a patched model is a set of fast-weight
tensors that ``torch.func.functional_call`` substitutes into the one original module. Nothing is
imported here, so ``import fastmeta`` does not pay for either layer.
"""
