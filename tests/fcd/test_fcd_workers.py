"""fcd-server as workers on Redis streams: real redis-server, real front and worker processes.

A replay of a trace's probes and light changes (UDP) and of box reports (XML-RPC) goes through the
front into the partitions' streams; one worker is SIGKILLed in the middle of the replay, once it
has applied part of the data.  Its partitions move to the other worker, which claims what it left
pending: every datagram and every report is applied exactly once.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import time
import urllib.request
import xmlrpc.client

import pytest

from boxcore.procs import free_port
from fcd.aggregate import RoadReport
from fcd.gen import Stream
from fcd.stack import Stack
from tests.redis_support import redis_cluster, redis_node  # noqa: F401  (fixtures)

BOX_REPORTS = 600


def _status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=20) as resp:
        return json.loads(resp.read())


def _wait(what: str, check, timeout: float = 90.0):
    """Poll a condition across processes (there is no event to wait on) until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout}s")
        time.sleep(0.1)


def _box_reports(n_roads: int, start: int, stop: int) -> list[dict]:
    """Distinct reports, each road's times increasing, later than any time of the trace (240 s)
    and within the server's data-clock skew of it (300 s: farther ahead is refused)."""
    return [RoadReport(road=k % n_roads, t=241.0 + 0.1 * k, green=True, queue=1, cars=2, density=1.0,
                       mean_speed=5.0, departures=1, interval=1.0, was_green=False).to_xmlrpc()
            for k in range(start, stop)]


@pytest.mark.parametrize("store", ["redis_node", "redis_cluster"])
def test_sigkill_of_a_worker_mid_replay_loses_nothing_and_counts_nothing_twice(store, request, small_trace,
                                                                             tmp_path):
    url = request.getfixturevalue(store).url
    trace_path = tmp_path / "trace.npz"
    small_trace.save(trace_path)
    stack = Stack(tmp_path / "roles", log_level="info")
    udp, http = free_port(socket.SOCK_DGRAM), free_port()
    common = ["--store", url, "--prefix", f"t{secrets.token_hex(3)}", "--lease", "1"]
    try:
        front = stack.start("front", "fcd.server", ["--city", str(trace_path), "--udp", f"127.0.0.1:{udp}",
                                                    "--http", f"127.0.0.1:{http}", "--partitions", "4",
                                                    "--model-interval", "1", *common])
        _run(stack.wait_ready(front, timeout=60))
        workers = {}
        for name in ("wA", "wB"):
            workers[name] = stack.start(name, "fcd.server", ["--worker", "--city", str(trace_path),
                                                            "--worker-name", name, *common])
            _run(stack.wait_ready(workers[name], timeout=60))
        _wait("both workers own partitions", lambda: {p["owner"] for p in
                                                       _status(http)["stream"]["partitions"]} == {"wA", "wB"})

        stream = Stream(small_trace, None, 1)
        datagrams = stream.encode(0, len(stream), generator=1, first_seq=0, loop=0)
        n_roads = small_trace.city.n_roads
        rpc = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{http}/RPC2")
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        third = len(datagrams) // 3

        def replay(lo: int, hi: int, box_lo: int, box_hi: int) -> None:
            for i in range(lo, hi, 200):
                for d in datagrams[i:min(i + 200, hi)]:
                    tx.sendto(d, ("127.0.0.1", udp))
                time.sleep(0.002)            # paced: a loopback burst must not overrun the front's buffer
            for k in range(box_lo, box_hi, 50):
                rpc.fcd.report("box0", _box_reports(n_roads, k, min(k + 50, box_hi)))

        replay(0, third, 0, BOX_REPORTS // 3)
        applied_a = _wait("worker A applied part of the replay",
                          lambda: max(0, _status(http)["stream"]["totals"]["applied_by"].get("wA", 0) - 999))
        applied_a += 999
        os.kill(workers["wA"].proc.pid, signal.SIGKILL)
        replay(third, len(datagrams), BOX_REPORTS // 3, BOX_REPORTS)
        tx.close()

        def drained():
            s = _status(http)
            t = s["stream"]["totals"]
            done = (s["udp"]["datagrams"] == len(datagrams) and not s["stream"]["front"]["queue_refused"]
                    and t.get("applied_items", 0) == t.get("appended_items", -1) and t.get("backlog") == 0
                    and s["stream"]["front"]["appended_entries"] == t.get("appended_entries"))
            return s if done else None

        status = _wait("every appended entry applied", drained, timeout=120)
        totals = status["stream"]["totals"]
        sent_probes = sum(len(d) == 38 for d in datagrams)
        assert status["udp"]["received"] == len(datagrams) and status["udp"]["lost"] == 0
        assert totals["probes"] == sent_probes                      # 0 lost, 0 counted twice
        assert totals["lights"] == len(datagrams) - sent_probes
        assert totals["reports_box"] == BOX_REPORTS, json.dumps(status["stream"])
        assert totals.get("refused_items", 0) == 0 and totals.get("malformed_entries", 0) == 0
        # worker B took over A's partitions; A had applied some of the data before it died
        assert {p["owner"] for p in status["stream"]["partitions"]} == {"wB"}
        assert 1000 <= applied_a <= totals["applied_by"]["wA"] < totals["applied_items"]
        assert totals["applied_by"]["wA"] + totals["applied_by"]["wB"] == totals["applied_items"]
        # the model ran on what the workers applied
        _wait("the front's model saw the applied reports",
              lambda: _status(http)["counters"].get("reports_box", 0) == BOX_REPORTS)
    finally:
        _run(stack.stop_all())


def _run(coro):
    import asyncio
    return asyncio.run(coro)


def test_front_with_workers_option_starts_and_stops_its_workers(redis_node, small_trace, tmp_path):
    """``fcd-server --store URL --workers 2``: one command, two worker children sharing the partitions."""
    trace_path = tmp_path / "trace.npz"
    small_trace.save(trace_path)
    stack = Stack(tmp_path / "roles")
    udp, http = free_port(socket.SOCK_DGRAM), free_port()
    try:
        front = stack.start("front", "fcd.server", ["--city", str(trace_path), "--udp", f"127.0.0.1:{udp}",
                                                    "--http", f"127.0.0.1:{http}", "--store", redis_node.url,
                                                    "--prefix", f"t{secrets.token_hex(3)}", "--workers", "2"])
        _run(stack.wait_ready(front, timeout=60))
        _wait("two workers own the partitions",
              lambda: len({p["owner"] for p in _status(http)["stream"]["partitions"]} - {""}) == 2)
        stream = Stream(small_trace, None, 1)
        datagrams = stream.encode(0, 3000, generator=1, first_seq=0, loop=0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for d in datagrams:
                tx.sendto(d, ("127.0.0.1", udp))
        def applied():
            status = _status(http)
            totals = status["stream"]["totals"]
            return status if totals.get("probes", 0) + totals.get("lights", 0) == len(datagrams) else None

        status = _wait("everything applied", applied)
        assert len(status["stream"]["totals"]["applied_by"]) == 2
        worker_pids = [int(line.split()[0]) for line in
                       __import__("subprocess").run(["pgrep", "-P", str(front.proc.pid)], capture_output=True,
                                                    text=True).stdout.split()]
        assert len(worker_pids) == 2
        assert _run(stack.stop(front)) == 0
        for pid in worker_pids:                  # stopped with their front
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        _run(stack.stop_all())


def test_a_worker_with_another_city_is_refused(redis_node, small_trace, tmp_path):
    """Front and workers must read one city: a worker given another is refused with a clear error."""
    from fcd.city import grid_city
    from fcd.sim import Simulator
    trace_path, other_path = tmp_path / "trace.npz", tmp_path / "other.npz"
    small_trace.save(trace_path)
    Simulator(grid_city(3, 3, block=120.0, seed=9), cars=10, seed=1).run(20.0).save(other_path)
    stack = Stack(tmp_path / "roles")
    common = ["--store", redis_node.url, "--prefix", f"t{secrets.token_hex(3)}"]
    try:
        front = stack.start("front", "fcd.server", ["--city", str(trace_path), "--udp", "127.0.0.1:0",
                                                    "--http", f"127.0.0.1:{free_port()}", *common])
        _run(stack.wait_ready(front, timeout=60))
        from boxcore.procs import python_module
        worker = _run(stack.group.run("worker", [*python_module("fcd.server"), "--worker", "--city",
                                                 str(other_path), *common], timeout=60, check=False))
        assert worker.returncode == 2
        assert "front and workers must read the same --city" in worker.output()
    finally:
        _run(stack.stop_all())
