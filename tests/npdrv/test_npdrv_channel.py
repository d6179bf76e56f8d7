"""Driver behaviour on lost, late and malformed control frames (sans-IO channel and the
asyncio driver over an in-memory link; the AF_PACKET path is in test_npdrv_emulator.py)."""


import pytest

from npdrv import wire
from npdrv.card import Card
from npdrv.channel import Completed, ControlChannel, Failed
from npdrv.controlpoint import ControlPoint
from npdrv.driver import NpDriver, NpError, NpTimeout
from npdrv.wire import Cmd, NpAction, NpRule, Status, Table

HOST_MAC = bytes.fromhex("020000000011")
CARD_MAC = bytes.fromhex("0200000000ff")


def make():
    card_cp = ControlPoint(Card(), CARD_MAC)
    channel = ControlChannel(HOST_MAC, timeout=1.0, retries=2, seed=3)
    return card_cp, channel


def test_lost_request_is_resent_and_lost_reply_answered_from_cache():
    cp, ch = make()
    cid = ch.submit([wire.request(wire.CodeLoad("booster"))], now=0)   # not idempotent
    (first,) = ch.frames_to_send()
    cp.handle_frame(first)                       # executed, but the reply is lost
    ch.submit([wire.request(NpRule(1, 5, NpAction.DROP))], now=0)
    (second,) = ch.frames_to_send()              # lost on the way to the card
    ch.handle_timer(1.0)
    resent = ch.frames_to_send()
    assert resent == [second]                    # only the idempotent request is resent
    failed = ch.next_event()
    assert isinstance(failed, Failed) and failed.correlator == cid and failed.command is Cmd.CODE_LOAD
    for reply in cp.handle_frame(resent[0]):
        ch.receive(reply, 1.1)
    done = ch.next_event()
    assert isinstance(done, Completed) and done.results[0].ok
    # The same request again (its reply lost too) is answered from the cache, not re-run.
    assert cp.handle_frame(resent[0]) == cp.handle_frame(resent[0])
    assert cp.stats["duplicate_requests"] == 2 and cp.stats["cmd_rule_insert"] == 1


def test_gives_up_after_retries():
    _, ch = make()
    cid = ch.submit([wire.request(wire.Echo(b"?"))], now=0)
    for t in (1.0, 2.0):                     # retries=2: three attempts in all
        ch.handle_timer(t)
    assert len(ch.frames_to_send()) == 3 and ch.next_event() is None
    ch.handle_timer(3.0)
    event = ch.next_event()
    assert isinstance(event, Failed) and event.correlator == cid and "3 attempt" in event.reason
    assert ch.get_timer() is None


def test_late_reply_for_a_finished_request_is_ignored():
    cp, ch = make()
    ch.submit([wire.request(wire.Echo(b"a"))], now=0)
    (req,) = ch.frames_to_send()
    ch.handle_timer(1.0)
    (again,) = ch.frames_to_send()
    late = cp.handle_frame(req)
    for reply in late:
        ch.receive(reply, 1.2)
    assert isinstance(ch.next_event(), Completed)
    for reply in late:                          # the same reply arriving again, late
        ch.receive(reply, 1.3)
    assert ch.next_event() is None and ch.stats["stale"] == 1


def test_malformed_and_mismatched_replies():
    cp, ch = make()
    ch.receive(b"\x00" * 10, 0)
    ch.receive(wire.ETH_HEADER.pack(HOST_MAC, CARD_MAC, wire.ETHERTYPE) + b"\x01\x01garbage", 0)
    ch.receive(wire.ETH_HEADER.pack(HOST_MAC, CARD_MAC, 0x0800) + b"\x00" * 40, 0)
    assert ch.stats["malformed"] == 3
    cid = ch.submit([wire.request(wire.Echo(b"a"))], now=0)
    wrong = wire.Message(cid, (wire.Command(Cmd.FWD_ADD, wire.Empty()),), reply=True)
    ch.receive(wire.frame(HOST_MAC, CARD_MAC, wrong), 0.1)
    event = ch.next_event()
    assert isinstance(event, Failed) and "FWD_ADD where ECHO" in event.reason


def test_fragments_reassemble_in_any_order():
    cp, ch = make()
    cp.execute(wire.request(wire.CodeLoad("booster")))
    for i in range(1, 80):
        cp.execute(wire.request(NpRule(i, i, NpAction.REDIRECT)))
    ch.submit([wire.request(wire.DumpRequest(Table.RULES))], now=0)
    replies = cp.handle_frame(ch.frames_to_send()[0])
    assert len(replies) > 2
    for reply in reversed(replies):
        ch.receive(reply, 0.1)
    (result,) = ch.next_event().results
    assert [r.rule.rule_id for r in result.entries] == list(range(79, 0, -1))   # priority order


def test_fragments_beyond_the_last_or_a_second_last_are_refused_and_the_retry_completes():
    cp, ch = make()
    cp.execute(wire.request(wire.CodeLoad("booster")))
    cid = ch.submit([wire.request(NpRule(1, 5, NpAction.DROP))], now=0)     # idempotent: retried
    request = ch.frames_to_send()[0]
    (reply,) = cp.handle_frame(request)
    _, _, good = wire.parse_frame(reply)

    def fragment(number: int, more: bool) -> bytes:
        return wire.frame(HOST_MAC, CARD_MAC, wire.Message(cid, good.commands, reply=True, more=more, fragment=number))

    ch.receive(fragment(5, True), 0.1)      # beyond the last that comes next: kept until then
    ch.receive(fragment(1, False), 0.1)     # the last is 1, yet 5 is held and 0 is missing
    ch.receive(fragment(0, False), 0.1)     # a second last fragment
    assert ch.next_event() is None and ch.stats["refused_fragments"] == 2
    ch.handle_timer(1.5)                    # the retry clears what was held and asks again
    (again,) = ch.frames_to_send()
    (reply,) = cp.handle_frame(again)
    ch.receive(reply, 1.6)
    assert isinstance(ch.next_event(), Completed)


class Link:
    """An in-memory control link to a ControlPoint that can lose or corrupt frames."""

    def __init__(self, cp: ControlPoint) -> None:
        self.cp = cp
        self.drop_requests = 0
        self.drop_replies = 0
        self.corrupt_next_reply = False
        self.mac = HOST_MAC

    def __call__(self, on_frame, loop):
        self.on_frame, self.loop = on_frame, loop
        return self

    def send(self, frame: bytes) -> None:
        if self.drop_requests:
            self.drop_requests -= 1
            return
        for reply in self.cp.handle_frame(frame):
            if self.drop_replies:
                self.drop_replies -= 1
                continue
            if self.corrupt_next_reply:
                self.corrupt_next_reply = False
                self.loop.call_soon(self.on_frame, reply[:14] + b"\xee" + reply[15:])
            self.loop.call_later(0.001, self.on_frame, reply)

    def close(self) -> None:
        pass


async def test_driver_retries_raises_named_errors_and_survives_garbage():
    link = Link(ControlPoint(Card(), CARD_MAC))
    async with NpDriver(transport_factory=link, timeout=0.05, retries=2) as np:
        link.drop_requests, link.drop_replies = 1, 1
        assert await np.echo(b"ping") == b"ping"
        assert np.stats["retries"] == 2
        link.corrupt_next_reply = True
        await np.code_load("booster")
        assert np.stats["malformed"] == 1
        rules = [wire.request(NpRule(i, 1, NpAction.REDIRECT, proto=17, proto_mask=0xFF, dport=(i, i)))
                 for i in range(1, 301)]
        results = await np.execute(rules)           # several frames, sent concurrently
        assert len(results) == 300 and all(r.ok for r in results)
        assert len(await np.dump(Table.RULES)) == 300
        with pytest.raises(NpError) as err:
            await np.rule_delete(9999)
        assert err.value.command is Cmd.RULE_DELETE and err.value.status is Status.NOT_FOUND
        assert "RULE_DELETE failed: NOT_FOUND" in str(err.value)
        assert await np.rule_delete(9999, missing_ok=True) is False
        link.drop_requests = 10
        with pytest.raises(NpTimeout) as err:
            await np.code_load("booster")
        assert err.value.command is Cmd.CODE_LOAD and np.stats["timeouts"] == 1
        link.drop_requests = 0
        assert await np.echo(b"still fine") == b"still fine"


from hypothesis import given, settings          # noqa: E402
from hypothesis import strategies as st         # noqa: E402

from npdrv_strategies import request_commands    # noqa: E402


def _reply_commands():
    """Reply commands of every type and status, OK ones with bodies that encode."""
    ok_bodies = {
        Cmd.ECHO: st.builds(wire.Echo, st.binary(max_size=8)),
        Cmd.TABLE_DUMP: st.builds(wire.DumpHead, st.sampled_from(list(Table)), st.integers(0, 3)),
        Cmd.ENTRY: st.builds(lambda n: wire.Entry(wire.McastSet(n, ())), st.integers(1, 9)),
        Cmd.RULE_INSERT: st.just(wire.Empty()),
        Cmd.COUNTERS_READ: st.builds(wire.Counters, st.sampled_from(list(wire.Scope)), st.integers(0, 9),
                                     st.integers(0, 9), st.integers(0, 9)),
    }
    ok = st.sampled_from(sorted(ok_bodies)).flatmap(lambda c: ok_bodies[c].map(lambda b: wire.Command(c, b)))
    failed = st.builds(lambda c, s: wire.Command(c, wire.Reason("no"), s), st.sampled_from(list(ok_bodies)),
                       st.sampled_from([s for s in Status if s is not Status.OK]))
    return st.one_of(ok, failed)


@settings(max_examples=150, deadline=None)
@given(requests=st.lists(request_commands(), min_size=1, max_size=3),
       replies=st.lists(st.lists(_reply_commands(), max_size=4), min_size=1, max_size=3),
       more=st.lists(st.booleans(), min_size=3, max_size=3),
       numbers=st.lists(st.integers(0, 4), min_size=3, max_size=3))
def test_fuzz_arbitrary_replies_end_a_request_cleanly_or_not_at_all(requests, replies, more, numbers):
    _, ch = make()
    cid = ch.submit(wire.split_commands(requests)[0], now=0)
    ch.frames_to_send()
    for i, commands in enumerate(replies):
        msg = wire.Message(cid, tuple(commands), reply=True, more=more[i], fragment=numbers[i])
        ch.receive(wire.frame(HOST_MAC, CARD_MAC, msg), 0.1)
    event = ch.next_event()
    assert event is None or event.correlator == cid
    if event is None:                       # still waiting: the timer ends it
        ch.handle_timer(100.0)
        for t in range(2):
            ch.handle_timer(200.0 + t * 100)
        assert ch.pending == 0


def test_dump_reply_with_a_failed_entry_fails_the_request():
    _, ch = make()
    cid = ch.submit([wire.request(wire.DumpRequest(Table.MULTICAST))], now=0)
    reply = wire.Message(cid, (wire.Command(Cmd.TABLE_DUMP, wire.DumpHead(Table.MULTICAST, 1)),
                               wire.Command(Cmd.ENTRY, wire.Reason("?"), Status.INTERNAL)), reply=True)
    ch.receive(wire.frame(HOST_MAC, CARD_MAC, reply), 0.1)
    event = ch.next_event()
    assert isinstance(event, Failed) and "announced 1 entries" in event.reason
