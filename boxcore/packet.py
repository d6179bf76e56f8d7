"""Packets as the box sees them: a parsed 5-tuple plus payload, and the wire
formats (Ethernet, IPv4, UDP, TCP) declared once as ``cliruntime.wirefields.Layout`` field lists.

Every engine hands boosters the same :class:`Packet`, whether it came from a
socket (user engine), an NFQUEUE verdict queue (linux engine) or a frame on the
NP emulator's virtual interface (np engine).  Parsing is strict: anything
malformed raises :class:`PacketDecodeError` whose ``reason`` is a short code an
engine can count (``truncated``, ``bad_version``, ``bad_ihl``,
``length_mismatch``, ``bad_checksum``, ``bad_transport``).

Only IPv4 is parsed from the wire.  Ports of protocols without ports, and of
non-first fragments, are 0.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from cliruntime.wirefields import Layout

# ----------------------------------------------------------------- protocols

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17

PROTO_NAMES = {"icmp": PROTO_ICMP, "tcp": PROTO_TCP, "udp": PROTO_UDP}

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_VLAN = 0x8100

# ------------------------------------------------------------ wire layouts
# Declared once; every encoder and decoder below goes through these.

#: Ethernet II.
ETHERNET = Layout("!", (("dst", "6s"), ("src", "6s"), ("ethertype", "H")))
#: IPv4 without options.
IPV4 = Layout("!", (("version_ihl", "B"), ("tos", "B"), ("total_length", "H"), ("ident", "H"),
                    ("flags_fragment", "H"), ("ttl", "B"), ("proto", "B"), ("checksum", "H"),
                    ("src", "4s"), ("dst", "4s")))
#: The pseudo-header that UDP and TCP checksums cover.
PSEUDO = Layout("!", (("src", "4s"), ("dst", "4s"), ("zero", "B"), ("proto", "B"), ("length", "H")))
UDP = Layout("!", (("sport", "H"), ("dport", "H"), ("length", "H"), ("checksum", "H")))
#: TCP without options; the data offset is the high nibble of its byte.
TCP = Layout("!", (("sport", "H"), ("dport", "H"), ("seq", "I"), ("ack", "I"), ("data_offset", "B"),
                   ("flags", "B"), ("window", "H"), ("checksum", "H"), ("urgent", "H")))
#: One 16-bit field rewritten in place (lengths and checksums, at the offsets below).
U16 = Layout("!", (("value", "H"),))

IPV4_FLAG_DF = 0x4000
IPV4_FLAG_MF = 0x2000
IPV4_OFFSET_MASK = 0x1FFF
IPV4_MAX_TOTAL = 0xFFFF

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20

_IP_TOTAL_AT = IPV4.offset("total_length")
_IP_FRAGMENT_AT = IPV4.offset("flags_fragment")
_IP_PROTO_AT = IPV4.offset("proto")
_IP_CSUM_AT = IPV4.offset("checksum")
_UDP_LENGTH_AT = UDP.offset("length")
_UDP_CSUM_AT = UDP.offset("checksum")
_TCP_OFFSET_AT = TCP.offset("data_offset")
_TCP_CSUM_AT = TCP.offset("checksum")


class PacketDecodeError(ValueError):
    """A malformed packet or frame; ``reason`` is a short code for counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class PacketError(ValueError):
    """A :class:`Packet` that cannot be encoded (bad address, payload too big...)."""


# ------------------------------------------------------------- checksums

def ip_checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of ``data``, as an int.

    Sums 16-bit big-endian words in one's complement: since 2**16 == 1
    (mod 0xffff), the word sum is congruent to the whole buffer read as one
    big-endian integer, which Python reduces in C.
    """
    data = bytes(data)
    if len(data) % 2:
        data += b"\x00"
    whole = int.from_bytes(data, "big")
    folded = whole % 0xFFFF
    if folded == 0 and whole != 0:
        folded = 0xFFFF  # one's complement "negative zero"
    return 0xFFFF - folded


def _transport_checksum(src: bytes, dst: bytes, proto: int, segment: bytes) -> int:
    csum = ip_checksum(PSEUDO.pack(src, dst, 0, proto, len(segment)) + segment)
    if proto == PROTO_UDP and csum == 0:
        return 0xFFFF  # 0 means "no checksum" in UDP
    return csum


# ------------------------------------------------------------- addresses

def _addr_bytes(addr: str, what: str) -> bytes:
    try:
        return socket.inet_pton(socket.AF_INET, addr)
    except (OSError, TypeError):
        raise PacketError(f"{what} is not an IPv4 address: {addr!r}") from None


def mac_to_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def mac_from_str(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise PacketError(f"not a MAC address: {text!r}")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise PacketError(f"not a MAC address: {text!r}") from None


def _mac(value: bytes | str, what: str) -> bytes:
    if isinstance(value, str):
        return mac_from_str(value)
    if isinstance(value, (bytes, bytearray)) and len(value) == 6:
        return bytes(value)
    raise PacketError(f"{what} MAC must be 6 bytes or 'aa:bb:cc:dd:ee:ff', got {value!r}")


# ------------------------------------------------------------- packets

@dataclass(frozen=True, slots=True)
class TcpInfo:
    """The TCP header fields a :class:`Packet` does not otherwise carry."""

    flags: int = TCP_ACK
    seq: int = 0
    ack: int = 0
    window: int = 65535
    options: bytes = b""


@dataclass(frozen=True, slots=True)
class Fragment:
    """IPv4 fragmentation state of a parsed packet (absent when unfragmented)."""

    ident: int
    offset: int          # in bytes
    more: bool


@dataclass(slots=True)
class Packet:
    """An IPv4 packet: the 5-tuple, the transport payload and the TTL.

    ``tcp`` and ``fragment`` are filled by :meth:`parse_ip` and do not take
    part in equality: two packets are equal when they carry the same 5-tuple,
    payload and TTL.
    """

    proto: int
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes
    ttl: int = 64
    tcp: TcpInfo | None = field(default=None, compare=False, repr=False)
    fragment: Fragment | None = field(default=None, compare=False, repr=False)

    # ---------------------------------------------------------- decode
    @classmethod
    def parse_ip(cls, raw: bytes | bytearray | memoryview, *, allow_padding: bool = False,
                 verify_checksum: bool = True) -> "Packet":
        """Parse an IPv4 datagram.

        ``allow_padding`` accepts bytes after the IPv4 total length (Ethernet
        minimum-size padding) and ignores them.  ``verify_checksum`` checks the
        IPv4 header checksum; UDP/TCP checksums are not verified because
        locally generated packets seen before the NIC often carry partial
        (offloaded) ones.
        """
        raw = bytes(raw)
        if len(raw) < IPV4.size:
            raise PacketDecodeError("truncated", f"{len(raw)} bytes, an IPv4 header needs {IPV4.size}")
        (ver_ihl, _tos, total, ident, flags_frag, ttl, proto, _csum,
         src_b, dst_b) = IPV4.unpack_from(raw)
        version, ihl = ver_ihl >> 4, ver_ihl & 0x0F
        if version != 4:
            raise PacketDecodeError("bad_version", f"IP version {version}, expected 4")
        header_len = ihl * 4
        if ihl < 5:
            raise PacketDecodeError("bad_ihl", f"IHL {ihl} is below the minimum of 5")
        if header_len > len(raw):
            raise PacketDecodeError("truncated", f"IHL says {header_len} header bytes, only {len(raw)} present")
        if total < header_len:
            raise PacketDecodeError("length_mismatch", f"total length {total} is shorter than the {header_len}-byte header")
        if total > len(raw):
            raise PacketDecodeError("truncated", f"total length {total}, only {len(raw)} bytes present")
        if total < len(raw) and not allow_padding:
            raise PacketDecodeError("length_mismatch", f"total length {total}, but {len(raw)} bytes present")
        if verify_checksum and ip_checksum(raw[:header_len]) != 0:
            raise PacketDecodeError("bad_checksum", "IPv4 header checksum does not verify")
        src = socket.inet_ntoa(src_b)
        dst = socket.inet_ntoa(dst_b)
        body = raw[header_len:total]

        frag_offset = (flags_frag & IPV4_OFFSET_MASK) * 8
        more = bool(flags_frag & IPV4_FLAG_MF)
        fragment = Fragment(ident, frag_offset, more) if (more or frag_offset) else None
        if frag_offset:
            # A non-first fragment carries no transport header, hence no ports.
            return cls(proto, src, 0, dst, 0, body, ttl, None, fragment)

        if proto == PROTO_UDP:
            if len(body) < UDP.size:
                raise PacketDecodeError("truncated", f"UDP header needs {UDP.size} bytes, {len(body)} present")
            sport, dport, length, _ = UDP.unpack_from(body)
            if fragment is None:
                if length < UDP.size or length > len(body):
                    raise PacketDecodeError("bad_transport", f"UDP length {length} with {len(body)} bytes after the IP header")
                payload = body[UDP.size:length]
            else:
                payload = body[UDP.size:]  # the rest is in later fragments
            return cls(proto, src, sport, dst, dport, payload, ttl, None, fragment)

        if proto == PROTO_TCP:
            if len(body) < TCP.size:
                raise PacketDecodeError("truncated", f"TCP header needs {TCP.size} bytes, {len(body)} present")
            sport, dport, seq, ack, off_byte, flags, window, _, _ = TCP.unpack_from(body)
            data_offset = (off_byte >> 4) * 4
            if data_offset < TCP.size:
                raise PacketDecodeError("bad_transport", f"TCP data offset {data_offset} is below {TCP.size}")
            if data_offset > len(body):
                raise PacketDecodeError("truncated", f"TCP data offset {data_offset}, {len(body)} bytes present")
            tcp = TcpInfo(flags, seq, ack, window, body[TCP.size:data_offset])
            return cls(proto, src, sport, dst, dport, body[data_offset:], ttl, tcp, fragment)

        return cls(proto, src, 0, dst, 0, body, ttl, None, fragment)

    # ---------------------------------------------------------- encode
    def to_ip(self, *, ident: int = 0, tcp: TcpInfo | None = None, tos: int = 0) -> bytes:
        """Build the IPv4 datagram (UDP, TCP, or raw payload for other
        protocols) with correct header and transport checksums.

        TCP header fields come from ``tcp``, else ``self.tcp``, else a plain ACK.
        """
        if self.fragment is not None:
            raise PacketError("cannot rebuild a fragment; forward its raw bytes instead")
        if not 0 <= self.proto <= 255:
            raise PacketError(f"protocol {self.proto} is not in 0..255")
        if not 0 <= self.ttl <= 255:
            raise PacketError(f"TTL {self.ttl} is not in 0..255")
        src_b = _addr_bytes(self.src, "source")
        dst_b = _addr_bytes(self.dst, "destination")
        payload = bytes(self.payload)
        if self.proto in (PROTO_UDP, PROTO_TCP):
            for name, port in (("source", self.sport), ("destination", self.dport)):
                if not 0 <= port <= 0xFFFF:
                    raise PacketError(f"{name} port {port} is not in 0..65535")
        if self.proto == PROTO_UDP:
            length = UDP.size + len(payload)
            segment = bytearray(UDP.pack(self.sport, self.dport, length & 0xFFFF, 0) + payload)
            csum_at = _UDP_CSUM_AT
        elif self.proto == PROTO_TCP:
            info = tcp or self.tcp or TcpInfo()
            options = info.options + b"\x00" * (-len(info.options) % 4)
            header_len = TCP.size + len(options)
            if header_len > 60:
                raise PacketError(f"TCP options make a {header_len}-byte header, the maximum is 60")
            segment = bytearray(
                TCP.pack(self.sport, self.dport, info.seq & 0xFFFFFFFF, info.ack & 0xFFFFFFFF,
                         (header_len // 4) << 4, info.flags & 0xFF, info.window & 0xFFFF, 0, 0)
                + options + payload)
            csum_at = _TCP_CSUM_AT
        else:
            segment = bytearray(payload)
            csum_at = None
        total = IPV4.size + len(segment)
        if total > IPV4_MAX_TOTAL:
            raise PacketError(f"packet of {total} bytes exceeds the IPv4 maximum of {IPV4_MAX_TOTAL}")
        if csum_at is not None:
            U16.pack_into(segment, csum_at,
                             _transport_checksum(src_b, dst_b, self.proto, bytes(segment)))
        header = bytearray(IPV4.pack(0x45, tos & 0xFF, total, ident & 0xFFFF, 0, self.ttl,
                                     self.proto, 0, src_b, dst_b))
        U16.pack_into(header, _IP_CSUM_AT, ip_checksum(header))
        return bytes(header + segment)

    def reply(self, payload: bytes) -> "Packet":
        """A packet back to this packet's sender (addresses and ports swapped)."""
        return Packet(self.proto, self.dst, self.dport, self.src, self.sport, bytes(payload))

    @property
    def five_tuple(self) -> tuple[int, str, int, str, int]:
        return (self.proto, self.src, self.sport, self.dst, self.dport)


# -------------------------------------------------- raw datagram rewriting

def _ip_layout(raw: bytes) -> tuple[int, int, bool]:
    """(header length, total length, is a fragment) of a raw IPv4 datagram."""
    if len(raw) < IPV4.size:
        raise PacketDecodeError("truncated", f"{len(raw)} bytes, an IPv4 header needs {IPV4.size}")
    if raw[0] >> 4 != 4:
        raise PacketDecodeError("bad_version", f"IP version {raw[0] >> 4}, expected 4")
    header_len = (raw[0] & 0x0F) * 4
    if header_len < IPV4.size or header_len > len(raw):
        raise PacketDecodeError("bad_ihl", f"IHL gives {header_len} header bytes for a {len(raw)}-byte packet")
    (total,) = U16.unpack_from(raw, _IP_TOTAL_AT)
    (flags_frag,) = U16.unpack_from(raw, _IP_FRAGMENT_AT)
    if total != len(raw):
        raise PacketDecodeError("length_mismatch", f"total length {total}, but {len(raw)} bytes present")
    return header_len, total, bool(flags_frag & (IPV4_FLAG_MF | IPV4_OFFSET_MASK))


def fix_checksums(raw: bytes | bytearray) -> bytes:
    """Recompute the IPv4 header checksum and the UDP/TCP checksum of ``raw``
    (after its payload was edited in place).  Fragments get only the IPv4
    checksum: their transport checksum covers bytes this fragment lacks."""
    buf = bytearray(raw)
    header_len, _total, fragmented = _ip_layout(bytes(buf))
    proto = buf[_IP_PROTO_AT]
    if not fragmented and proto in (PROTO_UDP, PROTO_TCP):
        at = _UDP_CSUM_AT if proto == PROTO_UDP else _TCP_CSUM_AT
        need = UDP.size if proto == PROTO_UDP else TCP.size
        if len(buf) - header_len < need:
            raise PacketDecodeError("truncated", f"transport header needs {need} bytes")
        buf[header_len + at:header_len + at + 2] = b"\x00\x00"
        csum = _transport_checksum(bytes(buf[12:16]), bytes(buf[16:20]), proto, bytes(buf[header_len:]))
        U16.pack_into(buf, header_len + at, csum)
    buf[_IP_CSUM_AT:_IP_CSUM_AT + 2] = b"\x00\x00"
    U16.pack_into(buf, _IP_CSUM_AT, ip_checksum(buf[:header_len]))
    return bytes(buf)


def replace_payload(raw: bytes | bytearray, payload: bytes) -> bytes:
    """``raw`` with its transport payload replaced by ``payload``: the IPv4
    header (with options) and the UDP/TCP header are kept, lengths and
    checksums recomputed.  Used for "pass modified" verdicts."""
    raw = bytes(raw)
    header_len, _total, fragmented = _ip_layout(raw)
    if fragmented:
        raise PacketError("cannot replace the payload of a fragment")
    proto = raw[_IP_PROTO_AT]
    if proto == PROTO_UDP:
        transport = bytearray(raw[header_len:header_len + UDP.size])
        if len(transport) < UDP.size:
            raise PacketDecodeError("truncated", "UDP header incomplete")
        U16.pack_into(transport, _UDP_LENGTH_AT, UDP.size + len(payload))
    elif proto == PROTO_TCP:
        if len(raw) - header_len < TCP.size:
            raise PacketDecodeError("truncated", "TCP header incomplete")
        data_offset = (raw[header_len + _TCP_OFFSET_AT] >> 4) * 4
        if data_offset < TCP.size or header_len + data_offset > len(raw):
            raise PacketDecodeError("bad_transport", f"TCP data offset {data_offset}")
        transport = bytearray(raw[header_len:header_len + data_offset])
    else:
        transport = bytearray()
    total = header_len + len(transport) + len(payload)
    if total > IPV4_MAX_TOTAL:
        raise PacketError(f"packet of {total} bytes exceeds the IPv4 maximum of {IPV4_MAX_TOTAL}")
    header = bytearray(raw[:header_len])
    U16.pack_into(header, _IP_TOTAL_AT, total)
    return fix_checksums(bytes(header + transport + payload))


# ------------------------------------------------------------- Ethernet

def parse_ethernet(frame: bytes | bytearray | memoryview) -> tuple[bytes, bytes, int, bytes]:
    """Split an Ethernet II frame into (dst MAC, src MAC, EtherType, payload).

    An 802.1Q tag is not interpreted: its EtherType (0x8100) is returned with
    the tag left at the front of the payload.  802.3 length fields (< 0x0600)
    are refused.
    """
    frame = bytes(frame)
    if len(frame) < ETHERNET.size:
        raise PacketDecodeError("truncated", f"{len(frame)} bytes, an Ethernet header needs {ETHERNET.size}")
    dst, src, ethertype = ETHERNET.unpack_from(frame)
    if ethertype < 0x0600:
        raise PacketDecodeError("bad_ethertype", f"0x{ethertype:04x} is an 802.3 length, not an EtherType")
    return dst, src, ethertype, frame[ETHERNET.size:]


def build_ethernet(dst_mac: bytes | str, src_mac: bytes | str, ethertype: int, payload: bytes) -> bytes:
    """An Ethernet II frame (no FCS, no padding: veth and taps do not need it)."""
    if not 0x0600 <= ethertype <= 0xFFFF:
        raise PacketError(f"EtherType 0x{ethertype:x} is not in 0x0600..0xffff")
    return ETHERNET.pack(_mac(dst_mac, "destination"), _mac(src_mac, "source"), ethertype) + bytes(payload)
