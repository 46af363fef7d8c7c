"""The ``"bmm"`` evaluation strategy: a model of ``nn.Linear`` layers and elementwise activations,
traced once with ``torch.fx`` and run as batched matmuls over tasks.

Each ``Linear`` runs as one ``baddbmm`` over all tasks with the per-task weights ``[T, out, in]``
viewed straight from the task rows: no ``vmap`` and no ``functional_call``. Same math as the other
strategies (exact); on the sine MLP it removes most of vmap's per-op overhead.
"""
from __future__ import annotations

import functools
import operator
from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

# What the "bmm" strategy may meet in a traced forward besides nn.Linear: functions and modules that
# act elementwise (or on the last dim alone), so they apply unchanged to [T, N, F] activations.
_BMM_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.GELU, nn.ELU, nn.SiLU, nn.Identity,
                nn.Hardtanh, nn.Softsign, nn.Mish)
_BMM_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.softplus,
                  F.gelu, F.elu, F.silu, F.mish, operator.add, operator.sub, operator.mul, operator.neg,
                  torch.add, torch.sub, torch.mul}


class BmmPlan:
    """A model's forward rewritten as batched matmuls over tasks (the ``"bmm"`` strategy).

    ``BmmPlan.reason(model)`` says why a model does not qualify (``None`` if it does): its forward
    is traced with ``torch.fx.symbolic_trace`` and every node must be an ``nn.Linear``, an
    elementwise activation module or function, or ``+``/``-``/``*`` between activations. No
    parameter or buffer may be read outside a ``Linear`` (``get_attr``), so batch norm, dropout,
    convolutions and custom layers fall back to ``vmap``/``loop``.

    :meth:`run` evaluates the traced graph with per-task parameters ``{name: [T, ...]}`` on
    inputs ``[T, N, in]``: ``Linear`` -> ``baddbmm(b[:, None], h, W^T)``, everything else as is.
    """

    def __init__(self, model: nn.Module):
        # A bare nn.Linear is traced into F.linear on its own attributes: run it as one layer.
        self._root_linear = isinstance(model, nn.Linear)
        graph, why = (None, None) if self._root_linear else self._checked_graph(model)
        if why is not None:
            raise ValueError(f"strategy: 'bmm' needs a model of nn.Linear layers and elementwise activations: {why}")
        # The graph as (kind, node, a, b) steps, resolved once: a forward then costs a few dict
        # operations per layer (it runs twice per MAML step, where ~1 ms is the whole step).
        modules = dict(model.named_modules())
        self._steps = []
        for node in graph.nodes if graph is not None else []:
            if node.op == "call_module":
                m = modules[node.target]
                # Activation modules run through their forward: Module.__call__'s hook handling costs
                # ~1.5 us per call, and hooks are not run here anyway (the Linear layers are replaced).
                self._steps.append(("linear", node, (f"{node.target}.weight", f"{node.target}.bias"), node.args[0])
                                   if isinstance(m, nn.Linear)
                                   else ("module", node, m.forward, node.args[0]))
            elif node.op == "placeholder":
                self._steps.append(("input", node, None, None))
            elif node.op == "call_function":
                self._steps.append(("function", node, None, None))
            elif node.op == "output":
                self._steps.append(("output", node, None, None))

    @classmethod
    def reason(cls, model: nn.Module) -> Optional[str]:
        return None if isinstance(model, nn.Linear) else cls._checked_graph(model)[1]

    @staticmethod
    def _checked_graph(model: nn.Module) -> tuple[Optional[torch.fx.Graph], Optional[str]]:
        """``(traced graph, None)`` if the model qualifies, else ``(None, why not)``: one trace
        serves both the check and the plan."""
        try:
            graph = torch.fx.symbolic_trace(model).graph
        except Exception as e:  # noqa: BLE001 - untraceable forward: not a bmm model
            return None, f"torch.fx cannot trace its forward ({type(e).__name__}: {e})"
        modules = dict(model.named_modules())
        placeholders = 0
        for node in graph.nodes:
            if node.op == "placeholder":
                placeholders += 1
            elif node.op == "call_module":
                m = modules[node.target]
                if not isinstance(m, (nn.Linear,) + _BMM_MODULES):
                    return None, f"module {node.target!r} is a {type(m).__name__}"
                if len(node.args) != 1 or node.kwargs:
                    return None, f"module {node.target!r} is not called on exactly one input"
            elif node.op == "call_function":
                if node.target not in _BMM_FUNCTIONS:
                    return None, f"function {getattr(node.target, '__name__', node.target)!r} is not elementwise-known"
            elif node.op == "get_attr":
                return None, f"the forward reads {node.target!r} directly"
            elif node.op == "call_method":
                return None, f"the forward calls tensor method {node.target!r}"
        if placeholders != 1:
            return None, f"the forward takes {placeholders} inputs (expected 1)"
        if not any(isinstance(m, nn.Linear) for m in modules.values()):
            return None, "it has no nn.Linear layer"
        return graph, None

    def run(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Outputs ``[T, N, out]`` for per-task parameters ``{name: [T, ...]}`` and ``x`` ``[T, N, in]``."""
        if x.dim() != 3:
            raise ValueError(f"x: the 'bmm' strategy needs per-task inputs [T, N, features], got shape {tuple(x.shape)}")
        if self._root_linear:
            return self._linear(params, ("weight", "bias"), x)
        env: dict = {}
        load = functools.partial(torch.fx.node.map_arg, fn=lambda n: env[n])
        for kind, node, a, b in self._steps:
            if kind == "linear":
                env[node] = self._linear(params, a, env[b])
            elif kind == "module":
                env[node] = a(env[b])
            elif kind == "function":
                env[node] = node.target(*load(node.args), **load(node.kwargs))
            elif kind == "input":
                env[node] = x
            else:
                return load(node.args)[0]
        raise RuntimeError("BmmPlan: traced graph has no output")  # unreachable for fx graphs

    @staticmethod
    def _linear(params: dict[str, torch.Tensor], keys: tuple[str, str], h: torch.Tensor) -> torch.Tensor:
        w = params[keys[0]].transpose(1, 2)  # [T, in, out]
        b = params.get(keys[1])
        return torch.bmm(h, w) if b is None else torch.baddbmm(b.unsqueeze(1), h, w)


