"""The docs build strictly and their Python code blocks run (the README is checked in test_readme.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Pages whose ```python blocks are executed, in order, one namespace per page.
EXECUTED = ["quickstart.md"] + sorted(p.name for p in (ROOT / "docs" / "tutorials").glob("*.md"))


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.parametrize("page", EXECUTED)
def test_docs_code_blocks_run(page, tmp_path, monkeypatch):
    path = ROOT / "docs" / page if page == "quickstart.md" else ROOT / "docs" / "tutorials" / page
    blocks = _python_blocks(path.read_text())
    assert blocks, f"{page} has no python code blocks"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{page}[block {i}]", "exec"), namespace)
        except Exception as exc:  # name the page and block in the failure
            raise AssertionError(f"{page}, python block {i} failed: {exc!r}") from exc


@pytest.mark.skipif(
    shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists(),
    reason="mkdocs is not installed (pip install -e '.[docs]')",
)
def test_mkdocs_build_strict(tmp_path):
    """The site builds in strict mode at mkdocs' default log level, so every warning (a griffe docstring warning, a
    broken link) fails the build and is shown here. ``-q`` would hide warnings from strict mode too."""
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    out = subprocess.run(
        [mkdocs, "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert "WARNING" not in log, log
