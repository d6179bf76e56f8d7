"""Domain modules raise their own typed errors, never the CLI's ConfigError; each console script
names the ones that mean "bad configuration" and reports them as one line, exit status 2."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from cliruntime import ConfigError


def _taken_port(kind: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return sock


def _run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60)


def test_a_trace_that_is_not_one_is_a_trace_error(tmp_path):
    from fcd.trace import Trace, TraceError

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(TraceError, match="cannot read trace") as err:
        Trace.load(bad)
    assert not isinstance(err.value, ConfigError)
    # fcd-gen names TraceError: one line, exit 2
    out = _run_module("fcd.gen", "--trace", str(bad), "--targets", "127.0.0.1:9")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("fcd-gen: error: cannot read trace")
    assert "Traceback" not in out.stderr


async def test_the_impairing_relay_raises_relay_errors():
    from mmpog.impair import Impairment, ImpairingRelay, RelayError

    with pytest.raises(RelayError, match="probabilities"):
        Impairment(loss=1.5).validate()
    with pytest.raises(RelayError, match="non-negative"):
        ImpairingRelay(("127.0.0.1", 0), ("127.0.0.1", 9), Impairment(delay=-1), Impairment())
    with _taken_port(socket.SOCK_DGRAM) as taken:
        relay = ImpairingRelay(taken.getsockname(), ("127.0.0.1", 9), Impairment(), Impairment())
        with pytest.raises(RelayError, match="cannot bind"):
            await relay.start()


def test_the_impairing_relay_cli_reports_a_taken_port_in_one_line():
    with _taken_port(socket.SOCK_DGRAM) as taken:
        host, port = taken.getsockname()
        out = _run_module("mmpog.impair", "--listen", f"{host}:{port}", "--upstream", "127.0.0.1:9")
    assert out.returncode == 2, out.stderr
    assert f"error: cannot bind {host}:{port}" in out.stderr and "Traceback" not in out.stderr


def test_the_game_client_checks_its_position_while_parsing():
    out = _run_module("mmpog.client", "--position", "1;2")
    assert out.returncode == 2
    assert "--position: expected X,Y, got '1;2'" in out.stderr


async def test_start_http_raises_http_setup_errors():
    from boxcore.http import HttpSetupError, start_http

    with pytest.raises(HttpSetupError, match="not a loopback address"):
        await start_http(None, "192.0.2.1", 0)
    with _taken_port(socket.SOCK_STREAM) as taken:
        with pytest.raises(HttpSetupError, match="cannot serve HTTP"):
            await start_http(None, *taken.getsockname())


def test_boxd_reports_a_taken_http_port_in_one_line(tmp_path):
    with _taken_port(socket.SOCK_STREAM) as taken:
        host, port = taken.getsockname()
        out = _run_module("boxcore.boxd", "--engine", "user", "--control", str(tmp_path / "c.sock"),
                          "--state", str(tmp_path / "st"), "--http", f"{host}:{port}")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"boxd: error: cannot serve HTTP on {host}:{port}")
    assert "Traceback" not in out.stderr


def test_the_emulator_names_the_interface_it_cannot_open():
    import asyncio

    from npdrv.card import Card, CardConfig
    from npdrv.controlpoint import ControlPoint
    from npdrv.emulator import Emulator, EmulatorError

    card = Card(CardConfig(ports=2, port_macs=(b"\x02" * 6, b"\x04" * 6)))
    emu = Emulator(card, ControlPoint(card, b"\x06" * 6), ["bbnoport0", "bbnoport1"], ["bbnohost0", "bbnohost1"],
                   "bbnoctl", 1 << 16)
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(EmulatorError, match="cannot open card interface 'bbnoport0'"):
            emu.open(loop)
    finally:
        for sock in emu.socks.values():
            sock.close()
        loop.close()
