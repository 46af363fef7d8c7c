"""``fuse_conv_blocks``: a model whose conv-block chains ``BatchNorm2d -> ReLU/LeakyReLU -> [MaxPool2d(2)]``
go through the fused :func:`fastmeta.ops.bn_relu_pool`, sharing every parameter, buffer and
submodule with the original.

**How chains are found.** Each module is looked at on its own:

* an ``nn.Sequential`` (or a subclass keeping its ``forward``) becomes a :class:`FusedSequential`,
  which finds the chains among its children at each call (consecutive ``BatchNorm2d``, ``ReLU`` or
  ``LeakyReLU(slope >= 0)``, and a ``MaxPool2d(2)`` if it follows), so editing it stays correct;
* a module with its own ``forward`` (user code: a model, a residual block) is traced with torch.fx,
  every submodule a leaf (``fastmeta/nn/_trace.py``): a chain is a sequence of module calls where
  each intermediate value has no other user, and the pool joins when it is the activation's only
  user. ResNet-12's block (Lee et al. 2019) has two chains without a pool (``bn1 -> LeakyReLU``,
  ``bn2 -> LeakyReLU``); its ``bn3 -> add(shortcut) -> LeakyReLU -> pool`` end stays ATen (the
  batch norm's output has the add as its user). The traced ``forward`` is specialized to the
  module's Python state at fuse time: it runs only while every submodule's ``training`` flag is as
  it was then (else the original ``forward``); fuse again after changing other state. A ``forward``
  that cannot be traced keeps running unfused (its Sequential children still fuse), and
  :func:`fusion_report` says why;
* torch.nn built-ins are used as they are.

**What is shared.** ``fused = fuse_conv_blocks(model)`` returns a new module object and never
mutates ``model`` or any of its children. Only modules that fuse something, and the modules on the
path from the root to them, are new shallow copies (same class or a subclass of it, same attributes,
the same parameter/buffer tensors and hook dictionaries, their own ``_modules``/``_parameters``/
``_buffers`` dicts); every other submodule is the model's own. So parameter names are unchanged
(``torch.func.functional_call(fused, {name: tensor}, x)`` takes the model's names), ``getattr(fused,
name)`` reaches every child under the model's names (the evaluator's ANIL body and head), running
statistics are updated in the model's own buffers, and hooks registered on the model's modules fire.

**When a chain runs fused.** At each call, only where :func:`bn_relu_pool` computes the same thing:
the BatchNorm uses batch statistics (training mode, or no running statistics), the input is a CPU
float32/float64/bfloat16 NCHW or channels_last tensor with the parameters in the matching dtype, no
functorch transform (``vmap``, ``grad``) is active, nothing is being compiled, and none of the
chain's modules has a hook (forward, forward-pre or backward: they must see the modules run).
Anything else runs the original modules.

Caveat of the shallow copies: a copied module keeps its own ``training`` flag (its children, shared,
follow ``model.train()``/``model.eval()``). That matters only for a container whose own
``forward`` reads ``self.training``; call ``train()``/``eval()`` on the fused module, or fuse again.
"""

from __future__ import annotations

from torch import nn

from .. import _extension
from . import _trace
from ._runtime import run_chain, sequential_chain

__all__ = ["fuse_conv_blocks", "count_fusable", "fusion_report", "FusedSequential"]


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` whose ``BatchNorm2d -> ReLU/LeakyReLU -> [MaxPool2d(2)]`` runs run as
    one :func:`~fastmeta.ops.bn_relu_pool` call where it applies (see the module docstring), and as
    the original modules otherwise. Built by :func:`fuse_conv_blocks`; the runs are found at each
    call (a type test per module), so slicing or editing it keeps it correct."""

    def forward(self, input):
        mods = list(self._modules.values())
        x, i = input, 0
        while i < len(mods):
            n = sequential_chain(mods, i)
            if n:
                x = run_chain(mods[i], mods[i + 1], mods[i + 2] if n == 3 else None, x)
                i += n
            else:
                x = mods[i](x)
                i += 1
        return x


_fused_classes: dict[type, type] = {nn.Sequential: FusedSequential}


def _fused_class(cls: type) -> type:
    # A Sequential subclass (that keeps Sequential's forward) stays an instance of its class.
    if cls not in _fused_classes:
        _fused_classes[cls] = type(f"Fused{cls.__name__}", (FusedSequential, cls), {"__module__": __name__})
    return _fused_classes[cls]


def _is_sequential(m: nn.Module) -> bool:
    return isinstance(m, FusedSequential) or (isinstance(m, nn.Sequential)
                                               and type(m).forward is nn.Sequential.forward)


def _runs(m: nn.Sequential) -> int:
    mods, i, n = list(m._modules.values()), 0, 0
    while i < len(mods):
        k = sequential_chain(mods, i)
        n, i = (n + 1, i + k) if k else (n, i + 1)
    return n


def _analyze(m: nn.Module) -> tuple[int, str, object]:
    """``(chains in m's own forward, why none could be looked for or "", traced graph or None)``."""
    if _is_sequential(m):
        return _runs(m), "", None
    sites = _trace.fused_sites(m)
    if sites is not None:  # already fused
        return len(sites), "", None
    if not _trace.traceable(m):
        return 0, "", None
    graph, why = _trace.trace(_shallow_copy(m, type(m)))  # a copy: tracing runs forward's Python code
    if graph is None:
        return 0, f"not traced ({why}); its own forward runs unfused", None
    return len(_trace.find_sites(graph, dict(m.named_modules()))), "", graph


def count_fusable(model: nn.Module) -> int:
    """Number of chains of ``model`` that :func:`fuse_conv_blocks` routes through the fused op (of a
    fused model: the chains it routes): runs in its ``nn.Sequential`` containers plus sites of
    traced ``forward`` methods. Structural: each still falls back to the original modules at run
    time when its input does not qualify."""
    return sum(_analyze(m)[0] for m in model.modules())


def fusion_report(model: nn.Module) -> list[str]:
    """One line per module of ``model`` that has chains or could not be traced:
    ``"name (Class): 2 chains [bn1 -> relu, ...]"`` or ``"name (Class): not traced (why); ..."``."""
    lines = []
    for name, m in model.named_modules():
        count, why, _ = _analyze(m)
        label = f"{name or '<root>'} ({type(m).__name__})"
        if why:
            lines.append(f"{label}: {why}")
        elif count:
            sites = _trace.fused_sites(m)
            detail = f" [{', '.join(map(repr, sites.values()))}]" if sites else ""
            lines.append(f"{label}: {count} chain{'s' if count > 1 else ''}{detail}")
    return lines


def _shallow_copy(m: nn.Module, cls: type) -> nn.Module:
    new = cls.__new__(cls)
    new.__dict__.update(m.__dict__)
    for key in ("_modules", "_parameters", "_buffers"):
        new.__dict__[key] = type(m.__dict__[key])(m.__dict__[key])
    return new


_traced_classes: dict[type, type] = {}


def _traced_class(cls: type) -> type:
    # One subclass per class: TracedForward.forward first, the class's own forward as its fallback.
    if cls not in _traced_classes:
        _traced_classes[cls] = type(f"Fused{cls.__name__}", (_trace.TracedForward, cls), {"__module__": __name__})
    return _traced_classes[cls]


def _rebuild(m: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    if id(m) in memo:  # a module reachable twice stays one module
        return memo[id(m)]
    replaced = {}
    for name, child in m._modules.items():
        if child is not None:
            new_child = _rebuild(child, memo)
            if new_child is not child:
                replaced[name] = new_child
    count, _, graph = _analyze(m)
    if count and graph is not None:
        new = _shallow_copy(m, _traced_class(type(m)))
        new._modules.update(replaced)
        sites, _ = _trace.rewrite(graph, dict(m.named_modules()))
        _trace.install(new, graph, sites)
    elif count and not isinstance(m, FusedSequential) and _is_sequential(m):
        new = _shallow_copy(m, _fused_class(type(m)))
        new._modules.update(replaced)
    elif replaced:
        new = _shallow_copy(m, type(m))
        new._modules.update(replaced)
    else:
        new = m
    memo[id(m)] = new
    return new


def fuse_conv_blocks(model: nn.Module) -> nn.Module:
    """``model`` with its ``BatchNorm2d -> ReLU/LeakyReLU -> [MaxPool2d(2)]`` chains fused (see the
    module docstring: how they are found, what is shared, when they run fused).

    Args:
        model: any ``nn.Module``.

    Returns:
        A new module computing the same function (float32 results differ from ATen's by rounding,
        ~1e-6 relative; float64 to ~1e-14), sharing every parameter, buffer and submodule of
        ``model`` under the same names; ``model`` itself when nothing can be fused (no chain, or
        the native extension is not available). ``model`` is never modified.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not _extension.available() or count_fusable(model) == 0:
        return model
    return _rebuild(model, {})
