"""``fastmeta bench`` finds the checkout's suite by file path, whatever else is installed.

learn2learn 0.2.0 installs a top-level package named ``tests``; a bench that imported
``tests.reference`` got that package instead of the repository's folder and died with
``ModuleNotFoundError: No module named 'tests.reference'``. Here a package of that name is put
on the path ahead of everything else, and the command must still run end to end.
"""
import argparse
import os
import subprocess
import sys

import pytest

from fastmeta.cli import bench as bench_cmd


def _env_with_foreign_tests(tmp_path):
    pkg = tmp_path / "site" / "tests"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")  # as learn2learn ships it: an empty package
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site")] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _fastmeta(argv, env, cwd):
    code = f"import sys; from fastmeta.cli import main; sys.exit(main({argv!r}))"
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_bench_runs_with_a_foreign_tests_package_first_on_the_path(tmp_path):
    env = _env_with_foreign_tests(tmp_path)
    work = tmp_path / "work"  # not the repository: the command must not rely on the current directory
    work.mkdir()
    # The hazard is real in this environment: `import tests` finds the foreign package.
    probe = subprocess.run([sys.executable, "-c", "import tests; print(tests.__file__)"], env=env, cwd=work,
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0 and probe.stdout.strip() == str(tmp_path / "site" / "tests" / "__init__.py")

    r = _fastmeta(["bench", "--help"], env, work)
    assert r.returncode == 0, r.stderr
    assert "--full" in r.stdout

    out = tmp_path / "out"
    r = _fastmeta(["bench", "--smoke", "--no-peers", "--no-rss", "--out", str(out)], env, work)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    md = (out / "bench.md").read_text()
    assert "| plain loop |" in md and "| fastmeta |" in md and "| compute floor |" in md
    assert "**wrong**" not in md and "Command: `fastmeta bench --smoke`" in md


def test_bench_without_a_checkout_says_what_is_missing(tmp_path, monkeypatch):
    # As installed from a wheel: no bench/ beside the package.
    monkeypatch.setattr(bench_cmd, "REPO", tmp_path)
    monkeypatch.setattr(bench_cmd, "SUITE", tmp_path / "bench" / "cli.py")
    monkeypatch.delitem(sys.modules, bench_cmd.MODULE, raising=False)
    parser = argparse.ArgumentParser(prog="fastmeta")
    bench_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--full", "--out", "x"])
    with pytest.raises(SystemExit, match="needs the source checkout's bench/"):
        args.func(args)
