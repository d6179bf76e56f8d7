"""The np engine end to end: boxd --engine np on the host of an emulated card, real boosters.

client 10.1.0.2 -- [card p0 | p1] -- server 10.2.0.2, the box (np0, np1, npc) the card's host.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from npdrv import netns
from npdrv.driver import NpDriver
from npdrv.wire import Table

from npdrv_netlab import VENV_BIN, card_lab

pytestmark = pytest.mark.root

PY = sys.executable
TEST_BOOSTER = str(Path(__file__).parent.parent / "linux" / "linux_test_booster.py")
SERVER = "10.2.0.2"


class Boxd:
    def __init__(self, lab, workdir: Path) -> None:
        self.lab = lab
        self.control = str(workdir / "control.sock")
        self.log = workdir / "boxd.log"
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.box, PY, "-m", "boxcore.boxd", "--engine", "np", "--control",
             self.control, "--state", str(workdir / "state"), "--heartbeat", "0.25", "--np-sync", "0.2",
             "--log-level", "info"], stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"boxd exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            if "boxd ready" in self.log.read_text():
                return
            time.sleep(0.05)
        raise AssertionError(f"boxd did not start: {self.log.read_text()[-3000:]}")

    def booster(self, argv: list[str], out: Path) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.lab.box, *argv, "--control", self.control],
                                stdout=open(out, "w"), stderr=open(out.with_suffix(".log"), "w"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(path: Path, proc: subprocess.Popen, predicate, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in events(path):
            if predicate(event):
                return event
        if proc.poll() is not None:
            raise AssertionError(f"booster exited {proc.returncode}: {path.with_suffix('.log').read_text()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"event not seen: {path.with_suffix('.log').read_text()[-2000:]}")


def exchange(lab, payloads: list[bytes], port: int, timeout: float = 1.0) -> list[bytes]:
    rx = lab.udp(lab.server, (SERVER, port), timeout)
    tx = lab.udp(lab.client, ("10.1.0.2", 0))
    try:
        for payload in payloads:
            tx.sendto(payload, (SERVER, port))
            time.sleep(0.002)
        got = []
        while True:
            try:
                got.append(rx.recv(2048))
            except TimeoutError:
                return got
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


def stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        proc.wait(10)


async def test_example_booster_on_a_udp_stream_through_the_card(tmp_path):
    with card_lab(tmp_path) as lab:
        boxd = Boxd(lab, tmp_path)
        try:
            stats = tmp_path / "example.json"
            example = subprocess.Popen(
                ["ip", "netns", "exec", lab.box, str(VENV_BIN / "booster-example"), "--control", boxd.control,
                 "--port", "9001", "--drop-prefix", "SPAM", "--report-every", "0", "--stats-json", str(stats)],
                stderr=open(tmp_path / "example.log", "w"))
            deadline = time.monotonic() + 15
            while not (await card(lab, Table.RULES)) and time.monotonic() < deadline:
                time.sleep(0.1)
            (rule,) = await card(lab, Table.RULES)
            assert rule.rule.action.name == "REDIRECT" and rule.rule.dport == (9001, 9001)
            # the card's rule comes first; the booster is ready once its host side (the queue it
            # reads) is bound too, which it says in its log: before that, packets fail open
            deadline = time.monotonic() + 15
            while "counting udp port" not in (tmp_path / "example.log").read_text():
                assert time.monotonic() < deadline and example.poll() is None, (tmp_path / "example.log").read_text()
                time.sleep(0.05)
            payloads = [b"SPAM %d" % i if i % 4 == 0 else b"data %d" % i for i in range(200)]
            got = exchange(lab, payloads, 9001)
            assert got == [p for p in payloads if not p.startswith(b"SPAM")]
            # Traffic to other ports is the card's alone: the host never sees it.
            assert exchange(lab, [b"other %d" % i for i in range(20)], 9002) == [b"other %d" % i for i in range(20)]
            (rule,) = await card(lab, Table.RULES)
            assert rule.packets == 200
            fwd = {entry.network: entry for entry in await card(lab, Table.FORWARDING)}
            assert f"{SERVER}/32" in fwd and fwd[f"{SERVER}/32"].port == 1      # learned from the host
            assert "10.1.0.1/32" in fwd and fwd["10.1.0.1/32"].port == 0xFF      # the host's own address
            stop(example)
            totals = json.loads(stats.read_text())["totals"]
            assert (totals["packets"], totals["dropped"], totals["passed"]) == (200, 50, 150)
            deadline = time.monotonic() + 5
            while await card(lab, Table.RULES) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert await card(lab, Table.RULES) == []                 # removed with its booster
            assert exchange(lab, [b"SPAM passes now"], 9001) == [b"SPAM passes now"]
        finally:
            boxd.stop()
        saved = subprocess.run(["ip", "netns", "exec", lab.box, "iptables-save"], capture_output=True,
                               text=True).stdout
        assert "NP-COPY" not in saved and "BOOSTER" not in saved
        emu = lab.stop_emulator()["emulator"]
        # redirected packets the booster passed went on through the host: np1 -> card -> port 1
        assert emu["card"]["redirected"] >= 200 and emu["card"]["from_host"] >= 150
        assert emu["card"]["forwarded"] >= 20


async def test_redirect_copy_and_multicast_boosters_through_the_card(tmp_path):
    with card_lab(tmp_path) as lab:
        boxd = Boxd(lab, tmp_path)
        boosters = []
        try:
            out = tmp_path / "redirect.jsonl"
            boosters.append(proc := boxd.booster([PY, TEST_BOOSTER, "--mode", "redirect", "--port", "9101"], out))
            assert wait_for(out, proc, lambda e: e["kind"] == "ready")["delivery"] == "nfqueue"
            assert exchange(lab, [b"hello", b"DROP me", b"MOD me", b"plain"], 9101) == [b"hello", b"MOD ME!", b"plain"]
            client = lab.udp(lab.client, ("10.1.0.2", 5555))
            client.sendto(b"REPLY please", (SERVER, 9101))
            assert client.recvfrom(2048) == (b"pong REPLY please", (SERVER, 9101))   # injected by the booster
            client.close()

            out = tmp_path / "copy.jsonl"
            boosters.append(proc := boxd.booster([PY, TEST_BOOSTER, "--mode", "copy", "--port", "9102",
                                                  "--name", "copier"], out))
            assert wait_for(out, proc, lambda e: e["kind"] == "ready")["delivery"] == "nflog"
            payloads = [b"c%d" % i for i in range(30)]
            assert exchange(lab, payloads, 9102) == payloads            # exactly once: the host forwards no copy
            wait_for(out, proc, lambda e: e.get("payload") == "c29")
            assert [e["payload"] for e in events(out) if e["kind"] == "copy"] == [p.decode() for p in payloads]

            rx = [lab.udp(lab.server, (SERVER, 9201 + i)) for i in range(2)]
            out = tmp_path / "multicast.jsonl"
            boosters.append(proc := boxd.booster([PY, TEST_BOOSTER, "--mode", "multicast", "--port", "9200",
                                                  "--name", "mcast", "--members", f"{SERVER}:9201,{SERVER}:9202"], out))
            wait_for(out, proc, lambda e: e["kind"] == "ready")
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
            assert rules["COPY"].packets == 30 and rules["MULTICAST"].packets == 1
            (group,) = await card(lab, Table.MULTICAST)
            assert set(group.members) == {(SERVER, 9201), (SERVER, 9202)}
        finally:
            for proc in boosters:
                stop(proc)
            boxd.stop()
        assert await card(lab, Table.RULES) == []


async def test_tcp_interception_through_the_card(tmp_path):
    import socket

    with card_lab(tmp_path) as lab:
        boxd = Boxd(lab, tmp_path)
        out = tmp_path / "tproxy.jsonl"
        proc = boxd.booster([PY, TEST_BOOSTER, "--mode", "tproxy", "--port", "8080"], out)
        try:
            assert wait_for(out, proc, lambda e: e["kind"] == "ready")["delivery"] == "tproxy"
            # Nobody listens on the server: the booster, reached through the card's REDIRECT and
            # the host's TPROXY, answers in its place and sees the original destination.
            with netns.inside(lab.client):
                conn = socket.create_connection((SERVER, 8080), timeout=5)
            with conn:
                line = conn.makefile().readline()
            assert line.startswith(f"booster original_dst={SERVER}:8080 client=10.1.0.2:")
            (rule,) = await card(lab, Table.RULES)
            assert rule.rule.action.name == "REDIRECT" and rule.rule.proto == 6 and rule.packets >= 2
        finally:
            stop(proc)
            boxd.stop()


async def test_boxd_sigkill_fails_open_and_the_next_boxd_clears_the_card(tmp_path):
    with card_lab(tmp_path) as lab:
        boxd = Boxd(lab, tmp_path)
        out = tmp_path / "redirect.jsonl"
        proc = boxd.booster([PY, TEST_BOOSTER, "--mode", "redirect", "--port", "9301"], out)
        try:
            wait_for(out, proc, lambda e: e["kind"] == "ready")
            assert exchange(lab, [b"DROP me", b"keep"], 9301) == [b"keep"]
            boxd.proc.kill()
            boxd.proc.wait(10)
            stop(proc, signal.SIGKILL)
            # The card still redirects to the host; with nobody on the queue the host's kernel
            # lets the packets through (--queue-bypass): fail-open.
            assert len(await card(lab, Table.RULES)) == 1
            assert exchange(lab, [b"DROP me too"], 9301) == [b"DROP me too"]
            (tmp_path / "again").mkdir()
            again = Boxd(lab, tmp_path / "again")
            try:
                assert await card(lab, Table.RULES) == []          # the new boxd reloaded the card
                assert exchange(lab, [b"DROP passes"], 9301) == [b"DROP passes"]
            finally:
                again.stop()
        finally:
            stop(proc, signal.SIGKILL)
            boxd.stop()
