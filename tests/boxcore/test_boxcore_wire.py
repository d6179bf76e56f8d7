"""The control and data-channel wire formats: round trips, strict validation, fuzzing."""

import struct

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from boxcore import framing, wire
from boxcore.framing import FramingError
from boxcore.wire import FrameDecoder, Tag, WireDecodeError

ADDR = st.tuples(st.sampled_from(["127.0.0.1", "10.0.0.1"]), st.integers(0, 65535)).map(list)


def test_encode_decode_round_trip():
    msg = {"t": "rule", "id": 3, "action": "redirect", "match": {"proto": 17, "dst_port": 7000},
           "priority": 5}
    frame = wire.encode(msg)
    assert struct.unpack("!I", frame[:4])[0] == len(frame) - 4
    dec = FrameDecoder()
    # fed one byte at a time: frames are reassembled
    out = []
    for i in range(len(frame)):
        out += dec.feed(frame[i:i + 1])
    assert out == [msg] and dec.buffered == 0


@pytest.mark.parametrize("msg, why", [
    ({"id": 1}, "no string 't'"),
    ({"t": "nope", "id": 1}, "unknown message type"),
    ({"t": "hello", "id": 1, "name": "x"}, "missing field 'version'"),
    ({"t": "hello", "id": 1, "name": 3, "version": 1}, "field 'name' must be str"),
    ({"t": "hello", "id": -1, "name": "x", "version": 1}, "field 'id'"),
    ({"t": "hello", "id": 1, "name": "x", "version": 1, "extra": 1}, "unknown field 'extra'"),
    ({"t": "rule", "id": 1, "action": "steal", "match": {}}, "field 'action'"),
    ({"t": "heartbeat", "counters": [[1, 2]]}, "field 'counters'"),
    ({"t": "reply", "id": 1, "status": "MAYBE"}, "field 'status'"),
    ({"t": "hello", "id": True, "name": "x", "version": 1}, "field 'id'"),
    ([1, 2], "not a map"),
])
def test_validate_says_what_is_wrong(msg, why):
    with pytest.raises(WireDecodeError, match=why):
        wire.validate(msg)


def test_the_control_framer_is_the_shared_one():
    assert issubclass(FrameDecoder, framing.FrameDecoder)


def test_bad_lengths_break_the_stream():
    with pytest.raises(FramingError, match="frame length 0"):
        FrameDecoder().feed(b"\x00\x00\x00\x00")
    with pytest.raises(FramingError, match="outside"):
        FrameDecoder(max_frame=100).feed(struct.pack("!I", 101))


def test_garbage_body_is_a_bad_frame_not_fatal():
    dec = FrameDecoder()
    good = wire.encode({"t": "bye"})
    out = dec.feed(struct.pack("!I", 2) + b"\xc1\xc1" + good)
    assert isinstance(out[0], WireDecodeError) and "undecodable" in str(out[0]) and out[1] == {"t": "bye"}


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_frame_decoder_never_crashes(data):
    dec = FrameDecoder(max_frame=1000)
    try:
        msgs = dec.feed(data)
    except FramingError:
        return
    for msg in msgs:
        if isinstance(msg, WireDecodeError):
            continue
        try:
            wire.validate(msg)
        except WireDecodeError:
            pass


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=8) | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=10)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(wire.MESSAGES)), st.dictionaries(st.sampled_from(
    ["id", "name", "version", "action", "match", "cookie", "key", "value", "status", "members", "counters",
     "watch", "nfds", "client", "prefix", "group", "what"]), json_like, max_size=6))
def test_fuzz_validate_accepts_or_raises_decode_error(kind, fields):
    msg = dict(fields, t=kind)
    try:
        wire.validate(msg)
    except WireDecodeError:
        return
    # whatever validates must encode and come back identical
    assert FrameDecoder().feed(wire.encode(msg)) == [msg]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 2**32), st.sampled_from([6, 17]), ADDR, ADDR,
       st.binary(max_size=100), st.booleans())
def test_packet_datagram_round_trip(cookie, token, proto, src, dst, payload, want):
    data = wire.pack_datagram(Tag.PACKET, cookie, token, proto, src[0], src[1], dst[0], dst[1], payload, want)
    tag, fields = wire.unpack_datagram(data)
    assert tag is Tag.PACKET and fields == [cookie, token, proto, src[0], src[1], dst[0], dst[1], payload, want]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.lists(json_like, max_size=10).map(msgpack.packb))
def test_fuzz_datagrams(data):
    try:
        tag, fields = wire.unpack_datagram(data)
    except WireDecodeError:
        return
    assert len(fields) == len(wire.DATAGRAMS[tag])


@pytest.mark.parametrize("obj, why", [
    ([9, 1], "unknown datagram tag"),
    ([1, 1, 5, None], "field 'verdict'"),
    ([1, 1, 0], "2 fields, expected 3"),
    ({"a": 1}, "not a non-empty array"),
    ([3, 1, 70000, b"x"], "field 'src_port'"),
])
def test_datagram_errors(obj, why):
    with pytest.raises(WireDecodeError, match=why):
        wire.unpack_datagram(msgpack.packb(obj))


def test_packet_from_wire_strict():
    good = {"proto": 17, "src": "1.2.3.4", "sport": 1, "dst": "5.6.7.8", "dport": 2, "payload": b"x"}
    assert wire.packet_from_wire(good).payload == b"x"
    with pytest.raises(WireDecodeError):
        wire.packet_from_wire(dict(good, sport=-1))
    with pytest.raises(WireDecodeError):
        wire.packet_from_wire(dict(good, extra=1))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32), st.integers(0, 2), st.none() | st.binary(max_size=20)),
                min_size=1, max_size=wire.MAX_BATCH))
def test_verdict_batch_round_trip(records):
    records = [list(r) for r in records]
    tag, got = wire.unpack_datagram(wire.pack_batch(Tag.VERDICTS, records))
    assert tag is Tag.VERDICTS and got == records


@pytest.mark.parametrize("obj, why", [
    ([4, []], "one list of 1..256 records"),
    ([4, [[1, 2]]], "PACKET: 2 fields, expected 9"),
    ([5, [[1, 0, None]] * 257], "one list of 1..256"),
    ([5, [[1, 7, None]]], "field 'verdict'"),
    ([5, [[1, 0, None]], "extra"], "one list"),
])
def test_batch_errors(obj, why):
    with pytest.raises(WireDecodeError, match=why):
        wire.unpack_datagram(msgpack.packb(obj))


def test_optional_hello_fields_and_delegate_are_declared():
    """Added without changing any existing shape: an old booster's hello is still valid."""
    wire.validate({"t": "hello", "id": 1, "name": "old", "version": 1})
    wire.validate({"t": "hello", "id": 1, "name": "ctl", "version": 1, "observer": True})
    wire.validate({"t": "hello", "id": 1, "name": "new", "version": 1, "features": ["delegate"]})
    with pytest.raises(WireDecodeError, match="features"):
        wire.validate({"t": "hello", "id": 1, "name": "x", "version": 1, "features": "delegate"})
    with pytest.raises(WireDecodeError, match="features"):
        wire.validate({"t": "hello", "id": 1, "name": "x", "version": 1, "features": ["f"] * 17})
    wire.validate({"t": "delegate", "cookie": 3, "delivery": {"kind": "socket", "params": {}, "nfds": 1},
                   "nfds": 1})
    with pytest.raises(WireDecodeError, match="missing field 'delivery'"):
        wire.validate({"t": "delegate", "cookie": 3, "nfds": 1})
    assert "delegate" not in wire.REQUESTS and "delegate" in wire.FEATURES
