"""Every script in examples/ runs (in its --tiny smoke-test form)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ARGS = {
    "prune_and_recover.py": ["--tiny", "--steps", "2"],
    "spiel_custom_loop.py": ["--tiny", "--steps", "6"],
    "s2ft_adapter_switching.py": ["--tiny", "--steps", "2"],
    "multi_gpu_sft.py": ["--tiny", "--cpu", "--steps", "2", "--save-steps", "1"],
}
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


def test_every_example_has_smoke_arguments():
    assert set(SCRIPTS) == set(ARGS), "add the new example's smoke-test arguments to ARGS"


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script, tmp_path):
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *ARGS[script]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": str(EXAMPLES)},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
