"""The documentation: the site builds with zero warnings, tutorial pages run as written, and
the README stays a front page inside the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TESTED = re.compile(r"^<!-- tested:", re.M)
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def tutorial_pages() -> list[Path]:
    """Pages that declare their python blocks runnable (first line after the title)."""
    return sorted(p for p in DOCS.glob("*.md") if TESTED.search(p.read_text(encoding="utf-8")))


def test_the_docs_site_builds_with_zero_warnings(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "WARNING" not in out.stderr, out.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    # the reference is generated from docstrings, so public functions and their parameters show
    for name in ("segment_he", "simulate_dataset", "open_slide", "run_gate", "train_bootstrap"):
        assert name in api, name
    assert "return_types" in api


def test_every_docs_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = {p.name for p in DOCS.glob("*.md")}
    assert pages, "no docs pages"
    missing = sorted(p for p in pages if f": {p}" not in nav)
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"


def test_there_is_a_tutorial_page_with_code():
    pages = tutorial_pages()
    assert pages, "no page is marked tested"
    assert all(PYTHON_BLOCK.findall(p.read_text(encoding="utf-8")) for p in pages)


@pytest.mark.parametrize("page", tutorial_pages(), ids=lambda p: p.name)
def test_tutorial_code_runs_as_written(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = PYTHON_BLOCK.findall(page.read_text(encoding="utf-8"))
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the message is the point
            pytest.fail(f"{page.name}, python block {i} failed: {err!r}\n{code}")
    assert capsys.readouterr().out.strip(), "the tutorial printed nothing"


def test_the_readme_is_a_front_page_inside_the_repository():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = readme.splitlines()
    assert len(lines) <= 200, len(lines)
    assert lines[3].startswith("make demo") and lines[4].startswith("make test")
    assert "../" not in readme, "the README points outside the repository"
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to a missing file: {target}"


def test_the_tests_the_docs_cite_exist():
    """Pages cite tests (``tests/x.py::test_name``); each must exist, so a renamed or removed
    test cannot leave a promise unchecked while the page still claims it."""
    cited = set()
    for page in DOCS.glob("*.md"):
        text = page.read_text(encoding="utf-8")
        cited |= set(re.findall(r"(tests/[\w/]+\.py)::(\w+)", text))
        cited |= {(m, None) for m in re.findall(r"`(tests/[\w/]+\.py)`", text)}
    assert cited, "no page cites a test"
    for path, name in sorted(cited, key=str):
        file = ROOT / path
        assert file.is_file(), f"docs cite a missing test file {path}"
        if name:
            assert re.search(rf"def {name}\(", file.read_text(encoding="utf-8")), f"{path}::{name}"
