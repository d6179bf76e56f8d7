"""Booster-to-booster protocol: the upper level of the two-level overlay.

Frames are the suite's (:mod:`boxcore.framing`: a 4-byte big-endian length then one msgpack map).  Every message
type and its fields are declared once in :data:`SCHEMA` and checked strictly
on decode (:class:`B2BDecodeError` names what was wrong).

=======  ===============================================================
hello    ``id`` booster name, ``cluster`` list of prefixes, ``v`` version
table    ``bits`` table size exponent, ``slots`` zlib-compressed bitmap of
         the QRP slots present in the cluster (the cluster's keyword table)
query    ``guid``, ``ttl``, ``hops``, ``criteria``, ``flags``, ``urns``
hit      ``guid`` (the query's), ``hops``, ``payload`` raw QueryHit payload
push     ``payload`` raw Push payload (routed by servent GUID)
bye      ``reason``
=======  ===============================================================
"""

from __future__ import annotations

import zlib

from boxcore.framing import FrameDecoder, FramingError, encode_frame

from .qrp import RouteTable

__all__ = ["B2BDecodeError", "FramingError", "SCHEMA", "VERSION", "encode", "frame_decoder", "table_from_message",
           "table_message", "validate"]

VERSION = 1
DEFAULT_MAX_FRAME = 256 * 1024


class B2BDecodeError(ValueError):
    """A malformed booster-to-booster frame; the message says what was wrong."""


SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "hello": {"id": str, "cluster": list, "v": int},
    "table": {"bits": int, "slots": bytes},
    "query": {"guid": bytes, "ttl": int, "hops": int, "criteria": str, "flags": int, "urns": list},
    "hit": {"guid": bytes, "hops": int, "payload": bytes},
    "push": {"payload": bytes},
    "bye": {"reason": str},
}

# Integer fields that end up in a Gnutella header or payload: exactly the ranges those hold.
RANGES = {"ttl": (0, 255), "hops": (0, 255), "flags": (0, 0xFFFF), "v": (0, 0xFFFF)}


def validate(obj: object) -> dict:
    if not isinstance(obj, dict):
        raise B2BDecodeError(f"frame is a {type(obj).__name__}, not a map")
    kind = obj.get("t")
    if kind not in SCHEMA:
        raise B2BDecodeError(f"unknown message type {kind!r}")
    for name, typ in SCHEMA[kind].items():
        if name not in obj:
            raise B2BDecodeError(f"{kind}: missing field {name!r}")
        value = obj[name]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise B2BDecodeError(f"{kind}: field {name!r} is {type(value).__name__}, expected {typ.__name__}")
    extra = set(obj) - set(SCHEMA[kind]) - {"t"}
    if extra:
        raise B2BDecodeError(f"{kind}: unexpected fields {sorted(extra)}")
    if kind in ("query", "hit") and len(obj["guid"]) != 16:
        raise B2BDecodeError(f"{kind}: guid of {len(obj['guid'])} bytes, expected 16")
    for name, (low, high) in RANGES.items():
        if name in SCHEMA[kind] and not low <= obj[name] <= high:
            raise B2BDecodeError(f"{kind}: {name} {obj[name]} outside {low}..{high}")
    if kind == "query" and "\x00" in obj["criteria"]:
        raise B2BDecodeError("query: NUL in criteria")
    if kind == "table" and not 1 <= obj["bits"] <= 20:
        raise B2BDecodeError(f"table: bits {obj['bits']} outside 1..20")
    if kind == "query" and not all(isinstance(u, str) for u in obj["urns"]):
        raise B2BDecodeError("query: urns must be strings")
    if kind == "hello" and not all(isinstance(c, str) for c in obj["cluster"]):
        raise B2BDecodeError("hello: cluster must be a list of prefixes")
    return obj


def encode(obj: dict) -> bytes:
    validate(obj)
    return encode_frame(obj)


def frame_decoder(max_frame: int = DEFAULT_MAX_FRAME) -> FrameDecoder:
    """The suite's framer with this protocol's validator: each malformed frame comes back as a
    :class:`B2BDecodeError` in the list (the stream goes on); a bad length raises
    :class:`~boxcore.framing.FramingError` (boundaries lost: close the link)."""
    return FrameDecoder(max_frame, error=B2BDecodeError, validate=validate)


def table_message(table: RouteTable) -> dict:
    return {"t": "table", "bits": table.bits, "slots": zlib.compress(bytes(table.bitmap))}


def table_from_message(msg: dict) -> RouteTable:
    bits = msg["bits"]
    size = 1 << bits
    want = size // 8 or 1
    decomp = zlib.decompressobj()
    try:
        bitmap = decomp.decompress(msg["slots"], want + 1)
    except zlib.error as exc:
        raise B2BDecodeError(f"table: bad zlib data: {exc}") from None
    if len(bitmap) != want:
        raise B2BDecodeError(f"table: bitmap of {len(bitmap)} bytes, expected {want}")
    if size < 8:   # a table smaller than its one byte: bits past the end are not slots
        bitmap = bytes([bitmap[0] & ((1 << size) - 1)])
    return RouteTable(bits, bitmap=bitmap)
