"""The controller under hostile and random input, in memory.

1. Random control messages never kill it, every request with an id is answered, and a
   well-behaved booster is still served afterwards.
2. Random operation sequences from several boosters (rules that overlap on purpose, cancels of
   anyone's cookies, multicast groups, departures and returns): after every reply the box's
   invariants hold - no two boosters hold overlapping terminating rules, every installed rule
   and group has a live owner, every reply is well-formed and answers its request, and the
   engine's state equals the controller's.
"""

import asyncio
import socket

import msgpack
import pytest
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


class RawClient:
    """A control connection speaking the wire protocol by hand (descriptors are discarded)."""

    def __init__(self, box: MemoryBox) -> None:
        boxd_end, self.sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        box.controller.adopt(boxd_end)
        self.decoder = wire.FrameDecoder()
        self.ids = iter(range(1, 1 << 30))
        self.reader = self.writer = None

    async def open(self):
        self.reader, self.writer = await asyncio.open_unix_connection(sock=self.sock)
        return self

    async def request(self, msg: dict) -> dict:
        rid = next(self.ids)
        self.writer.write(wire.encode(dict(msg, id=rid)))
        while True:
            data = await asyncio.wait_for(self.reader.read(65536), 5)
            assert data, "boxd closed the connection"
            for reply in self.decoder.feed(data):
                wire.validate(reply)           # well-formed, declared fields only
                if reply["t"] == "reply":
                    assert reply["id"] == rid, "replies come in order"
                    assert reply["status"] in wire.Status.__members__
                    assert (reply["status"] == "OK") == ("reason" not in reply)
                    return reply

    def close(self):
        if self.writer is not None:
            self.writer.close()


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
        await box.until(lambda: not (box.controller.rules or box.controller.sessions),
                        what="the fuzzer's session and rules to go")
        # the box still works for a real booster
        booster = await box.connect("after-fuzz")
        seen = []
        await booster.redirect(Match(proto="udp", dst_port=4242), lambda p: seen.append(p))
        outcome = await box.inject(Packet(17, "10.0.0.1", 1, "10.0.0.2", 4242, b"ok"))
        assert outcome.action == "consumed" and seen
        return replies


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(messages | rule_requests, max_size=12))
def test_random_control_messages_never_kill_boxd(tmp_path_factory, msgs):
    tmp = tmp_path_factory.mktemp("fuzz")
    replies = asyncio.run(_exercise(msgs, tmp))
    # every frame carries an id, so each one is answered exactly once and in order -
    # even one-way types (an id makes them invalid) and types only boxd may send
    assert len(replies) == len(msgs) + 1
    assert replies[0]["status"] == "OK"
    assert [r["id"] for r in replies[1:]] == [m["id"] for m in msgs]


# ---------------------------------------------------------------- operation sequences

BOOSTERS = 3
# a small space so requests overlap and conflict often
small_match = st.fixed_dictionaries({"proto": st.sampled_from(["udp", "tcp"])}, optional={
    "dst_port": st.sampled_from([5000, 5001, [5000, 5001], [4999, 5002]]),
    "src": st.sampled_from(["10.0.0.0/8", "10.1.0.0/16", "192.168.0.1"]),
})
ops = st.one_of(
    st.tuples(st.just("rule"), st.integers(0, BOOSTERS - 1),
              st.sampled_from(["redirect", "copy", "drop", "forward", "multicast"]), small_match,
              st.sampled_from([None, 1, 2])),
    st.tuples(st.just("cancel"), st.integers(0, BOOSTERS - 1), st.integers(1, 30)),
    st.tuples(st.just("group"), st.integers(0, BOOSTERS - 1), st.integers(1, 3),
              st.lists(st.tuples(st.sampled_from(["10.0.0.1", "10.0.0.2"]), st.integers(1, 3)),
                       max_size=3, unique=True)),
    st.tuples(st.just("leave"), st.integers(0, BOOSTERS - 1)),
    st.tuples(st.just("dir_put"), st.integers(0, BOOSTERS - 1), st.sampled_from(["a", "b"]), st.integers(-2**63, 2**64 - 1)),
)


def check_invariants(box: MemoryBox) -> None:
    ctl = box.controller
    live = {id(s) for s in ctl.sessions.values() if not s.closed}
    installed = list(ctl.rules.values())
    for installed_rule in installed:
        assert id(installed_rule.session) in live, "every installed rule has a live owner"
        assert installed_rule.session.rules.get(installed_rule.rule.cookie) is installed_rule
    for group, (owner, members) in ctl.groups.items():
        assert id(owner) in live and group in owner.groups and members
    for i, a in enumerate(installed):
        for b in installed[i + 1:]:
            if a.session is not b.session and a.rule.action.terminal and b.rule.action.terminal:
                assert not a.rule.match.overlaps(b.rule.match), \
                    f"{a.rule.describe()} and {b.rule.describe()} overlap across boosters"
    # the engine holds exactly the controller's rules and groups
    assert {r.cookie for r in box.engine.classifier.rules()} == set(ctl.rules)
    assert set(box.engine.owners) == set(ctl.rules)
    assert {g: list(m) for g, m in box.engine.groups.items()} == {g: list(m) for g, (_, m) in ctl.groups.items()}


async def _run_sequence(sequence, tmp):
    async with MemoryBox(state=tmp) as box:
        clients: list[RawClient | None] = [None] * BOOSTERS

        async def client(i):
            if clients[i] is None:
                clients[i] = await RawClient(box).open()
                reply = await clients[i].request({"t": "hello", "name": f"b{i}", "version": 1})
                assert reply["status"] == "OK"
            return clients[i]

        for op in sequence:
            kind, who = op[0], op[1]
            if kind == "leave":
                if clients[who] is not None:
                    clients[who].close()
                    clients[who] = None
                    await box.until(lambda: not any(s.booster.name == f"b{who}"
                                                    for s in box.controller.sessions.values()),
                                    what=f"b{who} to leave")
            else:
                c = await client(who)
                if kind == "rule":
                    _, _, action, match, group = op
                    msg = {"t": "rule", "action": action, "match": match}
                    if group is not None:
                        msg["group"] = group
                    reply = await c.request(msg)
                    if reply["status"] == "CONFLICT":
                        assert reply["holder"]
                elif kind == "cancel":
                    await c.request({"t": "cancel", "cookie": op[2]})
                elif kind == "group":
                    await c.request({"t": "set_multicast_group", "group": op[2],
                                     "members": [list(m) for m in op[3]]})
                else:
                    reply = await c.request({"t": "dir_put", "key": op[2], "value": op[3]})
                    assert reply["status"] in ("OK", "INVALID")
            await box.controller._teardowns.join()   # departed boosters' rules are gone
            check_invariants(box)
        for c in clients:
            if c is not None:
                c.close()
        await box.until(lambda: not box.controller.sessions, what="every session to close")
        await box.controller._teardowns.join()
        check_invariants(box)
        assert not box.controller.rules and not box.engine.owners and not box.engine.groups


@pytest.mark.timeout(600)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(ops, min_size=1, max_size=25))
def test_random_operation_sequences_keep_the_invariants(tmp_path_factory, sequence):
    asyncio.run(_run_sequence(sequence, tmp_path_factory.mktemp("seq")))
