"""Vendor messages and pings against gtk-gnutella 1.2.3's captured messages (sans-IO, deterministic)."""

import random
import re
from collections import Counter

import pytest

from gnutella import vendor
from gnutella.handshake import Identity
from gnutella.node import Node, NodeConfig, Send
from gnutella.share import ShareIndex
from gnutella.wire import Message, Ping, VendorMessage, decode_message, HEADER

from conftest import FIXTURES

CAPTURE = FIXTURES / "gtk-gnutella-1.2.3-vendor-messages.txt"


def _captured() -> dict[str, Message]:
    """The first message of each kind in the capture, as gtk-gnutella sent it."""
    out = {}
    pattern = re.compile(r"^\+\s*[\d.]+s \S+ ttl=(\d+) hops=(\d+) guid=([0-9a-f]{32}) \[([^\]]+)\]")
    lines = CAPTURE.read_text().splitlines()
    for i, line in enumerate(lines):
        m = pattern.match(line)
        if m and m.group(4) not in out:
            payload = bytes.fromhex(lines[i + 1].split()[1])
            raw = HEADER.pack(bytes.fromhex(m.group(3)), 0x31, int(m.group(1)), int(m.group(2)), len(payload)) + payload
            out[m.group(4)] = decode_message(raw)
    return out


def _node(wall=lambda: 1_795_055_967.5) -> tuple[Node, Counter]:
    stats = Counter()
    node = Node(NodeConfig(), Identity(b"\x01" * 16, "10.0.0.1", 6346, True), ShareIndex(), random.Random(1), stats,
                wall_clock=wall)
    return node, stats


def test_capture_decodes_to_the_four_kinds():
    assert set(_captured()) == {"Messages Supported", "Features Supported", "Time Sync Request", "Time Sync Reply"}


def test_messages_supported_layout_is_gtk_gnutellas():
    msg = _captured()["Messages Supported"]
    assert (msg.guid, msg.ttl, msg.hops) == (bytes(16), 1, 0)
    listed = vendor.decode_supported(msg.payload)
    assert listed.kind == "messages" and len(listed.entries) == 27
    assert listed.entries[0] == (b"BEAR", 4, 1) and (b"GTKG", 9, 1) in listed.entries
    # our encoder, given gtk-gnutella's list, produces its bytes exactly
    assert vendor.messages_supported_message(listed.entries).encode() == msg.encode()
    features = vendor.decode_supported(_captured()["Features Supported"].payload)
    assert features.kind == "features" and (b"TLS!", 0, 1) in features.entries and len(features.entries) == 6


def test_ours_lists_exactly_what_we_answer():
    ours = vendor.messages_supported_message()
    assert (ours.guid, ours.ttl, ours.hops) == (bytes(16), 1, 0)
    assert vendor.decode_supported(ours.payload).entries == ((b"GTKG", 9, 1), (b"GTKG", 10, 1))


def test_time_sync_request_is_answered_as_gtk_gnutella_answers_it():
    request = _captured()["Time Sync Request"]
    node, stats = _node()
    node.peer_up(7, 0.0, "10.0.0.2", 6346, b"\x02" * 16, "0.6", True, False)
    (reply,) = node.receive(7, request, 1.0)
    assert isinstance(reply, Send) and reply.cid == 7
    msg = reply.message
    gtk_reply = _captured()["Time Sync Reply"]
    assert (msg.ttl, msg.hops, len(msg.encode())) == (gtk_reply.ttl, gtk_reply.hops, len(gtk_reply.encode()))
    assert msg.guid[:8] == request.guid[:8]                       # their send time comes back
    assert msg.guid[8:] == (1_795_055_967).to_bytes(4, "big") + (500_000).to_bytes(4, "big")
    vm = msg.payload
    assert (vm.vendor, vm.selector, vm.version) == (b"GTKG", 10, 1)
    assert vm.data == b"\0" + msg.guid[8:]                        # received at (same wall clock here)
    assert stats["vendor_time_sync_answered"] == 1


@pytest.mark.parametrize("kind", ["Messages Supported", "Features Supported", "Time Sync Reply"])
def test_other_vendor_messages_get_no_answer(kind):
    node, stats = _node()
    node.peer_up(7, 0.0, "10.0.0.2", 6346, b"\x02" * 16, "0.6", True, False)
    assert node.receive(7, _captured()[kind], 1.0) == []
    assert stats["vendor_supported_lists"] + stats["vendor_ignored"] == 1


def test_malformed_supported_list_is_counted():
    node, stats = _node()
    node.peer_up(7, 0.0, "10.0.0.2", 6346, b"\x02" * 16, "0.6", True, False)
    bad = Message(bytes(16), 1, 0, VendorMessage(b"\0\0\0\0", 0, 0, b"\x05\x00GTKG"))
    assert node.receive(7, bad, 1.0) == [] and stats["vendor_malformed"] == 1


def test_link_up_sends_supported_messages_then_one_ping_like_gtk_gnutella():
    node, stats = _node()
    out = node.peer_up(7, 0.0, "10.0.0.2", 6346, b"\x02" * 16, "0.6", True, False, remote_qrp=False)
    sends = [a.message for a in out if isinstance(a, Send)]
    supported, ping = sends[-2], sends[-1]
    assert isinstance(supported.payload, VendorMessage) and supported.guid == bytes(16)
    assert isinstance(ping.payload, Ping) and (ping.ttl, ping.hops) == (4, 0)     # gtk-gnutella's own first ping
    # no second ping before the refresh interval, then one (never a burst gtk-gnutella would throttle)
    assert not [a for a in node.tick(10.0) if isinstance(a, Send) and isinstance(a.message.payload, Ping)
                and a.message.ttl > 1]
    refresh = [a for a in node.tick(node.config.ping_interval) if isinstance(a.message.payload, Ping)]
    assert len(refresh) == 1 and refresh[0].message.ttl == 4


from hypothesis import given, settings, strategies as st  # noqa: E402

from gnutella.wire import GnutellaDecodeError  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([0, 10]), st.binary(max_size=64))
def test_fuzz_supported_lists_decode_or_say_what_is_wrong(selector, data):
    try:
        listed = vendor.decode_supported(VendorMessage(b"\0\0\0\0", selector, 0, data))
    except GnutellaDecodeError:
        return
    assert len(data) == 2 + len(listed.entries) * (6 if selector == 10 else 8)
