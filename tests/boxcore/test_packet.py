"""boxcore.packet: IPv4/UDP/TCP/Ethernet encoding and strict decoding,
checked against scapy as an independent implementation, and fuzzed."""

import struct

import pytest
from hypothesis import given, settings, strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from boxcore.packet import (
    PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_PSH, TCP_SYN, Packet, PacketDecodeError, PacketError,
    TcpInfo, build_ethernet, fix_checksums, ip_checksum, mac_from_str, mac_to_str,
    parse_ethernet, replace_payload,
)

addresses = st.integers(0, 2 ** 32 - 1).map(lambda n: ".".join(str(b) for b in n.to_bytes(4, "big")))
port = st.integers(0, 65535)


def test_ip_checksum_known_value():
    # RFC 1071 example words 0001 f203 f4f5 f6f7 sum to ddf2, checksum 220d
    assert ip_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert ip_checksum(b"") == 0xFFFF
    assert ip_checksum(b"\x01") == ip_checksum(b"\x01\x00")


@settings(max_examples=150, deadline=None)
@given(addresses, port, addresses, port, st.binary(max_size=300), st.integers(1, 255))
def test_udp_matches_scapy_and_round_trips(src, sport, dst, dport, payload, ttl):
    pkt = Packet(PROTO_UDP, src, sport, dst, dport, payload, ttl)
    raw = pkt.to_ip()
    ref = bytes(IP(src=src, dst=dst, ttl=ttl, id=0, flags=0) / UDP(sport=sport, dport=dport) / payload)
    assert raw == ref
    assert Packet.parse_ip(raw) == pkt


@settings(max_examples=100, deadline=None)
@given(addresses, port, addresses, port, st.binary(max_size=200),
       st.integers(0, 2 ** 32 - 1), st.integers(0, 2 ** 32 - 1), st.integers(0, 255))
def test_tcp_matches_scapy_and_round_trips(src, sport, dst, dport, payload, seq, ack, flags):
    pkt = Packet(PROTO_TCP, src, sport, dst, dport, payload)
    raw = pkt.to_ip(tcp=TcpInfo(flags=flags, seq=seq, ack=ack, window=1000))
    ref = bytes(IP(src=src, dst=dst, id=0, flags=0)
                / TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, window=1000, options=[])
                / payload)
    assert raw == ref
    back = Packet.parse_ip(raw)
    assert back == pkt
    assert back.tcp == TcpInfo(flags, seq, ack, 1000)


def test_tcp_options_and_other_protocols():
    pkt = Packet(PROTO_TCP, "10.0.0.1", 1, "10.0.0.2", 2, b"data")
    raw = pkt.to_ip(tcp=TcpInfo(flags=TCP_SYN, options=b"\x02\x04\x05\xb4"))
    parsed = IP(raw)
    assert parsed[TCP].options == [("MSS", 1460)]
    assert Packet.parse_ip(raw).tcp.options == b"\x02\x04\x05\xb4"
    icmp = bytes(ICMP(type=8, id=1, seq=1) / b"ping")
    raw = Packet(1, "10.0.0.1", 0, "10.0.0.2", 0, icmp).to_ip()
    assert bytes(IP(raw)[ICMP]) == icmp
    back = Packet.parse_ip(raw)
    assert (back.proto, back.sport, back.dport, back.payload) == (1, 0, 0, icmp)


def test_parse_scapy_packets_with_options():
    raw = bytes(IP(src="1.2.3.4", dst="5.6.7.8", options=b"\x01\x01\x01\x00") / UDP(sport=9, dport=10) / b"hi")
    pkt = Packet.parse_ip(raw)
    assert pkt.five_tuple == (17, "1.2.3.4", 9, "5.6.7.8", 10) and pkt.payload == b"hi"


def test_reply_swaps_endpoints():
    pkt = Packet(PROTO_UDP, "10.0.0.1", 1000, "10.0.0.2", 53, b"q", ttl=3)
    assert pkt.reply(b"a") == Packet(PROTO_UDP, "10.0.0.2", 53, "10.0.0.1", 1000, b"a", 64)


def _udp(payload=b"hello"):
    return Packet(PROTO_UDP, "10.0.0.1", 1000, "10.0.0.2", 2000, payload).to_ip()


@pytest.mark.parametrize("mangle, reason", [
    (lambda r: r[:10], "truncated"),
    (lambda r: b"\x65" + r[1:], "bad_version"),
    (lambda r: b"\x44" + r[1:], "bad_ihl"),
    (lambda r: b"\x4f" + r[1:], "truncated"),
    (lambda r: r + b"\x00", "length_mismatch"),
    (lambda r: r[:-1], "truncated"),
    (lambda r: r[:2] + struct.pack("!H", 16) + r[4:], "length_mismatch"),
    (lambda r: r[:8] + b"\x01" + r[9:], "bad_checksum"),
    (lambda r: r[:24] + struct.pack("!H", 200) + r[26:], "bad_transport"),
    (lambda r: r[:24] + struct.pack("!H", 7) + r[26:], "bad_transport"),
])
def test_strict_decoding(mangle, reason):
    with pytest.raises(PacketDecodeError) as info:
        Packet.parse_ip(mangle(_udp()))
    assert info.value.reason == reason
    assert reason in str(info.value)


def test_padding_allowed_on_request_and_checksum_optional():
    raw = _udp() + b"\x00" * 6
    assert Packet.parse_ip(raw, allow_padding=True).payload == b"hello"
    bad = bytearray(_udp())
    bad[10] ^= 0xFF
    assert Packet.parse_ip(bytes(bad), verify_checksum=False).payload == b"hello"


def test_fragments():
    whole = IP(src="10.0.0.1", dst="10.0.0.2", id=77) / UDP(sport=5, dport=6) / (b"x" * 100)
    first, second, _last = (bytes(f) for f in whole.fragment(fragsize=48))
    head = Packet.parse_ip(first)
    assert (head.sport, head.dport) == (5, 6)
    assert head.fragment.more and head.fragment.offset == 0 and head.fragment.ident == 77
    tail = Packet.parse_ip(second)
    assert (tail.sport, tail.dport) == (0, 0)          # non-first fragment: no ports
    assert tail.fragment.offset == 48 and tail.fragment.more
    with pytest.raises(PacketError, match="fragment"):
        tail.to_ip()
    assert fix_checksums(second) == second            # IPv4 checksum only


def test_fix_checksums_after_in_place_edit():
    raw = bytearray(_udp(b"hello"))
    raw[-5:] = b"HELLO"
    fixed = fix_checksums(raw)
    assert fixed == _udp(b"HELLO")
    tcp = bytearray(Packet(PROTO_TCP, "1.1.1.1", 1, "2.2.2.2", 2, b"abc").to_ip(tcp=TcpInfo(flags=TCP_PSH | TCP_ACK)))
    tcp[-1:] = b"z"
    ref = IP(bytes(tcp))
    del ref[IP].chksum, ref[TCP].chksum
    assert fix_checksums(tcp) == bytes(ref)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=100), st.binary(max_size=300))
def test_replace_payload_keeps_headers_and_fixes_lengths(old, new):
    raw = bytes(IP(src="9.9.9.9", dst="8.8.8.8", options=b"\x01\x01\x01\x00", id=5) / UDP(sport=1, dport=2) / old)
    out = replace_payload(raw, new)
    ref = IP(src="9.9.9.9", dst="8.8.8.8", options=b"\x01\x01\x01\x00", id=5) / UDP(sport=1, dport=2) / new
    assert out == bytes(ref)
    tcp = Packet(PROTO_TCP, "1.1.1.1", 1, "2.2.2.2", 2, old).to_ip(tcp=TcpInfo(seq=9, options=b"\x01\x01\x01\x01"))
    back = Packet.parse_ip(replace_payload(tcp, new))
    assert back.payload == new and back.tcp.seq == 9 and back.tcp.options == b"\x01\x01\x01\x01"


def test_encoding_errors():
    with pytest.raises(PacketError, match="source is not an IPv4 address"):
        Packet(PROTO_UDP, "10.0.0", 1, "10.0.0.1", 2, b"").to_ip()
    with pytest.raises(PacketError, match="destination port"):
        Packet(PROTO_UDP, "10.0.0.1", 1, "10.0.0.1", 70000, b"").to_ip()
    with pytest.raises(PacketError, match="exceeds the IPv4 maximum"):
        Packet(PROTO_UDP, "10.0.0.1", 1, "10.0.0.1", 2, b"x" * 65508).to_ip()
    Packet(PROTO_UDP, "10.0.0.1", 1, "10.0.0.1", 2, b"x" * 65507).to_ip()


def test_ethernet_round_trip_against_scapy():
    ip = _udp()
    frame = build_ethernet("02:00:00:00:00:01", bytes.fromhex("020000000002"), 0x0800, ip)
    assert frame == bytes(Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02", type=0x0800) / IP(ip))
    dst, src, ethertype, payload = parse_ethernet(frame)
    assert (mac_to_str(dst), mac_to_str(src), ethertype, payload) == ("02:00:00:00:00:01", "02:00:00:00:00:02", 0x0800, ip)
    assert mac_from_str("AA:bb:cc:dd:ee:ff") == bytes.fromhex("aabbccddeeff")
    with pytest.raises(PacketDecodeError, match="truncated"):
        parse_ethernet(frame[:13])
    with pytest.raises(PacketDecodeError, match="802.3"):
        parse_ethernet(frame[:12] + b"\x00\x40" + ip)
    with pytest.raises(PacketError, match="MAC"):
        build_ethernet("02:00:00:00:00", src, 0x0800, b"")
    with pytest.raises(PacketError, match="EtherType"):
        build_ethernet(dst, src, 0x40, b"")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80))
def test_fuzz_parse_only_raises_decode_errors(raw):
    for candidate in (raw, b"\x45" + raw, _udp()[:20] + raw):
        try:
            pkt = Packet.parse_ip(candidate, verify_checksum=False)
        except PacketDecodeError:
            continue
        assert 0 <= pkt.sport <= 65535 and 0 <= pkt.dport <= 65535


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 60), st.integers(0, 255))
def test_fuzz_single_byte_corruption(index, value):
    raw = bytearray(Packet(PROTO_TCP, "10.0.0.1", 1, "10.0.0.2", 2, b"payload!").to_ip())
    raw[index % len(raw)] = value
    try:
        Packet.parse_ip(bytes(raw))
    except PacketDecodeError as exc:
        assert exc.reason in {"truncated", "bad_version", "bad_ihl", "length_mismatch", "bad_checksum", "bad_transport"}
