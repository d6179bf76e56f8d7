import asyncio
import socket
import xmlrpc.client

import pytest

from fcd import wire
from fcd.aggregate import Aggregator
from fcd.booster import BoxAggregator
from fcd.rpc import KeepAliveClient, ReliableUplink, RpcError
from fcd.server import FcdServer


async def start_server(city, port=0, limits=None):
    server = FcdServer(city, limits=limits)
    _, port = await server.start_http("127.0.0.1", port)
    return server, server.http, port


def reports_from(trace, limit_t):
    agg = Aggregator(trace.city)
    out = []
    for t, probes, lights in trace.steps():
        if t > limit_t:
            break
        agg.feed(probes)
        for ch in lights:
            out += agg.light_change(int(ch["light"]), t, int(ch["green"]))
    return out


async def test_one_connection_carries_many_calls(small_trace):
    server, runner, port = await start_server(small_trace.city)
    client = KeepAliveClient("127.0.0.1", port)
    for _ in range(20):
        assert "fcd.report" in await client.call("system.listMethods")
    results = await client.multicall([("system.listMethods", ()), ("no.such", ()), ("fcd.report", ("b", []))])
    assert isinstance(results[1], xmlrpc.client.Fault)
    assert results[2] == {"accepted": 0, "duplicates": 0, "rejected": 0}
    assert client.connections == 1 and client.requests == 21
    assert server.status()["http_connections"] == 1 and server.stats["http_requests"] == 21
    await client.aclose()
    await runner.close()


async def test_reconnect_after_server_restart_loses_nothing(small_trace):
    city = small_trace.city
    reports = reports_from(small_trace, 200)
    assert len(reports) > 40
    server1, runner1, port = await start_server(city)
    client = KeepAliveClient("127.0.0.1", port, timeout=2.0)
    uplink = ReliableUplink(client, batch=5, interval=0.01, backoff=(0.02, 0.1))
    stop = asyncio.Event()
    task = asyncio.create_task(uplink.run(stop))
    half = len(reports) // 2
    for rep in reports[:half]:
        uplink.put("fcd.report", "b1", [rep.to_xmlrpc()])
    await asyncio.wait_for(uplink.idle.wait(), 10)
    await runner1.close()                                    # the server goes away
    for rep in reports[half:]:
        uplink.put("fcd.report", "b1", [rep.to_xmlrpc()])
    await asyncio.wait_for(uplink.failing.wait(), 10)
    assert uplink.stats["failures"] > 0 and len(uplink.queue) > 0
    server2, runner2, _ = await start_server(city, port)        # restarted
    await asyncio.wait_for(uplink.idle.wait(), 10)
    assert not uplink.failing.is_set()
    stop.set()
    await task
    got = set(server1.seen) | set(server2.seen)
    assert got == {r.key for r in reports}
    assert uplink.stats["acked"] == len(reports) and uplink.stats["dropped"] == 0
    assert client.connections == 2
    await client.aclose()
    await runner2.close()


async def test_uplink_queue_is_bounded():
    client = KeepAliveClient("127.0.0.1", 1, timeout=0.1)
    uplink = ReliableUplink(client, max_queue=3)
    for i in range(5):
        uplink.put("fcd.report", "b", [])
    assert len(uplink.queue) == 3 and uplink.stats["dropped"] == 2
    with pytest.raises(RpcError):
        await client.call("system.listMethods")


def send_raw(trace, port, generator=9, skip=()):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    seq = 0
    sent = 0
    for t, probes, lights in trace.steps():
        data = wire.probes_from_trace(probes, generator, seq)
        for i in range(len(probes)):
            if seq + i not in skip:
                sock.sendto(data[i * wire.PROBE_SIZE:(i + 1) * wire.PROBE_SIZE], ("127.0.0.1", port))
                sent += 1
        seq += len(probes)
        for ch in lights:
            sock.sendto(wire.encode(wire.LightChange(generator, seq, int(ch["light"]), t, int(ch["phase"]),
                                                     int(ch["green"]))), ("127.0.0.1", port))
            seq += 1
            sent += 1
    sock.sendto(b"garbage", ("127.0.0.1", port))
    sock.close()
    return sent


async def test_server_without_boxes_raw_udp(small_trace):
    server = FcdServer(small_trace.city)
    _, port = server.open_udp("127.0.0.1", 0, 8 << 20)
    short = small_trace.__class__(small_trace.city, small_trace.probes[small_trace.probes["t"] < 100],
                                  small_trace.lights[small_trace.lights["t"] < 100])
    sent = send_raw(short, port, skip={5, 6, 7})      # loopback: all in the socket when sendto returns
    server.drain_udp()
    st = server.status()
    assert st["udp"]["syscalls"] < sent / 100          # batch receive: many datagrams per system call
    assert st["udp"]["received"] == sent and st["udp"]["lost"] == 3
    assert st["udp"]["malformed"] == 1
    expected = reports_from(short, 100)
    assert server.stats["reports_raw"] == len(expected) > 0
    asyncio.get_running_loop().remove_reader(server.udp_sock.fileno())
    server.udp_sock.close()


async def test_box_and_raw_data_combine_without_double_counting(small_trace):
    city = small_trace.city
    server, runner, port = await start_server(city)
    reports = reports_from(small_trace, 120)
    # the same road reports arrive from the raw path and from a box: counted once
    for rep in reports[:10]:
        server.accept(rep, "raw")
    client = KeepAliveClient("127.0.0.1", port)
    answer = await client.call("fcd.report", "b1", [r.to_xmlrpc() for r in reports])
    assert answer == {"accepted": len(reports) - 10, "duplicates": 10, "rejected": 0}
    assert server.model.observed == len(reports)
    bad = reports[0].to_xmlrpc()
    bad["queue"] = bad["cars"] + 1
    answer = await client.call("fcd.report", "b1", [bad, {"road": "x"}])
    assert answer["rejected"] == 2
    # malformed XML is answered with a fault, and the connection keeps working
    body = await client.post(b"<methodCall><oops")
    with pytest.raises(xmlrpc.client.Fault):
        xmlrpc.client.loads(body)
    assert await client.call("fcd.box_stats", "b1", {"received": 5, "lost": 1}) is True
    assert server.boxes["b1"]["received"] == 5
    await client.aclose()
    await runner.close()


async def test_box_aggregator_reports_through_the_uplink(small_trace):
    city = small_trace.city
    server, runner, port = await start_server(city)
    client = KeepAliveClient("127.0.0.1", port)
    uplink = ReliableUplink(client, interval=0.01)
    box = BoxAggregator(city, "b1", uplink)
    stop = asyncio.Event()
    task = asyncio.create_task(uplink.run(stop))

    class Pkt:
        def __init__(self, payload):
            self.payload = payload

    seq = 0
    for t, probes, lights in small_trace.steps():
        data = wire.probes_from_trace(probes, 1, seq)
        seq += len(probes)
        for i in range(len(probes)):
            assert box.on_packet(Pkt(data[i * wire.PROBE_SIZE:(i + 1) * wire.PROBE_SIZE])) is None
        for ch in lights:
            box.on_packet(Pkt(wire.encode(wire.LightChange(1, seq, int(ch["light"]), t, int(ch["phase"]),
                                                           int(ch["green"])))))
            seq += 1
        if t % 20 == 0:
            box.flush()
    box.idle()                   # the data stopped: counters reported, everything queued is due
    await asyncio.wait_for(uplink.idle.wait(), 10)
    stop.set()
    await task
    expected = reports_from(small_trace, 1e9)
    assert server.stats["reports_box"] == len(expected)
    assert box.counters()["received"] == seq and box.counters()["lost"] == 0
    assert client.connections == 1
    # many datagrams became few requests: the reduction the paper is about
    assert seq / server.stats["http_requests"] > 40
    await client.aclose()
    await runner.close()


from hypothesis import given, settings, strategies as st

_leaf = st.one_of(st.integers(-3, 300), st.text(max_size=4), st.booleans(), st.floats(allow_nan=False))
_value = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
_methods = st.sampled_from(["fcd.report", "fcd.box_stats", "fcd.status", "fcd.history", "system.multicall",
                            "system.listMethods", "nope"])


@settings(max_examples=200, deadline=None)
@given(_methods, st.lists(_value, max_size=3))
def test_xmlrpc_dispatch_only_answers_or_faults(small_city, method, params):
    server = FcdServer(small_city)
    try:
        server.dispatch(method, tuple(params))
    except xmlrpc.client.Fault:
        pass


async def test_uplink_cuts_batches_to_the_body_limit(small_trace):
    server, runner, port = await start_server(small_trace.city)
    reports = reports_from(small_trace, 200)
    client = KeepAliveClient("127.0.0.1", port, max_body=4096)
    uplink = ReliableUplink(client, batch=500, interval=0.01)
    for rep in reports:
        uplink.put("fcd.report", "b1", [rep.to_xmlrpc()])
    uplink.put("fcd.report", "b1", [r.to_xmlrpc() for r in reports])    # alone over the limit: never sendable
    stop = asyncio.Event()
    stop.set()                                # drain what is queued, then stop
    await uplink.run(stop)
    assert uplink.stats["batches_split"] > 0 and uplink.stats["unmarshallable"] == 1
    assert uplink.stats["acked"] == len(reports) and not uplink.queue
    assert set(server.seen) == {r.key for r in reports}
    assert client.connections == 1
    await client.aclose()
    await runner.close()


async def test_road_history_over_xmlrpc_and_http(small_trace):
    import json
    import urllib.request
    city = small_trace.city
    server, runner, port = await start_server(city)
    server.history = type(server.history)(city.n_roads, depth=4)
    reports = reports_from(small_trace, 1e9)
    client = KeepAliveClient("127.0.0.1", port)
    await client.call("fcd.report", "b1", [r.to_xmlrpc() for r in reports])
    await server.publish()                      # one model run, no tuplespace
    road = max({r.road for r in reports}, key=lambda x: sum(r.road == x for r in reports))
    mine = [r for r in reports if r.road == road]
    assert len(mine) > 4
    got = await client.call("fcd.history", road, 10)
    assert [r["t"] for r in got["reports"]] == [r.t for r in mine[-4:]]    # the newest 4, oldest first
    assert got["reports"][-1]["source"] == "box"
    (pred,) = got["predictions"]
    assert pred["run"] == server.latest.run and len(pred["traverse"]) == server.horizon + 1
    assert pred["traverse"][0] == round(float(server.latest.traverse[0, road]), 2)
    assert server.status()["history"]["reports_evicted"] == len(reports) - sum(
        min(4, sum(r.road == x for r in reports)) for x in {r.road for r in reports})

    def get(path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, None

    status, body = await asyncio.to_thread(get, f"/api/roads/{road}/history?limit=2")
    assert status == 200 and body["reports"] == got["reports"][-2:] and body["predictions"] == got["predictions"]
    assert (await asyncio.to_thread(get, f"/api/roads/{city.n_roads}/history"))[0] == 404
    assert (await asyncio.to_thread(get, "/api/roads/x/history"))[0] == 400
    with pytest.raises(xmlrpc.client.Fault, match="unknown road"):
        await client.call("fcd.history", -1, 5)
    await client.aclose()
    await runner.close()
