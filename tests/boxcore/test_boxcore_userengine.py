"""The user engine through a real boxd: channel delivery, copies, fail-open verdict
timeouts and health eviction, multicast fan-out, limits, malformed control input."""

import asyncio
import socket
import struct

import msgpack
import pytest

from boxcore import wire
from boxcore.booster import Booster, BoosterError, Verdict
from boxcore.packet import Packet
from boxcore.rules import Match, PayloadPattern
from boxcore.procs import free_port
from boxcore.testing import BoxdProcess
from tests.loopback import bound_udp, recv
from tests.polling import until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def net():
    box, srv = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    server = bound_udp(srv)
    client = bound_udp()
    yield {"box": box, "server_port": srv, "server": server, "client": client,
           "listen": [f"udp:127.0.0.1:{box}=127.0.0.1:{srv}"]}
    server.close()
    client.close()


async def test_channel_copy_and_payload_redirect(tmp_path, net):
    async with BoxdProcess(tmp_path, listens=net["listen"], http=False) as boxd:
        async with Booster("a", control=boxd.control) as a, Booster("b", control=boxd.control) as b:
            copies, redirected = [], []
            cop = await a.copy(Match(proto="udp", dst_port=net["server_port"]), lambda p: copies.append(p.payload))
            red = await b.redirect(Match(proto="udp", dst_port=net["server_port"],
                                         payload=(PayloadPattern(0, b"CMD"),)),
                                   lambda p: (redirected.append(p.payload), Verdict.modify(b"cmd" + p.payload[3:]))[1])
            assert cop.delivery.kind == "channel" and red.delivery.kind == "channel"
            net["client"].sendto(b"plain", ("127.0.0.1", net["box"]))
            net["client"].sendto(b"CMD go", ("127.0.0.1", net["box"]))
            got = sorted([(await recv(net["server"]))[0] for _ in range(2)])
            assert got == [b"cmd go", b"plain"]
            await until(lambda: len(copies) == 2, what="both copies")
            assert sorted(copies) == [b"CMD go", b"plain"] and redirected == [b"CMD go"]
            rules = await boxd.query("rules")
            assert {r["cookie"]: r["packets"] for r in rules} == {cop.cookie: 2, red.cookie: 1}


async def test_stalled_booster_fails_open_then_is_evicted(tmp_path, net):
    async with BoxdProcess(tmp_path, listens=net["listen"], http=False, heartbeat=0.3,
                           extra=["--user-verdict-timeout", "0.05"]) as boxd:
        booster = Booster("sleepy", control=boxd.control)
        await booster.connect()

        async def never(pkt):
            await asyncio.sleep(3600)

        await booster.redirect(Match(proto="udp", dst_port=net["server_port"],
                                     payload=(PayloadPattern(0, b"x"),)), never)
        for i in range(5):
            net["client"].sendto(b"x%d" % i, ("127.0.0.1", net["box"]))
        got = sorted([(await recv(net["server"]))[0] for _ in range(5)])
        assert got == [b"x0", b"x1", b"x2", b"x3", b"x4"]   # passed after the verdict timeout
        why = await asyncio.wait_for(booster.run_until_stopped(), 5)
        assert "unhealthy" in why
        status = await boxd.query("status")
        assert status["counters"]["boosters_evicted"] == 1 and status["rules"] == 0
        await booster.close()


async def test_multicast_group_fan_out_and_limits(tmp_path, net):
    members = [bound_udp() for _ in range(3)]
    async with BoxdProcess(tmp_path, listens=net["listen"], http=False,
                           extra=["--max-rules-per-booster", "2"]) as boxd:
        async with Booster("mc", control=boxd.control) as b:
            await b.set_multicast_group(3, [m.getsockname() for m in members])
            b.send_multicast(3, b"to all", src_port=net["box"])
            for m in members:
                data, addr = await recv(m)
                assert data == b"to all" and addr == ("127.0.0.1", net["box"])
            await b.multicast(Match(proto="udp", dst_port=net["server_port"]), 3)
            net["client"].sendto(b"fan", ("127.0.0.1", net["box"]))
            for m in members:
                assert (await recv(m))[0] == b"fan"
            await b.copy(Match(proto="udp", dst_port=1), lambda p: None)
            with pytest.raises(BoosterError, match="limit"):
                await b.copy(Match(proto="udp", dst_port=2), lambda p: None)
            # a booster-built reply goes to the client from the box's address
            client_addr = net["client"].getsockname()
            b.send(Packet(17, "127.0.0.1", net["server_port"], client_addr[0], client_addr[1], b"hi"))
            data, addr = await recv(net["client"])
            assert (data, addr) == (b"hi", ("127.0.0.1", net["box"]))
    for m in members:
        m.close()


async def test_malformed_control_input_is_counted_not_fatal(tmp_path, net):
    async with BoxdProcess(tmp_path, listens=net["listen"], http=False) as boxd:
        reader, writer = await asyncio.open_unix_connection(str(boxd.control))
        body = msgpack.packb({"t": "hello", "id": 1, "name": 7, "version": 1})
        writer.write(struct.pack("!I", len(body)) + body)
        writer.write(struct.pack("!I", 3) + b"\xc1\xc1\xc1")
        writer.write(wire.encode({"t": "hello", "id": 2, "name": "raw", "version": wire.PROTOCOL_VERSION}))
        await writer.drain()
        dec = wire.FrameDecoder()
        replies = []
        while len(replies) < 2:
            replies += dec.feed(await asyncio.wait_for(reader.read(65536), 3))
        assert replies[0]["status"] == "INVALID" and "name" in replies[0]["reason"]
        assert replies[1]["id"] == 2 and replies[1]["status"] == "OK"   # still served
        status = await boxd.query("status")
        assert status["counters"]["control_malformed"] == 2
        # a broken length kills only this connection
        writer.write(b"\xff\xff\xff\xff")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 3) == b""
        writer.close()
        assert (await boxd.query("status"))["boosters"] == 0


async def test_delegated_socket_is_taken_back_when_a_copy_arrives(tmp_path, net):
    async with BoxdProcess(tmp_path, listens=net["listen"], http=False) as boxd:
        async with Booster("owner", control=boxd.control) as a, Booster("spy", control=boxd.control) as b:
            got_a, got_b = [], []
            sub = await a.redirect(Match(proto="udp", dst_port=net["server_port"]),
                                   lambda p: (got_a.append(p.payload), Verdict.PASS)[1])
            assert sub.delivery.kind == "socket"
            net["client"].sendto(b"one", ("127.0.0.1", net["box"]))
            assert (await recv(net["server"]))[0] == b"one"
            await b.copy(Match(proto="udp", dst_port=net["server_port"]), lambda p: got_b.append(p.payload))
            await until(lambda: a.stats["undelegated"] == 1, what="undelegate")
            assert sub.delivery.kind == "channel" and sub.delegated_socket is None
            net["client"].sendto(b"two", ("127.0.0.1", net["box"]))
            assert (await recv(net["server"]))[0] == b"two"
            await until(lambda: got_b == [b"two"], what="the copy")
            assert got_a == [b"one", b"two"] and got_b == [b"two"]
            rules = {r["cookie"]: r for r in await boxd.query("rules")}
            assert rules[sub.cookie]["delivery"] == "channel"


async def test_evicted_booster_lets_go_of_a_delegated_socket(tmp_path, net):
    async with BoxdProcess(tmp_path, listens=net["listen"], http=False) as boxd:
        booster = Booster("holder", control=boxd.control)
        await booster.connect()
        sub = await booster.redirect(Match(proto="udp", dst_port=net["server_port"]), lambda p: None)
        assert sub.delivery.kind == "socket"
        receiver = sub.receiver
    # boxd stopped (SIGTERM): the booster must not keep the box's port bound
    await asyncio.wait_for(booster.run_until_stopped(), 5)
    assert receiver.stopped and receiver.sock.fileno() == -1
    async with BoxdProcess(tmp_path, listens=net["listen"], http=False):
        pass   # binds the same port again
    await booster.close()


async def test_receive_batches_on_a_delegated_socket(tmp_path, net):
    async with BoxdProcess(tmp_path, listens=net["listen"], http=False) as boxd:
        async with Booster("batcher", control=boxd.control, heartbeat=0.05) as a, \
                Booster("spy", control=boxd.control) as b:
            singles, batches = [], []
            sub = await a.redirect(Match(proto="udp", dst_port=net["server_port"]),
                                   lambda p: singles.append(p.payload))
            assert sub.delivery.kind == "socket"
            assert sub.receive_batches(batches.append, max_batch=4) is True
            sent = [b"batch %d" % i for i in range(10)]
            for payload in sent:
                net["client"].sendto(payload, ("127.0.0.1", net["box"]))
            await until(lambda: sum(map(len, batches)) == len(sent), what="every datagram in batches")
            assert [p for batch in batches for p in batch] == sent and singles == []
            assert all(1 <= len(batch) <= 4 for batch in batches)
            async def reported():    # counted by the library, reported with heartbeats
                rules = {r["cookie"]: r for r in await boxd.query("rules")}
                return rules[sub.cookie] if rules[sub.cookie]["packets"] == len(sent) else None

            rule = await until(reported, what="the counts in boxd")
            assert rule["bytes"] == sum(map(len, sent))
            # boxd takes the socket back: the per-packet handler receives again
            await b.copy(Match(proto="udp", dst_port=net["server_port"]), lambda p: None)
            await until(lambda: sub.delivery.kind == "channel", what="undelegate")
            assert sub.receive_batches(batches.append) is False
            net["client"].sendto(b"single", ("127.0.0.1", net["box"]))
            await until(lambda: singles, what="the per-packet handler")
            assert singles == [b"single"] and sum(map(len, batches)) == len(sent)


async def test_idle_flows_expire_and_an_idle_engine_arms_no_timers(net):
    from boxcore.engines.user import UserEngine, listen_spec
    engine = UserEngine([listen_spec(net["listen"][0])], flow_idle=0.1)
    await engine.start()
    try:
        assert engine._flow_timer is None and engine._verdict_timer is None     # idle: nothing to wake for
        net["client"].sendto(b"relay me", ("127.0.0.1", net["box"]))
        assert (await recv(net["server"]))[0] == b"relay me"
        assert engine.status()["flows"] == 1
        await until(lambda: engine.stats["flows_expired"], what="the idle flow to expire")
        assert engine.stats["flows_expired"] == 1 and engine.status()["flows"] == 0
        assert engine._flow_timer is None and engine._verdict_timer is None
    finally:
        await engine.stop()


async def test_tcp_relays_are_shared_out_per_client_and_idle_ones_closed():
    """One host cannot take every relay slot (--user-max-tcp-per-source), and a relayed connection
    silent both ways for --user-tcp-idle is closed, freeing its slot."""
    from boxcore.engines.user import UserEngine, listen_spec

    upstream = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)     # accepts, never speaks
    box = free_port(socket.SOCK_STREAM)
    engine = UserEngine([listen_spec(f"tcp:127.0.0.1:{box}=127.0.0.1:{upstream.sockets[0].getsockname()[1]}")],
                        max_tcp=8, max_tcp_per_source=2, tcp_idle=1.0)
    await engine.start()
    conns = []
    try:
        for source in ("127.0.0.2", "127.0.0.2", "127.0.0.2", "127.0.0.3"):
            reader, writer = await asyncio.open_connection("127.0.0.1", box, local_addr=(source, 0))
            conns.append((reader, writer))
        await until(lambda: engine.stats["tcp_relayed"] == 3, what="three relays")
        assert engine.stats["tcp_refused_per_source"] == 1 and engine.stats["tcp_refused"] == 0
        assert await asyncio.wait_for(conns[2][0].read(), 5) == b""          # the third of one host: closed
        assert engine.status()["tcp_relays"] == 3
        # nobody says anything: every relay is closed after the idle bound, and the slots are free
        for reader, _ in (conns[0], conns[1], conns[3]):
            assert await asyncio.wait_for(reader.read(), 10) == b""
        await until(lambda: engine.status()["tcp_relays"] == 0, what="the relays to end")
        assert engine.stats["tcp_idle_closed"] == 3 and engine._tcp_per_source == {}
    finally:
        for _, writer in conns:
            writer.close()
        await engine.stop()
        upstream.close()
        await upstream.wait_closed()


async def test_one_host_churning_udp_flows_evicts_only_its_own(net):
    """Beyond --user-max-flows-per-source a host's own least recently used flow makes room: a host
    sending from many ports cannot push another host's flow out of the table."""
    from boxcore.engines.user import UserEngine, listen_spec

    engine = UserEngine([listen_spec(net["listen"][0])], max_flows=8, max_flows_per_source=3)
    await engine.start()
    churners = []
    try:
        other = bound_udp(host="127.0.0.3")
        churners = [bound_udp(host="127.0.0.2") for _ in range(10)]
        other.sendto(b"keep me", ("127.0.0.1", net["box"]))
        assert (await recv(net["server"]))[0] == b"keep me"
        for i, sock in enumerate(churners):
            sock.sendto(b"churn %d" % i, ("127.0.0.1", net["box"]))
            assert (await recv(net["server"]))[0] == b"churn %d" % i
        assert engine.stats["flows_evicted_per_source"] == 7 and engine.stats["flows_evicted"] == 0
        assert sorted(client[0] for _, client in engine.flows) == ["127.0.0.2"] * 3 + ["127.0.0.3"]
        # the other host's flow is still the same one: the server's answer through it comes back
        other_flow = next(f for (_, client), f in engine.flows.items() if client[0] == "127.0.0.3")
        net["server"].sendto(b"answer", other_flow.sock.getsockname())
        assert (await recv(other))[0] == b"answer"
        other.close()
    finally:
        for sock in churners:
            sock.close()
        await engine.stop()
