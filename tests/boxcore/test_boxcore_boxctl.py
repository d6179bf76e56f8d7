"""boxctl against a real boxd: every command, tables and JSON, over --control and --http."""

import json
import socket

import pytest

from boxcore import boxctl
from boxcore.booster import Booster
from boxcore.rules import Match
from boxcore.testing import BoxdProcess, free_port

pytestmark = pytest.mark.timeout(60)


async def test_every_command_both_ways(tmp_path, capsys):
    listen = f"udp:127.0.0.1:{free_port(socket.SOCK_DGRAM)}=127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
    async with BoxdProcess(tmp_path, listens=[listen]) as boxd:
        async with Booster("shown", control=boxd.control) as b:
            sub = await b.copy(Match(proto="udp", dst_port=4444), lambda p: None)
            for where in (["--control", str(boxd.control)], ["--http", boxd.http_url]):
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
