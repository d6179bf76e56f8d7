"""boxctl against a real boxd: every command, tables and JSON, over --control and --http; every
failure is one line on stderr and exit status 2, never a traceback."""

import json
import socket
import subprocess
import sys

import pytest

from boxcore import boxctl
from boxcore.booster import Booster
from boxcore.rules import Match
from boxcore.procs import free_port
from boxcore.testing import BoxdProcess
from hostile import as_uid, shared_dir

pytestmark = pytest.mark.timeout(60)
TOKEN = "boxctl-test-token-0123456789"


async def test_every_command_both_ways(tmp_path, capsys):
    listen = f"udp:127.0.0.1:{free_port(socket.SOCK_DGRAM)}=127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
    token = tmp_path / "token"
    token.write_text(TOKEN)
    async with BoxdProcess(tmp_path, listens=[listen], extra=["--http-token-file", str(token)]) as boxd:
        async with Booster("shown", control=boxd.control) as b:
            sub = await b.copy(Match(proto="udp", dst_port=4444), lambda p: None)
            for where in (["--control", str(boxd.control)],
                          ["--http", boxd.http_url, "--http-token-file", str(token)]):
                for command in boxctl.COMMANDS:
                    assert boxctl.main([*where, command, "--json"]) == 0
                    data = json.loads(capsys.readouterr().out)
                    if command == "status":
                        assert data["engine"] == "user" and data["boosters"] == 1
                    elif command == "boosters":
                        assert [x["name"] for x in data] == ["shown"]
                    elif command == "rules":
                        assert data[0]["cookie"] == sub.cookie and data[0]["match_text"] == "udp dport 4444"
                    else:
                        assert str(sub.cookie) in data["rules"] and "rules_installed" in data["events"]
                    assert boxctl.main([*where, command]) == 0
                    table = capsys.readouterr().out
                    assert {"status": "engine", "boosters": "shown", "rules": "udp dport 4444",
                            "counters": "rule counters"}[command] in table
            # per-booster data over HTTP needs the token
            assert boxctl.main(["--http", boxd.http_url, "boosters", "--json"]) == 2
            assert "401" in capsys.readouterr().err


def run_boxctl(*args, user=None):
    prefix = ["setpriv", "--reuid", str(user), "--regid", str(user), "--clear-groups"] if user else []
    return subprocess.run([*prefix, sys.executable, "-m", "boxcore.boxctl", *args], capture_output=True,
                          text=True, timeout=30)


def one_line_error(out):
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr
    assert out.stderr.startswith("boxctl: error:")
    return out.stderr


async def test_every_failure_is_one_line(tmp_path):
    # boxd gone
    assert "cannot reach boxd" in one_line_error(run_boxctl("--control", str(tmp_path / "none.sock"), "status"))
    assert "cannot reach boxd" in one_line_error(run_boxctl("--http", "http://127.0.0.1:1", "status"))
    policy = tmp_path / "policy.toml"
    policy.write_text('[[grant]]\nboosters = "x"\nactions = ["copy"]\n')
    with shared_dir() as shared:
        await _denied_and_too_many(shared, policy)
    # boxd sends garbage
    path = tmp_path / "fake.sock"
    fake = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fake.bind(str(path))
    fake.listen(1)
    proc = subprocess.Popen([sys.executable, "-m", "boxcore.boxctl", "--control", str(path), "status"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    conn, _ = fake.accept()
    conn.sendall(b"\x00\x00\x00\x00")
    _, stderr = proc.communicate(timeout=30)
    conn.close()
    fake.close()
    assert proc.returncode == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr


async def _denied_and_too_many(shared, policy):
    async with BoxdProcess(shared, policy=policy, http=False,
                           extra=["--control-mode", "0660", "--control-group", "65534",
                                  "--max-sessions-per-uid", "2"]) as boxd:
        # denied: uid 65534 reaches the socket (its group) but the policy lets it query nothing
        err = one_line_error(run_boxctl("--control", str(boxd.control), "status", user=65534))
        assert "PERMISSION_DENIED" in err and "may not query" in err
        # too many sessions: uid 65534 already holds its two connections
        out = as_uid(f"""
            from boxcore import boxctl
            socks = [socket.socket(socket.AF_UNIX) for _ in range(2)]
            for s in socks:
                s.connect({str(boxd.control)!r})
            # no wait needed: boxd accepts in connection order and counts a connection as it
            # accepts it, so these two count before boxctl's third
            sys.exit(boxctl.main(["--control", {str(boxd.control)!r}, "status"]))
        """)
        assert "closed the connection" in one_line_error(out)
