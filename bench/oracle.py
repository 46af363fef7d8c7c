"""The plain per-task reference loops of ``tests/reference.py``, loaded by file path.

The benchmarks time and check against the same loops the tests use as their oracle, so the two
never drift. They are loaded from the file under the private module name
``fastmeta_bench_reference`` rather than imported as ``tests.reference``: ``tests`` is a common
top-level package name (learn2learn 0.2.0 installs one), and whichever comes first on the path
would shadow the repository's folder. ``tests/`` itself imports the file as ``reference``.
"""
from __future__ import annotations

from pathlib import Path

from fastmeta.cli.bench import load_file

PATH = Path(__file__).resolve().parents[1] / "tests" / "reference.py"
MODULE = "fastmeta_bench_reference"


def load():
    """The loaded module (once per process; later calls return the same module)."""
    if not PATH.is_file():
        raise ImportError(f"the plain reference loops are missing: {PATH} not found", path=str(PATH))
    return load_file(MODULE, PATH)


reference = load()
flat = reference.flat
maml_meta_grad = reference.maml_meta_grad
rel_err = reference.rel_err
