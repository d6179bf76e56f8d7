"""The booster library against an in-process boxd (MemoryBox): verdicts, copies,
arbitration, idempotency, policy, timers, directory, handler isolation."""

import asyncio

import pytest

from boxcore.booster import Conflict, InvalidRequest, PermissionDenied, Verdict
from boxcore.examples.udp_counter import TOTALS_KEY, UdpCounter, attach
from boxcore.packet import Packet
from boxcore.policy import Policy
from boxcore.rules import Match
from boxcore.testing import FakeClock, MemoryBox


def udp(payload=b"x", src="10.0.0.1", sport=5000, dst="10.0.0.2", dport=7000):
    return Packet(17, src, sport, dst, dport, payload)


async def test_redirect_verdicts_consume_pass_modify(tmp_path):
    async with MemoryBox(state=tmp_path) as box:
        b = await box.connect("b1")
        seen = []

        def handler(pkt):
            seen.append(pkt)
            if pkt.payload == b"keep":
                return None
            if pkt.payload == b"pass":
                return Verdict.PASS
            return Verdict.modify(pkt.payload.upper())

        await b.redirect(Match(proto="udp", dst_port=7000), handler)
        assert (await box.inject(udp(b"keep"))).action == "consumed"
        assert (await box.inject(udp(b"pass"))).action == "forwarded"
        out = await box.inject(udp(b"mod"))
        assert out.action == "modified" and out.emitted[0].payload == b"MOD"
        assert (await box.inject(udp(b"other", dport=7001))).action == "forwarded"
        assert [p.payload for p in seen] == [b"keep", b"pass", b"mod"]
        assert [p.payload for p in box.sent()] == [b"pass", b"MOD", b"other"]
        rules = box.rules()
        assert rules[0]["packets"] == 3 and rules[0]["bytes"] == 11


async def test_coroutine_handler_and_copy(tmp_path):
    async with MemoryBox(state=tmp_path) as box:
        b1 = await box.connect("b1")
        b2 = await box.connect("b2")
        copies = []

        async def slow(pkt):
            await asyncio.sleep(0)          # a coroutine handler that yields before deciding
            return Verdict.PASS

        await b1.redirect(Match(proto="udp", dst_port=7000), slow)
        await b2.copy(Match(proto="udp"), lambda pkt: copies.append(pkt.payload) or Verdict.CONSUME)
        out = await box.inject(udp(b"a"))
        assert out.action == "forwarded" and out.copies == 1
        assert copies == [b"a"]


async def test_handler_exception_is_counted_and_isolated(tmp_path):
    async with MemoryBox(state=tmp_path) as box:
        b = await box.connect("b1")
        calls = []

        def handler(pkt):
            calls.append(pkt.payload)
            if pkt.payload == b"boom":
                raise RuntimeError("handler bug")
            return Verdict.PASS

        await b.redirect(Match(proto="udp", dst_port=7000), handler)
        assert (await box.inject(udp(b"boom"))).action == "consumed"
        assert (await box.inject(udp(b"fine"))).action == "forwarded"
        assert b.stats["handler_errors"] == 1
        assert calls == [b"boom", b"fine"]

        async def bad_async(pkt):
            raise ValueError("async bug")

        await b.copy(Match(proto="udp", dst_port=7001), bad_async)
        await box.inject(udp(b"c", dport=7001))     # returns once the coroutine handler has finished
        assert b.stats["handler_errors"] == 2


async def test_conflict_names_holder_copy_may_overlap_idempotent(tmp_path):
    async with MemoryBox(state=tmp_path) as box:
        a = await box.connect("alpha")
        b = await box.connect("beta")
        sub = await a.redirect(Match(proto="udp", dst_port=(7000, 7010)), lambda p: None)
        with pytest.raises(Conflict) as err:
            await b.redirect(Match(proto="udp", dst_port=7005), lambda p: None)
        assert err.value.holder == "alpha"
        with pytest.raises(Conflict):
            await b.drop(Match(dst_port=7003))
        await b.copy(Match(proto="udp", dst_port=7005), lambda p: None)     # COPY may overlap
        await b.redirect(Match(proto="udp", dst_port=7011), lambda p: None)  # disjoint is fine
        again = await a.redirect(Match(proto="udp", dst_port=(7000, 7010)), lambda p: None)
        assert again is sub and len(box.rules()) == 3
        await sub.cancel()
        await b.redirect(Match(proto="udp", dst_port=7005), lambda p: None)  # now free
        assert {r["owner"] for r in box.rules()} == {"beta"}


async def test_permission_denied_with_reason(tmp_path):
    policy = Policy.loads('[[grant]]\nboosters = "fcd-*"\nactions = ["redirect"]\n'
                          'protocols = ["udp"]\ndst_ports = ["7000-7010"]\n')
    async with MemoryBox(state=tmp_path, policy=policy) as box:
        ok = await box.connect("fcd-booster")
        await ok.redirect(Match(proto="udp", dst_port=7001), lambda p: None)
        with pytest.raises(PermissionDenied) as err:
            await ok.redirect(Match(proto="udp", dst_port=8000), lambda p: None)
        assert err.value.reason
        other = await box.connect("intruder")
        with pytest.raises(PermissionDenied):
            await other.copy(Match(proto="udp", dst_port=7002), lambda p: None)


async def test_invalid_requests(tmp_path):
    async with MemoryBox(state=tmp_path) as box:
        b = await box.connect("b1")
        with pytest.raises(InvalidRequest):
            await b.session.request({"t": "rule", "action": "redirect", "match": {"dst_port": 70000}})
        with pytest.raises(InvalidRequest):
            await b.session.request({"t": "rule", "action": "redirect", "match": {"bogus": 1}})
        with pytest.raises(InvalidRequest):
            await b.session.request({"t": "cancel", "cookie": 999})
        with pytest.raises(Conflict):
            await box.connect("b1")  # one booster per name


async def test_send_multicast_and_timers_with_fake_clock(tmp_path):
    clock = FakeClock()
    async with MemoryBox(state=tmp_path, clock=clock) as box:
        b = await box.connect("mc")
        await b.set_multicast_group(7, [("10.0.0.5", 4000), ("10.0.0.6", 4000)])
        ticks = []
        timer = b.call_every(1.0, lambda: ticks.append(clock.time()))
        b.call_later(0.5, lambda: b.send_multicast(7, b"hello", src_port=4000))
        await clock.advance(3.0)
        assert ticks == [1.0, 2.0, 3.0]
        timer.cancel()
        await clock.advance(2.0)
        assert len(ticks) == 3
        await b.multicast(Match(proto="udp", dst_port=4000), 7)
        out = await box.inject(udp(b"m", dport=4000))
        assert out.action == "multicast" and sorted(p.dst for p in out.emitted) == ["10.0.0.5", "10.0.0.6"]
        # the booster's own send_multicast reaches boxd on the data channel: no event to wait on
        await box.until(lambda: len(box.sent("multicast")) == 4, what="the booster's multicast")
        assert sorted(p.dst for p in box.sent("multicast")) == ["10.0.0.5", "10.0.0.5", "10.0.0.6", "10.0.0.6"]
        assert [p.payload for p in box.sent("multicast")].count(b"hello") == 2
        b.send(udp(b"made by booster"))
        injected = await box.until(lambda: box.sent("inject"), what="the injected packet")
        assert injected[0].payload == b"made by booster"


async def test_directory_get_put_watch(tmp_path):
    async with MemoryBox(state=tmp_path) as box:
        b = await box.connect("d1")
        assert await b.directory.get("k", "none") == "none"
        await b.directory.put("k", {"n": 1})
        assert await b.directory.get("k") == {"n": 1}
        events = []

        async def watch():
            async for key, value in b.directory.watch("p/"):
                events.append((key, value))
                if len(events) == 2:
                    return

        task = asyncio.create_task(watch())
        await asyncio.sleep(0)      # the task sends dir_watch; boxd serves a booster's requests in order
        await b.directory.put("p/a", 1)
        await b.directory.put("q/b", 2)
        assert await b.directory.delete("p/a")
        await asyncio.wait_for(task, 2)
        assert events == [("p/a", 1), ("p/a", None)]
        assert await b.directory.items("") == [("k", {"n": 1}), ("q/b", 2)]


async def test_example_counter_logic_in_memory(tmp_path):
    clock = FakeClock()
    async with MemoryBox(state=tmp_path, clock=clock) as box:
        b = await box.connect("udp-counter")
        counter = UdpCounter(b"SPAM")
        await attach(b, counter, 9001, 1.0)
        for i in range(5):
            await box.inject(udp(b"data %d" % i, src="10.0.0.1", dport=9001))
        await box.inject(udp(b"SPAM!", src="10.0.0.9", sport=6000, dport=9001))
        assert counter.passed == 5 and counter.dropped == 1
        assert len(box.sent()) == 5
        assert await box.advance(1.0) == 1
        saved = await b.directory.get(TOTALS_KEY)
        assert saved["packets"] == 6 and saved["per_source"]["10.0.0.9:6000"] == [1, 5]


async def test_async_socket_helpers(tmp_path):
    async with MemoryBox(state=tmp_path) as box:
        b = await box.connect("sockets")
        a_ep = await b.open_udp(("127.0.0.1", 0))
        b_ep = await b.open_udp(("127.0.0.1", 0), remote=a_ep.local_address)
        b_ep.send(b"over udp")
        data, addr = await asyncio.wait_for(a_ep.recv(), 2)
        assert data == b"over udp" and addr == b_ep.local_address
        a_ep.close()
        b_ep.close()

        async def shout(reader, writer):
            writer.write((await reader.readline()).upper())
            await writer.drain()
            if b"BOOM" in (await reader.readline()).upper():
                raise RuntimeError("server handler bug")

        server = await b.serve_tcp("127.0.0.1", 0, shout)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await b.open_tcp("127.0.0.1", port)
        writer.write(b"hello\nboom\n")
        assert await asyncio.wait_for(reader.readline(), 2) == b"HELLO\n"
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
        server.close()
        assert b.stats["handler_errors"] == 1


async def test_coroutine_handlers_are_bounded_and_a_packet_beyond_the_bound_passes(tmp_path):
    async with MemoryBox(state=tmp_path) as box:
        b = await box.connect("b1", max_handlers_in_flight=2)
        gate = asyncio.Event()
        started = []

        async def held(pkt):
            started.append(pkt.payload)
            await gate.wait()
            return None                     # consume

        await b.redirect(Match(proto="udp", dst_port=7000), held)
        first, second, third = (asyncio.create_task(box.engine.process(udp(p))) for p in (b"1", b"2", b"3"))
        assert (await third).action == "forwarded"         # decided at once: fail-open
        assert started == [b"1", b"2"] and b.stats["handlers_refused"] == 1 and b.inflight.count == 2
        assert not first.done() and not second.done()
        gate.set()
        assert [(await t).action for t in (first, second)] == ["consumed", "consumed"]
        await box.settle()
        assert b.inflight.count == 0 and b.stats["handler_errors"] == 0
        assert (await box.inject(udp(b"4"))).action == "consumed"       # room again
