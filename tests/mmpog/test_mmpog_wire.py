"""The mmpog wire header: round trips, strict validation, fuzzing."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmpog import wire
from mmpog.wire import Flag, Header, Kind, WireDecodeError

u32 = st.integers(0, wire.MAX_U32)


def test_header_is_28_bytes_and_declared_layout():
    data = wire.encode(Header(Kind.DATA, int(Flag.RELIABLE), 40, 7, 3, 0xDEADBEEF), b"hi")
    assert len(data) == wire.HEADER_SIZE + 2 == 30
    assert data[:4] == bytes([1, Kind.DATA, Flag.RELIABLE, 0])
    header, payload = wire.decode(data)
    assert (header.location, header.sender, header.packet_id, header.rto_ms, payload) == (7, 3, 0xDEADBEEF, 40, b"hi")
    assert header.reliable and not header.retransmit


@given(kind=st.sampled_from([Kind.DATA]), reliable=st.booleans(), retransmit=st.booleans(), rto=st.integers(0, 65535),
       location=u32, sender=u32, pid=u32, seq=st.integers(1, wire.MAX_U32 - 1), payload=st.binary(max_size=200))
@settings(max_examples=150)
def test_roundtrip_forwarded_data(kind, reliable, retransmit, rto, location, sender, pid, seq, payload):
    flags = (Flag.RELIABLE if reliable else 0) | (Flag.RETRANSMIT if retransmit else 0)
    seq = seq if reliable else 0
    lowest = seq // 2
    header = Header(kind, int(flags), rto, location, sender, pid, seq, lowest)
    assert wire.decode(wire.encode(header, payload)) == (header, payload)


@given(st.binary(max_size=120))
@settings(max_examples=200)
def test_fuzz_decode_only_raises_decode_error(data):
    try:
        header, payload = wire.decode(data)
    except WireDecodeError:
        return
    assert wire.encode(header, payload) == data


@given(st.binary(min_size=wire.HEADER_SIZE, max_size=wire.HEADER_SIZE + 40), st.integers(0, 27), st.integers(0, 255))
@settings(max_examples=200)
def test_fuzz_mutated_valid_packets(tail, index, value):
    valid = bytearray(wire.encode(Header(Kind.NACK, location=1, sender=2), wire.encode_nack_ranges([(5, 3)])))
    valid[index] = value
    try:
        header, payload = wire.decode(bytes(valid))
    except WireDecodeError:
        return
    assert header.kind in set(Kind)


@pytest.mark.parametrize("data, message", [
    (b"\x01\x01", "shorter than"),
    (bytes([2, 1, 0, 0]) + bytes(24), "unsupported version 2"),
    (bytes([1, 9, 0, 0]) + bytes(24), "unknown kind 9"),
    (bytes([1, 1, 0x80, 0]) + bytes(24), "unknown flags"),
    (bytes([1, 1, 0, 7]) + bytes(24), "reserved byte"),
    (bytes([1, 1, 0, 0, 0, 0, 0, 5]) + bytes(20), "payload_len says 5"),
])
def test_decode_errors_say_what_is_wrong(data, message):
    with pytest.raises(WireDecodeError, match=message):
        wire.decode(data)


@pytest.mark.parametrize("header, payload, message", [
    (Header(Kind.HEARTBEAT, packet_id=3, seq=4, lowest=1), b"", "HEARTBEAT carries no"),
    (Header(Kind.HEARTBEAT, seq=4, lowest=1), b"x", "HEARTBEAT carries no"),
    (Header(Kind.NACK), b"\x00\x00\x00\x01\x00", "NACK payload"),
    (Header(Kind.HELLO), b"short", "HELLO token"),
    (Header(Kind.DATA, flags=1, seq=3, lowest=9), b"", "lowest 9 is above seq 3"),
    (Header(Kind.WELCOME, flags=1), b"", "WELCOME carries no"),
    (Header(Kind.DATA, flags=wire.COPY, seq=3, lowest=1), b"", "COPY is a reliable"),
    (Header(Kind.DATA, flags=wire.COPY | wire.RELIABLE), b"", "COPY is a reliable, sequenced"),
    (Header(Kind.DATA, flags=wire.COPY | wire.RELIABLE | wire.RETRANSMIT, seq=3, lowest=1), b"", "never a RETRANSMIT"),
    (Header(Kind.LOSS, sender=2), b"\x00\x00\x01", "LOSS carries a 4-byte count"),
    (Header(Kind.LOSS, sender=2, seq=1), b"\x00\x00\x00\x01", "LOSS carries"),
    (Header(Kind.LOSS, sender=2, flags=wire.COPY), b"\x00\x00\x00\x01", "LOSS carries"),
])
def test_kind_rules(header, payload, message):
    with pytest.raises(WireDecodeError, match=message):
        wire.decode(wire.encode(header, payload))


def test_nack_ranges():
    assert wire.seqs_to_ranges([1, 2, 3, 7, 9, 10]) == [(1, 3), (7, 1), (9, 2)]
    assert wire.seqs_to_ranges(list(range(1, 200, 2)), max_ranges=4) == [(1, 1), (3, 1), (5, 1), (7, 1)]
    payload = wire.encode_nack_ranges([(1, 3), (7, 1)])
    assert wire.decode_nack_ranges(payload) == [(1, 3), (7, 1)]
    with pytest.raises(WireDecodeError, match="empty"):
        wire.decode_nack_ranges(wire.NACK_RANGE.pack(5, 0))
    with pytest.raises(WireDecodeError, match="past 2"):
        wire.decode_nack_ranges(wire.NACK_RANGE.pack(wire.MAX_U32, 2))
    with pytest.raises(ValueError):
        wire.encode_nack_ranges([])


def test_encode_rejects_out_of_range():
    with pytest.raises(ValueError):
        wire.encode(Header(Kind.DATA, location=2**32), b"")
    with pytest.raises(ValueError):
        wire.encode(Header(Kind.DATA), bytes(wire.MAX_PAYLOAD + 1))


def test_restamp_changes_only_seq_lowest_flags():
    data = wire.encode(Header(Kind.DATA, int(Flag.RELIABLE), 50, 4, 5, 6), b"pay")
    header, payload = wire.decode(wire.restamp(data, 10, 8, int(Flag.RELIABLE | Flag.RETRANSMIT)))
    assert (header.seq, header.lowest, header.retransmit, header.packet_id, payload) == (10, 8, True, 6, b"pay")


# ---------------------------------------------------------------- malformed input is never fatal

from mmpog.reliability import ClientEndpoint, ReflectorCore  # noqa: E402

_kinds = st.sampled_from(list(Kind))


@st.composite
def plausible_datagrams(draw):
    """Well-framed headers with arbitrary field values (and sometimes a corrupted byte)."""
    kind = draw(_kinds)
    payload = draw(st.binary(max_size=40))
    data = bytearray(wire.HEADER.pack(1, int(kind), draw(st.integers(0, 7)), draw(st.integers(0, 65535)),
                                      len(payload), draw(st.integers(0, 3)), draw(st.integers(0, 4)),
                                      draw(u32), draw(st.integers(0, 50)), draw(st.integers(0, 50))) + payload)
    if draw(st.booleans()):
        index = draw(st.integers(0, len(data) - 1))
        data[index] = draw(st.integers(0, 255))
    return bytes(data)


@given(st.lists(plausible_datagrams() | st.binary(max_size=60), max_size=30))
@settings(max_examples=150, deadline=None)
def test_fuzz_reflector_and_client_survive_anything(datagrams):
    reflector = ReflectorCore()
    reflector.add_member(1, 2, b"t" * 16)
    client = ClientEndpoint(2, 1, b"t" * 16)
    client.connect(0.0)
    for hello in client.datagrams_to_send(0.0):
        reflector.receive_datagram(hello, ("127.0.0.1", 9), 0.0)
    for welcome, _ in reflector.datagrams_to_send(0.0):
        client.receive_datagram(welcome, 0.001)
    assert client.joined                       # so fuzzed datagrams reach the joined paths of both sides
    now = 0.0
    for data in datagrams:
        now += 0.01
        reflector.receive_datagram(data, ("127.0.0.1", 9), now)
        client.receive_datagram(data, now)
        reflector.handle_timer(now)
        client.handle_timer(now)
        reflector.datagrams_to_send(now)
        client.datagrams_to_send(now)
        while client.next_event() is not None:
            pass
    snapshot = client.snapshot()
    assert snapshot["missing"] <= client.config.max_missing


# ---------------------------------------------------------------- packing (BUNDLE)


def test_pack_fills_up_to_the_mtu_and_unpacks_to_the_same_datagrams():
    items = [wire.encode(Header(Kind.DATA, 0, 3, 7, 1, n, seq=4, lowest=1), bytes(64)) for n in range(40)]
    packed = wire.pack(items)
    assert all(len(d) <= wire.MAX_DATAGRAM for d in packed)
    assert len(packed) == 3                                     # 94 bytes per item: 14 per datagram
    again = []
    for data in packed:
        header, payload = wire.decode(data)
        assert header.kind is Kind.BUNDLE and header.location == 7
        again += wire.unpack(header, payload)
    assert again == items
    assert wire.pack(items[:1]) == items[:1]                    # a lone datagram goes as it is


@pytest.mark.parametrize("payload, why", [
    (b"\x00", "stray bytes"),
    (b"\x00\x05abcde", "does not fit"),
    (b"\x03\x00" + bytes(10), "does not fit"),
])
def test_bundle_items_validated(payload, why):
    header = Header(Kind.BUNDLE, location=7)
    with pytest.raises(WireDecodeError, match=why):
        wire.unpack(header, payload)


def test_bundle_refuses_nesting_and_other_locations():
    inner = wire.encode(Header(Kind.DATA, 0, 3, 7, 1, 9), b"x")
    other = wire.encode(Header(Kind.DATA, 0, 3, 8, 1, 9), b"x")
    [nested] = wire.pack([inner, inner])
    with pytest.raises(WireDecodeError, match="inside a BUNDLE"):
        wire.unpack(Header(Kind.BUNDLE, location=7), wire.BUNDLE_ITEM.pack(len(nested)) + nested)
    with pytest.raises(WireDecodeError, match="another location"):
        wire.unpack(Header(Kind.BUNDLE, location=7), wire.BUNDLE_ITEM.pack(len(other)) + other)


@given(st.lists(st.binary(min_size=0, max_size=300), min_size=0, max_size=30))
@settings(max_examples=200, deadline=None)
def test_unpack_never_raises_anything_but_wire_decode_error(blob_parts):
    header = Header(Kind.BUNDLE, location=7)
    try:
        wire.unpack(header, b"".join(blob_parts))
    except WireDecodeError:
        pass


def _unpack_then_decode(header, payload):
    """The two-pass reference: frame the items, then decode each (a bad item is left out and counted)."""
    items, malformed = [], 0
    for item in wire.unpack(header, payload):
        try:
            items.append(wire.decode(item))
        except WireDecodeError:
            malformed += 1
    return items, malformed


@st.composite
def bundle_payloads(draw):
    """Items framed as a BUNDLE carries them: plausible datagrams (some corrupted), sometimes a bad frame."""
    parts = []
    for data in draw(st.lists(plausible_datagrams(), max_size=12)):
        length = len(data) if draw(st.integers(0, 9)) else draw(st.integers(0, 0xFFFF))
        parts.append(wire.BUNDLE_ITEM.pack(length) + data)
    if draw(st.booleans()):
        parts.append(draw(st.binary(max_size=40)))
    return b"".join(parts)


@given(bundle_payloads(), st.integers(0, 3))
@settings(max_examples=300, deadline=None)
def test_decode_bundle_is_unpack_then_decode_in_one_pass(payload, location):
    header = Header(Kind.BUNDLE, location=location)
    try:
        expected = _unpack_then_decode(header, payload)
    except WireDecodeError as exc:
        with pytest.raises(WireDecodeError) as raised:
            wire.decode_bundle(header, payload)
        assert str(raised.value) == str(exc)          # the same error, saying the same thing
        return
    assert wire.decode_bundle(header, payload) == expected


def test_decode_bundle_keeps_good_items_around_a_bad_one():
    good = [wire.encode(Header(Kind.DATA, 0, 3, 7, 1, n, seq=4, lowest=1), bytes(8)) for n in range(3)]
    bad = bytearray(good[1])
    bad[2] = 0x80                                      # unknown flag
    payload = b"".join(wire.BUNDLE_ITEM.pack(len(d)) + d for d in (good[0], bytes(bad), good[2]))
    items, malformed = wire.decode_bundle(Header(Kind.BUNDLE, location=7), payload)
    assert malformed == 1
    assert [h.packet_id for h, _ in items] == [0, 2] and all(p == bytes(8) for _, p in items)


@given(rto=st.integers(0, 65535), location=u32, sender=u32, pid=u32, seq=st.integers(1, wire.MAX_U32 - 1),
       payload=st.binary(max_size=200), count=u32)
@settings(max_examples=150)
def test_roundtrip_copy_flag_and_loss_report(rto, location, sender, pid, seq, payload, count):
    copy = Header(Kind.DATA, wire.RELIABLE | wire.COPY, rto, location, sender, pid, seq, seq // 2)
    data = wire.encode(copy, payload)
    assert wire.decode(data) == (copy, payload)
    # the one-pass bundle decoder applies the same rules to a COPY inside a BUNDLE
    bundle = wire.decode(wire.pack([data, data], max_size=65535)[0])
    assert wire.decode_bundle(*bundle) == ([(copy, payload)] * 2, 0)
    report = Header(Kind.LOSS, 0, rto, location, sender)
    loss_payload = wire.LOSS_REPORT.pack(count)
    assert wire.decode(wire.encode(report, loss_payload)) == (report, loss_payload)


@given(st.integers(0, 255), st.integers(0, wire.MAX_U32), st.binary(max_size=8))
@settings(max_examples=200)
def test_fuzz_copy_and_loss_fields(flags, seq, payload):
    """Any flags and seq on DATA, any payload on LOSS: valid ones obey the COPY/LOSS rules, the rest
    raise WireDecodeError (never anything else)."""
    for kind in (Kind.DATA, Kind.LOSS):
        raw = wire.HEADER.pack(1, int(kind), flags, 0, len(payload), 1, 2, 0, seq, 0) + payload
        try:
            header, body = wire.decode(raw)
        except WireDecodeError:
            continue
        if header.flags & wire.COPY:
            assert kind is Kind.DATA and header.reliable and header.seq and not header.retransmit
        if kind is Kind.LOSS:
            assert len(body) == wire.LOSS_REPORT.size and header.flags == 0 and header.seq == 0
