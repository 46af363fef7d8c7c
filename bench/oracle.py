"""The plain per-task reference loops of ``tests/reference.py``, loaded by file path.

The benchmarks time and check against the same loops the tests use as their oracle, so the two
never drift. They are loaded from the file under the private module name
``fastmeta_bench_reference`` rather than imported as ``tests.reference``: ``tests`` is a common
top-level package name (learn2learn 0.2.0 installs one), and whichever comes first on the path
would shadow the repository's folder. ``tests/`` itself imports the file as ``reference``.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PATH = Path(__file__).resolve().parents[1] / "tests" / "reference.py"
MODULE = "fastmeta_bench_reference"


def load():
    """The loaded module (once per process; later calls return the same module)."""
    if MODULE in sys.modules:
        return sys.modules[MODULE]
    if not PATH.is_file():
        raise ImportError(f"the plain reference loops are missing: {PATH} not found", path=str(PATH))
    spec = importlib.util.spec_from_file_location(MODULE, PATH)
    mod = importlib.util.module_from_spec(spec)
    # Registered before it runs, as an import would: dataclasses and pickling look the module up.
    sys.modules[MODULE] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[MODULE]
        raise
    return mod


reference = load()
flat = reference.flat
maml_meta_grad = reference.maml_meta_grad
rel_err = reference.rel_err
