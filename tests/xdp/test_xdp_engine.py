"""The xdp engine end to end: boxd in the box of a transparent lab, real boosters, real traffic.

client 10.1.0.2 -> box (boxd --engine xdp, boosters) -> server 10.2.0.2

Each action, the example booster unchanged with its kernel counters in /api/rules, fail-open
under booster SIGKILL / SIGSTOP and boxd SIGKILL with a steady stream, and nothing left behind.
"""

import functools
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from boxcore.lab import Lab
from tests.linux import engine_lab
from tests.linux.engine_lab import PY, SERVER, Stream, TestBooster, echo_server, exchange, transparent_lab, wait_until

pytestmark = pytest.mark.root

Boxd = functools.partial(engine_lab.Boxd, engine="xdp")


@pytest.fixture(scope="module")
def lab():
    from tests.xdp.conftest import bpf_problem

    problem = bpf_problem()
    if problem:
        pytest.fail(problem) if os.environ.get("CI") else pytest.skip(problem)
    yield from transparent_lab()


booster = TestBooster     # the linux engine tests' booster: plain booster-library code, no engine named


def api(lab: Lab, path: str, port: int = 8710):
    import urllib.request

    with lab.inside("box"):
        return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).read())


def attached(lab: Lab) -> dict[str, str]:
    """What the box's interfaces carry of ours: XDP programs, clsact qdiscs, the multicast veth."""
    found = {}
    links = lab.run("box", ["ip", "-d", "link"]).stdout
    if "boxd_xdp" in links:
        found["xdp"] = "boxd_xdp attached"
    if "bbxdpmc" in links:
        found["veth"] = "bbxdpmc0"
    qdiscs = lab.run("box", ["tc", "qdisc", "show"]).stdout
    if "clsact" in qdiscs:
        found["qdisc"] = qdiscs
    rules = lab.run("box", ["ip", "rule"]).stdout
    if "lookup 178" in rules:
        found["ip rule"] = rules
    return found


def _boxd_programs() -> dict[int, str]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True).stdout
    return {p["id"]: p["name"] for p in json.loads(out or "[]") if p.get("name") in ("boxd_xdp", "boxd_tc")}


# programs of an earlier, crashed run may still be waiting for their namespace to be torn down
# (asynchronous in the kernel): only what this module loads must be gone
EARLIER = set(_boxd_programs())


def programs_loaded() -> list[str]:
    return [name for pid, name in _boxd_programs().items() if pid not in EARLIER]


def assert_box_clean(lab: Lab) -> None:
    assert attached(lab) == {}
    wait_until(lambda: not programs_loaded(), 5)      # programs are freed after an RCU grace period
    assert programs_loaded() == []


def test_redirect_consume_modify_inject_and_pass(lab, tmp_path):
    boxd = Boxd(lab, tmp_path)
    try:
        b = booster(lab, boxd, "redirect", 9001)
        assert b.ready["delivery"] == "socket"          # the booster reads its own socket: no boxd hop
        got = exchange(lab, [b"hello", b"DROP me", b"MOD me", b"plain"], 9001)
        assert got == [b"hello", b"MOD ME!", b"plain"]
        seen = [e for e in b.events() if e["kind"] == "packet"]
        assert [e["payload"] for e in seen] == ["hello", "DROP me", "MOD me", "plain"]
        assert all(e["src"] == "10.1.0.2" and e["dport"] == 9001 for e in seen)
        assert exchange(lab, [b"DROP? no, other port"], 9002) == [b"DROP? no, other port"]
        # a reply in the server's name: the original destination comes back from the kernel
        engine_lab.assert_reply_in_the_server_s_name(lab, 9001)
        b.kill(signal.SIGTERM)
        assert exchange(lab, [b"DROP now passes"], 9001) == [b"DROP now passes"]
    finally:
        boxd.stop()
    assert_box_clean(lab)


def test_the_example_booster_with_kernel_counters(lab, tmp_path):
    """booster-example unchanged; DROP in XDP by an installed drop rule; counters in /api/rules."""
    boxd = Boxd(lab, tmp_path, "--http", "127.0.0.1:8710")
    try:
        # the XDP program counts the UDP payload
        engine_lab.assert_example_booster_filters_and_counts(lab, boxd, tmp_path, 8710, delivery="socket",
                                                             header_bytes=0)
    finally:
        boxd.stop()
    assert_box_clean(lab)


DROPPER = """
import asyncio, sys
from boxcore.booster import Booster
from boxcore.rules import Match
async def main():
    async with Booster("dropper", control=sys.argv[1]) as b:
        await b.drop(Match(proto="udp", dst_port=int(sys.argv[2])))
        print("ready", flush=True)
        await b.run_until_stopped(asyncio.Event())
asyncio.run(main())
"""


def test_drop_happens_in_xdp_and_is_counted(lab, tmp_path):
    boxd = Boxd(lab, tmp_path, "--http", "127.0.0.1:8710")
    proc = lab.popen("box", [PY, "-c", DROPPER, boxd.control, "9040"], stdout=subprocess.PIPE,
                     stderr=open(tmp_path / "dropper.log", "w"), text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", (tmp_path / "dropper.log").read_text()
        assert exchange(lab, [b"a", b"bb", b"ccc"], 9040) == []
        assert exchange(lab, [b"other"], 9041) == [b"other"]
        assert wait_until(lambda: [(r["packets"], r["bytes"]) for r in api(lab, "/api/rules")] == [(3, 6)])
        assert api(lab, "/api/status")["engine_status"]["kernel"]["packets"] >= 4
        with lab.inside("box"):
            import urllib.request
            metrics = urllib.request.urlopen("http://127.0.0.1:8710/metrics", timeout=5).read().decode()
        assert any(line.endswith(" 3") for line in metrics.splitlines() if "packets" in line and "rule" in line), metrics
    finally:
        proc.kill()
        proc.wait()
        boxd.stop()
    assert_box_clean(lab)


def test_copy_through_the_ring_buffer_never_holds_packets(lab, tmp_path):
    boxd = Boxd(lab, tmp_path)
    try:
        b = booster(lab, boxd, "copy", 9003)
        assert b.ready["delivery"] == "channel"
        payloads = [b"c%d" % i for i in range(50)]
        assert exchange(lab, payloads, 9003) == payloads
        b.wait_for(lambda e: e.get("payload") == "c49")
        assert [e["payload"] for e in b.events() if e["kind"] == "copy"] == [p.decode() for p in payloads]
        b.kill(signal.SIGSTOP)        # a hung copier costs the originals nothing
        assert exchange(lab, payloads[:5], 9003) == payloads[:5]
        b.kill(signal.SIGKILL)
    finally:
        boxd.stop()
    assert_box_clean(lab)


def test_tcp_interception_sees_the_original_destination(lab, tmp_path):
    boxd = Boxd(lab, tmp_path, "--http", "127.0.0.1:8710")
    echo = echo_server(lab, 8081)
    try:
        b = booster(lab, boxd, "tproxy", 8080)
        assert b.ready["delivery"] == "tproxy"
        with lab.inside("client"):
            conn = socket.create_connection((SERVER, 8080), timeout=5)
        with conn:
            line = conn.makefile().readline()
        assert line.startswith(f"booster original_dst={SERVER}:8080 client=10.1.0.2:")
        b.kill(signal.SIGKILL)
        engine_lab.assert_onward_connections(lab, boxd, 8081)
        assert api(lab, "/api/status")["engine_status"]["kernel"]["replies_steered"] > 0
    finally:
        echo.kill()
        echo.wait()
        boxd.stop()
    assert_box_clean(lab)


def test_multicast_fan_out_in_the_kernel(lab, tmp_path):
    boxd = Boxd(lab, tmp_path)
    rx = [lab.socket("server") for _ in range(3)]
    try:
        for i, s in enumerate(rx):
            s.bind((SERVER, 9101 + i))
            s.settimeout(2)
        members = ",".join(f"{SERVER}:{9101 + i}" for i in range(3))
        b = booster(lab, boxd, "multicast", 9100, "--members", members)
        assert [s.recv(100) for s in rx] == [b"hello group"] * 3            # send_multicast
        tx = lab.socket("client")
        tx.bind(("10.1.0.2", 0))
        tx.sendto(b"to the group", (SERVER, 9100))                          # a MULTICAST rule
        sender = tx.getsockname()
        tx.close()
        assert [s.recvfrom(100) for s in rx] == [(b"to the group", sender)] * 3
    finally:
        for s in rx:
            s.close()
        boxd.stop()
    assert b.proc.wait(10) is not None
    assert_box_clean(lab)


def test_fail_open_when_the_booster_is_killed(lab, tmp_path):
    boxd = Boxd(lab, tmp_path)
    try:
        seen = engine_lab.fail_open_after_booster_kill(lab, boxd, 9010)
    finally:
        boxd.stop()
    # lost: what reached the dead booster's socket until boxd saw the disconnect and removed
    # the rule (boxd holds a copy of the socket): well under a second of traffic
    assert seen["lost"] <= seen["rate"] * 1.0
    assert_box_clean(lab)


def test_hung_booster_is_removed_by_the_watchdog(lab, tmp_path):
    """SIGSTOP: the engine's watchdog (the socket's queue unread for --xdp-stall) removes the
    booster's rules from the maps within the bound, before heartbeats would; the stream passes again."""
    boxd = Boxd(lab, tmp_path, *engine_lab.WATCHDOG_BOXD_OPTIONS, "--xdp-stall", "0.3", "--http", "127.0.0.1:8710")
    result = engine_lab.hung_booster_watchdog(
        lab, boxd, 9011, rules_present=lambda: api(lab, "/api/status")["engine_status"]["rules"] > 0, stall=0.3)
    assert "unhealthy: socket of rule" in result["reason"] and "stalled" in result["reason"], result
    assert_box_clean(lab)


def test_boxd_sigkill_fails_open_and_the_next_boxd_reconciles(lab, tmp_path):
    boxd = Boxd(lab, tmp_path)
    b = booster(lab, boxd, "redirect", 9012)
    dropper = lab.popen("box", [PY, "-c", DROPPER, boxd.control, "9013"], stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL, text=True)
    stream = Stream(lab, 9012, rate=2000)
    try:
        assert dropper.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        boxd.proc.kill()
        boxd.proc.wait(5)
        killed = time.monotonic()
        assert "xdp" in attached(lab)                        # left behind by the dead boxd
        time.sleep(1.0)
        after = stream.received_after(killed)
        b.proc.wait(10)                                      # the booster notices boxd is gone
        dropper.wait(10)
        time.sleep(1.2)                                      # past the lease: drop rules no longer apply
        late = stream.received_after(time.monotonic() - 0.25)
        assert exchange(lab, [b"dropped no more"], 9013) == [b"dropped no more"]
        sent, lost = stream.finish()
        again = Boxd(lab, tmp_path, name="boxd2")
        assert "left behind" in again.log.read_text()
        again.stop()
    finally:
        stream.stop.set()
        b.kill()
        dropper.kill()
        boxd.stop()
    print(f"\nboxd SIGKILL: sent {sent}, lost {lost}, {after} received in the second after the kill")
    assert after > 0.5 * stream.rate and late > 0
    assert_box_clean(lab)


def _drop_bpf_capabilities() -> None:
    """preexec_fn: take CAP_BPF, CAP_SYS_ADMIN and CAP_NET_ADMIN out of the bounding set, so the
    exec'd boxd runs as root without them."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (39, 21, 12):
        if libc.prctl(24, cap, 0, 0, 0) != 0:     # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_boxd_refuses_to_start_without_bpf_privileges(tmp_path):
    proc = subprocess.run([PY, "-m", "boxcore.boxd", "--engine", "xdp", "--control", f"{tmp_path}/c.sock",
                           "--state", f"{tmp_path}/st"], capture_output=True, text=True, timeout=30,
                          preexec_fn=_drop_bpf_capabilities)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "xdp engine needs root (CAP_BPF, CAP_NET_ADMIN missing)" in lines[0], proc.stderr


ANSWERER = """
import asyncio, sys
from boxcore.booster import Booster
from boxcore.rules import Match
async def main():
    async with Booster("answerer", control=sys.argv[1]) as b:
        dst = sys.argv[3] if len(sys.argv) > 3 else None
        holder = {}
        def on_packet(pkt):
            holder["sub"].receiver.sock.sendto(b"direct " + pkt.payload, (pkt.src, pkt.sport))
        holder["sub"] = await b.redirect(Match(proto="udp", dst=dst, dst_port=int(sys.argv[2])), on_packet)
        print("ready", holder["sub"].delivery.kind, flush=True)
        await b.run_until_stopped(asyncio.Event())
asyncio.run(main())
"""


@pytest.mark.parametrize("named_host", [False, True])
def test_a_booster_answers_on_its_own_socket(lab, tmp_path, named_host):
    """As the mmpog reflector does with a delegated socket: replies leave from the rule's host
    and port when the rule names them (a transparent socket), else from the box's address."""
    boxd = Boxd(lab, tmp_path)
    extra = [SERVER] if named_host else []
    proc = lab.popen("box", [PY, "-c", ANSWERER, boxd.control, "9060", *extra], stdout=subprocess.PIPE,
                     stderr=open(tmp_path / "answerer.log", "w"), text=True)
    client = lab.socket("client")
    try:
        assert proc.stdout.readline().split() == ["ready", "socket"], (tmp_path / "answerer.log").read_text()
        client.bind(("10.1.0.2", 0))
        client.settimeout(3)
        client.sendto(b"hi", (SERVER, 9060))
        data, peer = client.recvfrom(100)
        assert data == b"direct hi"
        assert peer == ((SERVER, 9060) if named_host else ("10.1.0.1", 9060))
    finally:
        client.close()
        proc.kill()
        proc.wait()
        boxd.stop()
    assert_box_clean(lab)


LIMITS = """
import asyncio, sys
from boxcore.booster import Booster, BoosterError
from boxcore.rules import Match
async def main():
    async with Booster("limits", control=sys.argv[1]) as b:
        async def attempt(label, coro):
            try:
                await coro
                print(label, "ok", flush=True)
            except BoosterError as exc:
                print(label, type(exc).__name__, exc, flush=True)
        members = [("10.2.0.2", 10000 + i) for i in range(257)]
        await attempt("group257", b.set_multicast_group(7, members))
        await attempt("group256", b.set_multicast_group(7, members[:256]))
        await attempt("ipv6dst", b.redirect(Match(proto="udp", dst="2001:db8::/32", dst_port=9070), lambda p: None))
        await attempt("ipv6src", b.drop(Match(proto="udp", src="::1", dst_port=9071)))
        await attempt("ipv4", b.drop(Match(proto="udp", dst="10.2.0.0/16", dst_port=9072)))
asyncio.run(main())
"""


def test_what_the_kernel_cannot_hold_is_refused_with_the_reason(lab, tmp_path):
    """A group larger than the kernel's fan-out (256 members) and IPv6 rules: the booster gets
    INVALID with the reason, the box keeps working (a 256-member group and an IPv4 rule go in)."""
    boxd = Boxd(lab, tmp_path, "--http", "127.0.0.1:8710")
    try:
        proc = lab.run("box", [PY, "-c", LIMITS, boxd.control], timeout=60)
        answers = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in proc.stdout.splitlines()}
        assert answers["group257"].startswith("InvalidRequest"), answers
        assert "257 members, at most 256" in answers["group257"], answers
        assert answers["group256"] == "ok"
        for label in ("ipv6dst", "ipv6src"):
            assert answers[label].startswith("InvalidRequest") and "IPv4 only" in answers[label], answers
        assert answers["ipv4"] == "ok"
        refused = api(lab, "/api/status")
        assert refused["engine_status"]["rules"] == 0          # the booster left: nothing held
    finally:
        boxd.stop()
    assert_box_clean(lab)


ORIGINAL = """
import asyncio, sys
from boxcore.booster import Booster
from boxcore.rules import Match
def seen(pkt):
    print(pkt.payload.decode(), pkt.src, pkt.dst, pkt.dport, flush=True)
async def main():
    async with Booster("original", control=sys.argv[1]) as b:
        sub = await b.redirect(Match(proto="udp", dst_port=int(sys.argv[2])), seen)
        print("ready", sub.delivery.params["dst"], sub.delivery.params["dport"],
              sub.delivery.params.get("orig_dst"), flush=True)
        await b.run_until_stopped(asyncio.Event())
asyncio.run(main())
"""


def test_a_redirect_socket_reports_each_datagram_s_original_destination(lab, tmp_path):
    """A rule naming only a port: the delivery's dst is 0.0.0.0, but the socket (bpf_sk_assign
    keeps the destination) reports each datagram's original destination (IP_RECVORIGDSTADDR),
    the delivery says so (orig_dst), and the booster's handler sees it as the packet's dst."""
    boxd = Boxd(lab, tmp_path)
    proc = lab.popen("box", [PY, "-c", ORIGINAL, boxd.control, "9080"], stdout=subprocess.PIPE,
                     stderr=open(tmp_path / "original.log", "w"), text=True)
    client = lab.socket("client")
    try:
        assert proc.stdout.readline().split() == ["ready", "0.0.0.0", "9080", "True"], \
            (tmp_path / "original.log").read_text()
        client.bind((engine_lab.CLIENT, 0))
        for host in (SERVER, "10.2.0.77", "10.1.0.1"):     # the server, another host, the box itself
            client.sendto(f"to-{host}".encode(), (host, 9080))
            assert proc.stdout.readline().split() == [f"to-{host}", engine_lab.CLIENT, host, "9080"]
    finally:
        client.close()
        proc.kill()
        proc.wait()
        boxd.stop()
    assert_box_clean(lab)
