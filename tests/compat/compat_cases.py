"""Models, tasks and comparison helpers shared by the compatibility-layer tests (float64)."""
from __future__ import annotations

import torch
from torch import nn

import fastmeta


class BufferMLP(nn.Module):
    """Linear -> BatchNorm1d (running statistics tracked) -> tanh * a registered buffer -> Dropout
    -> Linear: every kind of module state a functional call has to get right."""

    def __init__(self, dropout: float = 0.3, ways: int = 3):
        super().__init__()
        self.l1 = nn.Linear(4, 12)
        self.bn = nn.BatchNorm1d(12)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 12))
        self.drop = nn.Dropout(dropout)
        self.l2 = nn.Linear(12, ways)

    def forward(self, x):
        return self.l2(self.drop(torch.tanh(self.bn(self.l1(x))) * self.scale))


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        model = BufferMLP()
    elif kind == "conv4":
        model = fastmeta.Conv4(ways=3, hidden=4, image_size=16)
    else:
        raise ValueError(kind)
    return model.double().train()


def make_tasks(kind: str, n_tasks: int = 2, seed: int = 1) -> list:
    """``[(support_x, support_y, query_x, query_y)]``, 3-way, float64 inputs."""
    g = torch.Generator().manual_seed(seed)
    shape = (4,) if kind == "mlp" else (1, 16, 16)
    out = []
    for _ in range(n_tasks):
        sx, qx = (torch.randn(n, *shape, generator=g, dtype=torch.float64) for n in (6, 9))
        sy, qy = torch.arange(3).repeat(2), torch.arange(3).repeat(3)
        out.append((sx, sy, qx, qy))
    return out


def rel_err(a, b) -> float:
    """``||a - b|| / ||b||`` over lists of tensors (``None`` entries must match)."""
    assert [x is None for x in a] == [y is None for y in b], "one side has gradients the other lacks"
    pairs = [(x, y) for x, y in zip(a, b) if x is not None]
    assert pairs, "nothing to compare"
    num = sum(float((x - y).pow(2).sum()) for x, y in pairs) ** 0.5
    den = sum(float(y.pow(2).sum()) for _, y in pairs) ** 0.5
    return num / max(den, 1e-300)


def grads_of(model) -> list:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]
