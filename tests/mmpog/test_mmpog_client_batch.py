"""The batched receive path gives exactly what one datagram at a time gives.

``ClientEndpoint.receive_datagrams`` (a batch) against ``receive_datagram`` (one by one) on a lossy
stream with NACKs and repairs, and ``GameClient.receive_datagrams`` routing a batch that mixes two
locations, a foreign location and a cut datagram to the right endpoints in order.
"""

import random

from mmpog import recv_bench, wire
from mmpog.client import LOCATION_SLICE, GameClient
from mmpog.reliability import ClientEndpoint
from mmpog.testing import joined_endpoint
from mmpog.wire import RELIABLE, Header, Kind

TOKEN = b"batch-test-token"
PLAYER = 1


def joined(location: int, at: float = 0.0) -> ClientEndpoint:
    return joined_endpoint(location, PLAYER, TOKEN, at)


def drained(endpoint: ClientEndpoint) -> list:
    out = []
    while (event := endpoint.next_event()) is not None:
        out.append(event)
    return out


def test_endpoint_batch_equals_one_at_a_time_on_a_lossy_stream():
    updates = 4000
    datagrams = recv_bench.build_stream(updates, bundle=3, loss=0.08, payload=64, seed=11)
    # hostile and odd datagrams mixed in: cut, another location, a heartbeat revealing the last seq
    datagrams[10:10] = [datagrams[10][:20], wire.encode(Header(Kind.DATA, location=recv_bench.LOCATION + 1, sender=3))]
    datagrams.append(wire.encode(Header(Kind.HEARTBEAT, location=recv_bench.LOCATION, seq=10**6, lowest=1)))
    times = recv_bench._times(updates, datagrams)
    one, batched = joined(recv_bench.LOCATION, times[0] - 1), joined(recv_bench.LOCATION, times[0] - 1)
    drained(one), drained(batched)
    pairs = list(zip(datagrams, times))
    one_events, one_out, batch_events, batch_out = [], [], [], []
    sizes = random.Random(5)
    start = 0
    while start < len(pairs):
        batch = pairs[start:start + sizes.randint(1, 9)]
        start += len(batch)
        for data, now in batch:
            one.receive_datagram(data, now)
        batched.receive_datagrams(batch)
        one_events += drained(one)
        batch_events += drained(batched)
        one_out += one.datagrams_to_send(batch[-1][1])
        batch_out += batched.datagrams_to_send(batch[-1][1])
        assert one.get_timer() == batched.get_timer()
    assert one.stats == batched.stats
    assert one_events == batch_events and one_out == batch_out
    # the stream exercised the paths that matter: gaps, NACKs, repairs, the hostile datagrams
    stats = batched.stats
    assert stats["nacks_sent"] > 0 and stats["retransmissions_received"] > 0 and stats["unrecoverable"] > 0
    assert stats["malformed"] == 1 and stats["wrong_location"] == 1 and stats["heartbeats"] == 1


def data(location: int, sender: int, packet_id: int, seq: int = 0) -> bytes:
    flags = RELIABLE if seq else 0
    return wire.encode(Header(Kind.DATA, flags, 5, location, sender, packet_id, seq, 1 if seq else 0),
                       b"update %d" % packet_id)


async def test_client_routes_a_mixed_batch_to_each_location_in_order():
    client = GameClient("http://127.0.0.1:9", "batch", "unused")
    await client.start()
    try:
        events = []
        client.on_event = events.append
        client.player = PLAYER
        first, second = joined(21), joined(22)
        reference = {21: joined(21), 22: joined(22)}
        for endpoint in (first, second, *reference.values()):
            drained(endpoint)
        client._endpoints = {21: (first, ("127.0.0.1", 9)), 22: (second, ("127.0.0.1", 9))}
        stream = [data(21, 5, 1, seq=1), data(21, 6, 1), data(22, 5, 2, seq=1), data(21, 5, 3, seq=3),
                  b"short", data(23, 5, 4), data(22, 7, 1), data(22, 5, 2, seq=1), data(21, 6, 2)]
        batch = [(datagram, 10.0 + i * 0.001) for i, datagram in enumerate(stream)]
        client.receive_datagrams(batch)
        expected = []
        for location in (21, 22):                      # events are handed out per endpoint after the batch
            for datagram, now in batch:
                if len(datagram) >= wire.HEADER_SIZE and int.from_bytes(datagram[LOCATION_SLICE], "big") == location:
                    reference[location].receive_datagram(datagram, now)
            expected += drained(reference[location])
        assert events == expected
        assert [type(event).__name__ for event in events].count("Received") == 6    # of 7 routed: one duplicate dropped
        assert client.foreign == 2                     # the cut datagram and location 23
        assert first.stats == reference[21].stats and second.stats == reference[22].stats
        assert first.stats["missing_detected"] == 1   # seq 2 of location 21 was skipped
    finally:
        client._endpoints = {}
        await client.close()

