"""Gnutella 0.6 message codec: every wire format of the overlay, declared once here.

Header (23 bytes): descriptor GUID (16), payload type (1), TTL (1), hops (1),
payload length (4, little-endian).  Payloads:

=========  =====  ==========================================================
Ping       0x00   empty, or a GGEP block
Pong       0x01   port (2 LE), IPv4 (4), shared files (4 LE), shared KB (4 LE), [GGEP]
Bye        0x02   code (2 LE), reason (NUL-terminated text, optional)
QRP        0x30   RESET: variant 0, table length (4 LE), infinity (1)
                  PATCH: variant 1, seq no (1), seq size (1), compressor (1), entry bits (1), data
Vendor     0x31   vendor (4), selector (2 LE), version (2 LE), data     (0x32: standard vendor)
Push       0x40   servent GUID (16), file index (4 LE), IPv4 (4), port (2 LE), [GGEP]
Query      0x80   flags / min speed (2), criteria (NUL-terminated), extensions
QueryHit   0x81   hits (1), port (2 LE), IPv4 (4), speed (4 LE), results, [QHD trailer], servent GUID (16)
=========  =====  ==========================================================

The query flags field is big-endian when bit 0x8000 is set (the modern
convention gtk-gnutella demands: bytes ``80 00``); otherwise it is the legacy
little-endian minimum speed.  Every decoder raises :class:`GnutellaDecodeError`
saying what was wrong; :class:`MessageReader` turns a byte stream into
messages with a bounded buffer and a bounded payload size.
"""

from __future__ import annotations

import ipaddress
import os
import zlib
from dataclasses import dataclass, field
from typing import ClassVar, Union

from cliruntime.wirefields import Layout


class GnutellaDecodeError(ValueError):
    """Malformed Gnutella bytes; the message says what was wrong."""


# ---------------------------------------------------------------- header

HEADER = Layout("<", (("guid", "16s"), ("type", "B"), ("ttl", "B"), ("hops", "B"), ("length", "I")))
HEADER_SIZE = HEADER.size  # 23

PING, PONG, BYE, QRP, VENDOR, STD_VENDOR, PUSH, QUERY, QUERY_HIT, HSEP = (
    0x00, 0x01, 0x02, 0x30, 0x31, 0x32, 0x40, 0x80, 0x81, 0xCD)

TYPE_NAMES = {PING: "ping", PONG: "pong", BYE: "bye", QRP: "qrp", VENDOR: "vendor",
              STD_VENDOR: "vendor", PUSH: "push", QUERY: "query", QUERY_HIT: "query_hit", HSEP: "hsep"}

DEFAULT_MAX_PAYLOAD = 64 * 1024

# query flags (big-endian 16 bits, valid when FLAG_MARKER is set)
QF_MARKER = 0x8000
QF_FIREWALLED = 0x4000
QF_XML = 0x2000
QF_LEAF_GUIDED = 0x1000
QF_GGEP_H = 0x0800
QF_OOB = 0x0400


def new_guid(rng_bytes: bytes | None = None) -> bytes:
    """A fresh modern GUID: byte 8 is 0xff and byte 15 is 0x00 (servents mark theirs so)."""
    raw = bytearray(rng_bytes if rng_bytes is not None else os.urandom(16))
    if len(raw) != 16:
        raise ValueError("a GUID is 16 bytes")
    raw[8] = 0xFF
    raw[15] = 0x00
    return bytes(raw)


def _ip_to_bytes(ip: str) -> bytes:
    try:
        return ipaddress.IPv4Address(ip).packed
    except ValueError:
        raise ValueError(f"not an IPv4 address: {ip!r}") from None


def _ip_from_bytes(raw: bytes) -> str:
    return str(ipaddress.IPv4Address(raw))


# ---------------------------------------------------------------- GGEP

GGEP_MAGIC = 0xC3
_GGEP_LAST = 0x80
_GGEP_COBS = 0x40
_GGEP_DEFLATE = 0x20
_GGEP_RESERVED = 0x10
_GGEP_MAX_DATA = (1 << 18) - 1
# What the deflated extensions of one GGEP block may inflate to, together: as much as the
# largest legitimate message (a few hundred bytes of deflate otherwise inflate to megabytes,
# which a node would cache and re-compress on relay).
GGEP_MAX_INFLATED = DEFAULT_MAX_PAYLOAD


def cobs_encode(data: bytes) -> bytes:
    out = bytearray()
    block = bytearray()
    for byte in data:
        if byte == 0:
            out.append(len(block) + 1)
            out += block
            block.clear()
        else:
            block.append(byte)
            if len(block) == 254:
                out.append(255)
                out += block
                block.clear()
    out.append(len(block) + 1)
    out += block
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(data):
        code = data[i]
        if code == 0:
            raise GnutellaDecodeError("GGEP: zero byte inside COBS-encoded data")
        end = i + code
        if end > len(data):
            raise GnutellaDecodeError("GGEP: COBS block runs past the data")
        out += data[i + 1:end]
        i = end
        if code < 255 and i < len(data):
            out.append(0)
    return bytes(out)


@dataclass(frozen=True, slots=True)
class GGEPExtension:
    id: str
    data: bytes = b""
    compress: bool = False   # deflate on encode (the decoded form is always plain)
    cobs: bool = False


def _ggep_length(length: int) -> bytes:
    if length > _GGEP_MAX_DATA:
        raise ValueError(f"GGEP data of {length} bytes exceeds {_GGEP_MAX_DATA}")
    if length < 0x40:
        return bytes([0x40 | length])
    if length < 0x1000:
        return bytes([0x80 | (length >> 6), 0x40 | (length & 0x3F)])
    return bytes([0x80 | (length >> 12), 0x80 | ((length >> 6) & 0x3F), 0x40 | (length & 0x3F)])


def encode_ggep(extensions: list[GGEPExtension] | tuple[GGEPExtension, ...]) -> bytes:
    if not extensions:
        return b""
    out = bytearray([GGEP_MAGIC])
    for index, ext in enumerate(extensions):
        ident = ext.id.encode("ascii")
        if not 1 <= len(ident) <= 15:
            raise ValueError(f"GGEP id {ext.id!r} must be 1..15 bytes")
        data = ext.data
        flags = len(ident)
        if ext.compress:
            data = zlib.compress(data)
            flags |= _GGEP_DEFLATE
        if ext.cobs:
            data = cobs_encode(data)
            flags |= _GGEP_COBS
        if index == len(extensions) - 1:
            flags |= _GGEP_LAST
        out.append(flags)
        out += ident
        out += _ggep_length(len(data))
        out += data
    return bytes(out)


def _inflate_ggep(data: bytes, ident: bytes, budget: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        plain = inflater.decompress(data, budget + 1)
    except zlib.error as exc:
        raise GnutellaDecodeError(f"GGEP: bad deflate data in {ident!r}: {exc}") from None
    if len(plain) > budget:
        raise GnutellaDecodeError(f"GGEP: deflated data in {ident!r} inflates past "
                                  f"{GGEP_MAX_INFLATED} bytes for the block")
    if not inflater.eof or inflater.unused_data:
        raise GnutellaDecodeError(f"GGEP: deflate data in {ident!r} truncated or followed by stray bytes")
    return plain


def decode_ggep(buf: bytes, offset: int = 0) -> tuple[tuple[GGEPExtension, ...], int]:
    """Decode a GGEP block starting at ``offset`` (on the magic byte); return (extensions, end)."""
    if offset >= len(buf) or buf[offset] != GGEP_MAGIC:
        raise GnutellaDecodeError("GGEP: missing magic byte 0xC3")
    pos = offset + 1
    extensions = []
    inflate_budget = GGEP_MAX_INFLATED
    while True:
        if pos >= len(buf):
            raise GnutellaDecodeError("GGEP: block ends without a LAST extension")
        flags = buf[pos]
        pos += 1
        if flags & _GGEP_RESERVED:
            raise GnutellaDecodeError(f"GGEP: reserved flag bit set (flags 0x{flags:02x})")
        id_len = flags & 0x0F
        if id_len == 0:
            raise GnutellaDecodeError("GGEP: extension id length 0")
        ident = buf[pos:pos + id_len]
        if len(ident) != id_len:
            raise GnutellaDecodeError("GGEP: truncated extension id")
        pos += id_len
        length = 0
        for count in range(3):
            if pos >= len(buf):
                raise GnutellaDecodeError("GGEP: truncated data length")
            byte = buf[pos]
            pos += 1
            length = (length << 6) | (byte & 0x3F)
            if byte & 0x40:
                break
            if not byte & 0x80:
                raise GnutellaDecodeError("GGEP: length byte with neither MORE nor LAST")
        else:
            raise GnutellaDecodeError("GGEP: data length longer than 3 bytes")
        data = buf[pos:pos + length]
        if len(data) != length:
            raise GnutellaDecodeError(f"GGEP: extension {ident!r} declares {length} bytes, has {len(data)}")
        pos += length
        if flags & _GGEP_COBS:
            data = cobs_decode(data)
        if flags & _GGEP_DEFLATE:
            data = _inflate_ggep(data, ident, inflate_budget)
            inflate_budget -= len(data)
        try:
            name = ident.decode("ascii")
        except UnicodeDecodeError:
            raise GnutellaDecodeError(f"GGEP: non-ASCII extension id {ident!r}") from None
        # the encodings are kept so a relayed message is re-encoded as it came (COBS is deterministic)
        extensions.append(GGEPExtension(name, bytes(data), compress=bool(flags & _GGEP_DEFLATE),
                                        cobs=bool(flags & _GGEP_COBS)))
        if flags & _GGEP_LAST:
            return tuple(extensions), pos


def ggep_get(extensions: tuple[GGEPExtension, ...], ident: str) -> bytes | None:
    for ext in extensions:
        if ext.id == ident:
            return ext.data
    return None


def _optional_ggep(buf: bytes, what: str) -> tuple[GGEPExtension, ...]:
    if not buf:
        return ()
    extensions, end = decode_ggep(buf, 0)
    if end != len(buf):
        raise GnutellaDecodeError(f"{what}: {len(buf) - end} stray bytes after GGEP")
    return extensions


# ---------------------------------------------------------------- payloads

@dataclass(frozen=True, slots=True)
class Ping:
    TYPE: ClassVar[int] = PING
    ggep: tuple[GGEPExtension, ...] = ()

    def encode(self) -> bytes:
        return encode_ggep(self.ggep)

    @classmethod
    def decode(cls, buf: bytes) -> "Ping":
        return cls(_optional_ggep(buf, "ping"))


PONG_FIXED = Layout("<", (("port", "H"), ("ip", "4s"), ("files", "I"), ("kbytes", "I")))


@dataclass(frozen=True, slots=True)
class Pong:
    TYPE: ClassVar[int] = PONG
    port: int
    ip: str
    files: int = 0
    kbytes: int = 0
    ggep: tuple[GGEPExtension, ...] = ()

    def encode(self) -> bytes:
        return PONG_FIXED.pack(self.port, _ip_to_bytes(self.ip), self.files, self.kbytes) + encode_ggep(self.ggep)

    @classmethod
    def decode(cls, buf: bytes) -> "Pong":
        if len(buf) < PONG_FIXED.size:
            raise GnutellaDecodeError(f"pong: {len(buf)} bytes, need at least {PONG_FIXED.size}")
        port, ip, files, kbytes = PONG_FIXED.unpack_from(buf)
        return cls(port, _ip_from_bytes(ip), files, kbytes, _optional_ggep(buf[PONG_FIXED.size:], "pong"))


BYE_FIXED = Layout("<", (("code", "H"),))


@dataclass(frozen=True, slots=True)
class Bye:
    TYPE: ClassVar[int] = BYE
    code: int
    reason: str = ""

    def encode(self) -> bytes:
        return BYE_FIXED.pack(self.code) + self.reason.encode("utf-8", "replace") + b"\0"

    @classmethod
    def decode(cls, buf: bytes) -> "Bye":
        if len(buf) < BYE_FIXED.size:
            raise GnutellaDecodeError(f"bye: {len(buf)} bytes, need at least {BYE_FIXED.size}")
        (code,) = BYE_FIXED.unpack_from(buf)
        text = buf[BYE_FIXED.size:].split(b"\0", 1)[0]
        return cls(code, text.decode("utf-8", "replace").rstrip("\r\n"))


QRP_RESET_FIXED = Layout("<", (("variant", "B"), ("table_length", "I"), ("infinity", "B")))
QRP_PATCH_FIXED = Layout("<", (("variant", "B"), ("seq_no", "B"), ("seq_size", "B"), ("compressor", "B"),
                                  ("entry_bits", "B")))
QRP_COMPRESS_NONE, QRP_COMPRESS_ZLIB = 0, 1


@dataclass(frozen=True, slots=True)
class QrpReset:
    TYPE: ClassVar[int] = QRP
    table_length: int
    infinity: int

    def encode(self) -> bytes:
        return QRP_RESET_FIXED.pack(0, self.table_length, self.infinity)

    @classmethod
    def decode(cls, buf: bytes) -> "QrpReset":
        if len(buf) != QRP_RESET_FIXED.size:
            raise GnutellaDecodeError(f"QRP reset: {len(buf)} bytes, expected {QRP_RESET_FIXED.size}")
        _, length, infinity = QRP_RESET_FIXED.unpack(buf)
        if length == 0 or length & (length - 1):
            raise GnutellaDecodeError(f"QRP reset: table length {length} is not a power of two")
        if infinity < 1:
            raise GnutellaDecodeError("QRP reset: infinity 0")
        return cls(length, infinity)


@dataclass(frozen=True, slots=True)
class QrpPatch:
    TYPE: ClassVar[int] = QRP
    seq_no: int
    seq_size: int
    compressor: int
    entry_bits: int
    data: bytes

    def encode(self) -> bytes:
        return QRP_PATCH_FIXED.pack(1, self.seq_no, self.seq_size, self.compressor, self.entry_bits) + self.data

    @classmethod
    def decode(cls, buf: bytes) -> "QrpPatch":
        if len(buf) < QRP_PATCH_FIXED.size:
            raise GnutellaDecodeError(f"QRP patch: {len(buf)} bytes, need at least {QRP_PATCH_FIXED.size}")
        _, seq_no, seq_size, compressor, bits = QRP_PATCH_FIXED.unpack_from(buf)
        if not 1 <= seq_no <= seq_size:
            raise GnutellaDecodeError(f"QRP patch: sequence {seq_no} of {seq_size}")
        if compressor not in (QRP_COMPRESS_NONE, QRP_COMPRESS_ZLIB):
            raise GnutellaDecodeError(f"QRP patch: unknown compressor {compressor}")
        if bits not in (1, 2, 4, 8):
            raise GnutellaDecodeError(f"QRP patch: entry bits {bits} not 1, 2, 4 or 8")
        return cls(seq_no, seq_size, compressor, bits, bytes(buf[QRP_PATCH_FIXED.size:]))


def decode_qrp(buf: bytes) -> "QrpReset | QrpPatch":
    if not buf:
        raise GnutellaDecodeError("QRP: empty payload")
    if buf[0] == 0:
        return QrpReset.decode(buf)
    if buf[0] == 1:
        return QrpPatch.decode(buf)
    raise GnutellaDecodeError(f"QRP: unknown variant {buf[0]}")


VENDOR_FIXED = Layout("<", (("vendor", "4s"), ("selector", "H"), ("version", "H")))


@dataclass(frozen=True, slots=True)
class VendorMessage:
    TYPE: ClassVar[int] = VENDOR
    vendor: bytes
    selector: int
    version: int
    data: bytes = b""
    standard: bool = False   # 0x32 instead of 0x31

    def encode(self) -> bytes:
        return VENDOR_FIXED.pack(self.vendor, self.selector, self.version) + self.data

    @classmethod
    def decode(cls, buf: bytes, standard: bool = False) -> "VendorMessage":
        if len(buf) < VENDOR_FIXED.size:
            raise GnutellaDecodeError(f"vendor message: {len(buf)} bytes, need at least {VENDOR_FIXED.size}")
        vendor, selector, version = VENDOR_FIXED.unpack_from(buf)
        return cls(vendor, selector, version, bytes(buf[VENDOR_FIXED.size:]), standard)


PUSH_FIXED = Layout("<", (("servent_guid", "16s"), ("file_index", "I"), ("ip", "4s"), ("port", "H")))


@dataclass(frozen=True, slots=True)
class Push:
    TYPE: ClassVar[int] = PUSH
    servent_guid: bytes
    file_index: int
    ip: str
    port: int
    ggep: tuple[GGEPExtension, ...] = ()

    def encode(self) -> bytes:
        return PUSH_FIXED.pack(self.servent_guid, self.file_index, _ip_to_bytes(self.ip), self.port) + encode_ggep(self.ggep)

    @classmethod
    def decode(cls, buf: bytes) -> "Push":
        if len(buf) < PUSH_FIXED.size:
            raise GnutellaDecodeError(f"push: {len(buf)} bytes, need at least {PUSH_FIXED.size}")
        guid, index, ip, port = PUSH_FIXED.unpack_from(buf)
        return cls(guid, index, _ip_from_bytes(ip), port, _optional_ggep(buf[PUSH_FIXED.size:], "push"))


def _split_extensions(buf: bytes, what: str) -> tuple[tuple[str, ...], tuple[GGEPExtension, ...]]:
    """Query/hit extension area: HUGE URNs and plain text separated by 0x1C, GGEP blocks."""
    texts: list[str] = []
    ggep: list[GGEPExtension] = []
    pos = 0
    while pos < len(buf):
        if buf[pos] == GGEP_MAGIC:
            extensions, pos = decode_ggep(buf, pos)
            ggep.extend(extensions)
            continue
        if buf[pos] == 0x1C:
            pos += 1
            continue
        end = pos
        while end < len(buf) and buf[end] not in (0x1C, GGEP_MAGIC):
            end += 1
        texts.append(buf[pos:end].decode("utf-8", "replace"))
        pos = end
    return tuple(texts), tuple(ggep)


def _join_extensions(texts: tuple[str, ...], ggep: tuple[GGEPExtension, ...]) -> bytes:
    parts = [text.encode("utf-8") for text in texts]
    if ggep:
        parts.append(encode_ggep(ggep))
    return b"\x1c".join(parts)


# the query's first two bytes: big-endian flags when the top bit is set, else the legacy
# little-endian minimum speed
QUERY_FLAGS = Layout(">", (("flags", "H"),))
QUERY_MIN_SPEED = Layout("<", (("min_speed", "H"),))


@dataclass(frozen=True, slots=True)
class Query:
    TYPE: ClassVar[int] = QUERY
    criteria: str
    flags: int = QF_MARKER         # modern: 0x8000 set; else legacy minimum speed
    urns: tuple[str, ...] = ()      # "urn:sha1:..."
    ggep: tuple[GGEPExtension, ...] = ()

    @property
    def modern(self) -> bool:
        return bool(self.flags & QF_MARKER)

    def encode(self) -> bytes:
        if self.flags & QF_MARKER:
            head = QUERY_FLAGS.pack(self.flags)
        else:
            head = QUERY_MIN_SPEED.pack(self.flags)
        body = self.criteria.encode("utf-8")
        if b"\0" in body:
            raise ValueError("query criteria cannot contain NUL")
        return head + body + b"\0" + _join_extensions(self.urns, self.ggep)

    @classmethod
    def decode(cls, buf: bytes) -> "Query":
        if len(buf) < 3:
            raise GnutellaDecodeError(f"query: {len(buf)} bytes, need at least 3")
        if buf[0] & 0x80:
            (flags,) = QUERY_FLAGS.unpack_from(buf)
        else:
            (flags,) = QUERY_MIN_SPEED.unpack_from(buf)
        nul = buf.find(b"\0", 2)
        if nul < 0:
            raise GnutellaDecodeError("query: criteria not NUL-terminated")
        criteria = buf[2:nul].decode("utf-8", "replace")
        ext = buf[nul + 1:]
        if ext.endswith(b"\0"):      # some servents terminate the extension area too
            ext = ext[:-1]
        texts, ggep = _split_extensions(ext, "query")
        urns = tuple(t for t in texts if t.lower().startswith("urn:"))
        return cls(criteria, flags, urns, ggep)


HIT_FIXED = Layout("<", (("count", "B"), ("port", "H"), ("ip", "4s"), ("speed", "I")))
RESULT_FIXED = Layout("<", (("index", "I"), ("size", "I")))


@dataclass(frozen=True, slots=True)
class HitResult:
    index: int
    size: int
    name: str
    urns: tuple[str, ...] = ()
    ggep: tuple[GGEPExtension, ...] = ()

    @property
    def sha1(self) -> str | None:
        for urn in self.urns:
            if urn.lower().startswith("urn:sha1:"):
                return urn[9:].upper()
        return None


@dataclass(frozen=True, slots=True)
class QueryHit:
    TYPE: ClassVar[int] = QUERY_HIT
    port: int
    ip: str
    speed: int
    results: tuple[HitResult, ...]
    servent_guid: bytes
    vendor: bytes = b""           # QHD vendor code (4 bytes) or b"" for no trailer
    open_data: bytes = b""        # flags/flags2 masks
    private_data: bytes = b""     # anything between the open data and the servent GUID

    def encode(self) -> bytes:
        if not 0 < len(self.results) <= 255:
            raise ValueError("a query hit carries 1..255 results")
        out = bytearray(HIT_FIXED.pack(len(self.results), self.port, _ip_to_bytes(self.ip), self.speed))
        for result in self.results:
            out += RESULT_FIXED.pack(result.index, result.size)
            out += result.name.encode("utf-8") + b"\0"
            out += _join_extensions(result.urns, result.ggep) + b"\0"
        if self.vendor:
            if len(self.vendor) != 4:
                raise ValueError("QHD vendor code is 4 bytes")
            out += self.vendor + bytes([len(self.open_data)]) + self.open_data + self.private_data
        if len(self.servent_guid) != 16:
            raise ValueError("servent GUID is 16 bytes")
        out += self.servent_guid
        return bytes(out)

    @classmethod
    def decode(cls, buf: bytes) -> "QueryHit":
        if len(buf) < HIT_FIXED.size + 16:
            raise GnutellaDecodeError(f"query hit: {len(buf)} bytes, too short")
        count, port, ip, speed = HIT_FIXED.unpack_from(buf)
        if count == 0:
            raise GnutellaDecodeError("query hit: zero results")
        end = len(buf) - 16
        pos = HIT_FIXED.size
        results = []
        for n in range(count):
            if pos + RESULT_FIXED.size > end:
                raise GnutellaDecodeError(f"query hit: result {n + 1} of {count} truncated")
            index, size = RESULT_FIXED.unpack_from(buf, pos)
            pos += RESULT_FIXED.size
            name_end = buf.find(b"\0", pos, end)
            if name_end < 0:
                raise GnutellaDecodeError(f"query hit: result {n + 1} name not NUL-terminated")
            name = buf[pos:name_end].decode("utf-8", "replace")
            pos = name_end + 1
            ext_end = _find_result_end(buf, pos, end)
            texts, ggep = _split_extensions(buf[pos:ext_end], "query hit")
            pos = ext_end + 1
            results.append(HitResult(index, size, name, tuple(t for t in texts if t), ggep))
        vendor = open_data = private = b""
        if pos < end:
            if end - pos < 5:
                raise GnutellaDecodeError(f"query hit: {end - pos}-byte trailer, need at least 5")
            vendor = bytes(buf[pos:pos + 4])
            open_size = buf[pos + 4]
            if pos + 5 + open_size > end:
                raise GnutellaDecodeError("query hit: QHD open data runs into the servent GUID")
            open_data = bytes(buf[pos + 5:pos + 5 + open_size])
            private = bytes(buf[pos + 5 + open_size:end])
        return cls(port, _ip_from_bytes(ip), speed, tuple(results), bytes(buf[end:]), vendor, open_data, private)


def _find_result_end(buf: bytes, pos: int, end: int) -> int:
    """End (the NUL) of a result's extension area, skipping over GGEP blocks that may hold NULs."""
    while pos < end:
        byte = buf[pos]
        if byte == 0:
            return pos
        if byte == GGEP_MAGIC:
            _, pos = decode_ggep(buf[:end], pos)
            continue
        pos += 1
    raise GnutellaDecodeError("query hit: result extensions not NUL-terminated")


HSEP_ENTRY = Layout("<", (("nodes", "Q"), ("files", "Q"), ("kbytes", "Q")))


@dataclass(frozen=True, slots=True)
class Hsep:
    """Horizon Size Estimation (0xCD, gtk-gnutella sends it to peers that say ``HSEP/0.2``):
    per hop count 1..n, (nodes, files, kbytes) as three little-endian uint64."""
    TYPE: ClassVar[int] = HSEP
    hops: tuple[tuple[int, int, int], ...] = ()

    def encode(self) -> bytes:
        return b"".join(HSEP_ENTRY.pack(*entry) for entry in self.hops)

    @classmethod
    def decode(cls, buf: bytes) -> "Hsep":
        if len(buf) % HSEP_ENTRY.size:
            raise GnutellaDecodeError(f"hsep: {len(buf)} bytes, not a multiple of {HSEP_ENTRY.size}")
        return cls(tuple(HSEP_ENTRY.unpack_from(buf, i) for i in range(0, len(buf), HSEP_ENTRY.size)))


Payload = Union[Ping, Pong, Bye, QrpReset, QrpPatch, VendorMessage, Push, Query, QueryHit, Hsep]


@dataclass(frozen=True, slots=True)
class Message:
    guid: bytes
    ttl: int
    hops: int
    payload: Payload

    @property
    def type(self) -> int:
        if isinstance(self.payload, VendorMessage) and self.payload.standard:
            return STD_VENDOR
        return self.payload.TYPE

    @property
    def type_name(self) -> str:
        return TYPE_NAMES[self.type]

    def encode(self) -> bytes:
        if len(self.guid) != 16:
            raise ValueError("descriptor GUID is 16 bytes")
        body = self.payload.encode()
        return HEADER.pack(self.guid, self.type, self.ttl, self.hops, len(body)) + body

    def forwarded(self) -> "Message":
        """The copy a servent relays: TTL one less, hops one more."""
        return Message(self.guid, self.ttl - 1, next_hop(self.hops), self.payload)


MAX_HOPS = 255


def next_hop(count: int) -> int:
    """One more hop (or a reply TTL of hops+1), saturating at what the header's byte holds:
    a peer's hop count of 255 must not make our copy unencodable."""
    return min(count + 1, MAX_HOPS)


def decode_payload(ptype: int, body: bytes):
    if ptype == PING:
        return Ping.decode(body)
    if ptype == PONG:
        return Pong.decode(body)
    if ptype == BYE:
        return Bye.decode(body)
    if ptype == QRP:
        return decode_qrp(body)
    if ptype in (VENDOR, STD_VENDOR):
        return VendorMessage.decode(body, standard=ptype == STD_VENDOR)
    if ptype == PUSH:
        return Push.decode(body)
    if ptype == QUERY:
        return Query.decode(body)
    if ptype == QUERY_HIT:
        return QueryHit.decode(body)
    if ptype == HSEP:
        return Hsep.decode(body)
    raise GnutellaDecodeError(f"unknown payload type 0x{ptype:02x}")


def decode_message(buf: bytes) -> Message:
    """Decode exactly one whole message (header + payload)."""
    if len(buf) < HEADER_SIZE:
        raise GnutellaDecodeError(f"message: {len(buf)} bytes, header needs {HEADER_SIZE}")
    guid, ptype, ttl, hops, length = HEADER.unpack_from(buf)
    if len(buf) - HEADER_SIZE != length:
        raise GnutellaDecodeError(f"message: header says {length} payload bytes, got {len(buf) - HEADER_SIZE}")
    return Message(guid, ttl, hops, decode_payload(ptype, bytes(buf[HEADER_SIZE:])))


@dataclass
class RawMessage:
    """A framed message whose payload failed to decode (so it can be counted and dropped)."""
    guid: bytes
    type: int
    ttl: int
    hops: int
    error: str
    size: int


@dataclass
class MessageReader:
    """Frames a byte stream into messages.  Bounded: a header announcing more than
    ``max_payload`` bytes is a fatal framing error (the stream cannot be resynchronised),
    a payload that fails to decode is returned as a :class:`RawMessage` and the stream goes on."""

    max_payload: int = DEFAULT_MAX_PAYLOAD
    _buf: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[Message | RawMessage]:
        self._buf += data
        out: list[Message | RawMessage] = []
        while len(self._buf) >= HEADER_SIZE:
            guid, ptype, ttl, hops, length = HEADER.unpack_from(self._buf)
            if length > self.max_payload:
                raise GnutellaDecodeError(f"message: payload of {length} bytes exceeds limit {self.max_payload}")
            if len(self._buf) < HEADER_SIZE + length:
                break
            body = bytes(self._buf[HEADER_SIZE:HEADER_SIZE + length])
            del self._buf[:HEADER_SIZE + length]
            try:
                out.append(Message(guid, ttl, hops, decode_payload(ptype, body)))
            except (GnutellaDecodeError, ValueError) as exc:
                out.append(RawMessage(guid, ptype, ttl, hops, str(exc), HEADER_SIZE + length))
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)
