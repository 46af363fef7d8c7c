"""README.md is a user document: its examples must run and its links must resolve.

Every ```python fenced block of README.md runs as written, each in a fresh interpreter (the repo's
own python, this checkout first on the path), and must finish within a minute. Blocks that must not
run are tagged with another language (```bash, ```text). Relative links in README.md and docs/*.md
must point at files that exist, and ``#anchors`` at headings of the target page.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
TIMEOUT_S = 120  # per block; each takes seconds

_FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)


def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """``(language, code, first line number)`` of every fenced block."""
    return [(m.group(1).lower(), m.group(2), text.count("\n", 0, m.start()) + 2) for m in _FENCE.finditer(text)]


def python_blocks() -> list[tuple[str, int]]:
    return [(code, line) for lang, code, line in fenced_blocks(README.read_text()) if lang in ("python", "py")]


def test_readme_has_python_examples():
    assert python_blocks(), "README.md: no ```python block (the 'Use it in your code' example)"


@pytest.mark.parametrize("index", range(len(python_blocks())), ids=lambda i: f"block{i + 1}")
def test_readme_python_block_runs(index, tmp_path):
    code, line = python_blocks()[index]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("TRITON_INTERPRET", "1")
    script = tmp_path / f"readme_block{index + 1}.py"
    script.write_text(code)
    try:
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"README.md line {line}: the block did not finish in {TIMEOUT_S} s:\n{code}\n"
                    f"--- output so far ---\n{e.stdout or ''}{e.stderr or ''}")
    if proc.returncode != 0:
        pytest.fail(f"README.md line {line}: the block failed (exit {proc.returncode}):\n{code}\n"
                    f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")


def test_readme_test_command_block():
    """.ci/run extracts the CI command from between these markers with awk."""
    text = README.read_text()
    m = re.search(r"<!-- test-command -->\n```bash\n(.+)\n```\n<!-- /test-command -->", text)
    assert m, "README.md: the test-command block (between the <!-- test-command --> markers) is missing or reshaped"
    assert "python -m pytest" in m.group(1)


def test_readme_length():
    n = len(README.read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines; depth belongs in docs/"


def _slug(heading: str) -> str:
    """GitHub's heading anchor: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text())  # a '#' line inside a code block is not a heading
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", text, re.M):
        s = _slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def _links(path: Path) -> list[str]:
    text = _FENCE.sub("", path.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for link in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        dest = (page.parent / target).resolve() if target else page
        if not dest.exists():
            bad.append(f"{link}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{link}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}:\n" + "\n".join(bad)


def test_readme_links_every_docs_page():
    links = {(README.parent / link.partition("#")[0]).resolve() for link in _links(README)}
    missing = [str(p.relative_to(ROOT)) for p in DOCS if p.resolve() not in links]
    assert not missing, f"README.md does not link {missing}"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_user_docs_cite_nothing_outside_the_repository(page):
    """../shared and its notes do not ship to users."""
    text = page.read_text()
    for word in ("../shared", "DESIGN.md", "BUILD.md"):
        assert word not in text, f"{page.relative_to(ROOT)} mentions {word}, which users do not have"
