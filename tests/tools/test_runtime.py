"""The shared console-script runtime: errors, signals and stats behave the same everywhere."""

import argparse
import json
import signal
import subprocess
import sys
import textwrap

import pytest

from cliruntime import (
    ConfigError,
    host_port,
    int_list,
    make_parser,
    probability,
    run_async,
    run_sync,
)


def test_host_port_accepts_ipv4_ipv6_and_names():
    assert host_port("127.0.0.1:80") == ("127.0.0.1", 80)
    assert host_port("[::1]:8080") == ("::1", 8080)
    assert host_port("localhost:0") == ("localhost", 0)


@pytest.mark.parametrize("text", ["127.0.0.1", ":80", "host:x", "host:70000"])
def test_host_port_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        host_port(text)


def test_small_types():
    assert int_list("1,2, 4") == [1, 2, 4]
    assert probability("0.05") == 0.05
    with pytest.raises(argparse.ArgumentTypeError):
        probability("1.5")


def test_config_error_is_one_line_and_exit_2(capsys, tmp_path):
    async def amain(args, ctx):
        ctx.stats["seen"] += 1
        raise ConfigError("no such road network: city.xml")

    stats = tmp_path / "stats.json"
    status = run_async(make_parser("tool", "d"), amain, ["--stats-json", str(stats)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == ["tool: error: no such road network: city.xml"]
    assert json.loads(stats.read_text()) == {"seen": 1}


def test_bad_argument_exits_2():
    with pytest.raises(SystemExit) as info:
        run_sync(make_parser("tool", "d"), lambda a, s: 0, ["--log-level", "loud"])
    assert info.value.code == 2


def test_run_sync_writes_structured_stats(tmp_path):
    def fn(args, stats):
        stats["packets"] += 3
        stats.providers["table"] = lambda: {"rows": 2}

    out = tmp_path / "s.json"
    assert run_sync(make_parser("tool", "d"), fn, ["--stats-json", str(out)]) == 0
    assert json.loads(out.read_text()) == {"packets": 3, "table": {"rows": 2}}


SCRIPT = textwrap.dedent(
    """
    import sys
    from cliruntime import make_parser, run_async

    async def amain(args, ctx):
        print("ready", flush=True)
        await ctx.stop.wait()
        ctx.stats["stopped_cleanly"] = 1
        return 0

    sys.exit(run_async(make_parser("waiter", "d"), amain, sys.argv[1:]))
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_and_writes_stats(tmp_path, sig):
    stats = tmp_path / "stats.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, "--stats-json", str(stats)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
    assert json.loads(stats.read_text()) == {"stopped_cleanly": 1}
