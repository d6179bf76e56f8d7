"""Data-time batching in the booster: the same trace replayed at different speeds (so each
processing batch spans a different stretch of data time) gives the same uplink requests with
the same road reports and counter reports, hence the same reduction factor."""

import asyncio

import pytest

from fcd import wire
from fcd.booster import BoxAggregator
from fcd.rpc import KeepAliveClient, ReliableUplink
from fcd.server import FcdServer
from tests.polling import until


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


async def settled_box(port: int, box: str, after_seq: int = 0, timeout: float = 60.0) -> dict:
    """The server's status once the box sent final counters (``idle``) newer than ``after_seq``
    (polled: the box and the server are other processes)."""
    import json
    import urllib.request

    def status_once_settled():
        status = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10).read())
        entry = status["boxes"].get(box, {})
        return status if entry.get("idle") and entry.get("stats_seq", 0) > after_seq else None
    return await until(lambda: asyncio.to_thread(status_once_settled), f"box {box}'s final counters", timeout,
                       step=0.2)


@pytest.mark.slow
async def test_real_replays_at_two_speeds_give_the_same_requests(tmp_path, small_trace):
    from boxcore.procs import free_port
    from fcd.stack import Stack, run_gen_async
    from fcd.trace import Trace
    short = Trace(small_trace.city, small_trace.probes[small_trace.probes["t"] < 120],
                  small_trace.lights[small_trace.lights["t"] < 120])
    trace = tmp_path / "t.npz"
    short.save(trace)
    results = {}
    for speed in (12, 48):
        stack = Stack(tmp_path / f"roles{speed}")
        try:
            udp, http, box_port = free_port(2), free_port(), free_port(2)
            await stack.wait_ready(stack.server(trace, udp, http, None))
            # the final report comes after 3 s of silence: a busy machine does not split a replay
            await stack.box("b", trace, box_port, udp, http, booster_extra=["--stats-interval", "3"])
            before = await settled_box(http, "b")           # the box's start-up report
            gen = await run_gen_async(trace, [("127.0.0.1", box_port)], ["--processes", "1", "--speed", str(speed)])
            after = await settled_box(http, "b", before["boxes"]["b"]["stats_seq"])
            assert after["boxes"]["b"]["received"] == gen["sent"]
            results[speed] = (after["counters"]["reports_box"],
                              after["counters"]["http_requests"] - before["counters"]["http_requests"])
        finally:
            await stack.stop_all()
    assert results[12] == results[48]
    reports, requests = results[12]
    assert reports > 50 and requests <= 2 * 120 + 2      # one request per half second of data at most
