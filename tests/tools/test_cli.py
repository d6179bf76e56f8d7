"""Every console script keeps the suite's conventions: --help with examples, and a bad
argument is one clear line on stderr with exit status 2."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
BIN = Path(sys.executable).parent


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / script), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_has_examples(script):
    result = run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert "examples:" in result.stdout
    assert "--log-level" in result.stdout or script == "booster-loadgen"


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_argument_is_one_line_and_exit_2(script):
    result = run(script, "--no-such-flag")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{script}: error: ")
