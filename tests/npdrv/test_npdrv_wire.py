"""The guided-frame codec: round trips, strict decoding, fuzz."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npdrv import wire
from npdrv.wire import Cmd, Command, Message, Status

from npdrv_strategies import members, np_rules, request_commands, u32

SRC = bytes.fromhex("020000000001")


@settings(max_examples=150, deadline=None)
@given(commands=st.lists(request_commands(), min_size=1, max_size=8), correlator=u32)
def test_request_round_trip(commands, correlator):
    groups = wire.split_commands(commands)
    assert [c for g in groups for c in g] == commands
    for group in groups:
        data = wire.frame(wire.BROADCAST, SRC, Message(correlator, tuple(group)))
        assert len(data) <= 14 + wire.MAX_PAYLOAD
        dst, src, message = wire.parse_frame(data)
        assert (dst, src) == (wire.BROADCAST, SRC)
        assert message == Message(correlator, tuple(group))


@settings(max_examples=100, deadline=None)
@given(rules=st.lists(np_rules(), max_size=40), correlator=u32)
def test_fragmented_reply_round_trip(rules, correlator):
    replies = [Command(Cmd.TABLE_DUMP, wire.DumpHead(wire.Table.RULES, len(rules)))]
    replies += [Command(Cmd.ENTRY, wire.Entry(wire.RuleRecord(r, 3, 400))) for r in rules]
    messages = wire.reply_messages(correlator, replies)
    decoded = [wire.parse_frame(wire.frame(SRC, SRC, m))[2] for m in messages]
    assert [m.more for m in decoded] == [True] * (len(decoded) - 1) + [False]
    assert [m.fragment for m in decoded] == list(range(len(decoded)))
    assert [c for m in decoded for c in m.commands] == replies


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes_only_raise_decode_error(data):
    try:
        wire.decode_message(data)
    except wire.GuidedFrameDecodeError:
        pass


@settings(max_examples=200, deadline=None)
@given(commands=st.lists(request_commands(), min_size=1, max_size=3), pos=st.integers(0, 10_000),
       byte=st.integers(0, 255), cut=st.integers(0, 10_000))
def test_fuzz_mutated_frames_only_raise_decode_error(commands, pos, byte, cut):
    payload = bytearray(Message(7, tuple(wire.split_commands(commands)[0])).encode())
    payload[pos % len(payload)] = byte
    for candidate in (bytes(payload), bytes(payload[:cut % len(payload)])):
        try:
            message = wire.decode_message(candidate)
        except wire.GuidedFrameDecodeError:
            continue
        # Whatever decodes must encode again (minus padding) to the same meaning.
        assert wire.decode_message(message.encode()) == message


def _payload(*tlvs: bytes, count: int | None = None, flags: int = 0, version: int = 1) -> bytes:
    n = len(tlvs) if count is None else count
    return wire.HEADER.pack(version, flags, 9, 0, n) + b"".join(tlvs) + wire.TLV.pack(0, 0, 0)


def _tlv(ctype: int, value: bytes, status: int = 0) -> bytes:
    return wire.TLV.pack(ctype, status, len(value)) + value


@pytest.mark.parametrize("payload, reason", [
    (b"\x01\x00", "shorter than header"),
    (_payload(version=2), "unsupported version 2"),
    (_payload(flags=0x80), "unknown flags"),
    (_payload(flags=wire.FLAG_MORE), "MORE flag on a request"),
    (_payload(_tlv(1, b"x"), count=2), "header says 2 commands"),
    (_payload(_tlv(1, b"x"), count=0), "more commands than the header's count"),
    (_payload(_tlv(0x7F, b"")), "unknown command type 0x7f"),
    (_payload(_tlv(Cmd.ENTRY, b"")), "ENTRY is not allowed in a request"),
    (_payload(_tlv(1, b"x", status=1)), "a request carries status"),
    (_payload(_tlv(Cmd.FWD_ADD, b"\x0a\x00\x00\x01\x18\x01" + b"\x00" * 6)), "host bits set"),
    (_payload(_tlv(Cmd.FWD_ADD, b"\x00" * 5)), "FWD_ADD: expected 12 bytes"),
    (_payload(_tlv(Cmd.CODE_LOAD, b"Bad Name")), "bad code name"),
    (_payload(_tlv(Cmd.TABLE_DUMP, b"\x09")), "unknown table 9"),
    (_payload(_tlv(Cmd.MCAST_SET, struct.pack("!HH", 1, 2) + b"\x00" * 6)), "2 members need"),
    (wire.HEADER.pack(1, 0, 9, 0, 1) + wire.TLV.pack(1, 0, 0), "no END"),
    (_payload() + b"\x01", "non-zero bytes after END"),
    (wire.HEADER.pack(1, 0, 9, 0, 1) + wire.TLV.pack(1, 0, 50) + b"x", "runs past the frame end"),
])
def test_decode_errors_say_what_was_wrong(payload, reason):
    with pytest.raises(wire.GuidedFrameDecodeError, match=reason):
        wire.decode_message(payload)


def test_rule_body_rejects_bits_outside_mask_and_bad_ranges():
    good = wire.NpRule(1, proto=17, proto_mask=0xFF, dport=(10, 20))
    raw = bytearray(good.encode())
    raw[13] = 0x0F        # proto_mask 0x0F while proto is 17 (0x11): bit outside the mask
    with pytest.raises(wire.GuidedFrameDecodeError, match="proto value has bits outside"):
        wire.NpRule.decode(bytes(raw))
    bad_range = good.encode()[:-5] + struct.pack("!HHB", 30, 20, 0)
    with pytest.raises(wire.GuidedFrameDecodeError, match="dport range 30..20"):
        wire.NpRule.decode(bad_range)
    with pytest.raises(ValueError, match="MULTICAST rule needs a group"):
        wire.NpRule(1, action=wire.NpAction.MULTICAST)


def test_padding_after_end_is_accepted_and_minimum_frame_size_kept():
    data = wire.frame(wire.BROADCAST, SRC, Message(1, (wire.request(wire.Echo(b"")),)))
    assert len(data) == wire.MIN_FRAME
    assert wire.parse_frame(data)[2].commands[0].body == wire.Echo(b"")


def test_error_reply_carries_reason():
    msg = Message(5, (Command(Cmd.RULE_DELETE, wire.Reason("no rule 4"), Status.NOT_FOUND),), reply=True)
    decoded = wire.decode_message(msg.encode())
    assert decoded.commands[0].status is Status.NOT_FOUND
    assert decoded.commands[0].body.text == "no rule 4"


@given(st.lists(members, min_size=wire.MAX_GROUP_MEMBERS + 1, max_size=wire.MAX_GROUP_MEMBERS + 1))
@settings(max_examples=5)
def test_group_size_is_bounded(too_many):
    with pytest.raises(ValueError, match="at most"):
        wire.McastSet(1, tuple(too_many))
    wire.Message(1, (wire.request(wire.McastSet(1, tuple(too_many[:-1]))),)).encode()   # max fits a frame
