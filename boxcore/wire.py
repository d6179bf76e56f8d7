"""The boxd <-> booster wire protocols, declared once.

**Control connection** (Unix SOCK_STREAM, ``boxd --control PATH``): frames of a
4-byte big-endian length followed by a msgpack map.  Every map has ``t`` (the
message type); requests from the booster carry an ``id`` that boxd echoes in
its ``reply``.  File descriptors travel beside a frame (SCM_RIGHTS); a message
that carries some says how many in ``nfds`` and they are taken, in order, from
the descriptors received on the connection.  :data:`MESSAGES` declares every
type with its fields; :func:`validate` enforces it strictly.

**Data channel** (a Unix SOCK_DGRAM socketpair per booster, its booster end
handed over in the reply to ``hello``): one msgpack array per datagram, first
element a tag.  :data:`DATAGRAMS` declares them; PACKETS and VERDICTS carry
a list of PACKET / VERDICT records (:data:`BATCHES`), so a burst costs one
syscall per batch, not per packet.  Packets from boxd with ``want_verdict``
true need a VERDICT record back (same ``token``).

Both decoders raise :class:`WireDecodeError` (a ValueError) saying what was
wrong; callers count and drop.  This module is sans-IO: the asyncio adapter
that moves these frames and descriptors over sockets is :mod:`boxcore.transport`.
"""

from __future__ import annotations

import enum
import logging
from typing import Any, Callable

import msgpack

from boxcore import framing

log = logging.getLogger("boxcore.wire")

PROTOCOL_VERSION = 1
LENGTH = framing.LENGTH
DEFAULT_MAX_FRAME = 1 << 20          # 1 MiB: a directory value plus room
MAX_DATAGRAM = 65535 + 512           # the biggest UDP payload plus the header fields


class WireDecodeError(ValueError):
    """A frame, message or datagram that does not follow the protocol."""


class Status(str, enum.Enum):
    OK = "OK"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    CONFLICT = "CONFLICT"
    INVALID = "INVALID"
    ERROR = "ERROR"


# ------------------------------------------------------------------ field kinds

class _Kind:
    __slots__ = ("name", "check")

    def __init__(self, name: str, check: Callable[[Any], bool]) -> None:
        self.name = name
        self.check = check


def _is_int(v: Any) -> bool:
    return type(v) is int or (isinstance(v, int) and not isinstance(v, bool))


INT = _Kind("int", _is_int)
UINT = _Kind("non-negative int", lambda v: _is_int(v) and v >= 0)
STR = _Kind("str", lambda v: isinstance(v, str))
BYTES = _Kind("bytes", lambda v: isinstance(v, (bytes, bytearray)))
BOOL = _Kind("bool", lambda v: isinstance(v, bool))
MAP = _Kind("map", lambda v: isinstance(v, dict))
LIST = _Kind("list", lambda v: isinstance(v, (list, tuple)))
ANY = _Kind("any", lambda v: True)
ADDR = _Kind("[host, port]", lambda v: isinstance(v, (list, tuple)) and len(v) == 2
             and isinstance(v[0], str) and _is_int(v[1]) and 0 <= v[1] <= 65535)
COUNTERS = _Kind("list of [cookie, packets, bytes]", lambda v: isinstance(v, (list, tuple)) and all(
    isinstance(e, (list, tuple)) and len(e) == 3 and all(_is_int(x) and x >= 0 for x in e) for e in v))
MEMBERS = _Kind("list of [host, port]", lambda v: isinstance(v, (list, tuple)) and all(ADDR.check(e) for e in v))
STATUS = _Kind("status", lambda v: isinstance(v, str) and v in Status.__members__)
ACTION = _Kind("action", lambda v: v in ("redirect", "copy", "drop", "multicast", "forward"))

QUERIES = ("status", "boosters", "rules", "counters", "directory")
# optional features a booster may announce in its hello
FEATURES = ("delegate",)   # it takes a socket given back with "delegate" after an "undelegate"
FEATURE_LIST = _Kind("list of feature names", lambda v: isinstance(v, (list, tuple)) and len(v) <= 16
                     and all(isinstance(f, str) and len(f) <= 32 for f in v))
QUERY = _Kind("query name", lambda v: v in QUERIES)

REQ, OPT = True, False

# type -> {field: (kind, required)}.  "t" is implicit.  "id" marks requests.
MESSAGES: dict[str, dict[str, tuple[_Kind, bool]]] = {
    # booster -> boxd: requests (answered by "reply" with the same id)
    # observer: boxctl's read-only session (queries only, no booster);
    # features: optional protocol features the booster speaks (FEATURES)
    "hello": {"id": (UINT, REQ), "name": (STR, REQ), "version": (UINT, REQ), "observer": (BOOL, OPT),
              "features": (FEATURE_LIST, OPT)},
    "rule": {"id": (UINT, REQ), "action": (ACTION, REQ), "match": (MAP, REQ),
             "priority": (INT, OPT), "group": (INT, OPT), "tcp": (BOOL, OPT)},
    "cancel": {"id": (UINT, REQ), "cookie": (UINT, REQ)},
    "set_multicast_group": {"id": (UINT, REQ), "group": (UINT, REQ), "members": (MEMBERS, REQ)},
    "send": {"id": (UINT, REQ), "packet": (MAP, REQ)},
    "dir_get": {"id": (UINT, REQ), "key": (STR, REQ)},
    "dir_put": {"id": (UINT, REQ), "key": (STR, REQ), "value": (ANY, REQ)},
    "dir_delete": {"id": (UINT, REQ), "key": (STR, REQ)},
    "dir_items": {"id": (UINT, REQ), "prefix": (STR, REQ)},
    "dir_watch": {"id": (UINT, REQ), "prefix": (STR, REQ)},
    "dir_unwatch": {"id": (UINT, REQ), "watch": (UINT, REQ)},
    # read-only management query (boxctl --control), after a hello (observer or booster)
    "query": {"id": (UINT, REQ), "what": (QUERY, REQ)},
    # booster -> boxd: one-way
    "heartbeat": {"counters": (COUNTERS, OPT), "handler_errors": (UINT, OPT)},
    "bye": {},
    # boxd -> booster
    "reply": {"id": (UINT, REQ), "status": (STATUS, REQ), "reason": (STR, OPT),
              "holder": (STR, OPT), "result": (ANY, OPT), "nfds": (UINT, OPT)},
    "dir_event": {"watch": (UINT, REQ), "key": (STR, REQ), "value": (ANY, OPT),
                  "deleted": (BOOL, REQ)},
    "stream": {"cookie": (UINT, REQ), "client": (ADDR, REQ), "original_dst": (ADDR, REQ),
               "nfds": (UINT, REQ)},
    "evicted": {"reason": (STR, REQ)},
    # a delegated socket is taken back: the rule's packets come on the data channel from now on
    "undelegate": {"cookie": (UINT, REQ)},
    # ... and given back (only to boosters whose hello listed the feature "delegate"): the socket
    # travels beside it, the rule's delivery is ``delivery`` again
    "delegate": {"cookie": (UINT, REQ), "delivery": (MAP, REQ), "nfds": (UINT, REQ)},
}

REQUESTS = frozenset(t for t, f in MESSAGES.items() if "id" in f and t != "reply")


def validate(msg: Any) -> dict[str, Any]:
    """Check a decoded control message against :data:`MESSAGES`; return it."""
    if not isinstance(msg, dict):
        raise WireDecodeError(f"message is a {type(msg).__name__}, not a map")
    kind = msg.get("t")
    if not isinstance(kind, str):
        raise WireDecodeError("message has no string 't' (type)")
    fields = MESSAGES.get(kind)
    if fields is None:
        raise WireDecodeError(f"unknown message type {kind!r}")
    for key, value in msg.items():
        if key == "t":
            continue
        spec = fields.get(key)
        if spec is None:
            raise WireDecodeError(f"{kind}: unknown field {key!r}")
        if value is None and not spec[1]:
            continue
        if not spec[0].check(value):
            raise WireDecodeError(f"{kind}: field {key!r} must be {spec[0].name}, got {value!r:.60}")
    for key, (_, required) in fields.items():
        if required and key not in msg:
            raise WireDecodeError(f"{kind}: missing field {key!r}")
    return msg


def encode(msg: dict[str, Any]) -> bytes:
    """One frame: the length prefix and the msgpack map (validated first)."""
    validate(msg)
    return framing.encode_frame(msg)


def request_id(msg: Any) -> int | None:
    """The ``id`` of a (possibly invalid) request, so an INVALID reply can name it."""
    if isinstance(msg, dict):
        rid = msg.get("id")
        if _is_int(rid) and rid >= 0:
            return rid
    return None


class FrameDecoder(framing.FrameDecoder):
    """The control protocol's framer: :class:`boxcore.framing.FrameDecoder` with this
    protocol's error.  Frames come back decoded but unvalidated (boxd needs the ``id`` of an
    invalid request to answer it); an undecodable body comes back as a
    :class:`WireDecodeError` in the list, a bad length raises :class:`boxcore.framing.FramingError`."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        super().__init__(max_frame, error=WireDecodeError)


# ------------------------------------------------------------------ data channel

class Tag(enum.IntEnum):
    PACKET = 0      # boxd -> booster
    VERDICT = 1     # booster -> boxd
    SEND = 2        # booster -> boxd: inject a packet
    MULTICAST = 3   # booster -> boxd: fan a payload out to a group
    PACKETS = 4     # boxd -> booster: several PACKET records in one datagram
    VERDICTS = 5    # booster -> boxd: several VERDICT records in one datagram


# batch tag -> the record each element of its one field is (fewer syscalls under load)
BATCHES = {Tag.PACKETS: Tag.PACKET, Tag.VERDICTS: Tag.VERDICT}
MAX_BATCH = 256
BATCH_BYTES = 32768   # flush a batch before it grows past this (datagram size bound)


class VerdictCode(enum.IntEnum):
    CONSUME = 0
    PASS = 1
    MODIFY = 2


_PORT = _Kind("port", lambda v: type(v) is int and 0 <= v <= 65535)
_PROTO = _Kind("protocol", lambda v: type(v) is int and 0 <= v <= 255)
_VERDICT = _Kind("verdict", lambda v: type(v) is int and 0 <= v <= 2)
_OPT_BYTES = _Kind("bytes or nil", lambda v: v is None or type(v) is bytes)
_UINT = _Kind("non-negative int", lambda v: type(v) is int and v >= 0)
_STR = _Kind("str", lambda v: type(v) is str)
_BYTES = _Kind("bytes", lambda v: type(v) is bytes)
_BOOL = _Kind("bool", lambda v: v is True or v is False)

# tag -> field names and kinds, in order after the tag
DATAGRAMS: dict[Tag, tuple[tuple[str, _Kind], ...]] = {
    Tag.PACKET: (("cookie", _UINT), ("token", _UINT), ("proto", _PROTO), ("src", _STR),
                 ("sport", _PORT), ("dst", _STR), ("dport", _PORT), ("payload", _BYTES),
                 ("want_verdict", _BOOL)),
    Tag.VERDICT: (("token", _UINT), ("verdict", _VERDICT), ("payload", _OPT_BYTES)),
    Tag.SEND: (("proto", _PROTO), ("src", _STR), ("sport", _PORT), ("dst", _STR),
               ("dport", _PORT), ("payload", _BYTES)),
    Tag.MULTICAST: (("group", _UINT), ("src_port", _PORT), ("payload", _BYTES)),
}

_packb = msgpack.Packer(use_bin_type=True).pack


def pack_datagram(tag: Tag, *values: Any) -> bytes:
    """Encode a data-channel datagram (fields in :data:`DATAGRAMS` order; not re-validated:
    the hot path builds them from already-valid values)."""
    return _packb([int(tag), *values])


def pack_batch(tag: Tag, records: list[list[Any]]) -> bytes:
    """Encode PACKETS / VERDICTS: several records (1..MAX_BATCH) in one datagram."""
    return _packb([int(tag), records])


_TAGS = {int(tag): tag for tag in Tag}
_CHECKS = {tag: tuple(kind.check for _, kind in fields) for tag, fields in DATAGRAMS.items()}


def _check_record(tag: Tag, values: Any) -> None:
    checks = _CHECKS[tag]
    if type(values) is not list or len(values) != len(checks):
        got = len(values) if type(values) is list else type(values).__name__
        raise WireDecodeError(f"{tag.name}: {got} fields, expected {len(checks)}")
    for check, value in zip(checks, values):
        if not check(value):
            for (name, kind), bad in zip(DATAGRAMS[tag], values):
                if not kind.check(bad):
                    raise WireDecodeError(f"{tag.name}: field {name!r} must be {kind.name}")
_unpackb = msgpack.unpackb


def unpack_datagram(data: bytes) -> tuple[Tag, list[Any]]:
    """Decode and validate one data-channel datagram (on the per-packet path: kept lean)."""
    try:
        obj = _unpackb(data, raw=False)
    except Exception as exc:
        raise WireDecodeError(f"undecodable datagram: {type(exc).__name__}") from None
    if type(obj) is not list or not obj:
        raise WireDecodeError("datagram is not a non-empty array")
    first = obj[0]
    tag = _TAGS.get(first) if type(first) is int else None
    if tag is None:
        raise WireDecodeError(f"unknown datagram tag {first!r:.20}")
    values = obj[1:]
    record = BATCHES.get(tag)
    if record is None:
        _check_record(tag, values)
        return tag, values
    # a batch: [tag, [record, record, ...]] -> (tag, [records])
    if len(values) != 1 or type(values[0]) is not list or not 1 <= len(values[0]) <= MAX_BATCH:
        raise WireDecodeError(f"{tag.name}: expected one list of 1..{MAX_BATCH} records")
    for item in values[0]:
        _check_record(record, item)
    return tag, values[0]


def packet_to_wire(pkt: Any) -> dict[str, Any]:
    return {"proto": pkt.proto, "src": pkt.src, "sport": pkt.sport, "dst": pkt.dst,
            "dport": pkt.dport, "payload": bytes(pkt.payload)}


def packet_from_wire(data: dict[str, Any]) -> Any:
    """A Packet from the ``send`` message's ``packet`` map (strict)."""
    from boxcore.packet import Packet

    spec = DATAGRAMS[Tag.SEND]
    if set(data) != {name for name, _ in spec}:
        raise WireDecodeError(f"packet needs exactly the fields {[n for n, _ in spec]}")
    for name, kind in spec:
        if not kind.check(data[name]):
            raise WireDecodeError(f"packet: field {name!r} must be {kind.name}")
    return Packet(proto=data["proto"], src=data["src"], sport=data["sport"], dst=data["dst"],
                  dport=data["dport"], payload=bytes(data["payload"]))
