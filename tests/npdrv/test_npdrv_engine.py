"""The np engine end to end: boxd --engine np on the host of an emulated card, real boosters.

client 10.1.0.2 -- [card p0 | p1] -- server 10.2.0.2, the box (np0, np1, npc) the card's host.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cliruntime.procs import Role, python_module, script
from npdrv import netns
from npdrv.driver import NpDriver
from npdrv.wire import Table
from tests.polling import until

from npdrv_netlab import MARKER, card_lab, receive_until_marker

pytestmark = pytest.mark.root

PY = sys.executable
TEST_BOOSTER = str(Path(__file__).parent.parent / "linux" / "linux_test_booster.py")
SERVER = "10.2.0.2"


def start_boxd(lab, workdir: Path, name: str = "boxd") -> Role:
    boxd = lab.start_in_box(name, [*python_module("boxcore.boxd"), "--engine", "np", "--control",
                                   str(workdir / f"{name}.sock"), "--state", str(workdir / f"{name}-state"),
                                   "--heartbeat", "0.25", "--np-sync", "0.2", "--log-level", "info"], stats=False)
    lab.group.wait_for_log_sync(boxd, "boxd ready")
    return boxd


def control(boxd: Role) -> str:
    return boxd.argv[boxd.argv.index("--control") + 1]


def start_booster(lab, boxd: Role, name: str, argv: list[str]) -> Role:
    """A booster in the box; the test booster prints one JSON event a line (its log lines do not
    start with a brace)."""
    return lab.start_in_box(name, [*argv, "--control", control(boxd)], stats=False)


def events(booster: Role) -> list[dict]:
    return [json.loads(line) for line in booster.output().splitlines() if line.startswith("{")]


def wait_for(booster: Role, predicate, lab) -> dict:
    found: list[dict] = []

    def seen() -> bool:
        found[:] = [e for e in events(booster) if predicate(e)]
        return bool(found)
    lab.group.wait_until_sync(booster, seen, 15, "event not seen")
    return found[0]


def exchange(lab, payloads: list[bytes], port: int) -> list[bytes]:
    """Send ``payloads`` from the client to the server's ``port``, then a marker on the same path;
    what the server received before the marker."""
    rx = lab.udp(lab.server, (SERVER, port), 5.0)
    tx = lab.udp(lab.client, ("10.1.0.2", 0))
    try:
        for payload in payloads:
            tx.sendto(payload, (SERVER, port))
            time.sleep(0.002)       # pacing, not synchronisation
        tx.sendto(MARKER, (SERVER, port))
        return receive_until_marker(rx)
    finally:
        rx.close()
        tx.close()


async def card(lab, table: Table):
    with netns.inside(lab.box):
        driver = await NpDriver("npc").open()
    try:
        return await driver.dump(table)
    finally:
        await driver.close()


async def test_example_booster_on_a_udp_stream_through_the_card(tmp_path):
    with card_lab(tmp_path) as lab:
        boxd = start_boxd(lab, tmp_path)
        example = lab.start_in_box("example", [script("booster-example"), "--control", control(boxd),
                                               "--port", "9001", "--drop-prefix", "SPAM", "--report-every", "0"])
        (rule,) = await until(lambda: card(lab, Table.RULES), what="the booster's rule on the card", timeout=15)
        assert rule.rule.action.name == "REDIRECT" and rule.rule.dport == (9001, 9001)
        # the card's rule comes first; the booster is ready once its host side (the queue it
        # reads) is bound too, which it says in its log: before that, packets fail open
        lab.group.wait_for_log_sync(example, "counting udp port", 15)
        payloads = [b"SPAM %d" % i if i % 4 == 0 else b"data %d" % i for i in range(200)]
        got = exchange(lab, payloads, 9001)
        assert got == [p for p in payloads if not p.startswith(b"SPAM")]
        # Traffic to other ports is the card's alone: the host never sees it.
        assert exchange(lab, [b"other %d" % i for i in range(20)], 9002) == [b"other %d" % i for i in range(20)]
        (rule,) = await card(lab, Table.RULES)
        assert rule.packets == 201                                          # and the marker
        fwd = {entry.network: entry for entry in await card(lab, Table.FORWARDING)}
        assert f"{SERVER}/32" in fwd and fwd[f"{SERVER}/32"].port == 1      # learned from the host
        assert "10.1.0.1/32" in fwd and fwd["10.1.0.1/32"].port == 0xFF      # the host's own address
        await lab.group.stop(example)
        totals = example.read_stats()["totals"]
        assert (totals["packets"], totals["dropped"], totals["passed"]) == (201, 50, 151)

        async def removed():
            return await card(lab, Table.RULES) == []
        await until(removed, what="the rule to go with its booster")
        assert exchange(lab, [b"SPAM passes now"], 9001) == [b"SPAM passes now"]
        await lab.group.stop(boxd)
        saved = subprocess.run(["ip", "netns", "exec", lab.box, "iptables-save"], capture_output=True,
                               text=True).stdout
        assert "NP-COPY" not in saved and "BOOSTER" not in saved
        emu = lab.stop_emulator()["emulator"]
        # redirected packets the booster passed went on through the host: np1 -> card -> port 1
        assert emu["card"]["redirected"] >= 200 and emu["card"]["from_host"] >= 150
        assert emu["card"]["forwarded"] >= 20


async def test_redirect_copy_and_multicast_boosters_through_the_card(tmp_path):
    with card_lab(tmp_path) as lab:
        boxd = start_boxd(lab, tmp_path)
        proc = start_booster(lab, boxd, "redirect", [PY, TEST_BOOSTER, "--mode", "redirect", "--port", "9101"])
        assert wait_for(proc, lambda e: e["kind"] == "ready", lab)["delivery"] == "nfqueue"
        assert exchange(lab, [b"hello", b"DROP me", b"MOD me", b"plain"], 9101) == [b"hello", b"MOD ME!", b"plain"]
        client = lab.udp(lab.client, ("10.1.0.2", 5555))
        client.sendto(b"REPLY please", (SERVER, 9101))
        assert client.recvfrom(2048) == (b"pong REPLY please", (SERVER, 9101))   # injected by the booster
        client.close()

        proc = start_booster(lab, boxd, "copier", [PY, TEST_BOOSTER, "--mode", "copy", "--port", "9102",
                                                   "--name", "copier"])
        assert wait_for(proc, lambda e: e["kind"] == "ready", lab)["delivery"] == "nflog"
        payloads = [b"c%d" % i for i in range(30)]
        assert exchange(lab, payloads, 9102) == payloads            # exactly once: the host forwards no copy
        wait_for(proc, lambda e: e.get("payload") == MARKER.decode(), lab)
        assert [e["payload"] for e in events(proc) if e["kind"] == "copy"] == [p.decode() for p in payloads + [MARKER]]

        rx = [lab.udp(lab.server, (SERVER, 9201 + i)) for i in range(2)]
        proc = start_booster(lab, boxd, "mcast", [PY, TEST_BOOSTER, "--mode", "multicast", "--port", "9200",
                                                  "--name", "mcast", "--members", f"{SERVER}:9201,{SERVER}:9202"])
        wait_for(proc, lambda e: e["kind"] == "ready", lab)
        assert [s.recv(100) for s in rx] == [b"hello group"] * 2          # send_multicast via the card
        tx = lab.udp(lab.client, ("10.1.0.2", 0))
        tx.sendto(b"to the group", (SERVER, 9200))                         # the card's MULTICAST rule
        sender = tx.getsockname()
        assert [s.recvfrom(100) for s in rx] == [(b"to the group", sender)] * 2
        tx.close()
        for s in rx:
            s.close()
        rules = {r.rule.action.name: r for r in await card(lab, Table.RULES)}
        assert set(rules) == {"REDIRECT", "COPY", "MULTICAST"}
        assert rules["COPY"].packets == 31 and rules["MULTICAST"].packets == 1
        (group,) = await card(lab, Table.MULTICAST)
        assert set(group.members) == {(SERVER, 9201), (SERVER, 9202)}
        lab.stop_box_roles()                # the boosters and boxd: every rule goes with them
        assert await card(lab, Table.RULES) == []


async def test_tcp_interception_through_the_card(tmp_path):
    import socket

    with card_lab(tmp_path) as lab:
        boxd = start_boxd(lab, tmp_path)
        proc = start_booster(lab, boxd, "tproxy", [PY, TEST_BOOSTER, "--mode", "tproxy", "--port", "8080"])
        assert wait_for(proc, lambda e: e["kind"] == "ready", lab)["delivery"] == "tproxy"
        # Nobody listens on the server: the booster, reached through the card's REDIRECT and
        # the host's TPROXY, answers in its place and sees the original destination.
        with netns.inside(lab.client):
            conn = socket.create_connection((SERVER, 8080), timeout=5)
        with conn:
            line = conn.makefile().readline()
        assert line.startswith(f"booster original_dst={SERVER}:8080 client=10.1.0.2:")
        (rule,) = await card(lab, Table.RULES)
        assert rule.rule.action.name == "REDIRECT" and rule.rule.proto == 6 and rule.packets >= 2


async def test_boxd_sigkill_fails_open_and_the_next_boxd_clears_the_card(tmp_path):
    with card_lab(tmp_path) as lab:
        boxd = start_boxd(lab, tmp_path)
        proc = start_booster(lab, boxd, "redirect", [PY, TEST_BOOSTER, "--mode", "redirect", "--port", "9301"])
        wait_for(proc, lambda e: e["kind"] == "ready", lab)
        assert exchange(lab, [b"DROP me", b"keep"], 9301) == [b"keep"]
        boxd.proc.kill()
        boxd.proc.wait(10)
        proc.proc.kill()
        proc.proc.wait(10)
        # The card still redirects to the host; with nobody on the queue the host's kernel
        # lets the packets through (--queue-bypass): fail-open.
        assert len(await card(lab, Table.RULES)) == 1
        assert exchange(lab, [b"DROP me too"], 9301) == [b"DROP me too"]
        start_boxd(lab, tmp_path, "boxd-again")
        assert await card(lab, Table.RULES) == []          # the new boxd reloaded the card
        assert exchange(lab, [b"DROP passes"], 9301) == [b"DROP passes"]
