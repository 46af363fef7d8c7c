"""Finding conv-block chains in a module's own ``forward`` by torch.fx symbolic tracing.

A module with its own ``forward`` (not a torch.nn built-in) is traced with every submodule a leaf,
so the graph is that ``forward``'s code: calls of child modules (``call_module`` nodes, by the
children's qualified names), functions and methods. A *site* is a ``call_module`` chain

    BatchNorm2d -> ReLU / LeakyReLU(slope >= 0) -> [MaxPool2d(2)]

where each intermediate value has no other user (its only use is the next call; ``bn``'s output
feeding anything else, e.g. a residual add, is not a site). The pool joins when the activation's
only user is a 2x2 max-pool; otherwise the site is ``BN -> activation`` without a pool (ResNet-12's
inner layers). Each site becomes one ``call_module`` of a :class:`Site` that runs
:func:`~fastmeta.nn._runtime.run_chain`, so the run-time fallbacks apply per call.

Tracing runs the ``forward`` once on proxies, so what it specializes on is frozen: Python control
flow on non-tensor state (``if self.training``, flags) takes the branch it had at fuse time. The
fused module therefore records every submodule's ``training`` flag and runs the original
``forward`` (unfused) whenever one differs; other Python state must not change after fusing.
A ``forward`` that cannot be traced (control flow on tensor values, unsupported calls) keeps its
own ``forward``, unfused; the reason is kept for :func:`fastmeta.nn.fusion_report`.
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx
from torch import nn

from ._runtime import is_bn, is_pool2, run_chain, slope_of


class Site:
    """One fused chain of a traced ``forward``: ``pool(act(bn(x)))`` through
    :func:`~fastmeta.nn._runtime.run_chain`. Holds the (shared) modules, not their tensors, so
    ``functional_call``'s parameter swaps on them are seen. Not an ``nn.Module``: it is stored in the
    fused module's ``__dict__`` and adds no parameter or name."""

    def __init__(self, names: tuple, bn: nn.Module, act: nn.Module, pool: Optional[nn.Module]):
        self.names, self.bn, self.act, self.pool = names, bn, act, pool

    def __call__(self, x):
        return run_chain(self.bn, self.act, self.pool, x)

    def __repr__(self) -> str:
        return " -> ".join(self.names)


class _OwnForward(fx.Tracer):
    # Every submodule is a leaf: only the traced module's own forward is inlined (its children are
    # fused on their own, and stay callable by name, e.g. the evaluator's ANIL body).
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def traceable(m: nn.Module) -> bool:
    """Whether ``m``'s own ``forward`` is a candidate: user code, not a torch.nn built-in."""
    return not type(m).__module__.startswith("torch.") and type(m).forward is not nn.Module.forward


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _single_arg_call(node: Optional[fx.Node], arg: fx.Node, modules: dict) -> Optional[nn.Module]:
    if node is None or node.op != "call_module" or node.args != (arg,) or node.kwargs:
        return None
    return modules.get(node.target)


def find_sites(graph: fx.Graph, modules: dict) -> list[tuple]:
    """``[(bn_node, act_node, pool_node or None)]`` of the chains in ``graph`` (see the module docstring)."""
    sites = []
    for node in graph.nodes:
        if node.op != "call_module" or not is_bn(modules.get(node.target)) or len(node.args) != 1 or node.kwargs:
            continue
        act_node = _only_user(node)
        if slope_of(_single_arg_call(act_node, node, modules)) is None:
            continue
        pool_node = _only_user(act_node)
        if not is_pool2(_single_arg_call(pool_node, act_node, modules)):
            pool_node = None
        sites.append((node, act_node, pool_node))
    return sites


def trace(m: nn.Module) -> tuple[Optional[fx.Graph], str]:
    """``m``'s own ``forward`` as a graph, or ``(None, why not)``."""
    try:
        return _OwnForward().trace(m), ""
    except Exception as e:  # noqa: BLE001 - any failure means "not traceable": the module runs unfused
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def rewrite(graph: fx.Graph, modules: dict) -> tuple[dict, int]:
    """Replace each site of ``graph`` (in place) by a ``call_module`` of a :class:`Site`.

    Returns ``({attribute name: Site}, count)``: the attributes the rewritten code calls on ``self``."""
    found = {}
    for k, (bn, act, pool) in enumerate(find_sites(graph, modules)):
        name = f"_fastmeta_site_{k}"
        last = pool if pool is not None else act
        names = tuple(n.target for n in (bn, act, pool) if n is not None)
        found[name] = Site(names, modules[bn.target], modules[act.target],
                           modules[pool.target] if pool is not None else None)
        with graph.inserting_before(last):
            new = graph.call_module(name, bn.args)
        last.replace_all_uses_with(new)
        for n in (pool, act, bn):
            if n is not None:
                graph.erase_node(n)
    return found, len(found)


def compile_forward(graph: fx.Graph, label: str):
    """The rewritten graph as a plain function ``forward(self, ...)`` (fx's code generator, with
    ``self`` the fused module: its children and sites are reached by attribute, as in the original)."""
    code = graph.python_code(root_module="self")
    env = dict(code.globals)
    exec(compile(code.src, f"<fastmeta fused forward of {label}>", "exec"), env)  # noqa: S102 - fx's own codegen
    return env["forward"]


class TracedForward(nn.Module):
    """Mixin of a module whose ``forward`` is its traced, rewritten graph (built by
    :func:`fastmeta.nn.fuse_conv_blocks`); the original class's ``forward`` runs instead whenever a
    submodule's ``training`` flag differs from fuse time (see the module docstring)."""

    def forward(self, *args, **kwargs):
        fn, modules, flags, _sites = self.__dict__["_fastmeta_traced"]
        if any(m.training != f for m, f in zip(modules, flags)):
            return super().forward(*args, **kwargs)
        return fn(self, *args, **kwargs)


def fused_sites(m: nn.Module) -> Optional[dict]:
    """The :class:`Site` objects of a traced, fused module (None for any other module)."""
    traced = m.__dict__.get("_fastmeta_traced") if isinstance(m, TracedForward) else None
    return traced[3] if traced is not None else None


def install(new: nn.Module, graph: fx.Graph, sites: dict) -> None:
    """Give ``new`` (a fresh shallow copy, already of a :class:`TracedForward` class) its traced forward."""
    new.__dict__.update(sites)
    modules = tuple(new.modules())
    new.__dict__["_fastmeta_traced"] = (compile_forward(graph, type(new).__name__), modules,
                                        tuple(bool(m.training) for m in modules), sites)
