"""The booster's logic alone (sans-IO, deterministic) and its booster-to-booster codec."""

import struct

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from gnutella import b2b
from gnutella.boostercore import BoosterConfig, BoosterCore, SendPeer
from gnutella.handshake import ConnectRequest, Headers
from gnutella.node import Close, Send
from gnutella.qrp import RouteTable
from gnutella.wire import Bye, HitResult, Message, Ping, Push, Query, QueryHit


def core(**cfg) -> BoosterCore:
    return BoosterCore(BoosterConfig("edge1", ("10.11.0.0/24",), **cfg), secret=b"k")


def table_of(*names: str) -> RouteTable:
    t = RouteTable(16)
    for n in names:
        t.add_text(n)
    return t


def up(c: BoosterCore, cid: int, ip: str, dst=("10.12.0.11", 6346), table=None):
    listen = (ip, 6346)
    assert c.decide(ConnectRequest("0.6", Headers({"X-Ultrapeer": "True"})), listen).accepted
    c.local_up(cid, 0.0, ip, listen, dst, leaf=False)
    if table is not None:
        for m in table.to_messages():
            c.local_message(cid, Message(b"\x00" * 16, 1, 0, m), 0.0)


def peer(c: BoosterCore, pid: int, table: RouteTable | None):
    c.peer_up(pid)
    if table is not None:
        c.peer_message(pid, b2b.table_message(table), 0.0)


def hit_from(ip: str, name: str, guid=b"\x66" * 16) -> QueryHit:
    return QueryHit(6346, ip, 100, (HitResult(1, 10, name),), guid)


Q = lambda text, guid=b"\x51" * 16, ttl=4, hops=0: Message(guid, ttl, hops, Query(text))


def sends(actions, kind=Send):
    return [a for a in actions if isinstance(a, kind)]


def queries_out(actions):
    return [a for a in actions if isinstance(a, SendPeer) and a.obj["t"] == "query"]


def test_steering_accepts_one_intercepted_connection_per_servent_and_names_local_peers():
    c = core(max_per_client=1)
    up(c, 1, "10.11.0.11")
    up(c, 2, "10.11.0.21")
    second = c.decide(ConnectRequest("0.6", Headers({"X-Ultrapeer": "True"})), ("10.11.0.11", 6346))
    assert second.code == 503 and c.stats["steered_away"] == 1
    assert c.local_hosts(exclude=("10.11.0.11", 6346)) == [("10.11.0.21", 6346)]


def test_pings_answered_as_impersonated_peer_plus_local_pongs():
    c = core()
    up(c, 1, "10.11.0.11", dst=("10.12.0.31", 6346))
    up(c, 2, "10.11.0.21")
    alive = c.local_message(1, Message(b"\x01" * 16, 1, 0, Ping()), 0.0)
    assert [(a.message.guid, a.message.payload.ip) for a in alive] == [(b"\x01" * 16, "10.12.0.31")]
    full = c.local_message(1, Message(b"\x02" * 16, 3, 0, Ping()), 0.0)
    assert {a.message.payload.ip for a in full} == {"10.12.0.31", "10.11.0.21"}
    assert all(a.message.guid == b"\x02" * 16 and a.cid == 1 for a in full)
    assert not sends(full, SendPeer)                       # pings never leave the cluster


def test_local_hit_keeps_the_query_inside():
    c = core(sightings=0, local_wait=0.5)
    up(c, 1, "10.11.0.11", table=table_of("nothing here"))
    up(c, 2, "10.11.0.21", table=table_of("blue moon.mp3"))
    up(c, 3, "10.11.0.31", table=table_of("other stuff.txt"))
    peer(c, 9, None)
    out = c.local_message(1, Q("blue moon"), 0.0)
    (probe,) = sends(out)
    assert probe.cid == 2 and probe.message.ttl == 1 and probe.message.guid != b"\x51" * 16   # only the one that may have it
    back = c.local_message(2, Message(probe.message.guid, 1, 0, hit_from("10.11.0.21", "blue moon.mp3")), 0.1)
    (to_origin,) = sends(back)
    assert to_origin.cid == 1 and to_origin.message.guid == b"\x51" * 16
    assert queries_out(c.tick(2.0)) == []
    assert c.stats["local_hits"] == 1 and c.stats["forwarded_by_timeout"] == 0


def test_no_local_hit_goes_out_after_the_wait_only_to_boosters_that_may_have_it():
    c = core(sightings=0, local_wait=0.5, forward="wait")
    up(c, 1, "10.11.0.11")
    peer(c, 8, table_of("red sky.flac"))
    peer(c, 9, table_of("jazz.mp3"))
    c.local_message(1, Q("red sky"), 0.0)
    assert queries_out(c.tick(0.4)) == []
    (out,) = queries_out(c.tick(0.6))
    assert out.pid == 8 and out.obj["t"] == "query" and out.obj["criteria"] == "red sky"
    assert c.stats["forwarded_by_timeout"] == 1 and c.stats["queries_not_sent_by_table"] == 1
    # a remote hit comes back to the servent that asked
    (deliver,) = sends(c.peer_message(8, {"t": "hit", "guid": b"\x51" * 16, "hops": 2,
                                          "payload": hit_from("10.12.0.11", "red sky.flac").encode()}, 0.7))
    assert deliver.cid == 1 and isinstance(deliver.message.payload, QueryHit)


def test_enough_sightings_send_it_out_before_the_wait():
    c = core(sightings=3, local_wait=10)
    for i, ip in enumerate(["10.11.0.11", "10.11.0.21", "10.11.0.31"], 1):
        up(c, i, ip)
    peer(c, 9, None)
    assert not sends(c.local_message(1, Q("x y z"), 0.0), SendPeer)
    assert not sends(c.local_message(2, Q("x y z", hops=1), 0.01), SendPeer)
    (out,) = sends(c.local_message(3, Q("x y z", hops=1), 0.02), SendPeer)
    assert c.stats["forwarded_by_count"] == 1
    assert not sends(c.local_message(3, Q("x y z", hops=2), 0.03), SendPeer)   # once only


def test_query_from_a_booster_floods_the_cluster_once_per_servent_and_hits_go_back():
    c = core()
    up(c, 1, "10.11.0.11", table=table_of("alpha beta.txt"))
    up(c, 2, "10.11.0.21", table=table_of("gamma.txt"))
    c.locals[3] = c.locals[1].__class__(3, "10.11.0.11", ("10.11.0.11", 6346), c.impersonate(("10.13.0.1", 6346)),
                                       False, c.locals[1].qrp, c.locals[1].table)   # a second link of servent 1
    peer(c, 7, None)
    obj = {"t": "query", "guid": b"\x99" * 16, "ttl": 5, "hops": 1, "criteria": "alpha", "flags": 0x8000, "urns": []}
    out = sends(c.peer_message(7, obj, 0.0))
    assert [a.cid for a in out] == [1] and out[0].message.ttl == 2       # clamped to remote_ttl
    assert c.peer_message(7, obj, 0.1) == []                            # duplicate
    (back,) = sends(c.local_message(1, Message(b"\x99" * 16, 2, 0, hit_from("10.11.0.11", "alpha beta.txt")), 0.2),
                    SendPeer)
    assert back.pid == 7 and back.obj["t"] == "hit"
    # ...and the query is never sent on to other boosters
    assert queries_out(c.tick(5.0)) == []


def test_push_is_routed_across_boosters_by_servent_guid():
    c = core(sightings=0, local_wait=0)
    up(c, 1, "10.11.0.11")
    peer(c, 7, None)
    c.local_message(1, Q("tune"), 0.0)
    servent = b"\x42" * 16
    c.peer_message(7, {"t": "hit", "guid": b"\x51" * 16, "hops": 1,
                       "payload": hit_from("10.12.0.11", "tune.mp3", servent).encode()}, 0.1)
    (out,) = sends(c.local_message(1, Message(b"\x11" * 16, 3, 0, Push(servent, 1, "10.11.0.11", 6346)), 0.2),
                   SendPeer)
    assert out.pid == 7 and Push.decode(out.obj["payload"]).servent_guid == servent
    # and the other way: a push from a booster to a local servent
    c.local_message(1, Message(b"\x52" * 16, 2, 0, hit_from("10.11.0.11", "mine.txt", b"\x43" * 16)), 0.3)
    (inside,) = sends(c.peer_message(7, {"t": "push", "payload": Push(b"\x43" * 16, 1, "10.12.0.5", 6346).encode()}, 0.4))
    assert inside.cid == 1


def test_cluster_table_changes_are_sent_to_boosters_rate_limited():
    c = core(table_interval=1.0)
    peer(c, 5, None)
    up(c, 1, "10.11.0.11", table=table_of("violin concerto.ogg"))
    (t1,) = sends(c.tick(10.0), SendPeer)
    assert b2b.table_from_message(t1.obj).matches("violin concerto")
    up(c, 2, "10.11.0.21", table=table_of("drum solo.wav"))
    assert sends(c.tick(10.5), SendPeer) == []                 # within table_interval
    (t2,) = sends(c.tick(11.1), SendPeer)
    assert b2b.table_from_message(t2.obj).matches("drum solo")


def test_bye_closes_and_query_table_is_bounded():
    c = core(max_queries=5)
    up(c, 1, "10.11.0.11")
    assert isinstance(c.local_message(1, Message(b"\x00" * 16, 1, 0, Bye(200, "bye")), 0.0)[0], Close)
    for i in range(9):
        c.local_message(1, Q("q", guid=bytes([i]) * 16), 0.0)
    assert len(c.queries) == 5 and c.stats["query_table_evicted"] == 4


# ---------------------------------------------------------------- b2b codec

def test_b2b_round_trip_every_type():
    msgs = [
        {"t": "hello", "id": "edge1", "cluster": ["10.11.0.0/24"], "v": 1},
        b2b.table_message(table_of("a b c")),
        {"t": "query", "guid": b"\x01" * 16, "ttl": 2, "hops": 1, "criteria": "x", "flags": 0x8000, "urns": []},
        {"t": "hit", "guid": b"\x01" * 16, "hops": 3, "payload": b"abc"},
        {"t": "push", "payload": b"xyz"},
        {"t": "bye", "reason": "done"},
    ]
    stream = b"".join(b2b.encode(m) for m in msgs)
    reader = b2b.frame_decoder()
    out = []
    for i in range(0, len(stream), 7):
        out += reader.feed(stream[i:i + 7])
    assert out == msgs


@pytest.mark.parametrize("obj,words", [
    ({"t": "nope"}, "unknown message type"),
    ({"t": "hit", "guid": b"\x01" * 16, "hops": 1}, "missing field 'payload'"),
    ({"t": "hit", "guid": b"\x01" * 3, "hops": 1, "payload": b""}, "guid of 3 bytes"),
    ({"t": "bye", "reason": 5}, "expected str"),
    ({"t": "bye", "reason": "x", "extra": 1}, "unexpected fields"),
    ({"t": "table", "bits": 40, "slots": b""}, "outside 1..20"),
    ([1, 2], "not a map"),
])
def test_b2b_decode_errors_say_what_was_wrong(obj, words):
    body = msgpack.packb(obj, use_bin_type=True)
    (err,) = b2b.frame_decoder().feed(struct.pack(">I", len(body)) + body)
    assert isinstance(err, b2b.B2BDecodeError) and words in str(err)


def test_b2b_oversized_frame_is_fatal():
    with pytest.raises(b2b.FramingError, match="outside"):
        b2b.frame_decoder(max_frame=10).feed(struct.pack(">I", 11))


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_b2b_fuzz_only_decode_errors(data):
    try:
        for item in b2b.frame_decoder(max_frame=1000).feed(data):
            assert isinstance(item, (dict, b2b.B2BDecodeError))
    except b2b.FramingError:
        pass


@settings(max_examples=50, deadline=None)
@given(st.sets(st.integers(0, (1 << 12) - 1), max_size=300))
def test_cluster_table_message_round_trip(slots):
    table = RouteTable(12, set(slots))
    assert b2b.table_from_message(b2b.table_message(table)).present == table.present


def test_trust_tables_forwards_at_once_when_no_local_table_matches():
    c = core(sightings=0, local_wait=5.0, trust_tables=True, forward="wait")
    up(c, 1, "10.11.0.11", table=table_of("mine.txt"))
    up(c, 2, "10.11.0.21", table=table_of("other.txt"))
    peer(c, 9, None)
    assert len(queries_out(c.local_message(1, Q("distant opera"), 0.0))) == 1
    # a query some local table may answer still waits for the local attempt
    assert queries_out(c.local_message(1, Q("other", guid=b"\x61" * 16), 0.0)) == []
    # and without the option everything waits
    plain = core(sightings=0, local_wait=5.0, forward="wait")
    up(plain, 1, "10.11.0.11", table=table_of("mine.txt"))
    peer(plain, 9, None)
    assert queries_out(plain.local_message(1, Q("distant opera"), 0.0)) == []


def test_conventional_outside_peer_gets_forwarded_queries_and_its_queries_enter_the_cluster():
    from gnutella.handshake import Identity
    c = core(sightings=0, local_wait=0.2, upstream_ttl=3, forward="wait")
    up(c, 1, "10.11.0.11", table=table_of("local tune.mp3"))
    up(c, 2, "10.11.0.21", table=table_of("other.txt"))
    c.upstream_up(50, Identity(b"\x05" * 16, "10.100.1.2", 6346, True))
    # its alive ping gets our pong, same GUID; pings never enter the cluster
    (pong,) = c.upstream_message(50, Message(b"\x31" * 16, 1, 0, Ping()), 0.0)
    assert pong.cid == 50 and pong.message.guid == b"\x31" * 16 and pong.message.payload.ip == "10.100.1.2"
    # a local query with no local hit goes to it after the wait, with our TTL cap
    c.local_message(1, Q("far song", ttl=6), 0.0)
    (out,) = [a for a in c.tick(0.3) if isinstance(a, Send)]
    assert out.cid == 50 and out.message.ttl == 3 and out.message.guid == b"\x51" * 16
    (back,) = sends(c.upstream_message(50, Message(b"\x51" * 16, 3, 1, hit_from("10.50.0.9", "far song.ogg")), 0.4))
    assert back.cid == 1
    # its query floods the cluster (filtered by tables) and local hits go back to it
    inject = sends(c.upstream_message(50, Q("local tune", guid=b"\x71" * 16, ttl=4), 0.5))
    assert [a.cid for a in inject] == [1] and inject[0].message.ttl == 2
    (hit_back,) = sends(c.local_message(1, Message(b"\x71" * 16, 2, 0, hit_from("10.11.0.11", "local tune.mp3")), 0.6))
    assert hit_back.cid == 50
    c.upstream_down(50)
    assert c.local_message(1, Message(b"\x71" * 16, 2, 0, hit_from("10.11.0.11", "local tune.mp3")), 0.7) == []


def test_adaptive_forwarding_goes_out_at_once_when_no_local_table_may_answer():
    c = core(sightings=0, local_wait=5.0)
    up(c, 1, "10.11.0.11", table=table_of("mine.txt"))
    up(c, 2, "10.11.0.21", table=table_of("other.txt"))
    peer(c, 8, table_of("distant opera.ogg"))
    peer(c, 9, table_of("jazz.mp3"))
    (out,) = queries_out(c.local_message(1, Q("distant opera"), 0.0))
    assert out.pid == 8 and c.stats["forwarded_by_tables"] == 1 and c.stats["queries_not_sent_by_table"] == 1
    # a local servent without a table yet may hold anything: the local attempt comes first
    up(c, 3, "10.11.0.31")
    assert queries_out(c.local_message(1, Q("distant opera", guid=b"\x62" * 16), 0.0)) == []


def test_adaptive_wait_follows_how_long_local_hits_take():
    c = core(sightings=0, local_wait=0.5, min_local_wait=0.02, wait_margin=3.0)
    up(c, 1, "10.11.0.11", table=table_of("nothing here"))
    up(c, 2, "10.11.0.21", table=table_of("blue moon.mp3"))
    peer(c, 9, None)
    assert c.local_wait() == 0.5                         # nothing learned yet: the configured bound
    (probe,) = sends(c.local_message(1, Q("blue moon"), 0.0))
    c.local_message(2, Message(probe.message.guid, 1, 0, hit_from("10.11.0.21", "blue moon.mp3")), 0.01)
    assert c.local_wait() == pytest.approx(0.03)          # 10 ms local hit, margin 3
    # a query the table claims but no local hit answers goes out once the learned wait is over
    c.local_message(1, Q("blue moon", guid=b"\x63" * 16), 1.0)
    assert queries_out(c.tick(1.02)) == []
    (out,) = queries_out(c.tick(1.031))
    assert out.obj["guid"] == b"\x63" * 16 and c.stats["forwarded_by_timeout"] == 1
    assert c.next_deadline() is None
    # bounded below and above
    c.local_hit_delays.clear()
    c.local_hit_delays.append(0.001)
    assert c.local_wait() == 0.02
    c.local_hit_delays.append(10.0)
    assert c.local_wait() == 0.5


def test_opaque_hit_and_push_name_only_the_relay():
    from gnutella.boostercore import opaque_hit, opaque_push
    from gnutella.wire import GGEPExtension
    result = HitResult(1, 10, "far.ogg", ("urn:sha1:" + "A" * 32,),
                       (GGEPExtension("ALT", b"\x0a\x0c\x00\x0b\xca\x18", cobs=True), GGEPExtension("CT", b"\x01")))
    hit = QueryHit(6346, "10.12.0.11", 100, (result,), b"\x66" * 16, b"GTKG", b"\x1c\x00", b"\xc3\x82PUSH\x46xxxxxx")
    seen = QueryHit.decode(opaque_hit(hit, ("10.11.0.1", 40001)).encode())
    assert (seen.ip, seen.port) == ("10.11.0.1", 40001) and seen.private_data == b""
    assert [g.id for g in seen.results[0].ggep] == ["CT"] and seen.results[0].sha1 == "A" * 32
    assert seen.servent_guid == hit.servent_guid and seen.open_data == hit.open_data
    push = opaque_push(Push(b"\x66" * 16, 3, "10.13.0.5", 6346), ("10.11.0.1", 40002))
    assert (push.ip, push.port, push.file_index) == ("10.11.0.1", 40002, 3)


def test_a_listen_address_no_pong_can_carry_is_never_learned():
    """Review finding: ``Listen-IP: 10.11.0.5:99999`` was learned (even when refused); every
    later ping answer then built Pong(99999), which raised inside the link's pump."""
    c = core()
    for bad in (("10.11.0.5", 99999), ("10.11.0.5", 0), ("10.11.0.5", -1), ("10.11.0.999", 6346)):
        c.learn_servent(bad)
    assert c.stats["servents_refused"] == 4 and c.local_hosts() == []
    up(c, 1, "10.11.0.11")
    pongs = sends(c.local_message(1, Message(b"\x01" * 16, 2, 0, Ping()), 0.0))
    assert [m.message.payload.port for m in pongs] == [6346]
    for action in pongs:
        action.message.encode()


def test_hop_counts_saturate_at_255_instead_of_making_unencodable_messages():
    """Review finding: a query with hops 255 was forwarded with hops 256 (struct.error in the task
    that encoded it)."""
    c = core()
    up(c, 1, "10.11.0.11")
    peer(c, 7, None)
    actions = c.local_message(1, Q("free song", ttl=1, hops=255), 0.0)
    actions += c.local_message(1, Message(b"\x02" * 16, 1, 255, Ping()), 0.0)
    for a in actions:
        if isinstance(a, SendPeer):
            b2b.encode(a.obj)
        elif isinstance(a, Send):
            a.message.encode()
    assert any(isinstance(a, Send) for a in actions)


@pytest.mark.parametrize("field,value", [("hops", 256), ("ttl", 256), ("hops", -1), ("flags", 0x10000),
                                         ("criteria", "a\x00b")])
def test_b2b_query_fields_are_range_checked(field, value):
    obj = {"t": "query", "guid": b"\x01" * 16, "ttl": 3, "hops": 1, "criteria": "free", "flags": 0x8000, "urns": []}
    b2b.validate(obj)
    with pytest.raises(b2b.B2BDecodeError):
        b2b.validate({**obj, field: value})


def test_a_b2b_query_of_hops_255_reaches_local_servents_encodable():
    c = core()
    up(c, 1, "10.11.0.11")
    peer(c, 7, None)
    obj = {"t": "query", "guid": b"\x03" * 16, "ttl": 3, "hops": 255, "criteria": "free", "flags": 0x8000, "urns": []}
    out = sends(c.peer_message(7, b2b.validate(obj), 0.0))
    assert out and all(len(a.message.encode()) > 23 for a in out)


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=16, max_size=64), st.binary(min_size=16, max_size=64), st.binary(min_size=32, max_size=32),
       st.binary(min_size=32, max_size=32))
def test_peer_auth_succeeds_exactly_when_both_hold_the_same_secret(secret_a, secret_b, nonce_a, nonce_b):
    connector, acceptor = b2b.PeerAuth(secret_a, True, nonce_a), b2b.PeerAuth(secret_b, False, nonce_b)
    try:
        to_acceptor = acceptor.receive(b2b.validate(connector.challenge()))
        to_connector = connector.receive(b2b.validate(acceptor.challenge()))
        connector.receive(b2b.validate(to_acceptor[0]))
        acceptor.receive(b2b.validate(to_connector[0]))
    except b2b.B2BAuthError:
        assert secret_a != secret_b or nonce_a == nonce_b
        return
    assert secret_a == secret_b and connector.done and acceptor.done
