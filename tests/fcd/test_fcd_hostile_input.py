"""A review's findings on fcd-server's network-facing parts, each as the probe that got through:
spoofed data times, XML-RPC amplification and entity expansion, out-of-range numbers, unbounded
box stats.  Real sockets on loopback (the server in this process, as test_fcd_rpc_server)."""

import asyncio
import json
import socket
import xmlrpc.client

import pytest

from fcd import wire
from fcd.aggregate import RoadReport
from fcd.rpc import KeepAliveClient
from fcd.server import FcdServer, HttpLimits


def report(road: int, t: float, **extra) -> dict:
    rep = RoadReport(road=road, t=t, green=True, queue=0, cars=1, density=1.0, mean_speed=5.0,
                     departures=0, interval=1.0, was_green=True)
    return {**rep.to_xmlrpc(), **extra}


async def start(city, **kw):
    server = FcdServer(city, **kw)
    _, port = await server.start_http("127.0.0.1", 0)
    return server, port


async def post(port: int, body: bytes) -> bytes:
    """One raw XML-RPC POST; the whole answer's body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    answer = await asyncio.wait_for(reader.read(), 60)
    writer.close()
    return answer.split(b"\r\n\r\n", 1)[1]


def light(light_no: int, t: float, seq: int) -> bytes:
    return wire.encode(wire.LightChange(generator=9, seq=seq, light=light_no, t=t, phase=0, green=1))


def probe(t: float, seq: int) -> bytes:
    return wire.encode(wire.CarProbe(generator=9, seq=seq, car=1, t=t, x=10.0, y=10.0, speed=1.0, heading=0.0))


# ---------------------------------------------------------------- 1: data-clock poisoning

async def test_a_spoofed_datagram_far_ahead_does_not_move_the_data_clock(small_city):
    server, port = await start(small_city)
    _, udp = server.open_udp("127.0.0.1", 0, 1 << 20)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.sendto(light(0, 100.0, 1), ("127.0.0.1", udp))
        server.drain_udp()
        assert server.model.observed > 0 and server.model.latest_t == 100.0
        for seq, data in enumerate([light(0, 1e12, 2), light(0, 1e300, 3), probe(1e12, 4)], 5):
            sock.sendto(data, ("127.0.0.1", udp))
        sock.sendto(light(0, 140.0, 9), ("127.0.0.1", udp))      # real data goes on
        server.drain_udp()
    finally:
        sock.close()
    assert server.model.latest_t == 140.0
    assert server.ingest.stats["time_ahead"] == 3
    # a box's report as far ahead is refused the same way; one within the skew is taken
    client = KeepAliveClient("127.0.0.1", port)
    answer = await client.call("fcd.report", "box", [report(1, 1e12), report(1, 400.0)])
    assert answer == {"accepted": 1, "duplicates": 0, "rejected": 1}
    assert server.model.latest_t == 400.0 and server.stats["time_ahead"] == 1
    await client.aclose()
    await server.http.close()
    server.udp_sock.close()


def test_data_clock_refuses_only_beyond_the_skew_and_the_wall_clock():
    wall = [0.0]
    clock = wire.DataClock(300.0, max_rate=10.0, wall=lambda: wall[0])
    assert clock.admit(1e12 - 1) is True          # the first time sets the clock (no reference yet)
    clock = wire.DataClock(300.0, max_rate=10.0, wall=lambda: wall[0])
    assert clock.admit(50.0) and clock.admit(350.0) and not clock.admit(651.0) and clock.admit(10.0)
    assert clock.newest == 350.0 and clock.refused == 1
    import numpy as np
    ts = np.array([100.0, 650.0, 651.0, 1e300])
    assert clock.admit_mask(ts, np.ones(4, bool)).tolist() == [True, True, False, False]
    assert clock.refused == 3
    # after a quiet hour of wall time, real data an hour on is accepted (at most 10 data s per wall s)
    wall[0] = 3600.0
    assert clock.admit(350.0 + 3600.0) and not clock.admit(1e12)
    with pytest.raises(ValueError):
        wire.DataClock(float("nan"))


# ---------------------------------------------------------------- 2, 3: amplification

def multicall_body(calls: list[tuple[str, tuple]]) -> bytes:
    return xmlrpc.client.dumps(([{"methodName": m, "params": list(p)} for m, p in calls],),
                               "system.multicall", allow_none=True).encode()


async def test_a_small_multicall_cannot_make_a_large_reply(small_city):
    server, port = await start(small_city)
    client = KeepAliveClient("127.0.0.1", port)
    for road in range(small_city.n_roads):             # every road's history full
        await client.call("fcd.report", "box", [report(road, 100.0 + k) for k in range(128)])
    one = await post(port, xmlrpc.client.dumps((0, 128), "fcd.history").encode())
    assert len(one) > 50_000                          # one road's history is a large answer
    body = multicall_body([("fcd.history", (0, 128))] * 900)
    answer = await post(port, body)
    assert len(answer) < len(body) and b"faultCode" in answer and b"<int>7</int>" in answer
    assert server.stats["rpc_refused_reply"] == 1
    # more calls than a box ever sends in one multicall: refused before any runs
    answer = await post(port, multicall_body([("system.listMethods", ())] * 1001))
    assert b"1001 calls refused" in answer and server.stats["rpc_refused_calls"] == 1
    # what a box sends is still served whole
    results = await client.multicall([("fcd.report", ("box", [report(0, 230.0 + k)])) for k in range(500)])
    assert all(r == {"accepted": 1, "duplicates": 0, "rejected": 0} for r in results)
    await client.aclose()
    await server.http.close()


BILLION_LAUGHS = (b'<?xml version="1.0"?>\n<!DOCTYPE m [<!ENTITY a "' + b"A" * 1000 + b'">'
                  b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>\n'
                  b"<methodCall><methodName>&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;</methodName><params/></methodCall>")


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
async def test_entities_are_refused_and_unknown_names_are_not_echoed_at_length(small_city, encoding):
    server, port = await start(small_city)
    body = BILLION_LAUGHS if encoding == "utf-8" else BILLION_LAUGHS.decode().replace(
        '<?xml version="1.0"?>', '<?xml version="1.0" encoding="utf-16"?>').encode("utf-16")
    answer = await post(port, body)
    assert b"DTD or entity declaration is refused" in answer and len(answer) < 1000
    assert server.stats["rpc_refused_dtd"] == 1
    name = "x" * 100_000
    answer = await post(port, xmlrpc.client.dumps((), name).encode())
    assert b"unknown method" in answer and len(answer) < 1000
    await server.http.close()


# ---------------------------------------------------------------- 5: out-of-range numbers

def with_member(body: bytes, name: bytes, value: bytes) -> bytes:
    """``body`` with the first struct member ``name``'s value replaced by raw XML ``value``
    (xmlrpc.client cannot marshal an int of 400 digits: a hostile client writes it itself)."""
    head, tail = body.split(b"<name>" + name + b"</name>\n", 1)
    _, rest = tail.split(b"</value>", 1)
    return head + b"<name>" + name + b"</name>\n<value>" + value + b"</value>" + rest


@pytest.mark.parametrize("field,value", [(b"queue", b"<int>" + b"9" * 400 + b"</int>"),
                                         (b"t", b"<int>" + b"9" * 400 + b"</int>"),
                                         (b"density", b"<double>1e300</double>"),
                                         (b"turns", b"<struct><member><name>1</name><value><int>" + b"9" * 30
                                          + b"</int></value></member></struct>")])
async def test_one_out_of_range_report_loses_only_itself(small_city, field, value):
    server, port = await start(small_city)
    body = xmlrpc.client.dumps(("box", [report(2, 50.0), report(3, 50.0), report(4, 50.0)]), "fcd.report").encode()
    parts = body.split(b"<name>road</name>")
    parts[2] = with_member(b"<name>road</name>" + parts[2], field, value)[len(b"<name>road</name>"):]
    answer = await post(port, b"<name>road</name>".join(parts))
    params, _ = xmlrpc.client.loads(answer)
    assert params[0] == {"accepted": 2, "duplicates": 0, "rejected": 1}
    assert server.stats["reports_box"] == 2
    await server.http.close()


async def test_a_report_the_model_refuses_is_not_remembered_as_seen(small_city, monkeypatch):
    server, port = await start(small_city)
    observe = server.model.observe

    def refuse_once(rep):
        monkeypatch.setattr(server.model, "observe", observe)
        raise ValueError("refused")

    monkeypatch.setattr(server.model, "observe", refuse_once)
    client = KeepAliveClient("127.0.0.1", port)
    assert await client.call("fcd.report", "box", [report(2, 50.0)]) == {"accepted": 0, "duplicates": 0, "rejected": 1}
    assert await client.call("fcd.report", "box", [report(2, 50.0)]) == {"accepted": 1, "duplicates": 0, "rejected": 0}
    await client.aclose()
    await server.http.close()


# ---------------------------------------------------------------- 6: box stats

async def test_box_stats_are_bounded_and_status_stays_valid(small_city):
    server, port = await start(small_city, max_boxes=8)
    client = KeepAliveClient("127.0.0.1", port)
    huge = b"<int>" + b"9" * 400 + b"</int>"
    body = xmlrpc.client.dumps(("b0", {"huge": 1, "nan": 1.0, "ok": 7}), "fcd.box_stats").encode()
    body = with_member(body, b"huge", huge).replace(b"<double>1.0</double>", b"<double>nan</double>")
    params, _ = xmlrpc.client.loads(await post(port, body))
    assert params == (True,) and server.boxes["b0"] == {"ok": 7}
    await client.call("fcd.box_stats", "b0", {f"k{i}": i for i in range(200)})
    assert len(server.boxes["b0"]) == 64
    for i in range(1, 20):
        await client.call("fcd.box_stats", f"b{i}", {"x": i})
    assert len(server.boxes) == 8 and server.stats["boxes_evicted"] == 12
    with pytest.raises(xmlrpc.client.Fault, match="at most 64"):
        await client.call("fcd.box_stats", "n" * 65, {})
    assert server.stats["box_stats_refused"] == 2 + 137 and server.stats["boxes_refused_name"] == 1
    status = await client.call("fcd.status")        # every value marshals
    assert status["boxes"]["b19"] == {"x": 19}
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = (await asyncio.wait_for(reader.read(), 60)).split(b"\r\n\r\n", 1)[1]
    writer.close()
    json.loads(answer, parse_constant=lambda c: pytest.fail(f"/status holds {c}"))
    await client.aclose()
    await server.http.close()


# ---------------------------------------------------------------- fuzz: one report, one error

from hypothesis import given, settings, strategies as st  # noqa: E402

NUMBERS = st.one_of(st.integers(min_value=-10 ** 500, max_value=10 ** 500), st.floats(), st.booleans(),
                    st.none(), st.text(max_size=5))
FIELDS = ["road", "t", "green", "queue", "cars", "density", "mean_speed", "departures", "interval", "was_green",
          "crossed", "crossing_time", "samples", "distance"]


@settings(max_examples=300, deadline=None)
@given(base=st.fixed_dictionaries({}, optional={f: NUMBERS for f in FIELDS}),
       turns=st.one_of(st.none(), st.dictionaries(st.text(max_size=12), NUMBERS, max_size=3)),
       pieces=st.one_of(st.none(), st.lists(st.lists(NUMBERS, max_size=4), max_size=3)))
def test_a_report_is_parsed_or_refused_with_a_value_error(base, turns, pieces):
    data = {**report(1, 50.0), **base}
    if turns is not None:
        data["turns"] = turns
    if pieces is not None:
        data["pieces"] = pieces
    try:
        rep = RoadReport.from_xmlrpc(data, 16)
    except ValueError:
        return
    for name in ("queue", "cars", "departures", "crossed"):
        assert 0 <= getattr(rep, name) <= 10 ** 6
    assert all(0 <= v <= 10 ** 6 for v in rep.turns.values())
