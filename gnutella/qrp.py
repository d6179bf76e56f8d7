"""Query Routing Protocol: keyword hashing, route tables, RESET/PATCH encoding.

A leaf hashes every keyword of its shared file names into a table of
``2**bits`` slots and sends it to its ultrapeer as one RESET and a sequence of
PATCH messages (4-bit signed deltas against an all-"infinity" table,
zlib-compressed).  The ultrapeer then forwards a query to that leaf only when
every keyword of the query hits a present slot.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from .wire import (GnutellaDecodeError, QRP_COMPRESS_NONE, QRP_COMPRESS_ZLIB,
                   QrpPatch, QrpReset)

_A_INT = 0x4F1BBCDC
DEFAULT_TABLE_BITS = 16
DEFAULT_INFINITY = 7
MIN_KEYWORD = 3
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def qrp_hash(keyword: str | bytes, bits: int) -> int:
    """The QRP hash (specification section 4): lower-case, XOR the bytes into a
    32-bit little-endian word, multiply by 0x4F1BBCDC, keep the top ``bits`` bits."""
    data = keyword.lower().encode("utf-8") if isinstance(keyword, str) else keyword.lower()
    xor = 0
    for j, byte in enumerate(data):
        xor ^= byte << ((j & 3) * 8)
    return ((xor * _A_INT) & 0xFFFFFFFF) >> (32 - bits)


def keywords(text: str) -> list[str]:
    """Keywords of a file name or query: words of letters/digits, lower-case, at least 3 long."""
    words = [w.lower() for w in _WORD.findall(text)]
    return [w for w in words if len(w) >= MIN_KEYWORD]


def keyword_hashes(text: str, bits: int) -> set[int]:
    return {qrp_hash(word, bits) for word in keywords(text)}


class RouteTable:
    """A QRP table of ``2**bits`` slots, kept as a bitmap (slot ``s`` is bit ``s & 7`` of byte
    ``s >> 3``, the booster-to-booster layout): a 2**16 table is 8 KiB whatever its fill, and
    merging or testing never walks the slots in Python."""

    __slots__ = ("bits", "bitmap")

    def __init__(self, bits: int = DEFAULT_TABLE_BITS, slots: Iterable[int] = (),
                 bitmap: bytes | bytearray | None = None) -> None:
        self.bits = bits
        want = max(1, (1 << bits) // 8)
        if bitmap is not None:
            if len(bitmap) != want:
                raise ValueError(f"bitmap of {len(bitmap)} bytes for a table of {1 << bits} slots")
            self.bitmap = bytearray(bitmap)
        else:
            self.bitmap = bytearray(want)
        for slot in slots:
            self.add_slot(slot)

    @property
    def size(self) -> int:
        return 1 << self.bits

    def add_slot(self, slot: int) -> None:
        self.bitmap[slot >> 3] |= 1 << (slot & 7)

    def has(self, slot: int) -> bool:
        return bool(self.bitmap[slot >> 3] >> (slot & 7) & 1)

    @property
    def present(self) -> frozenset[int]:
        """The present slots (built on demand: for tests and diagnostics, not for routing)."""
        ones = np.flatnonzero(np.unpackbits(np.frombuffer(self.bitmap, np.uint8), bitorder="little"))
        return frozenset(int(s) for s in ones if s < self.size)

    def merge(self, other: "RouteTable") -> None:
        """Add ``other``'s slots (same size only)."""
        if other.bits != self.bits:
            raise ValueError(f"cannot merge a table of {other.bits} bits into one of {self.bits}")
        merged = int.from_bytes(self.bitmap, "little") | int.from_bytes(other.bitmap, "little")
        self.bitmap[:] = merged.to_bytes(len(self.bitmap), "little")

    def copy(self) -> "RouteTable":
        return RouteTable(self.bits, bitmap=self.bitmap)

    def add_text(self, text: str) -> None:
        for slot in keyword_hashes(text, self.bits):
            self.add_slot(slot)

    def matches(self, query_text: str) -> bool:
        """True when every keyword of the query may be behind this table (no keywords: match)."""
        return all(self.has(qrp_hash(w, self.bits)) for w in keywords(query_text))

    def fill_ratio(self) -> float:
        return int.from_bytes(self.bitmap, "little").bit_count() / self.size

    def __repr__(self) -> str:
        return f"RouteTable(bits={self.bits}, fill={self.fill_ratio():.4f})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RouteTable) and (self.bits, self.bitmap) == (other.bits, other.bitmap)

    # ---- encoding as RESET + PATCH messages

    def to_messages(self, infinity: int = DEFAULT_INFINITY, entry_bits: int = 4,
                    max_chunk: int = 4096, compress: bool = True) -> list[QrpReset | QrpPatch]:
        if entry_bits not in (4, 8):
            raise ValueError("entry bits must be 4 or 8 when sending")
        # Delta against an all-infinity table: present slots become 1, so delta = 1 - infinity.
        delta = (1 - infinity) & ((1 << entry_bits) - 1)
        present = np.unpackbits(np.frombuffer(self.bitmap, np.uint8), bitorder="little")[:self.size]
        entries = present.astype(np.uint8) * np.uint8(delta)
        if entry_bits == 4:   # two entries a byte, the first in the high nibble
            entries = (entries[0::2] << 4) | entries[1::2]
        raw = entries.tobytes()
        data = zlib.compress(raw) if compress else raw
        chunks = [data[i:i + max_chunk] for i in range(0, len(data), max_chunk)] or [b""]
        compressor = QRP_COMPRESS_ZLIB if compress else QRP_COMPRESS_NONE
        messages: list[QrpReset | QrpPatch] = [QrpReset(self.size, infinity)]
        for n, chunk in enumerate(chunks, 1):
            messages.append(QrpPatch(n, len(chunks), compressor, entry_bits, chunk))
        return messages


class QrpRefused(GnutellaDecodeError):
    """A well-formed QRP message we will not process; ``counter`` names the stat it counts in."""

    def __init__(self, message: str, counter: str) -> None:
        super().__init__(message)
        self.counter = counter


# Table sizes: gtk-gnutella sends 2**16 slots at least (LimeWire's default size too) and up to
# 2**21 for huge libraries; our default accepts up to 2**17 (128 KiB of entries per link while a
# table is rebuilt, 16 KiB kept).  Larger tables are refused (``qrp_refused_size``): the link
# stays, its queries are not filtered.
MAX_TABLE_SIZE = 1 << 17
MIN_TABLE_SIZE = 1 << 6
# A link may send RESET_BURST RESETs in any RESET_BURST * RESET_INTERVAL seconds (a leaf resends
# when its library changes, gtk-gnutella at most every few minutes).  Beyond: ``qrp_rate_limited``.
RESET_BURST = 3
RESET_INTERVAL = 30.0


@dataclass
class TableReceiver:
    """Rebuilds a peer's table from RESET and PATCH messages: bounded table size, bounded
    buffered patch bytes, rate-limited RESETs, vectorised (no per-slot Python loop)."""

    max_table_size: int = MAX_TABLE_SIZE
    reset_burst: int = RESET_BURST
    reset_interval: float = RESET_INTERVAL
    table: RouteTable | None = None
    _size: int = 0
    _infinity: int = DEFAULT_INFINITY
    _values: np.ndarray | None = None
    _pending: list[bytes] = field(default_factory=list)
    _pending_bytes: int = 0
    _expect_seq: int = 1
    _compressor: int = 0
    _entry_bits: int = 4
    _discarding: bool = False
    _resets: list[float] = field(default_factory=list)

    def receive(self, msg: QrpReset | QrpPatch, now: float = 0.0) -> RouteTable | None:
        """Feed one QRP message; returns the new table when a patch sequence completes."""
        if isinstance(msg, QrpReset):
            return self._reset(msg, now)
        if self._discarding:
            raise QrpRefused("QRP: patch of a refused table dropped", "qrp_patches_dropped")
        if self._values is None:
            raise GnutellaDecodeError("QRP: PATCH before RESET")
        if msg.seq_no != self._expect_seq:
            expected = self._expect_seq
            self._drop_pending()
            raise GnutellaDecodeError(f"QRP: patch {msg.seq_no} out of sequence (expected {expected})")
        if msg.seq_no == 1:
            self._compressor, self._entry_bits = msg.compressor, msg.entry_bits
        needed = self._size * self._entry_bits // 8
        # zlib never grows incompressible data by more than ~0.1% + a few bytes
        limit = needed + needed // 64 + 64 if self._compressor == QRP_COMPRESS_ZLIB else needed
        self._pending_bytes += len(msg.data)
        if self._pending_bytes > limit:
            self._drop_pending()
            raise GnutellaDecodeError(f"QRP: patch sequence exceeds {limit} bytes for a table of {needed}")
        self._pending.append(msg.data)
        self._expect_seq += 1
        if msg.seq_no < msg.seq_size:
            return None
        data = b"".join(self._pending)
        self._drop_pending()
        if self._compressor == QRP_COMPRESS_ZLIB:
            decomp = zlib.decompressobj()
            try:
                # bounded: never inflate more than a whole table's worth
                data = decomp.decompress(data, needed + 1)
            except zlib.error as exc:
                raise GnutellaDecodeError(f"QRP: bad zlib patch: {exc}") from None
        self._apply(data)
        present = np.packbits(self._values < self._infinity, bitorder="little")
        self.table = RouteTable(self._size.bit_length() - 1, bitmap=present.tobytes())
        return self.table

    def _reset(self, msg: QrpReset, now: float) -> None:
        if not MIN_TABLE_SIZE <= msg.table_length <= self.max_table_size:
            self._discarding = True
            raise QrpRefused(f"QRP: table of {msg.table_length} slots outside "
                             f"{MIN_TABLE_SIZE}..{self.max_table_size}", "qrp_refused_size")
        self._resets = [t for t in self._resets if now - t < self.reset_interval * self.reset_burst]
        if len(self._resets) >= self.reset_burst:
            self._discarding = True
            raise QrpRefused(f"QRP: more than {self.reset_burst} tables in "
                             f"{self.reset_interval * self.reset_burst:.0f} s", "qrp_rate_limited")
        self._resets.append(now)
        self._discarding = False
        self._size = msg.table_length
        self._infinity = msg.infinity
        self._values = np.full(msg.table_length, msg.infinity, dtype=np.uint8)
        self._drop_pending()
        self.table = RouteTable(self._size.bit_length() - 1)
        return None

    def _drop_pending(self) -> None:
        self._pending.clear()
        self._pending_bytes = 0
        self._expect_seq = 1

    def _apply(self, data: bytes) -> None:
        """Add the signed ``entry_bits`` deltas of ``data`` (most significant first) to the
        entries, modulo 256 as the specification's byte arithmetic does."""
        assert self._values is not None
        bits = self._entry_bits
        per_byte = 8 // bits
        mask = (1 << bits) - 1
        needed = self._size * bits // 8
        if len(data) != needed:
            raise GnutellaDecodeError(f"QRP: patch holds {len(data)} bytes, table needs {needed}")
        raw = np.frombuffer(data, dtype=np.uint8)
        deltas = np.empty(self._size, dtype=np.uint8)
        for k in range(per_byte):
            deltas[k::per_byte] = (raw >> (8 - bits * (k + 1))) & mask
        if bits < 8:   # sign-extend each delta to a byte: adding it modulo 256 subtracts
            negative = (deltas & (1 << (bits - 1))) != 0
            deltas[negative] |= np.uint8(0xFF ^ mask)
        self._values += deltas


def receive_table(peer: Any, msg: QrpReset | QrpPatch, stats: Counter, now: float = 0.0) -> bool:
    """Feed one QRP message to ``peer.qrp`` and install ``peer.table`` when a table completes
    (counted in ``qrp_tables``); a malformed message is counted (``qrp_malformed``) and dropped,
    a refused one in its own counter (``qrp_refused_size``, ``qrp_rate_limited``,
    ``qrp_patches_dropped``).  True when a new table was installed."""
    try:
        table = peer.qrp.receive(msg, now)
    except QrpRefused as exc:
        stats[exc.counter] += 1
        return False
    except GnutellaDecodeError:
        stats["qrp_malformed"] += 1
        return False
    if table is None:
        return False
    peer.table = table
    stats["qrp_tables"] += 1
    return True
