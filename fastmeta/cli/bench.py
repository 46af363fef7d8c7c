"""``fastmeta bench``: the subcommand's entry; the benchmark itself lives in the source checkout.

The suite (``bench/``, with its command in ``bench/cli.py``) and the plain reference loops it
checks against (``tests/reference.py``) are not part of the installed package, so this command runs
from a checkout (``pip install -e .``), not from a wheel. ``bench/cli.py`` is loaded by file path
under a private module name: importing the checkout's folders as packages (``bench``, ``tests``)
would pick up whatever installed package has the same name first.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "bench" / "cli.py"
MODULE = "fastmeta_bench_cli"
HELP = "benchmark fastmeta vs peers and the compute floor (markdown + PNG)"


def _missing() -> str | None:
    """Why the suite cannot run from here, or None."""
    if SUITE.is_file() and (REPO / "tests" / "reference.py").is_file():
        return None
    return (f"fastmeta bench: needs the source checkout's bench/ and tests/reference.py (not found under {REPO}; "
            "a wheel does not ship them: install from a checkout with pip install -e .)")


def load_file(name: str, path: Path):
    """The Python file ``path`` as module ``name``, loaded once per process (later calls return the
    same module). Registered in ``sys.modules`` before it runs, as an import would: dataclasses and
    pickling look the module up by name."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


def suite():
    """``bench/cli.py`` of the checkout, loaded once per process (the same module on every call)."""
    why = None if MODULE in sys.modules else _missing()
    if why:
        raise SystemExit(why)
    return load_file(MODULE, SUITE)


def run(args) -> int:
    return suite().run(args)


def register(subparsers) -> None:
    if _missing():
        # Without the checkout there are no options to offer. Nothing counts as an option here
        # (no prefix character can occur in an argument), so any arguments, --help included, reach
        # run(), which says what is missing instead of argparse's "unrecognized arguments".
        p = subparsers.add_parser("bench", help=HELP, prefix_chars="\0", add_help=False)
        p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    else:
        p = subparsers.add_parser("bench", help=HELP, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        suite().add_arguments(p)
    p.set_defaults(func=run)
