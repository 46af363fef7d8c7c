"""Algorithms by name, for the CLI and for checkpoints (which store the config, not objects)."""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from .base import Algorithm
from .hfmaml import HFMAML
from .maml import FOMAML, MAML
from .sharp import SharpMAML

# Sharp-MAML radius when --alpha-low/--alpha-up are not given: the largest value of the paper's
# grid {0.05, 0.005, 0.0005, 0.00005} (Sharp-MAML sec. 5.1).
DEFAULT_RADIUS = 0.05
# ESharp-MAML default SDS ratio mu (the benchmark setting; ESAM's own default).
DEFAULT_SDS_RATIO = 0.5


def _radius(c: dict, key: str) -> float:
    v = c.get(key)
    return DEFAULT_RADIUS if v is None else v


def _hfmaml(c: dict) -> HFMAML:
    return HFMAML(c["inner_lr"], c["inner_steps"], delta=c.get("delta"), rho=c.get("rho") or 1.0,
                  fd_dtype=torch.float64 if c.get("fd_float64") else None)


def _sharp(low: bool, up: bool, esam: bool = False) -> Callable[[dict], Algorithm]:
    def make(c: dict) -> SharpMAML:
        kw = {}
        if esam:
            kw = dict(swp_keep_prob=c.get("swp_keep_prob"),
                      sds_ratio=DEFAULT_SDS_RATIO if c.get("sds_ratio") is None else c["sds_ratio"])
        return SharpMAML(c["inner_lr"], c["inner_steps"],
                         alpha_low=_radius(c, "alpha_low") if low else 0.0,
                         alpha_up=_radius(c, "alpha_up") if up else 0.0,
                         first_order=bool(c.get("first_order")), seed=c.get("seed"), **kw)
    return make


# name -> factory(config dict) -> Algorithm. Config keys: inner_lr, inner_steps, plus the
# options each algorithm declares in OPTIONS below (missing keys -> defaults, so older
# checkpoints still load).
FACTORIES: dict[str, Callable[[dict], Algorithm]] = {
    "maml": lambda c: MAML(c["inner_lr"], c["inner_steps"]),
    "fomaml": lambda c: FOMAML(c["inner_lr"], c["inner_steps"]),
    "hfmaml": _hfmaml,
    "sharp-low": _sharp(low=True, up=False),
    "sharp-up": _sharp(low=False, up=True),
    "sharp-both": _sharp(low=True, up=True),
    "esharp-low": _sharp(low=True, up=False, esam=True),
}

# Extra command-line options: (flag, kwargs for argparse.add_argument).
OPTIONS: list[tuple[str, dict]] = [
    ("--alpha-low", dict(type=float, default=None,
                         help=f"Sharp-MAML inner SAM radius (sharp-low/-both, esharp-low; default {DEFAULT_RADIUS})")),
    ("--alpha-up", dict(type=float, default=None,
                        help=f"Sharp-MAML meta SAM radius (sharp-up/-both; default {DEFAULT_RADIUS})")),
    ("--first-order", dict(action="store_true", help="Sharp-MAML: hold inner gradients constant")),
    ("--swp-keep-prob", dict(type=float, default=None, help="esharp-low: ESAM SWP keep probability xi (default off)")),
    ("--sds-ratio", dict(type=float, default=None,
                         help=f"esharp-low: ESAM SDS ratio mu (default {DEFAULT_SDS_RATIO})")),
    ("--delta", dict(type=float, default=None, help="hfmaml: fixed finite-difference step (default: Thm 4.17 rule)")),
    ("--rho", dict(type=float, default=None, help="hfmaml: Hessian Lipschitz constant for the delta rule (default 1)")),
    ("--fd-float64", dict(action="store_true", help="hfmaml: perturbed gradients in float64")),
]


def add_algorithm_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--algo", default="maml", choices=sorted(FACTORIES), help="meta-learning algorithm")
    for flag, kw in OPTIONS:
        parser.add_argument(flag, **kw)


def build_algorithm(config: dict) -> Algorithm:
    name = config.get("algo", "maml")
    if name not in FACTORIES:
        raise ValueError(f"algo: unknown algorithm {name!r}; choose from {sorted(FACTORIES)}")
    return FACTORIES[name](config)
