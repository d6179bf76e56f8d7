"""The controller under hostile input: random control messages never kill it, every
request with an id is answered, and a well-behaved booster is still served afterwards."""

import asyncio
import socket

import msgpack

from hypothesis import HealthCheck, given, settings, strategies as st

from boxcore import wire
from boxcore.packet import Packet
from boxcore.rules import Match
from boxcore.testing import MemoryBox

values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=6) | st.binary(max_size=6),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=6)
fields = st.sampled_from(["name", "version", "action", "match", "cookie", "key", "value", "prefix", "group",
                          "members", "packet", "what", "watch", "priority", "tcp", "counters", "nfds"])
messages = st.builds(
    lambda t, rid, extra: {"t": t, "id": rid, **extra},
    st.sampled_from(sorted(wire.MESSAGES) + ["bogus"]), st.integers(0, 1000),
    st.dictionaries(fields, values, max_size=4))
match_dicts = st.fixed_dictionaries({}, optional={
    "proto": st.sampled_from([6, 17, "udp", 300]), "dst_port": st.integers(-1, 70000) | st.tuples(
        st.integers(0, 100), st.integers(0, 100)).map(list), "src": st.sampled_from(["10.0.0.0/8", "bad"])})
rule_requests = st.builds(lambda rid, action, match: {"t": "rule", "id": rid, "action": action, "match": match},
                          st.integers(0, 1000), st.sampled_from(["redirect", "copy", "drop", "forward"]),
                          match_dicts)


async def _exercise(msgs, tmp):
    async with MemoryBox(state=tmp) as box:
        boxd_end, raw = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        box.controller.adopt(boxd_end)
        reader, writer = await asyncio.open_unix_connection(sock=raw)
        # register first so the requests reach their handlers
        writer.write(wire.encode({"t": "hello", "id": 10_000, "name": "fuzz", "version": 1}))
        for msg in msgs:
            body = msgpack.packb(msg, use_bin_type=True)
            writer.write(len(body).to_bytes(4, "big") + body)
        await writer.drain()
        dec = wire.FrameDecoder()
        replies = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while loop.time() < deadline and len(replies) < len(msgs) + 1:
            try:
                data = await asyncio.wait_for(reader.read(65536), 0.2)
            except asyncio.TimeoutError:
                break
            if not data:
                break
            replies += [m for m in dec.feed(data) if m.get("t") == "reply"]
        writer.close()
        while box.controller.rules or box.controller.sessions:   # the fuzzer's rules go with it
            await asyncio.sleep(0.005)
        # the box still works for a real booster
        booster = await box.connect("after-fuzz")
        seen = []
        await booster.redirect(Match(proto="udp", dst_port=4242), lambda p: seen.append(p))
        outcome = await box.inject(Packet(17, "10.0.0.1", 1, "10.0.0.2", 4242, b"ok"))
        assert outcome.action == "consumed" and seen
        return replies


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(messages | rule_requests, max_size=12))
def test_random_control_messages_never_kill_boxd(tmp_path_factory, msgs):
    tmp = tmp_path_factory.mktemp("fuzz")
    replies = asyncio.run(_exercise(msgs, tmp))
    # every frame carries an id, so each one is answered exactly once and in order -
    # even one-way types (an id makes them invalid) and types only boxd may send
    assert len(replies) == len(msgs) + 1
    assert replies[0]["status"] == "OK"
    assert [r["id"] for r in replies[1:]] == [m["id"] for m in msgs]
