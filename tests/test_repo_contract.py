"""The README's set-up commands are what CI runs, and the CLI's help is complete."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, re.S)[:2]


def test_readme_starts_with_two_setup_commands_and_ci_runs_the_second_verbatim():
    cmds = _setup_commands()
    assert len(cmds) == 2 and all("\n" not in c for c in cmds)
    assert "lrp-kernels explain" in cmds[0] and "pytest" in cmds[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert cmds[1] in ci, ".ci/run must run the README's test command verbatim"


def test_cli_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "lrp_kernels.cli", "--help"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    for name in ("explain", "compare", "profile", "build-ext", "info"):
        assert name in out, f"{name} missing from lrp-kernels --help"
