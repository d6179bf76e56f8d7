"""The impairing relay: seeded decisions, and a real relay over loopback sockets."""

import asyncio
import random
import socket

from mmpog.impair import Impairment, ImpairingRelay, _Direction


def test_direction_decisions_are_seeded_and_match_the_probabilities():
    def decisions(seed):
        direction = _Direction(Impairment(loss=0.2, delay=0.01, jitter=0.02, duplicate=0.1), random.Random(seed))
        return [direction.decide() for _ in range(5000)], direction

    first, direction = decisions(4)
    assert first == decisions(4)[0]
    assert 0.17 < direction.dropped / 5000 < 0.23
    assert 0.07 < direction.duplicated / direction.passed < 0.13
    assert all(0.01 <= delay < 0.03 for delays in first for delay in delays)


async def test_relay_forwards_both_ways_with_one_upstream_socket_per_client():
    loop = asyncio.get_running_loop()
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    relay = ImpairingRelay(("127.0.0.1", 0), server.getsockname(), Impairment(), Impairment(delay=0.005), seed=1)
    addr = await relay.start()
    clients = []
    try:
        for n in range(2):
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            client.bind(("127.0.0.1", 0))
            client.setblocking(False)
            clients.append(client)
            await loop.sock_sendto(client, b"hello %d" % n, addr)
        seen = set()
        for _ in range(2):
            data, upstream = await asyncio.wait_for(loop.sock_recvfrom(server, 100), 2)
            seen.add(upstream)
            await loop.sock_sendto(server, b"re:" + data, upstream)
        assert len(seen) == 2                          # the server sees each client as its own address
        for n, client in enumerate(clients):
            data, source = await asyncio.wait_for(loop.sock_recvfrom(client, 100), 2)
            assert data == b"re:hello %d" % n and source == addr
        assert relay.snapshot()["down"]["passed"] == 2 and relay.in_flight == 0
    finally:
        relay.close()
        server.close()
        for client in clients:
            client.close()
