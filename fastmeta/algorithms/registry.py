"""Algorithms by name, for the CLI and for checkpoints (which store the config, not objects)."""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from .base import Algorithm
from .hfmaml import HFMAML
from .mamlpp import MAMLPlusPlus
from .maml import FOMAML, MAML
from .metasgd import MetaSGD
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
    if c.get("first_order"):
        # HF-MAML's point is the Hessian term, estimated by finite differences (Fallah et al.
        # eqs. 9-11); dropping it is FO-MAML, which has its own name.
        raise ValueError("first_order: --algo hfmaml has no first-order variant (its Hessian-vector product is "
                         "estimated by finite differences); drop --first-order, or use --algo fomaml")
    return HFMAML(c["inner_lr"], c["inner_steps"], delta=c.get("delta"), rho=c.get("rho") or 1.0,
                  fd_dtype=torch.float64 if c.get("fd_float64") else None)


def _inner_opt(c: dict):
    """The ``inner_optimizer`` config key (None, "sgd", "adam" or a dict) with the flat ``inner_*``
    hyperparameter keys of the CLI folded in; ``ValueError`` naming the key when one is given
    without an optimizer that takes it."""
    spec = c.get("inner_optimizer")
    kw = {k: c.get("inner_" + k) for k in ("momentum", "nesterov", "weight_decay", "betas", "eps")}
    kw = {k: v for k, v in kw.items() if v not in (None, False)}
    if spec is None:
        if kw:
            raise ValueError(f"inner_{sorted(kw)[0]}: needs --inner-optimizer (sgd or adam)")
        return None
    spec = dict(spec) if isinstance(spec, dict) else {"name": spec}
    allowed = {"sgd": ("momentum", "nesterov", "weight_decay"), "adam": ("betas", "eps", "weight_decay")}
    for k in kw:
        if k not in allowed.get(spec.get("name"), ()):
            raise ValueError(f"inner_{k}: not an option of --inner-optimizer {spec.get('name')!r}")
    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    return {**spec, **kw}


def _mamlpp(c: dict) -> MAMLPlusPlus:
    kw = {k: c[k] for k in ("msl_epochs", "first_order_epochs", "steps_per_epoch") if c.get(k) is not None}
    return MAMLPlusPlus(c["inner_lr"], c["inner_steps"], first_order=bool(c.get("first_order")),
                        lslr=not c.get("no_lslr"), inner_optimizer=_inner_opt(c), **kw)


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
# checkpoints still load). first_order: every factory honours it (fomaml is first-order anyway)
# except hfmaml, which refuses it; tests/test_train_tasks.py holds new ones to that.
FACTORIES: dict[str, Callable[[dict], Algorithm]] = {
    "maml": lambda c: MAML(c["inner_lr"], c["inner_steps"], first_order=bool(c.get("first_order")),
                           inner_optimizer=_inner_opt(c), recompute=bool(c.get("recompute"))),
    "fomaml": lambda c: FOMAML(c["inner_lr"], c["inner_steps"], inner_optimizer=_inner_opt(c)),
    "metasgd": lambda c: MetaSGD(c["inner_lr"], c["inner_steps"], first_order=bool(c.get("first_order")),
                                 inner_optimizer=_inner_opt(c)),
    "mamlpp": _mamlpp,
    "hfmaml": _hfmaml,
    "sharp-low": _sharp(low=True, up=False),
    "sharp-up": _sharp(low=False, up=True),
    "sharp-both": _sharp(low=True, up=True),
    "esharp-low": _sharp(low=True, up=False, esam=True),
}

# The algorithms that take --inner-optimizer (the others refuse it rather than ignore it).
INNER_OPTIMIZER_ALGOS = ("maml", "fomaml", "metasgd", "mamlpp")

# Extra command-line options: (flag, kwargs for argparse.add_argument).
OPTIONS: list[tuple[str, dict]] = [
    ("--alpha-low", dict(type=float, default=None,
                         help=f"Sharp-MAML inner SAM radius (sharp-low/-both, esharp-low; default {DEFAULT_RADIUS})")),
    ("--alpha-up", dict(type=float, default=None,
                        help=f"Sharp-MAML meta SAM radius (sharp-up/-both; default {DEFAULT_RADIUS})")),
    ("--first-order", dict(action="store_true",
                           help="maml, metasgd, mamlpp, sharp-*, esharp-low: hold inner gradients constant "
                                "(fomaml always does; refused by hfmaml)")),
    ("--swp-keep-prob", dict(type=float, default=None, help="esharp-low: ESAM SWP keep probability xi (default off)")),
    ("--sds-ratio", dict(type=float, default=None,
                         help=f"esharp-low: ESAM SDS ratio mu (default {DEFAULT_SDS_RATIO})")),
    ("--inner-optimizer", dict(default=None, choices=["sgd", "adam"],
                               help="maml, fomaml, metasgd, mamlpp: differentiable inner optimizer (default: plain SGD steps)")),
    ("--inner-momentum", dict(type=float, default=None, help="--inner-optimizer sgd: momentum mu")),
    ("--inner-nesterov", dict(action="store_true", help="--inner-optimizer sgd: Nesterov momentum")),
    ("--inner-weight-decay", dict(type=float, default=None, help="--inner-optimizer sgd/adam: L2 weight decay")),
    ("--inner-betas", dict(type=float, nargs=2, default=None, metavar=("B1", "B2"),
                           help="--inner-optimizer adam: betas (default 0.9 0.999)")),
    ("--inner-eps", dict(type=float, default=None, help="--inner-optimizer adam: eps (default 1e-8)")),
    ("--no-lslr", dict(action="store_true", help="mamlpp: fixed inner_lr instead of learned per-layer per-step rates")),
    ("--msl-epochs", dict(type=int, default=None, help="mamlpp: epochs of the annealed multi-step loss (default 15; 0: off)")),
    ("--first-order-epochs", dict(type=int, default=None,
                                  help="mamlpp: first-order epochs before second order (default 0)")),
    ("--steps-per-epoch", dict(type=int, default=None, help="mamlpp: meta-steps per schedule epoch (default 500)")),
    ("--delta", dict(type=float, default=None, help="hfmaml: fixed finite-difference step (default: Thm 4.17 rule)")),
    ("--rho", dict(type=float, default=None, help="hfmaml: Hessian Lipschitz constant for the delta rule (default 1)")),
    ("--fd-float64", dict(action="store_true", help="hfmaml: perturbed gradients in float64")),
    ("--recompute", dict(action="store_true",
                         help="maml: memory-bounded second order, inner steps recomputed in the meta-backward "
                              "(docs/memory.md)")),
]


def add_algorithm_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--algo", default="maml", choices=sorted(FACTORIES), help="meta-learning algorithm")
    for flag, kw in OPTIONS:
        parser.add_argument(flag, **kw)


def build_algorithm(config: dict) -> Algorithm:
    name = config.get("algo", "maml")
    if name not in FACTORIES:
        raise ValueError(f"algo: unknown algorithm {name!r}; choose from {sorted(FACTORIES)}")
    if config.get("recompute") and name != "maml":
        raise ValueError(f"recompute: only --algo maml recomputes its inner steps, got --algo {name}")
    if config.get("inner_optimizer") is not None and name not in INNER_OPTIMIZER_ALGOS:
        raise ValueError(f"inner_optimizer: --algo {name} takes plain SGD inner steps; an inner optimizer "
                         f"works with {', '.join(INNER_OPTIMIZER_ALGOS)}")
    return FACTORIES[name](config)
