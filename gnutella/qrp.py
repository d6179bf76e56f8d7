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
from typing import Any

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


@dataclass
class RouteTable:
    """A QRP table: a set of present slots in a table of ``2**bits`` slots."""

    bits: int = DEFAULT_TABLE_BITS
    present: set[int] = field(default_factory=set)

    @property
    def size(self) -> int:
        return 1 << self.bits

    def add_text(self, text: str) -> None:
        self.present.update(keyword_hashes(text, self.bits))

    def matches(self, query_text: str) -> bool:
        """True when every keyword of the query may be behind this table (no keywords: match)."""
        words = keywords(query_text)
        return all(qrp_hash(w, self.bits) in self.present for w in words)

    def fill_ratio(self) -> float:
        return len(self.present) / self.size

    # ---- encoding as RESET + PATCH messages

    def to_messages(self, infinity: int = DEFAULT_INFINITY, entry_bits: int = 4,
                    max_chunk: int = 4096, compress: bool = True) -> list[QrpReset | QrpPatch]:
        if entry_bits not in (4, 8):
            raise ValueError("entry bits must be 4 or 8 when sending")
        # Delta against an all-infinity table: present slots become 1, so delta = 1 - infinity.
        delta = (1 - infinity) & ((1 << entry_bits) - 1)
        if entry_bits == 8:
            raw = bytearray(self.size)
            for slot in self.present:
                raw[slot] = delta
        else:
            raw = bytearray(self.size // 2)
            for slot in self.present:
                raw[slot >> 1] |= delta << (0 if slot & 1 else 4)
        data = zlib.compress(bytes(raw)) if compress else bytes(raw)
        chunks = [data[i:i + max_chunk] for i in range(0, len(data), max_chunk)] or [b""]
        compressor = QRP_COMPRESS_ZLIB if compress else QRP_COMPRESS_NONE
        messages: list[QrpReset | QrpPatch] = [QrpReset(self.size, infinity)]
        for n, chunk in enumerate(chunks, 1):
            messages.append(QrpPatch(n, len(chunks), compressor, entry_bits, chunk))
        return messages


@dataclass
class TableReceiver:
    """Rebuilds a peer's table from RESET and PATCH messages (bounded table size)."""

    max_table_size: int = 1 << 20
    table: RouteTable | None = None
    _size: int = 0
    _infinity: int = DEFAULT_INFINITY
    _values: bytearray | None = None
    _pending: list[bytes] = field(default_factory=list)
    _expect_seq: int = 1
    _compressor: int = 0
    _entry_bits: int = 4

    def receive(self, msg: QrpReset | QrpPatch) -> RouteTable | None:
        """Feed one QRP message; returns the new table when a patch sequence completes."""
        if isinstance(msg, QrpReset):
            if msg.table_length > self.max_table_size:
                raise GnutellaDecodeError(f"QRP: table of {msg.table_length} slots exceeds {self.max_table_size}")
            self._size = msg.table_length
            self._infinity = msg.infinity
            self._values = bytearray([msg.infinity]) * msg.table_length
            self._pending.clear()
            self._expect_seq = 1
            self.table = RouteTable(self._size.bit_length() - 1, set())
            return None
        if self._values is None:
            raise GnutellaDecodeError("QRP: PATCH before RESET")
        if msg.seq_no != self._expect_seq:
            self._pending.clear()
            self._expect_seq = 1
            raise GnutellaDecodeError(f"QRP: patch {msg.seq_no} out of sequence (expected {self._expect_seq})")
        if msg.seq_no == 1:
            self._compressor, self._entry_bits = msg.compressor, msg.entry_bits
        self._pending.append(msg.data)
        self._expect_seq += 1
        if msg.seq_no < msg.seq_size:
            return None
        data = b"".join(self._pending)
        self._pending.clear()
        self._expect_seq = 1
        if self._compressor == QRP_COMPRESS_ZLIB:
            decomp = zlib.decompressobj()
            try:
                # bounded: never inflate more than a whole table's worth
                data = decomp.decompress(data, self._size * self._entry_bits // 8 + 1)
            except zlib.error as exc:
                raise GnutellaDecodeError(f"QRP: bad zlib patch: {exc}") from None
        self._apply(data)
        present = {i for i, v in enumerate(self._values) if v < self._infinity}
        self.table = RouteTable(self._size.bit_length() - 1, present)
        return self.table

    def _apply(self, data: bytes) -> None:
        assert self._values is not None
        bits = self._entry_bits
        per_byte = 8 // bits
        mask = (1 << bits) - 1
        sign = 1 << (bits - 1)
        needed = self._size * bits // 8
        if len(data) != needed:
            raise GnutellaDecodeError(f"QRP: patch holds {len(data)} bytes, table needs {needed}")
        values = self._values
        if bits == 8:
            for i, byte in enumerate(data):
                if byte:
                    values[i] = (values[i] + (byte - 256 if byte & 0x80 else byte)) & 0xFF
            return
        for i, byte in enumerate(data):
            if not byte:
                continue
            for k in range(per_byte):
                nib = (byte >> (8 - bits * (k + 1))) & mask
                if nib:
                    delta = nib - (1 << bits) if nib & sign else nib
                    slot = i * per_byte + k
                    values[slot] = (values[slot] + delta) & 0xFF


def receive_table(peer: Any, msg: QrpReset | QrpPatch, stats: Counter) -> bool:
    """Feed one QRP message to ``peer.qrp`` and install ``peer.table`` when a table completes
    (counted in ``qrp_tables``); a malformed message is counted (``qrp_malformed``) and dropped.
    True when a new table was installed."""
    try:
        table = peer.qrp.receive(msg)
    except GnutellaDecodeError:
        stats["qrp_malformed"] += 1
        return False
    if table is None:
        return False
    peer.table = table
    stats["qrp_tables"] += 1
    return True
