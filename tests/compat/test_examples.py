"""Every program in examples/ runs for 2 steps on small data (its synthetic stand-in, or the real
Omniglot subsets where present), exits 0 and prints finite losses."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Each run is a fresh interpreter importing torch and fastmeta (20-40 s under a loaded 2-core CI).
pytestmark = pytest.mark.slow
PROGRAMS = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


def run_example(name, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(EXAMPLES / name), "--steps", "2", "--meta-batch", "2", *extra],
                       capture_output=True, text=True, timeout=600, env=env, cwd=EXAMPLES.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [float(v) for v in re.findall(r"^step \d+ loss (\S+)", r.stdout, re.M)]
    assert len(losses) == 2, r.stdout[-2000:]
    assert all(math.isfinite(v) for v in losses), r.stdout
    return losses


def test_every_example_is_listed():
    assert len(PROGRAMS) == 8, PROGRAMS


@pytest.mark.parametrize("name", PROGRAMS)
def test_example_runs(name):
    run_example(name)


@pytest.mark.parametrize("name", ["l2l_maml_omniglot.py", "higher_maml_omniglot_fastmeta.py"])
def test_example_on_real_omniglot(name, omniglot_zips):
    run_example(name, "--data", *map(str, omniglot_zips))
