"""Algorithms by name, for the CLI and for checkpoints (which store the config, not objects)."""
from __future__ import annotations

import argparse
from typing import Callable

from .base import Algorithm
from .maml import FOMAML, MAML

# name -> factory(config dict) -> Algorithm. Config keys: inner_lr, inner_steps, plus the
# options each algorithm declares in OPTIONS below.
FACTORIES: dict[str, Callable[[dict], Algorithm]] = {
    "maml": lambda c: MAML(c["inner_lr"], c["inner_steps"]),
    "fomaml": lambda c: FOMAML(c["inner_lr"], c["inner_steps"]),
}

# Extra command-line options: (flag, kwargs for argparse.add_argument).
OPTIONS: list[tuple[str, dict]] = []


def add_algorithm_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--algo", default="maml", choices=sorted(FACTORIES), help="meta-learning algorithm")
    for flag, kw in OPTIONS:
        parser.add_argument(flag, **kw)


def build_algorithm(config: dict) -> Algorithm:
    name = config.get("algo", "maml")
    if name not in FACTORIES:
        raise ValueError(f"algo: unknown algorithm {name!r}; choose from {sorted(FACTORIES)}")
    return FACTORIES[name](config)
