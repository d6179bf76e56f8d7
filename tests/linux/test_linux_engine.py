"""The linux engine end to end: boxd in the box of a transparent lab, real boosters, real traffic.

client 10.1.0.2 -> box (boxd --engine linux, boosters) -> server 10.2.0.2
"""

import functools
import signal
import socket
import subprocess
import time

import pytest

from boxcore.lab import Lab
from tests.linux import engine_lab
from tests.linux.engine_lab import (PY, SERVER, Stream, TestBooster, echo_server, exchange, transparent_lab,
                                    wait_until)

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab():
    yield from transparent_lab()


Boxd = functools.partial(engine_lab.Boxd, engine="linux")


def box_chains(lab: Lab) -> set[str]:
    saved = lab.run("box", ["iptables-save"]).stdout
    return {line[1:].split()[0] for line in saved.splitlines()
            if line.startswith(":BOOSTER-") or line.startswith(":BR-")}


def rule_chains(lab: Lab) -> set[str]:
    return {c for c in box_chains(lab) if c.startswith("BR-")}


def assert_box_clean(lab: Lab) -> None:
    assert box_chains(lab) == set()
    saved = lab.run("box", ["iptables-save"]).stdout
    assert "BOOSTER" not in saved and "NFQUEUE" not in saved and "TPROXY" not in saved
    assert "fwmark" not in lab.run("box", ["ip", "rule"]).stdout
    assert lab.run("box", ["ip", "route", "show", "table", "all", "proto", "176"]).stdout.strip() == ""
    queues = lab.run("box", ["cat", "/proc/net/netfilter/nfnetlink_queue"], check=False).stdout
    assert queues.strip() == "", f"queue still bound: {queues}"


def test_redirect_consume_modify_inject_and_pass(lab, tmp_path):
    boxd = Boxd(lab, tmp_path)
    try:
        booster = TestBooster(lab, boxd, "redirect", 9001)
        assert booster.ready["delivery"] == "nfqueue"
        got = exchange(lab, [b"hello", b"DROP me", b"MOD me", b"plain"], 9001)
        assert got == [b"hello", b"MOD ME!", b"plain"]           # consumed one, modified one
        seen = [e["payload"] for e in booster.events() if e["kind"] == "packet"]
        assert seen == ["hello", "DROP me", "MOD me", "plain"]
        assert all(e["dst"] == SERVER and e["src"] == "10.1.0.2" for e in booster.events() if e["kind"] == "packet")
        # traffic the rule does not match is untouched and never seen
        assert exchange(lab, [b"DROP? no, other port"], 9002) == [b"DROP? no, other port"]
        assert len([e for e in booster.events() if e["kind"] == "packet"]) == 4
        # inject: the booster answers in the server's name; the client gets it, the server nothing
        engine_lab.assert_reply_in_the_server_s_name(lab, 9001)
        booster.kill(signal.SIGTERM)
        assert wait_until(lambda: rule_chains(lab) == set(), 3), rule_chains(lab)   # its rules went with it
        assert exchange(lab, [b"DROP now passes"], 9001) == [b"DROP now passes"]
    finally:
        boxd.stop()
    assert_box_clean(lab)


def test_the_example_booster_in_transparent_placement(lab, tmp_path):
    """booster-example (the library's UDP counter/filter) on the linux engine, unchanged."""
    boxd = Boxd(lab, tmp_path, "--http", "127.0.0.1:8700")
    try:
        # netfilter's counters count the whole IP packet: 20 + 8 header bytes each
        engine_lab.assert_example_booster_filters_and_counts(lab, boxd, tmp_path, 8700, delivery="nfqueue",
                                                             header_bytes=28)
    finally:
        boxd.stop()
    assert_box_clean(lab)


def test_output_hook_claims_the_box_own_traffic_without_loops(lab, tmp_path):
    boxd = Boxd(lab, tmp_path, "--linux-hooks", "forward,input,output")
    try:
        booster = TestBooster(lab, boxd, "redirect", 9030)
        local = lab.socket("box")
        server = lab.socket("server")
        try:
            local.bind(("10.2.0.1", 0))
            local.settimeout(2)
            server.bind((SERVER, 9030))
            server.settimeout(1)
            local.sendto(b"REPLY from the box", (SERVER, 9030))     # the box's own traffic: OUTPUT
            data, peer = local.recvfrom(2048)
            assert data == b"pong REPLY from the box" and peer == (SERVER, 9030)
            local.sendto(b"plain from the box", (SERVER, 9030))
            assert server.recv(2048) == b"plain from the box"
        finally:
            local.close()
            server.close()
        # the injected reply was not queued again: the booster saw exactly the two packets
        time.sleep(0.2)
        assert [e["payload"] for e in booster.events() if e["kind"] == "packet"] == \
            ["REPLY from the box", "plain from the box"]
        booster.kill(signal.SIGTERM)
    finally:
        boxd.stop()
    assert_box_clean(lab)


def test_copy_through_nflog_never_holds_packets(lab, tmp_path):
    boxd = Boxd(lab, tmp_path)
    try:
        booster = TestBooster(lab, boxd, "copy", 9003)
        assert booster.ready["delivery"] == "nflog"
        payloads = [b"c%d" % i for i in range(50)]
        assert exchange(lab, payloads, 9003) == payloads
        booster.wait_for(lambda e: e.get("payload") == "c49")
        assert [e["payload"] for e in booster.events() if e["kind"] == "copy"] == [p.decode() for p in payloads]
        booster.kill(signal.SIGSTOP)        # a hung copier costs nothing: copies are not waited for
        assert exchange(lab, payloads[:5], 9003) == payloads[:5]
        booster.kill(signal.SIGKILL)
    finally:
        boxd.stop()
    assert_box_clean(lab)


def test_tproxy_interception_sees_the_original_destination(lab, tmp_path):
    boxd = Boxd(lab, tmp_path)
    echo = echo_server(lab, 8081)
    try:
        booster = TestBooster(lab, boxd, "tproxy", 8080)
        assert booster.ready["delivery"] == "tproxy"
        # nobody listens on the server's port 8080: the booster answers in its place
        with lab.inside("client"):
            conn = socket.create_connection((SERVER, 8080), timeout=5)
        with conn:
            line = conn.makefile().readline()
        assert line.startswith(f"booster original_dst={SERVER}:8080 client=10.1.0.2:")
        event = booster.wait_for(lambda e: e["kind"] == "connection")
        assert event["original_dst"] == [SERVER, 8080]
        booster.kill(signal.SIGKILL)
        engine_lab.assert_onward_connections(lab, boxd, 8081)
    finally:
        echo.kill()
        echo.wait()
        boxd.stop()
    assert_box_clean(lab)


def test_hung_interceptor_is_removed_and_connections_reach_the_server(lab, tmp_path):
    # heartbeats would take 3 s: the engine's watchdog (connections left unaccepted) must be first
    boxd = Boxd(lab, tmp_path, *engine_lab.WATCHDOG_BOXD_OPTIONS, "--linux-stall", "0.3")
    echo = echo_server(lab, 8082, answer="banner")
    try:
        booster = TestBooster(lab, boxd, "tproxy", 8082)
        booster.kill(signal.SIGSTOP)
        hung = time.monotonic()
        with lab.inside("client"):
            stuck = socket.create_connection((SERVER, 8082), timeout=5)   # the kernel accepts, nobody serves
        assert wait_until(lambda: not rule_chains(lab), 5)
        removed_after = time.monotonic() - hung
        with lab.inside("client"):
            conn = socket.create_connection((SERVER, 8082), timeout=5)
        with conn:
            assert conn.makefile().readline() == "the real server\n"
        stuck.close()
        booster.kill(signal.SIGKILL)
    finally:
        echo.kill()
        echo.wait()
        boxd.stop()
    print(f"\nhung interceptor: rules removed {removed_after:.2f}s after SIGSTOP")
    assert "unhealthy: tproxy port 15001 stalled" in boxd.log.read_text() and removed_after < 2.0
    assert_box_clean(lab)


def test_multicast_fan_out(lab, tmp_path):
    boxd = Boxd(lab, tmp_path)
    rx = [lab.socket("server") for _ in range(2)]
    try:
        for i, s in enumerate(rx):
            s.bind((SERVER, 9101 + i))
            s.settimeout(2)
        booster = TestBooster(lab, boxd, "multicast", 9100, "--members", f"{SERVER}:9101,{SERVER}:9102")
        assert [s.recv(100) for s in rx] == [b"hello group"] * 2           # send_multicast
        tx = lab.socket("client")
        tx.bind(("10.1.0.2", 0))
        tx.sendto(b"to the group", (SERVER, 9100))                         # a MULTICAST rule
        sender = tx.getsockname()
        tx.close()
        # one copy per member, from the original sender (members answer it directly)
        assert [s.recvfrom(100) for s in rx] == [(b"to the group", sender)] * 2
    finally:
        for s in rx:
            s.close()
        boxd.stop()                  # with the booster still connected: boxd removes everything
    assert booster.proc.wait(10) is not None   # and the booster notices boxd is gone
    assert_box_clean(lab)


def test_fail_open_when_the_booster_is_killed(lab, tmp_path):
    boxd = Boxd(lab, tmp_path)
    try:
        seen = engine_lab.fail_open_after_booster_kill(lab, boxd, 9010)
    finally:
        boxd.stop()
    assert seen["lost"] <= 4096            # at most what was queued
    assert_box_clean(lab)


def test_hung_booster_is_removed_by_the_watchdog(lab, tmp_path):
    """SIGSTOP: the engine's watchdog (a queue with no verdict for --linux-stall) removes the
    booster's rules within the bound, before heartbeats would, and the stream passes again."""
    boxd = Boxd(lab, tmp_path, *engine_lab.WATCHDOG_BOXD_OPTIONS, "--linux-stall", "0.3", "--linux-queue-len", "512")
    result = engine_lab.hung_booster_watchdog(lab, boxd, 9011, rules_present=lambda: bool(rule_chains(lab)),
                                              stall=0.3)
    assert "unhealthy: queue" in result["reason"] and "stalled" in result["reason"], result
    assert result["lost"] <= 512 + 50          # what the queue held (the rest passed: fail-open when full)
    assert_box_clean(lab)


def test_boxd_sigkill_fails_open_and_the_next_boxd_reconciles(lab, tmp_path):
    boxd = Boxd(lab, tmp_path)
    booster = TestBooster(lab, boxd, "redirect", 9012)
    stream = Stream(lab, 9012, rate=2000)
    try:
        time.sleep(0.5)
        boxd.proc.kill()
        boxd.proc.wait(5)
        killed = time.monotonic()
        assert rule_chains(lab)                                # left behind by the dead boxd
        time.sleep(1.0)
        after = stream.received_after(killed)
        booster.proc.wait(10)                                  # it notices boxd is gone and leaves
        time.sleep(0.3)
        late = stream.received_after(time.monotonic() - 0.25)
        sent, lost = stream.finish()
        assert rule_chains(lab)                                # still there: fail-open, not removed
        again = Boxd(lab, tmp_path, name="boxd2")
        assert "left behind" in again.log.read_text()
        assert rule_chains(lab) == set()
        again.stop()
    finally:
        stream.stop.set()
        booster.kill()
        boxd.stop()
    print(f"\nboxd SIGKILL: sent {sent}, lost {lost}, {after} received in the second after the kill")
    assert after > 0.5 * stream.rate and late > 0
    assert_box_clean(lab)


def _drop_cap_net_admin() -> None:
    """preexec_fn: take CAP_NET_ADMIN out of the bounding set, so the exec'd boxd runs as
    root without it (no capsh or setpriv needed)."""
    import ctypes

    PR_CAPBSET_DROP, CAP_NET_ADMIN = 24, 12
    if ctypes.CDLL(None, use_errno=True).prctl(PR_CAPBSET_DROP, CAP_NET_ADMIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_boxd_refuses_to_start_without_cap_net_admin(tmp_path):
    proc = subprocess.run([PY, "-m", "boxcore.boxd", "--engine", "linux", "--control", f"{tmp_path}/c.sock",
                           "--state", f"{tmp_path}/st"], capture_output=True, text=True, timeout=30,
                          preexec_fn=_drop_cap_net_admin)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if "error" in l]
    assert lines and "CAP_NET_ADMIN" in lines[-1]
