"""``fastmeta`` command line: train, evaluate, advise, bench, landscape.

Each subcommand is a module of this package with ``register(subparsers)``: :mod:`.train`,
:mod:`.evaluate`, :mod:`.advise` (learning-rate advice, :mod:`fastmeta.lr`), :mod:`.bench`
(optional: skipped while absent) and :mod:`.landscape` (:mod:`fastmeta.analysis`).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import advise, evaluate, landscape, train


def _optional(name: str):
    """The module ``name``, or None when it does not exist (the bench subcommand is optional)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise  # the module exists but something it imports is missing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmeta", description="Fast, correct gradient-based meta-learning.")
    sub = parser.add_subparsers(dest="command")
    # In this order in `fastmeta --help`.
    for mod in (train, evaluate, advise, _optional("fastmeta.cli.bench"), landscape):
        if mod is not None:
            mod.register(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        argv = ["train"]  # `fastmeta` alone runs the embedded default job
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)
