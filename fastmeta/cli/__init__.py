"""``fastmeta`` command line: train, evaluate, advise, bench, landscape.

Each subcommand is a module of this package with ``register(subparsers)``: :mod:`.train`,
:mod:`.evaluate`, :mod:`.advise` (learning-rate advice, :mod:`fastmeta.lr`), :mod:`.bench`
(optional: skipped while absent) and :mod:`.landscape` (:mod:`fastmeta.analysis`).

Errors: a user error (a bad argument, missing or unreadable data or checkpoint, an unwritable
output path, a diverging run, a failed rank) prints one line, ``fastmeta <command>: error:
<message>``, and exits with status 2; ``--debug`` adds the traceback. An unknown flag prints the
subcommand's usage, with the nearest known flag when there is one.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import sys
import traceback

from ..distributed import LaunchError, RankFailure
from . import advise, evaluate, landscape, train

# What a user can cause and fix: reported in one line. Anything else is a bug in fastmeta and
# keeps its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError, RankFailure, LaunchError)


def _optional(name: str):
    """The module ``name``, or None when it does not exist (the bench subcommand is optional)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise  # the module exists but something it imports is missing


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    for action in parser._actions:  # argparse keeps no public handle on its subparsers
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def build_parser() -> argparse.ArgumentParser:
    """The ``fastmeta`` parser with every subcommand registered (and ``--debug`` on each)."""
    parser = argparse.ArgumentParser(prog="fastmeta", description="Fast, correct gradient-based meta-learning.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command")
    # In this order in `fastmeta --help`.
    for mod in (train, evaluate, advise, _optional("fastmeta.cli.bench"), landscape):
        if mod is not None:
            mod.register(sub)
    for p in _subparsers(parser).values():
        if "-" in p.prefix_chars and "--debug" not in p._option_string_actions:
            # SUPPRESS: an absent subcommand flag must not overwrite `fastmeta --debug <command>`.
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="show the traceback of an error")
    return parser


def _unrecognized(p: argparse.ArgumentParser, extras: list) -> str:
    msg = f"unrecognized arguments: {' '.join(extras)}"
    known = [o for o in p._option_string_actions if o.startswith("--")]
    hints = []
    for x in extras:
        if x.startswith("-"):
            near = difflib.get_close_matches(x.split("=", 1)[0], known, n=1, cutoff=0.6)
            if near:
                hints.append(f"{x.split('=', 1)[0]} -> {near[0]}")
    return msg + (f" (did you mean: {', '.join(hints)}?)" if hints else "")


def _one_line(e: BaseException) -> str:
    # The first line: further lines (a rank's traceback in a LaunchError) are for --debug.
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def main(argv=None) -> int:
    """Run ``fastmeta <command> ...`` (``argv``: default ``sys.argv[1:]``; none: ``train``'s
    embedded default job); returns the exit status (2 for a user error, after one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        argv = ["train"]  # `fastmeta` alone runs the embedded default job
    args, extras = parser.parse_known_args(argv)
    if args.command is None:
        if extras:
            parser.error(_unrecognized(parser, extras))
        parser.print_help()
        return 2
    sp = _subparsers(parser)[args.command]
    if extras:
        sp.error(_unrecognized(sp, extras))  # the subcommand's usage, not the top level's
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{sp.prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"{sp.prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
