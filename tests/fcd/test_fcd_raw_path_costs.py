"""The raw path's cheaper steps give what the general ones give, and the server counts what the
kernel drops.

- A light change's reports read their roads' states in Python (``Aggregator._states_of``): the
  same cars, queues and mean speeds as ``road_states`` (floats compared with ==), at every light
  change of a real trace, with cars halted at the lights (queues) and on roads no light controls.
- A road listed twice gets a second report after the first one's reset, as before.
- ``fcd-server`` reads the kernel's drop counter of its raw socket (``SO_MEMINFO``) before each
  batch: a socket that overflowed is counted exactly and switches the server to its larger batch;
  a batch without new drops switches it back.
"""

import asyncio
import socket

import numpy as np

from boxcore.udpbatch import kernel_drops
from fcd import wire
from fcd.aggregate import Aggregator
from fcd.server import FcdServer


def _compare_states(agg: Aggregator, roads: list[int], t: float) -> tuple[int, int]:
    cars, queue, mean = agg.road_states(t)
    got = agg._states_of(roads, t)
    for road in roads:
        assert got[road] == (int(cars[road]), int(queue[road]), float(mean[road])), road
    return sum(got[r][1] for r in roads), sum(got[r][0] for r in roads)


def test_states_of_a_light_changes_roads_equal_road_states(small_trace):
    agg = Aggregator(small_trace.city)
    rng = np.random.default_rng(4)
    compared = queued = cars = 0
    for t, probes, lights in small_trace.steps():
        agg.feed(probes)
        for ch in lights:
            roads = list(agg.city.lights[int(ch["light"])].roads)
            q, c = _compare_states(agg, roads, t)
            # and any few roads, some without a light or without cars
            others = rng.choice(agg.city.n_roads, size=int(rng.integers(1, 6)), replace=False).tolist()
            _compare_states(agg, others, t + float(rng.uniform(0, 20)))    # later: some cars stale
            agg.light_change(int(ch["light"]), t, int(ch["green"]))
            compared, queued, cars = compared + 1, queued + q, cars + c
    assert compared > 50 and queued > 0 and cars > queued       # halted and moving cars were compared


def test_a_road_listed_twice_is_reported_twice_the_second_after_the_reset(small_trace):
    agg = Aggregator(small_trace.city)
    for t, probes, _ in small_trace.steps():
        agg.feed(probes)
        if t >= 60:
            break
    road = int(np.argmax(agg.departures))
    assert agg.departures[road] > 0
    first, second = agg._reports([(road, True, False), (road, False, True)], t)
    assert first.departures > 0 and first.samples > 0
    assert second.departures == 0 and second.samples == 0.0 and second.interval == 0.0
    assert (first.cars, first.queue, first.mean_speed) == (second.cars, second.queue, second.mean_speed)


def _probe(seq: int) -> bytes:
    return wire.encode(wire.CarProbe(1, seq, seq % 50, 10.0 + seq * 1e-3, 100.0, 100.0, 5.0, 90.0))


async def test_an_overflowing_socket_is_counted_and_switches_to_the_larger_batch(small_trace):
    server = FcdServer(small_trace.city)
    _, port = server.open_udp("127.0.0.1", 0, 0)
    sock = server.udp_sock
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)     # holds a few dozen datagrams
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert server.batch_now == server.inline_batch < server.overload_batch
        sent = 2000
        for seq in range(sent):                        # loopback: queued or dropped when sendto returns
            sender.sendto(_probe(seq), ("127.0.0.1", port))
        received = server.drain_udp()
        dropped = sent - received
        assert 0 < received < sent // 4
        assert server.stats["udp_kernel_drops"] == dropped == kernel_drops(sock)
        assert server.batch_now == server.overload_batch
        assert server.status()["udp"]["kernel_drops"] == dropped and server.status()["udp"]["batch"] == 8192
        for seq in range(sent, sent + 10):             # fits: no new drops, back to the smaller batch
            sender.sendto(_probe(seq), ("127.0.0.1", port))
        assert server.drain_udp() == 10
        assert server.stats["udp_kernel_drops"] == dropped and server.batch_now == server.inline_batch
        assert server.ingest.stats["probes"] == received + 10
    finally:
        sender.close()
        asyncio.get_running_loop().remove_reader(sock.fileno())
        sock.close()


async def _until(condition, timeout: float = 20.0) -> None:
    """Polled: the model loop runs on its own wall-clock interval, there is no event to wait on."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_a_wall_clock_model_run_needs_new_data_since_the_previous_run(small_trace):
    from tests.fcd.test_fcd_rpc_server import reports_from
    server = FcdServer(small_trace.city)
    reports = reports_from(small_trace, 200)
    for rep in reports[:len(reports) // 2]:
        server.accept(rep, "box")
    # the reason: on the same data a run predicts the same (the run number aside)
    first, again = server.model.predict(5), server.model.predict(5)
    assert all(np.array_equal(getattr(first, k), getattr(again, k)) for k in ("n", "q", "traverse"))
    stop = asyncio.Event()
    task = asyncio.create_task(server.model_loop(stop, 0.02))
    try:
        await _until(lambda: server.model.runs == 3)                 # the loop's first run
        await _until(lambda: server.stats["model_runs_skipped"] >= 5)
        assert server.model.runs == 3
        for rep in reports[len(reports) // 2:]:
            server.accept(rep, "box")
        await _until(lambda: server.model.runs == 4)
        skipped = server.stats["model_runs_skipped"]
        await _until(lambda: server.stats["model_runs_skipped"] >= skipped + 5)
        assert server.model.runs == 4 and server.latest.run == 4
    finally:
        stop.set()
        await task
