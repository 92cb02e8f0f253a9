"""The README's claims: it opens with the two set-up commands, CI runs the test one, and its facts match the code."""

from __future__ import annotations

import re
from pathlib import Path

import sparse_peft_cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()


def _opening_commands() -> list[str]:
    first_heading = README.find("\n## ")
    blocks = re.finditer(r"```bash\n(.*?)\n\s*```", README, flags=re.S)
    return [m.group(1).strip() for m in blocks if m.start() < first_heading]


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    opening = _opening_commands()
    assert len(opening) == 2, "README must open with exactly two set-up commands"
    demo, tests = opening
    assert demo.endswith("sparse-peft demo") and "pip install" in demo
    assert "pytest" in tests and "pip install" in tests
    assert tests in CI, ".ci/run must run the README's test command verbatim"
    assert README[: README.find("\n## ")].count("```") == 4, "no other code block before the first heading"


def test_files_that_ci_cites_exist():
    for cited in re.findall(r"tests/\w+\.py", CI):
        assert (ROOT / cited).is_file(), f".ci/run cites {cited}, which does not exist"


def test_readme_tells_cpu_users_how_to_get_the_cpu_build_of_torch():
    assert "--index-url https://download.pytorch.org/whl/cpu" in README
    assert "so a CPU machine gets the CPU build" not in README  # only true with a local CPU wheel


def test_readme_names_where_the_demo_and_the_model_cache_write():
    assert f"`{sparse_peft_cli.DEMO_OUT}`" in README and "--overwrite" in README
    assert "~/.cache/sparse_peft" in README
    assert f"same {sparse_peft_cli.DEMO_DEFAULTS['steps']} optimizer steps" in README
