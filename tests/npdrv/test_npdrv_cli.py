"""np4gs3-emu and npctl on bad arguments: exit status 2 and one clear line."""

import subprocess

import pytest

from npdrv_netlab import VENV_BIN


@pytest.mark.parametrize("argv, says", [
    (["np4gs3-emu", "--name", "bbnpcli-x", "--create"], "--create needs --box-netns, --port0 and --port1"),
    (["np4gs3-emu", "--name", "bbnpcli-x", "--code", "turbo"], "--code must be one of"),
    (["np4gs3-emu", "--name", "bbnpcli-x", "--ports", "p0"], "expected two interface names"),
    (["np4gs3-emu", "--name", "bbnpcli-x", "--port-macs", "zz"], "bad MAC address"),
    (["npctl", "--iface", "npc", "--netns", "bbnpcli-missing", "echo"], "no network namespace"),
])
def test_bad_arguments_exit_2_with_one_line(argv, says):
    proc = subprocess.run([str(VENV_BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert says in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_has_examples():
    for tool in ("np4gs3-emu", "npctl"):
        out = subprocess.run([str(VENV_BIN / tool), "--help"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "examples:" in out.stdout
