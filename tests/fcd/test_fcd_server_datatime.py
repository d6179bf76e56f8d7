"""Data-time batching in the booster: the same trace replayed at different speeds (so each
processing batch spans a different stretch of data time) gives the same uplink requests with
the same road reports and counter reports, hence the same reduction factor."""

import asyncio

import pytest

from fcd import wire
from fcd.booster import BoxAggregator
from fcd.rpc import KeepAliveClient, ReliableUplink
from fcd.server import FcdServer


def datagrams(trace):
    """(t, payloads) per trace step, as generator 1 would send them."""
    seq = 0
    for t, probes, lights in trace.steps():
        data = wire.probes_from_trace(probes, 1, seq)
        seq += len(probes)
        out = [data[i * wire.PROBE_SIZE:(i + 1) * wire.PROBE_SIZE] for i in range(len(probes))]
        for ch in lights:
            out.append(wire.encode(wire.LightChange(1, seq, int(ch["light"]), t, int(ch["phase"]), int(ch["green"]))))
            seq += 1
        yield t, out


async def replay(trace, seconds_per_flush: float) -> tuple[dict, dict, list]:
    """Feed the box ``seconds_per_flush`` of data per processing batch (the replay speed times
    the flush interval); the server's counters and the requests' contents."""
    server = FcdServer(trace.city)
    _, port = await server.start_http("127.0.0.1", 0)
    requests = []
    original = server.dispatch

    def recording(method, params):
        if method == "system.multicall":
            requests.append([(c["methodName"], len(c["params"][1]) if c["methodName"] == "fcd.report" else 0)
                             for c in params[0]])
        return original(method, params)

    server.dispatch = recording
    client = KeepAliveClient("127.0.0.1", port)
    uplink = ReliableUplink(client, interval=None)
    box = BoxAggregator(trace.city, "b1", uplink, rpc_interval=0.5, stats_interval=1.0)
    stop = asyncio.Event()
    task = asyncio.create_task(uplink.run(stop))
    next_flush = None
    for t, payloads in datagrams(trace):
        box.on_batch(payloads)
        next_flush = t + seconds_per_flush if next_flush is None else next_flush
        if t >= next_flush:
            box.flush()
            next_flush = t + seconds_per_flush
            await asyncio.sleep(0)            # the uplink runs while data keeps coming
    box.idle()
    await asyncio.wait_for(uplink.idle.wait(), 20)
    stop.set()
    await task
    await client.aclose()
    await server.http.close()
    return dict(server.stats), box.stats, requests


async def test_same_requests_at_any_replay_speed(small_trace):
    slow_server, slow_box, slow_requests = await replay(small_trace, 1.0)      # 10 x real time, 0.1 s flushes
    fast_server, fast_box, fast_requests = await replay(small_trace, 20.0)     # 200 x real time
    assert slow_server["reports_box"] == fast_server["reports_box"] > 100
    assert slow_server["http_requests"] == fast_server["http_requests"]
    assert slow_requests == fast_requests             # the same calls, batched the same way
    assert slow_box["stats_seq"] == fast_box["stats_seq"] >= 200    # box_stats every data second
    # many datagrams, few requests: one per half second of data at most, plus the final one
    assert fast_server["http_requests"] <= 2 * 240 + 1


async def test_uplink_batches_only_at_marks():
    client = KeepAliveClient("127.0.0.1", 9)
    uplink = ReliableUplink(client, interval=None, batch=4)
    for i in range(2):
        uplink.put("fcd.report", "b", [])
    stop = asyncio.Event()
    assert uplink._sendable(stop) == 0                 # not due: waits for a mark or a full batch
    uplink.mark_due()
    uplink.put("fcd.report", "b", [])
    assert uplink._sendable(stop) == 2                 # only the calls before the mark
    uplink.put("fcd.report", "b", [])
    assert uplink._sendable(stop) == 4                 # a full batch goes at once
    stop.set()
    uplink.put("fcd.report", "b", [])
    assert uplink._sendable(stop) == 4                 # stopping: everything, a batch at a time


async def test_a_replay_from_the_start_restarts_the_clock(small_trace):
    uplink = ReliableUplink(KeepAliveClient("127.0.0.1", 9), interval=None)     # never started: we read marks
    box = BoxAggregator(small_trace.city, "b1", uplink, rpc_interval=0.5, stats_interval=1.0)
    for rnd in range(2):
        marks_before = box.stats["intervals"]
        for t, payloads in datagrams(small_trace):
            box.on_batch(payloads)
            if t % 10 == 0:
                box.flush()
        box.flush()
        # the second replay closes as many data-time intervals as the first
        assert box.stats["intervals"] - marks_before >= 2 * 230
    assert box.stats["clock_restarts"] == 1
