"""The scaffolding every kernel-engine test shares (tests/linux and tests/xdp).

A ``transparent`` lab (client 10.1.0.2 -> box -> server 10.2.0.2), boxd started in the box
with a given engine, the test booster (linux_test_booster.py, plain booster-library code that
names no engine), senders and receivers in the client and server namespaces, and a steady
sequence-numbered stream for the fail-open tests.  Every lab this module brings up is
recorded in :data:`LABS`, so a last test can check that none is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from boxcore.lab import Lab
from tests.polling import until_sync

PY = sys.executable
HERE = Path(__file__).parent
TEST_BOOSTER = str(HERE / "linux_test_booster.py")
CLIENT, SERVER = "10.1.0.2", "10.2.0.2"

# the engine options that make fail-open quick to observe in a test
ENGINE_OPTIONS = {
    "linux": ["--linux-stall", "0.5"],
    "xdp": ["--xdp-stall", "0.5", "--xdp-lease", "1.0"],
}

LABS: list[str] = []       # every lab name brought up here (the leftover check looks for them)


def lab_namespaces(name: str) -> list[str]:
    try:
        return [ns for ns in os.listdir("/run/netns") if ns.startswith(f"bb{name}_")]
    except FileNotFoundError:
        return []


def transparent_lab():
    """Generator for a module-scoped fixture: the lab, and afterwards a check it left no namespace."""
    with Lab.up("transparent") as lab:
        LABS.append(lab.name)
        yield lab
    assert lab_namespaces(lab.name) == []


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    """:func:`tests.polling.until_sync` as a truth value (``assert wait_until(...)``)."""
    try:
        until_sync(predicate, timeout=timeout, step=interval)
    except AssertionError:
        return False
    return True


class Boxd:
    """boxd in the box's namespace, waited for until it says it is ready."""

    def __init__(self, lab: Lab, workdir: Path, *extra: str, engine: str, name: str = "boxd") -> None:
        self.lab = lab
        self.control = str(workdir / f"{name}.sock")
        self.log = workdir / f"{name}.log"
        self.proc = lab.popen("box", [PY, "-m", "boxcore.boxd", "--engine", engine, "--control", self.control,
                                      "--state", str(workdir / "state"), "--heartbeat", "0.25",
                                      *ENGINE_OPTIONS[engine], "--log-level", "info", *extra],
                              stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"boxd exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            if "boxd ready" in self.log.read_text():
                return
            time.sleep(0.05)
        raise AssertionError(f"boxd did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class TestBooster:
    """linux_test_booster.py in the box; its events are JSON lines on its stdout."""

    __test__ = False

    def __init__(self, lab: Lab, boxd: Boxd, mode: str, port: int, *extra: str) -> None:
        self.out = Path(boxd.control).with_name(f"booster-{mode}-{port}.jsonl")
        self.err = self.out.with_suffix(".log")
        self.proc = lab.popen("box", [PY, TEST_BOOSTER, "--control", boxd.control, "--mode", mode,
                                      "--port", str(port), *extra],
                              stdout=open(self.out, "w"), stderr=open(self.err, "w"))
        self.ready = self.wait_for(lambda e: e["kind"] == "ready")

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]

    def wait_for(self, predicate, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if predicate(event):
                    return event
            if self.proc.poll() is not None:
                raise AssertionError(f"booster exited {self.proc.returncode}: {self.err.read_text()[-2000:]}")
            time.sleep(0.05)
        raise AssertionError(f"booster event not seen; stderr: {self.err.read_text()[-2000:]}")

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.proc.wait(10)


def assert_onward_connections(lab: Lab, boxd: Boxd, port: int) -> None:
    """A booster intercepting TCP to ``port`` and connecting onward itself (``connect_onward``):
    unspoofed, the server sees the box; spoofed, it sees the client, and its replies (addressed
    to the client) come back to the booster's socket.  Needs :func:`echo_server` on ``port``."""
    box_server_side = SERVER.rsplit(".", 1)[0] + ".1"
    for spoof in (False, True):
        onward = TestBooster(lab, boxd, "tproxy", port, "--onward", *(["--spoof"] if spoof else []))
        with lab.inside("client"):
            conn = socket.create_connection((SERVER, port), timeout=5)
        with conn:
            f = conn.makefile("rw")
            assert f.readline().startswith(f"booster original_dst={SERVER}:{port}")
            f.write("hi\n")
            f.flush()
            answer = f.readline()
        assert answer == f"server peer={CLIENT if spoof else box_server_side} got=hi\n"
        onward.kill(signal.SIGKILL)


def assert_reply_in_the_server_s_name(lab: Lab, port: int) -> None:
    """A redirect booster (linux_test_booster.py) answers "REPLY ..." in the server's name: the
    client gets the answer from the server's address, the server itself gets nothing."""
    client, server = lab.socket("client"), lab.socket("server")
    try:
        client.bind((CLIENT, 5555))
        client.settimeout(2)
        server.bind((SERVER, port))
        server.settimeout(0.3)
        client.sendto(b"REPLY please", (SERVER, port))
        data, peer = client.recvfrom(2048)
        assert data == b"pong REPLY please" and peer == (SERVER, port)
        try:
            leaked = server.recv(2048)
        except TimeoutError:
            leaked = None
        assert leaked is None, f"the server got {leaked!r}"
    finally:
        client.close()
        server.close()


def fail_open_after_booster_kill(lab: Lab, boxd: Boxd, port: int, rate: int = 2000) -> dict:
    """SIGKILL a redirect booster in the path of a steady stream; what the stream saw: whether
    traffic flowed again (a third of a second's worth within 5 s), sent, lost, received after."""
    booster = TestBooster(lab, boxd, "redirect", port)
    stream = Stream(lab, port, rate=rate)
    booster.wait_for(lambda e: e["kind"] == "packet")                 # it is in the path
    booster.kill(signal.SIGKILL)
    killed = time.monotonic()
    flowing = stream.wait_received_after(killed, int(0.35 * stream.rate), timeout=5)
    after = stream.received_after(killed)
    sent, lost = stream.finish()
    print(f"\nbooster SIGKILL under {stream.rate} pps: sent {sent}, lost {lost}, {after} received after the kill")
    assert flowing, f"traffic did not flow again after the kill ({after} received)"
    return {"sent": sent, "lost": lost, "after": after, "rate": stream.rate}


def exchange(lab: Lab, payloads: list[bytes], port: int, timeout: float = 1.0) -> list[bytes]:
    """Send payloads client -> server:port; return what the server received (in order)."""
    rx = lab.socket("server")
    tx = lab.socket("client")
    try:
        rx.bind((SERVER, port))
        rx.settimeout(timeout)
        tx.bind((CLIENT, 0))
        for payload in payloads:
            tx.sendto(payload, (SERVER, port))
        got = []
        while True:
            try:
                got.append(rx.recv(2048))
            except TimeoutError:
                return got
    finally:
        rx.close()
        tx.close()


class Stream:
    """A steady UDP stream client -> server with sequence numbers, counted at the server."""

    def __init__(self, lab: Lab, port: int, rate: int = 2000) -> None:
        self.rx = lab.socket("server")
        self.rx.bind((SERVER, port))
        self.rx.settimeout(0.2)
        self.tx = lab.socket("client")
        self.port, self.rate = port, rate
        self.sent = 0
        self.received: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._recv, daemon=True)]
        for t in self.threads:
            t.start()

    def _send(self) -> None:
        start = time.monotonic()
        while not self.stop.is_set():
            due = int((time.monotonic() - start) * self.rate)
            while self.sent < due:
                self.tx.sendto(b"seq %d" % self.sent, (SERVER, self.port))
                self.sent += 1
            time.sleep(0.001)

    def _recv(self) -> None:
        while True:
            try:
                data = self.rx.recv(2048)
            except TimeoutError:
                if self.stop.is_set():
                    return
                continue
            self.received.append((time.monotonic(), int(data.split()[1])))

    def received_after(self, when: float) -> int:
        return sum(1 for t, _ in self.received if t > when)

    def wait_received_after(self, when: float, count: int, timeout: float = 5.0) -> bool:
        """True once ``count`` packets arrived after ``when`` (traffic flows again)."""
        return wait_until(lambda: self.received_after(when) >= count, timeout)

    def finish(self) -> tuple[int, int]:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        self.rx.close()
        self.tx.close()
        seen = {seq for _, seq in self.received}
        return self.sent, self.sent - len(seen)


def echo_server(lab: Lab, port: int, answer: str = "peer") -> subprocess.Popen:
    """A TCP server on SERVER:port: ``peer`` answers "server peer=IP got=LINE", ``banner`` sends
    "the real server" at once."""
    if answer == "peer":
        body = ("    c, peer = s.accept(); line = c.makefile().readline()\n"
                "    c.sendall(f'server peer={peer[0]} got={line.strip()}\\n'.encode()); c.close()\n")
    else:
        body = "    c, peer = s.accept(); c.sendall(b'the real server\\n'); c.close()\n"
    return lab.popen("server", [PY, "-c", (
        "import socket\n"
        "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('{SERVER}', {port})); s.listen()\n"
        "while True:\n" + body)])


# heartbeats every 0.5 s, evicted after 6 misses (3 s); the engine's watchdog looks every 0.5 s
WATCHDOG_BOXD_OPTIONS = ("--heartbeat", "0.5", "--heartbeat-misses", "6")


def hung_booster_watchdog(lab: Lab, boxd: Boxd, port: int, rules_present, *, stall: float,
                          heartbeat_deadline: float = 3.0, rate: int = 2000) -> dict:
    """The engine's watchdog against a hung booster, the same for every engine.

    A redirecting booster in the path of a steady stream is SIGSTOPped (boxd started with
    :data:`WATCHDOG_BOXD_OPTIONS` and the engine's ``stall`` bound).  boxd must evict it for the
    engine's reason, not for missed heartbeats, its rules must leave the kernel
    (``rules_present()`` turns false) within the bound (stall + two looks + 0.5 s to remove
    them, and before heartbeats would have), and the stream must flow to the server again.  Returns
    the measurements (``reason``: boxd's eviction line, ``removed_after`` s, ``sent``, ``lost``).
    """
    booster = TestBooster(lab, boxd, "redirect", port)
    stream = Stream(lab, port, rate=rate)
    try:
        booster.wait_for(lambda e: e["kind"] == "packet")          # it is in the path
        assert rules_present()
        booster.kill(signal.SIGSTOP)
        hung = time.monotonic()
        assert wait_until(lambda: "evicting booster" in boxd.log.read_text(), 5), boxd.log.read_text()[-2000:]
        assert wait_until(lambda: not rules_present(), 2), "evicted, but its rules are still in the kernel"
        removed_after = time.monotonic() - hung
        flowing = stream.wait_received_after(hung + removed_after, rate // 4, timeout=5)
        sent, lost = stream.finish()
    finally:
        stream.stop.set()
        booster.kill(signal.SIGKILL)
        boxd.stop()
    reason = next(line for line in boxd.log.read_text().splitlines() if "evicting booster" in line)
    print(f"\nhung booster: {reason.split(': ', 1)[-1]}; rules removed {removed_after:.2f}s after SIGSTOP; "
          f"sent {sent}, lost {lost}")
    assert "missed heartbeats" not in reason, reason
    bound = min(stall + 2 * 0.5 + 0.5, heartbeat_deadline)
    assert removed_after < bound, f"rules removed {removed_after:.2f}s after SIGSTOP, bound {bound:.2f}s"
    assert flowing, "traffic did not pass again after the rules were removed"
    # lost: at most what reached the hung booster until its rules went (and what was in flight)
    assert lost <= rate * (removed_after + 0.3) + 50, (sent, lost)
    return {"reason": reason, "removed_after": removed_after, "sent": sent, "lost": lost}


# ---------------------------------------------------------------- what the suite may leave behind

BPF_NAMES = {"boxd_xdp", "boxd_tc"}
BPF_MAP_NAMES = {"rules", "exact", "by_dport", "by_prefix", "general", "counters", "stats", "config", "groups",
                 "copies", "socks", "flows"}


def kernel_objects() -> dict[str, set]:
    """What the engines could leave in the host's kernel: BPF programs and maps of boxd's object
    (by id), pins and bpffs mounts, and, in the host's own namespace, qdiscs, XDP programs, the
    multicast veth and policy-routing rules of ours."""
    def bpftool(kind: str) -> list[dict]:
        out = subprocess.run(["bpftool", "-j", kind, "show"], capture_output=True, text=True).stdout
        return json.loads(out or "[]")

    found: dict[str, set] = {
        "programs": {(p["id"], p.get("name")) for p in bpftool("prog") if p.get("name") in BPF_NAMES},
        "maps": {(m["id"], m.get("name")) for m in bpftool("map") if m.get("name") in BPF_MAP_NAMES},
        "pins": set(), "bpffs_mounts": set(),
    }
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "bpf":
                found["bpffs_mounts"].add(fields[1])
                with contextlib.suppress(OSError):
                    found["pins"] |= {f"{fields[1]}/{n}" for n in os.listdir(fields[1]) if n.startswith("boxd-")}
    host = {
        "links": subprocess.run(["ip", "-d", "link"], capture_output=True, text=True).stdout,
        "qdiscs": subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout,
        "rules": subprocess.run(["ip", "rule"], capture_output=True, text=True).stdout,
    }
    found["host"] = ({"boxd_xdp attached"} if "boxd_xdp" in host["links"] else set()) \
        | ({"bbxdpmc veth"} if "bbxdpmc" in host["links"] else set()) \
        | {line.strip() for line in host["qdiscs"].splitlines() if "clsact" in line} \
        | {line.strip() for line in host["rules"].splitlines() if "lookup 178" in line}
    return found


def left_behind(before: dict[str, set]) -> dict[str, set]:
    """What appeared since ``before`` and is still there (programs and maps are freed after an
    RCU grace period: waited for, up to 5 s), plus the namespaces of every lab of this run."""
    def new() -> dict[str, set]:
        now = kernel_objects()
        out = {kind: now[kind] - before.get(kind, set()) for kind in now}
        out["namespaces"] = {ns for name in LABS for ns in lab_namespaces(name)}
        return {kind: items for kind, items in out.items() if items}

    wait_until(lambda: not new(), 5, interval=0.1)
    return new()


def assert_example_booster_filters_and_counts(lab: Lab, boxd: Boxd, tmp_path: Path, http_port: int, *,
                                              delivery: str, header_bytes: int) -> None:
    """booster-example (the library's UDP counter/filter), unchanged, on any engine: it drops what
    starts with SPAM on its port, leaves other ports untouched, and the kernel's per-rule counters
    reach ``/api/rules`` (``header_bytes`` per packet: what the engine's counter counts beyond the
    payload)."""
    stats = tmp_path / "example.json"
    log = tmp_path / "example.log"
    example = lab.popen("box", [PY, "-m", "boxcore.examples.udp_counter", "--control", boxd.control,
                                "--port", "9020", "--drop-prefix", "SPAM", "--report-every", "0",
                                "--stats-json", str(stats)], stderr=open(log, "w"))

    def rules_api():
        import urllib.request

        with lab.inside("box"):
            return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/rules", timeout=5).read())

    try:
        # its rule is in place and its socket or queue bound (until then, packets would pass: fail-open)
        assert wait_until(lambda: "counting udp port" in log.read_text(), 10), log.read_text()
        payloads = [b"one", b"SPAM two", b"three", b"SPAM four", b"five"]
        assert exchange(lab, payloads, 9020) == [b"one", b"three", b"five"]
        assert exchange(lab, [b"SPAM elsewhere"], 9021) == [b"SPAM elsewhere"]     # untouched, unseen
        assert wait_until(lambda: [r["packets"] for r in rules_api()] == [5], 5), rules_api()
        assert [(r["delivery"], r["packets"], r["bytes"]) for r in rules_api()] == \
            [(delivery, 5, sum(header_bytes + len(p) for p in payloads))]
        example.terminate()
        assert example.wait(10) == 0
    finally:
        if example.poll() is None:
            example.kill()
    totals = json.loads(stats.read_text())["totals"]
    assert (totals["packets"], totals["dropped"], totals["passed"]) == (5, 2, 3)
    assert list(totals["per_source"]) and all(k.startswith(f"{CLIENT}:") for k in totals["per_source"])
