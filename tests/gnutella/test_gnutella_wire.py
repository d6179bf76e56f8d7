import struct
import zlib

import pytest
from hypothesis import given, settings, strategies as st

from gnutella import wire

from gnutella.wire import (GGEPExtension, GnutellaDecodeError, HitResult, Message, MessageReader, Ping, Pong,
                           Push, Query, QueryHit, QrpPatch, QrpReset, RawMessage, VendorMessage, Bye,
                           cobs_decode, cobs_encode, decode_ggep, decode_message, encode_ggep, ggep_get,
                           QF_MARKER, QF_FIREWALLED)



# ---------------------------------------------------------------- real captures

def test_every_captured_message_decodes_and_reencodes_byte_for_byte(captures):
    decoded = 0
    for mode, kind, raw in captures:
        if kind != "recv":
            continue
        msg = decode_message(raw)
        assert msg.encode() == raw, (mode, msg.type_name)
        decoded += 1
    assert decoded == 6


def test_captured_pong_has_gtkg_vendor_ggep(captures):
    pong_raw = next(raw for _, kind, raw in captures if kind == "recv" and raw[16] == 0x01)
    msg = decode_message(pong_raw)
    assert isinstance(msg.payload, Pong)
    assert (msg.payload.ip, msg.payload.port, msg.payload.files, msg.payload.kbytes) == ("10.44.0.2", 6346, 1, 8)
    assert ggep_get(msg.payload.ggep, "VC")[:4] == b"GTKG"
    assert ggep_get(msg.payload.ggep, "TLS") == b""


def test_captured_query_hit_trailer_and_servent_guid(captures):
    raw = next(raw for _, kind, raw in captures if kind == "recv" and raw[16] == 0x81)
    hit = decode_message(raw).payload
    assert isinstance(hit, QueryHit)
    assert hit.vendor == b"GTKG"
    assert hit.servent_guid.hex() == "87833102068709f204bee6a34d31f3f1"  # == the GUID header of its handshake
    (result,) = hit.results
    assert (result.index, result.size, result.name) == (1, 2800, "booster-sample-alpha.txt")
    assert result.sha1 == "V5NHZLEPTOXWPBCGIE4IO7FUET7HP45W"
    assert len(ggep_get(result.ggep, "TT")) == 24          # tiger tree root
    assert hit.private_data.startswith(b"\xc3")             # GGEP in the QHD private area
    exts, end = decode_ggep(hit.private_data)
    assert [e.id for e in exts] == ["GTKGV", "TLS", "BH"] and end == len(hit.private_data)


def test_captured_qrp_messages(captures):
    reset = decode_message(captures[1][2]).payload
    patch = decode_message(captures[2][2]).payload
    assert reset == QrpReset(16384, 2)
    assert isinstance(patch, QrpPatch) and (patch.seq_no, patch.seq_size, patch.compressor, patch.entry_bits) == (1, 1, 1, 4)


def test_ping_with_ggep_scp_from_connect_capture():
    payload = bytes.fromhex("c3835343504102")
    assert Ping.decode(payload).ggep == (GGEPExtension("SCP", b"\x02"),)


# ---------------------------------------------------------------- query flags

def test_modern_query_flags_are_big_endian_80_00():
    raw = Query("free song").encode()
    assert raw[:2] == b"\x80\x00"
    assert Query.decode(raw).flags == QF_MARKER


def test_query_flags_bits_round_trip_big_endian():
    flags = QF_MARKER | QF_FIREWALLED
    raw = Query("x y z", flags).encode()
    assert raw[:2] == struct.pack(">H", flags)
    assert Query.decode(raw).flags == flags


def test_legacy_min_speed_is_little_endian():
    raw = Query("old style", 56).encode()
    assert raw[:2] == b"\x38\x00"
    q = Query.decode(raw)
    assert q.flags == 56 and not q.modern


def test_query_with_urn_and_ggep_extensions():
    q = Query("", QF_MARKER, ("urn:sha1:V5NHZLEPTOXWPBCGIE4IO7FUET7HP45W",), (GGEPExtension("H", b"\x01abc"),))
    assert Query.decode(q.encode()) == q


# ---------------------------------------------------------------- errors say what was wrong

@pytest.mark.parametrize("payload,kind,words", [
    (b"\x01\x02", 0x01, "pong"),
    (b"\x80\x00abc", 0x80, "NUL"),
    (b"\x05", 0x30, "variant"),
    (b"\x00\x03\x00\x00\x00\x02", 0x30, "power of two"),
    (b"\x01\x02\x01\x01\x04", 0x30, "sequence"),
    (b"\xc3\x10AB\x41x", 0x00, "reserved"),
    (b"\xc3\x02AB\x45xx", 0x00, "declares 5"),
    (b"", 0x77, "unknown payload type"),
])
def test_decode_errors_name_the_problem(payload, kind, words):
    raw = b"\x11" * 16 + bytes([kind, 1, 0]) + struct.pack("<I", len(payload)) + payload
    with pytest.raises(GnutellaDecodeError, match=words):
        decode_message(raw)


def test_reader_frames_split_stream_and_counts_malformed():
    good = Message(b"\x01" * 16, 3, 0, Ping()).encode()
    bad = b"\x02" * 16 + bytes([0x01, 1, 0]) + struct.pack("<I", 3) + b"abc"   # pong too short
    reader = MessageReader()
    stream = good + bad + good
    out = []
    for i in range(0, len(stream), 5):
        out.extend(reader.feed(stream[i:i + 5]))
    assert [type(m) for m in out] == [Message, RawMessage, Message]
    assert "pong" in out[1].error


def test_reader_refuses_oversized_payload():
    reader = MessageReader(max_payload=100)
    header = b"\x00" * 16 + bytes([0x80, 1, 0]) + struct.pack("<I", 101)
    with pytest.raises(GnutellaDecodeError, match="exceeds limit 100"):
        reader.feed(header)


# ---------------------------------------------------------------- round trips and fuzzing

guids = st.binary(min_size=16, max_size=16)
ids = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=15)
ggeps = st.lists(st.builds(GGEPExtension, ids, st.binary(max_size=300)), max_size=4).map(tuple)
ipv4 = st.ip_addresses(v=4).map(str)
words = st.text(alphabet=st.characters(blacklist_characters="\x00\x1c", blacklist_categories=("Cs",)), max_size=40)
urns = st.lists(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", min_size=32, max_size=32).map(lambda s: f"urn:sha1:{s}"), max_size=2).map(tuple)
results = st.builds(HitResult, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                    words, urns, ggeps)

payloads = st.one_of(
    st.builds(Ping, ggeps),
    st.builds(Pong, st.integers(0, 65535), ipv4, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), ggeps),
    st.builds(Bye, st.integers(0, 65535), st.text(alphabet="abc xyz:.", max_size=30)),
    st.builds(QrpReset, st.sampled_from([1 << b for b in range(1, 20)]), st.integers(1, 255)),
    st.builds(QrpPatch, st.just(1), st.integers(1, 255), st.sampled_from([0, 1]), st.sampled_from([1, 2, 4, 8]), st.binary(max_size=200)),
    st.builds(VendorMessage, st.binary(min_size=4, max_size=4), st.integers(0, 65535), st.integers(0, 65535), st.binary(max_size=50), st.booleans()),
    st.builds(Push, guids, st.integers(0, 2**32 - 1), ipv4, st.integers(0, 65535), ggeps),
    st.builds(Query, words, st.integers(0x8000, 0xFFFF), urns, ggeps),
    st.builds(QueryHit, st.integers(0, 65535), ipv4, st.integers(0, 2**32 - 1), st.lists(results, min_size=1, max_size=3).map(tuple),
              guids, st.sampled_from([b"", b"BBOX", b"GTKG"]), st.binary(max_size=2), st.just(b"")),
)


@settings(max_examples=150, deadline=None)
@given(guids, st.integers(0, 255), st.integers(0, 255), payloads)
def test_messages_round_trip(guid, ttl, hops, payload):
    if isinstance(payload, QueryHit) and not payload.vendor:
        payload = QueryHit(payload.port, payload.ip, payload.speed, payload.results, payload.servent_guid)
    msg = Message(guid, ttl, hops, payload)
    raw = msg.encode()
    assert decode_message(raw) == msg
    assert MessageReader().feed(raw) == [msg]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_decode_errors(data):
    reader = MessageReader(max_payload=1000)
    try:
        for item in reader.feed(data):
            assert isinstance(item, (Message, RawMessage))
    except GnutellaDecodeError:
        pass
    for kind in (0x00, 0x01, 0x02, 0x30, 0x31, 0x40, 0x80, 0x81):
        raw = b"\x00" * 16 + bytes([kind, 1, 0]) + struct.pack("<I", len(data)) + data
        try:
            decode_message(raw)
        except GnutellaDecodeError:
            pass


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=600))
def test_cobs_round_trip_has_no_zero(data):
    encoded = cobs_encode(data)
    assert b"\x00" not in encoded
    assert cobs_decode(encoded) == data


@settings(max_examples=100, deadline=None)
@given(st.lists(st.builds(GGEPExtension, ids, st.binary(max_size=5000), st.booleans(), st.booleans()), min_size=1, max_size=3))
def test_ggep_round_trip_with_deflate_and_cobs(exts):
    raw = encode_ggep(exts)
    decoded, end = decode_ggep(raw)
    assert end == len(raw)
    assert [(e.id, e.data) for e in decoded] == [(e.id, e.data) for e in exts]


def _deflated_ggep(ident: bytes, plain_size: int) -> bytes:
    """A GGEP block by hand (encode_ggep would refuse): one deflated extension."""
    data = zlib.compress(b"\x00" * plain_size, 9)
    assert len(data) < 1 << 18
    return bytes([0xC3, 0x80 | 0x20 | len(ident)]) + ident + wire._ggep_length(len(data)) + data


def test_ggep_deflate_bomb_in_a_pong_is_refused():
    """Review finding: a 61 KiB Pong payload inflated to 60 MiB (zlib.decompress unbounded)."""
    payload = Pong(6346, b"\x0a\x00\x00\x01", 0, 0).encode() + _deflated_ggep(b"DU", 60 << 20)
    assert len(payload) < 64 * 1024
    with pytest.raises(GnutellaDecodeError, match="inflates past"):
        Pong.decode(payload)


def test_ggep_inflation_is_bounded_per_block_not_per_extension():
    one = _deflated_ggep(b"A", 40 << 10)
    block = one[:1] + bytes([one[1] & ~0x80]) + one[2:] + _deflated_ggep(b"B", 40 << 10)[1:]
    with pytest.raises(GnutellaDecodeError, match="inflates past"):
        decode_ggep(block)
    exts, _ = decode_ggep(_deflated_ggep(b"A", 40 << 10))
    assert exts[0].data == b"\x00" * (40 << 10) and exts[0].compress


def test_ggep_truncated_deflate_is_refused():
    whole = zlib.compress(b"x" * 100)
    block = bytes([0xC3, 0x80 | 0x20 | 1]) + b"A" + wire._ggep_length(len(whole) - 4) + whole[:-4]
    with pytest.raises(GnutellaDecodeError, match="truncated"):
        decode_ggep(block)
