"""The bots' reader: a wake-up's first datagram alone (recvmsg), the rest with recvmmsg only when that
first one came late; whichever way, every update reaches the game once with its kernel arrival stamp."""

import math

import pytest

from mmpog import bots, recv_bench


@pytest.mark.parametrize("late", [True, False])
async def test_first_datagram_alone_unless_late(monkeypatch, late):
    # RECV_LATE decides by the stamp's age: -1 makes every first datagram late, inf none
    monkeypatch.setattr(bots, "RECV_LATE", -1.0 if late else math.inf)
    updates = 600
    datagrams = recv_bench.build_stream(updates, bundle=1, loss=0.05, payload=64, seed=9)
    expected = recv_bench.stage_endpoint(datagrams, recv_bench._times(updates, datagrams)).stats["received"]
    results = {}
    for stage in ("socket", "socket_recvmmsg"):
        bot, sock = await recv_bench._joined_bot(*recv_bench.READ_PATHS[stage])
        try:
            client, receiver = bot.client, bot.client.batch_receiver
            syscalls, batches, datagrams_before = receiver.syscalls, client.batches, client.datagrams
            recv_bench.stage_socket(bot, datagrams, wakeup=5)
            assert client.datagrams - datagrams_before == len(datagrams)
            assert len(bot.got) == len(bot.arrived) == expected
            assert all(latency >= 0 for latency in bot.arrived.values())
            results[stage] = (set(bot.got), set(bot.arrived), receiver.syscalls - syscalls,
                              client.batches - batches)
        finally:
            await client.close()
            sock.close()
    assert results["socket"][:2] == results["socket_recvmmsg"][:2]      # the same updates, each stamped
    wakeups = math.ceil(len(datagrams) / 5)
    assert results["socket_recvmmsg"][2:] == (wakeups, wakeups)            # one recvmmsg per wake-up
    if late:
        # the first alone, then one recvmmsg for the other four: one batch for the protocol
        assert results["socket"][2:] == (2 * wakeups, wakeups)
    else:
        # one recvmsg per datagram, each its own batch, and no call finds the socket empty
        assert results["socket"][2:] == (len(datagrams), len(datagrams))
