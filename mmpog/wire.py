"""The mmpog data-path encapsulation (paper Fig. 11, plus location and sender), declared once.

Every datagram between a game client and a reflector starts with this 28-byte
header, big-endian::

     0       1       2       3
    +-------+-------+-------+-------+
    |version| kind  | flags |   0   |
    +-------+-------+-------+-------+
    |    rto_ms     |  payload_len  |
    +-------+-------+-------+-------+
    |           location            |
    +-------------------------------+
    |            sender             |   player id of the originator (0 for reflector-made packets)
    +-------------------------------+
    |           packet_id           |   32-bit id chosen by the sender (0 for heartbeats)
    +-------------------------------+
    |              seq              |   reflector-assigned sequence number (0 = none)
    +-------------------------------+
    |            lowest             |   lowest seq the reflector can still retransmit
    +-------------------------------+
    |  payload (payload_len bytes)  |
    +-------------------------------+

``kind`` says what the datagram is; the payload of each kind is declared below
(``NACK_RANGE`` for NACK, the token for HELLO).  Validation is strict: the
version, kind, known flags, zero pad, exact payload length and the per-kind
rules are all checked, and a violation raises :class:`WireDecodeError` saying
what was wrong.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from cliruntime.wirefields import Layout

VERSION = 1

HEADER = Layout("!", (("version", "B"), ("kind", "B"), ("flags", "B"), ("reserved", "x"), ("rto_ms", "H"),
                     ("payload_len", "H"), ("location", "I"), ("sender", "I"), ("packet_id", "I"),
                     ("seq", "I"), ("lowest", "I")))
HEADER_SIZE = HEADER.size  # 28

# A NACK payload is a list of ranges of missing sequence numbers.
NACK_RANGE = Layout("!", (("first", "I"), ("count", "H")))  # count 1..65535
MAX_NACK_RANGES = 64

# A LOSS payload: the member's running count (mod 2**32) of seqs whose first arrival was a COPY.  A
# running count, not a delta: a lost report costs nothing, the next one carries it.
LOSS_REPORT = Layout("!", (("copies_first", "I"),))

MAX_PAYLOAD = 1400  # keeps every datagram under a 1500-byte MTU with IP/UDP headers
MAX_TOKEN = 64
MIN_TOKEN = 8
MAX_U32 = 0xFFFFFFFF
MAX_RTO_MS = 0xFFFF


class Kind(enum.IntEnum):
    DATA = 1        # game data: client -> reflector, and reflector -> members (fan-out/retransmission)
    HEARTBEAT = 2   # reflector -> members on an idle location: seq = last, lowest = lowest; no id, no data
    NACK = 3        # client -> reflector: payload = ranges of missing seqs
    HELLO = 4       # client -> reflector: payload = the token the game server issued; binds the address
    WELCOME = 5     # reflector -> client: answer to HELLO; packet_id echoed, seq = last, lowest = lowest
    BYE = 6         # client -> reflector: leaving the location (unbinds the address)
    BUNDLE = 7      # either way: payload = several whole datagrams of one location, each after a u16 length
    LOSS = 8        # client -> reflector: payload = LOSS_REPORT (how many reliable updates reached it only as
                    # a reflector's COPY, i.e. whose original was lost on its downlink); never answered


class Flag(enum.IntFlag):
    RELIABLE = 0x01      # the sender asked for reliable delivery: the reflector sequences and buffers it
    RETRANSMIT = 0x02    # a copy: resent by the sender after a timeout, or from the reflector's buffer
    COPY = 0x04          # a redundant copy the reflector sent a member beside the original (reliable, sequenced,
                         # never with RETRANSMIT): a member that gets a seq first as a COPY knows its original was lost


KNOWN_FLAGS = int(Flag.RELIABLE | Flag.RETRANSMIT | Flag.COPY)
_PLAIN_FLAGS = int(Flag.RELIABLE | Flag.RETRANSMIT)     # what the DATA hot path accepts without further rules
# plain ints for the hot paths (IntFlag/IntEnum arithmetic costs microseconds per packet)
RELIABLE = int(Flag.RELIABLE)
RETRANSMIT = int(Flag.RETRANSMIT)
COPY = int(Flag.COPY)
_KIND_OF = {int(k): k for k in Kind}


class WireDecodeError(ValueError):
    """A datagram that is not a valid mmpog packet; the message says what was wrong."""


class Header(NamedTuple):
    """The decoded header (an immutable tuple: cheap to build on the receive path)."""

    kind: Kind
    flags: int = 0
    rto_ms: int = 0
    location: int = 0
    sender: int = 0
    packet_id: int = 0
    seq: int = 0
    lowest: int = 0

    @property
    def reliable(self) -> bool:
        return bool(self.flags & RELIABLE)

    @property
    def retransmit(self) -> bool:
        return bool(self.flags & RETRANSMIT)


def encode(header: Header, payload: bytes = b"") -> bytes:
    """Header + payload as bytes; raises ValueError for values that do not fit the layout."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    if header.flags & ~KNOWN_FLAGS:
        raise ValueError(f"unknown flags 0x{header.flags:02x}")
    try:
        head = HEADER.pack(
            VERSION, int(header.kind), header.flags, min(header.rto_ms, MAX_RTO_MS), len(payload),
            header.location, header.sender, header.packet_id, header.seq, header.lowest,
        )
    except struct.error as exc:
        raise ValueError(f"header field out of range: {exc}") from None
    return head + payload


RESERVED_OFFSET = HEADER.offset("flags") + 1     # the pad byte ("x": the layout gives it no name)
_BUNDLE_CODE = int(Kind.BUNDLE)
_new_header = tuple.__new__     # Header(...) through its Python-level __new__ costs twice as much per packet
_DATA, _HEARTBEAT, _NACK, _HELLO, _WELCOME, _BYE, _BUNDLE, _LOSS = (
    Kind.DATA, Kind.HEARTBEAT, Kind.NACK, Kind.HELLO, Kind.WELCOME, Kind.BYE, Kind.BUNDLE, Kind.LOSS)


def _validated(version: int, kind_code: int, flags: int, reserved: int, rto_ms: int, length: int, available: int,
               location: int, sender: int, packet_id: int, seq: int, lowest: int) -> Header:
    """The one set of header rules, for a datagram and for each item of a BUNDLE: the fields as
    unpacked, the reserved byte and the bytes that follow the header -> the Header, or WireDecodeError."""
    kind = _KIND_OF.get(kind_code)
    if kind is _DATA and version == VERSION and not reserved and length == available <= MAX_PAYLOAD:
        # the hot path (every game update): only the DATA rules are left to check
        if not flags & ~_PLAIN_FLAGS and not (seq and lowest > seq + 1) and not (seq == 0 and flags & RELIABLE and lowest):
            return _new_header(Header, (kind, flags, rto_ms, location, sender, packet_id, seq, lowest))
    if reserved != 0:
        raise WireDecodeError(f"reserved byte is {reserved}, must be 0")
    if version != VERSION:
        raise WireDecodeError(f"unsupported version {version} (expected {VERSION})")
    if kind is None:
        raise WireDecodeError(f"unknown kind {kind_code}")
    if flags & ~KNOWN_FLAGS:
        raise WireDecodeError(f"unknown flags 0x{flags:02x}")
    if length != available:
        raise WireDecodeError(f"payload_len says {length} bytes but {available} follow the header")
    if length > MAX_PAYLOAD:
        raise WireDecodeError(f"payload of {length} bytes exceeds {MAX_PAYLOAD}")
    if seq and lowest > seq + 1:
        raise WireDecodeError(f"lowest {lowest} is above seq {seq} + 1")
    if kind is _DATA:
        if seq == 0 and flags & RELIABLE and lowest:
            # a reflector-forwarded reliable packet always has a seq; a client's one has neither
            raise WireDecodeError("reliable DATA with lowest set but no seq")
        if flags & COPY and (not flags & RELIABLE or flags & RETRANSMIT or not seq):
            raise WireDecodeError("a COPY is a reliable, sequenced DATA and never a RETRANSMIT")
    elif kind is _BUNDLE:          # second: what the reflector sends a busy location
        if length < BUNDLE_ITEM.size + HEADER_SIZE or flags or rto_ms or sender or packet_id or seq or lowest:
            raise WireDecodeError("BUNDLE carries only a location and at least one datagram")
    elif kind is _HEARTBEAT:
        if length or packet_id or sender or flags:
            raise WireDecodeError("HEARTBEAT carries no payload, packet id, sender or flags")
    elif kind is _NACK:
        if length == 0 or length % NACK_RANGE.size:
            raise WireDecodeError(f"NACK payload of {length} bytes is not a non-empty list of {NACK_RANGE.size}-byte ranges")
        if length // NACK_RANGE.size > MAX_NACK_RANGES:
            raise WireDecodeError(f"NACK with {length // NACK_RANGE.size} ranges exceeds {MAX_NACK_RANGES}")
        if flags:
            raise WireDecodeError("NACK carries no flags")
    elif kind is _HELLO:
        if not MIN_TOKEN <= length <= MAX_TOKEN:
            raise WireDecodeError(f"HELLO token of {length} bytes (expected {MIN_TOKEN}..{MAX_TOKEN})")
        if flags or seq or lowest:
            raise WireDecodeError("HELLO carries no flags, seq or lowest")
    elif kind is _WELCOME:
        if length or flags:
            raise WireDecodeError("WELCOME carries no payload or flags")
    elif kind is _LOSS:
        if length != LOSS_REPORT.size or flags or seq or lowest or packet_id:
            raise WireDecodeError(f"LOSS carries a {LOSS_REPORT.size}-byte count and no flags, packet id, seq or lowest")
    elif kind is _BYE:
        if length or flags or seq or lowest:
            raise WireDecodeError("BYE carries no payload, flags, seq or lowest")
    return _new_header(Header, (kind, flags, rto_ms, location, sender, packet_id, seq, lowest))


def decode(data: bytes) -> tuple[Header, bytes]:
    """Parse and validate one datagram; returns the header and the payload."""
    size = len(data)
    if size < HEADER_SIZE:
        raise WireDecodeError(f"datagram of {size} bytes is shorter than the {HEADER_SIZE}-byte header")
    version, kind, flags, rto_ms, length, location, sender, packet_id, seq, lowest = _unpack_header(data)
    header = _validated(version, kind, flags, data[RESERVED_OFFSET], rto_ms, length, size - HEADER_SIZE,
                        location, sender, packet_id, seq, lowest)
    return header, bytes(data[HEADER_SIZE:])


_unpack_header = HEADER.unpack_from


# ------------------------------------------------------------------ packing (BUNDLE)
# Several datagrams of one location in one: the reflector packs what one pass of its loop fans out to
# a location, a client what it queued in one go, up to the path MTU (MAX_DATAGRAM).  Each item is a
# whole datagram as it would have been sent alone, so unpacking is just "handle each in turn".

BUNDLE_ITEM = Layout("!", (("length", "H"),))
MAX_DATAGRAM = HEADER_SIZE + MAX_PAYLOAD        # 1428: with IP/UDP headers under a 1500-byte MTU
_LOCATION = Layout("!", (("location", "I"),))
LOCATION_OFFSET = HEADER.offset("location")


def pack(datagrams: list[bytes], max_size: int = MAX_DATAGRAM) -> list[bytes]:
    """Datagrams of one location -> as few datagrams as fit in ``max_size`` bytes each (a lone one as is).

    The caller passes validated datagrams of the same location (the location is read from the first).
    """
    if len(datagrams) < 2:
        return list(datagrams)
    out: list[bytes] = []
    items: list[bytes] = []
    size = HEADER_SIZE
    location = _LOCATION.unpack_from(datagrams[0], LOCATION_OFFSET)[0]

    def close() -> None:
        if len(items) == 1:
            out.append(items[0])
        elif items:
            payload = b"".join(BUNDLE_ITEM.pack(len(item)) + item for item in items)
            out.append(encode(Header(Kind.BUNDLE, location=location), payload))

    for data in datagrams:
        need = BUNDLE_ITEM.size + len(data)
        if items and size + need > max_size:
            close()
            items, size = [], HEADER_SIZE
        items.append(data)
        size += need
    close()
    return out


def unpack(header: Header, payload: bytes) -> list[bytes]:
    """A decoded BUNDLE -> its datagrams (each still to be decoded; nested bundles and other locations refused)."""
    items = []
    offset, end = 0, len(payload)
    while offset < end:
        if end - offset < BUNDLE_ITEM.size:
            raise WireDecodeError(f"BUNDLE has {end - offset} stray bytes at offset {offset}")
        (length,) = BUNDLE_ITEM.unpack_from(payload, offset)
        offset += BUNDLE_ITEM.size
        if length < HEADER_SIZE or offset + length > end:
            raise WireDecodeError(f"BUNDLE item of {length} bytes at offset {offset} does not fit")
        item = payload[offset:offset + length]
        offset += length
        if item[1] == Kind.BUNDLE:
            raise WireDecodeError("a BUNDLE inside a BUNDLE")
        if _LOCATION.unpack_from(item, LOCATION_OFFSET)[0] != header.location:
            raise WireDecodeError("a BUNDLE item of another location")
        items.append(item)
    return items


# An item's length prefix and its header, read by one precompiled struct: a bundle's items are
# framed, checked and decoded in one pass, without slicing each item out first.
BUNDLE_ITEM_HEADER = BUNDLE_ITEM + HEADER
_ITEM_OVERHEAD = BUNDLE_ITEM_HEADER.size                 # 30
_unpack_item = BUNDLE_ITEM_HEADER.unpack_from


def decode_bundle(header: Header, payload: bytes) -> tuple[list[tuple[Header, bytes]], int]:
    """A decoded BUNDLE -> ``([(header, payload), ...], malformed)``: its items decoded and validated
    in one pass, in order.

    The framing is the bundle's: a stray byte, an item that does not fit, a nested BUNDLE or an item
    of another location raises :class:`WireDecodeError` for the whole bundle (as :func:`unpack`).
    An item that is framed right but breaks the header rules is left out and counted in
    ``malformed``: one bad item loses nothing else of the bundle.
    """
    items = []
    malformed = 0
    offset, end = 0, len(payload)
    location = header.location
    while offset < end:
        left = end - offset
        if left < BUNDLE_ITEM.size:
            raise WireDecodeError(f"BUNDLE has {left} stray bytes at offset {offset}")
        if left < _ITEM_OVERHEAD:
            (length,) = BUNDLE_ITEM.unpack_from(payload, offset)
            raise WireDecodeError(f"BUNDLE item of {length} bytes at offset {offset + BUNDLE_ITEM.size} does not fit")
        (length, version, kind, flags, rto_ms, payload_len, item_location, sender, packet_id, seq,
         lowest) = _unpack_item(payload, offset)
        start = offset + BUNDLE_ITEM.size
        offset = start + length
        if length < HEADER_SIZE or offset > end:
            raise WireDecodeError(f"BUNDLE item of {length} bytes at offset {start} does not fit")
        if kind == _BUNDLE_CODE:
            raise WireDecodeError("a BUNDLE inside a BUNDLE")
        if item_location != location:
            raise WireDecodeError("a BUNDLE item of another location")
        try:
            item_header = _validated(version, kind, flags, payload[start + RESERVED_OFFSET], rto_ms, payload_len,
                                     length - HEADER_SIZE, item_location, sender, packet_id, seq, lowest)
        except WireDecodeError:
            malformed += 1
            continue
        items.append((item_header, payload[start + HEADER_SIZE:offset]))
    return items, malformed


def encode_nack_ranges(ranges: list[tuple[int, int]]) -> bytes:
    """``[(first, count), ...]`` -> NACK payload."""
    if not ranges or len(ranges) > MAX_NACK_RANGES:
        raise ValueError(f"a NACK carries 1..{MAX_NACK_RANGES} ranges, got {len(ranges)}")
    return b"".join(NACK_RANGE.pack(first, count) for first, count in ranges)


def decode_nack_ranges(payload: bytes) -> list[tuple[int, int]]:
    """NACK payload -> ``[(first, count), ...]`` (validated: count >= 1, no 32-bit overflow)."""
    ranges = []
    for first, count in NACK_RANGE.iter_unpack(payload):
        if count == 0 or first == 0:
            raise WireDecodeError(f"NACK range ({first}, {count}) is empty or starts at seq 0")
        if first + count - 1 > MAX_U32:
            raise WireDecodeError(f"NACK range ({first}, {count}) runs past 2**32")
        ranges.append((first, count))
    return ranges


def seqs_to_ranges(seqs: list[int], max_ranges: int = MAX_NACK_RANGES) -> list[tuple[int, int]]:
    """Sorted distinct seqs -> at most ``max_ranges`` (first, count) runs (later runs dropped)."""
    ranges: list[tuple[int, int]] = []
    for seq in seqs:
        if ranges and ranges[-1][0] + ranges[-1][1] == seq and ranges[-1][1] < 0xFFFF:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + 1)
        else:
            if len(ranges) == max_ranges:
                break
            ranges.append((seq, 1))
    return ranges


# ------------------------------------------------------------------ hot path helpers
# The reflector rewrites seq/lowest (and flags) of a client's DATA without a full
# decode/encode round trip: these are offsets into HEADER, declared next to it.
FLAGS_OFFSET = HEADER.offset("flags")
SEQ_LOWEST = Layout("!", (("seq", "I"), ("lowest", "I")))
SEQ_OFFSET = HEADER.offset("seq")
assert SEQ_OFFSET + SEQ_LOWEST.size == HEADER.offset("lowest") + 4

SENDER_AND_ID = Layout("!", (("sender", "I"), ("packet_id", "I")))
SENDER_OFFSET = HEADER.offset("sender")
assert SENDER_OFFSET + 4 == HEADER.offset("packet_id")


def sender_and_id(data: bytes) -> tuple[int, int]:
    """(sender, packet_id) of an already validated datagram."""
    return SENDER_AND_ID.unpack_from(data, SENDER_OFFSET)


def restamp(data: bytes, seq: int, lowest: int, flags: int | None = None) -> bytes:
    """A copy of an already validated datagram with seq/lowest (and optionally flags) replaced."""
    out = bytearray(data)
    SEQ_LOWEST.pack_into(out, SEQ_OFFSET, seq, lowest)
    if flags is not None:
        out[FLAGS_OFFSET] = flags
    return bytes(out)
