"""The README's set-up and test commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line.strip() for block in blocks[:2] for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_setup_and_test_commands():
    commands = _readme_commands()
    setup, test = commands[0], commands[-1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup.startswith("pip install") and setup in ci
    assert test in ci
    assert "venv" in ci and "torch==2.13.0" in ci
