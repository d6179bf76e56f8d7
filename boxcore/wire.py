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
wrong; callers count and drop.  :class:`FramedConnection` is the thin asyncio
adapter for the control connection (frames + descriptors, bounded output).
"""

from __future__ import annotations

import array
import asyncio
import collections
import enum
import logging
import os
import socket
import struct
from typing import Any, Callable, Iterable

import msgpack

log = logging.getLogger("boxcore.wire")

PROTOCOL_VERSION = 1
LENGTH = struct.Struct("!I")
DEFAULT_MAX_FRAME = 1 << 20          # 1 MiB: a directory value plus room
MAX_FDS_PER_RECV = 16
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
QUERY = _Kind("query name", lambda v: v in QUERIES)

REQ, OPT = True, False

# type -> {field: (kind, required)}.  "t" is implicit.  "id" marks requests.
MESSAGES: dict[str, dict[str, tuple[_Kind, bool]]] = {
    # booster -> boxd: requests (answered by "reply" with the same id)
    "hello": {"id": (UINT, REQ), "name": (STR, REQ), "version": (UINT, REQ)},
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
    # read-only management query (boxctl --control); allowed before hello
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
    body = msgpack.packb(msg, use_bin_type=True)
    return LENGTH.pack(len(body)) + body


def request_id(msg: Any) -> int | None:
    """The ``id`` of a (possibly invalid) request, so an INVALID reply can name it."""
    if isinstance(msg, dict):
        rid = msg.get("id")
        if _is_int(rid) and rid >= 0:
            return rid
    return None


class FrameDecoder:
    """Sans-IO: bytes in, decoded (unvalidated) messages out.

    A bad length is fatal to the stream (boundaries are lost): :meth:`feed`
    raises and the connection should be closed.  A frame whose body is not a
    msgpack map is returned as :class:`BadFrame` so the caller can answer
    INVALID and keep the session.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        out: list[Any] = []
        while len(self._buf) >= LENGTH.size:
            (length,) = LENGTH.unpack_from(self._buf)
            if length == 0 or length > self.max_frame:
                raise WireDecodeError(f"frame length {length} outside 1..{self.max_frame}")
            if len(self._buf) < LENGTH.size + length:
                break
            body = bytes(self._buf[LENGTH.size:LENGTH.size + length])
            del self._buf[:LENGTH.size + length]
            try:
                out.append(msgpack.unpackb(body, raw=False, strict_map_key=True))
            except Exception as exc:  # msgpack raises several types for garbage
                out.append(BadFrame(f"undecodable msgpack: {type(exc).__name__}: {exc}"))
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)


class BadFrame:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"BadFrame({self.reason!r})"


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


def socketpair_dgram(bufsize: int = 4 << 20) -> tuple[socket.socket, socket.socket]:
    """A data channel: a non-blocking Unix datagram socketpair with big buffers."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (a, b):
        s.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, bufsize)
            except OSError:
                pass
    return a, b


# ------------------------------------------------------------------ asyncio adapter

class FramedConnection:
    """A control connection on a non-blocking Unix stream socket, with descriptors.

    ``on_message(msg, fds)`` gets every decoded frame (a dict, or a
    :class:`BadFrame`) and the descriptors it declared with ``nfds`` (the
    receiver owns them).  ``on_close(reason)`` runs once when the peer goes away
    or the stream is broken.  Output is bounded by ``max_output``: a peer that
    does not read is disconnected rather than buffered forever.
    """

    def __init__(self, sock: socket.socket, on_message: Callable[[Any, list[int]], None],
                 on_close: Callable[[str], None], *, max_frame: int = DEFAULT_MAX_FRAME,
                 max_output: int = 8 << 20, loop: asyncio.AbstractEventLoop | None = None,
                 accept_fds: bool = True) -> None:
        sock.setblocking(False)
        # boxd's side: boosters never send descriptors, so any that arrive are closed
        # and a message's "nfds" is left to validation (INVALID), not fatal pairing.
        self.accept_fds = accept_fds
        self.sock = sock
        self.loop = loop or asyncio.get_running_loop()
        self.decoder = FrameDecoder(max_frame)
        self.on_message = on_message
        self.on_close = on_close
        self.max_output = max_output
        self._fds: collections.deque[int] = collections.deque()
        self._out: collections.deque[tuple[memoryview, list[int], bool]] = collections.deque()
        self._out_bytes = 0
        self._writing = False
        self.closed = False
        self.frames_in = 0
        self.frames_out = 0
        self.loop.add_reader(sock.fileno(), self._on_readable)

    # reading
    def _on_readable(self) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, 262144, MAX_FDS_PER_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"read error: {exc}")
            return
        if self.accept_fds:
            self._fds.extend(fds)
        else:
            for fd in fds:
                _close_fd(fd)
        if flags & getattr(socket, "MSG_CTRUNC", 0) and self.accept_fds:
            self.close("descriptors truncated")
            return
        if not data:
            self.close("peer closed")
            return
        try:
            messages = self.decoder.feed(data)
        except WireDecodeError as exc:
            self.close(f"broken stream: {exc}")
            return
        for msg in messages:
            if self.closed:
                return
            nfds = msg.get("nfds", 0) if isinstance(msg, dict) and self.accept_fds else 0
            if not _is_int(nfds) or nfds < 0:
                nfds = 0  # not a count: validation will say so
            if nfds > len(self._fds):
                self.close(f"message declares {nfds!r} descriptors, {len(self._fds)} received")
                return
            fds_for = [self._fds.popleft() for _ in range(nfds)]
            self.frames_in += 1
            self.on_message(msg, fds_for)

    # writing
    def send(self, msg: dict[str, Any], fds: Iterable[int] = (), *, close_fds: bool = False) -> bool:
        """Queue one message with descriptors (the peer gets duplicates).

        With ``close_fds`` the connection owns ``fds`` and closes them once sent
        (or when it closes first).
        """
        fds = list(fds)
        if self.closed:
            if close_fds:
                for fd in fds:
                    _close_fd(fd)
            return False
        if fds:
            msg = dict(msg, nfds=len(fds))
        frame = encode(msg)
        if self._out_bytes + len(frame) > self.max_output:
            if close_fds:
                for fd in fds:
                    _close_fd(fd)
            self.close("peer not reading: output limit reached")
            return False
        self._out.append((memoryview(frame), fds, close_fds))
        self._out_bytes += len(frame)
        self.frames_out += 1
        self._flush()
        return True

    def _flush(self) -> None:
        while self._out:
            view, fds, owned = self._out[0]
            try:
                if fds:
                    sent = self.sock.sendmsg([view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                       array.array("i", fds))])
                else:
                    sent = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.close(f"write error: {exc}")
                return
            self._out_bytes -= sent
            if owned:
                for fd in fds:
                    _close_fd(fd)
            if sent < len(view):
                self._out[0] = (view[sent:], [], False)  # descriptors went with the first byte
                break
            self._out.popleft()
        if self._out and not self._writing:
            self.loop.add_writer(self.sock.fileno(), self._flush)
            self._writing = True
        elif not self._out and self._writing:
            self.loop.remove_writer(self.sock.fileno())
            self._writing = False

    def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.remove_reader(self.sock.fileno())
            if self._writing:
                self.loop.remove_writer(self.sock.fileno())
        except (ValueError, OSError):
            pass
        while self._fds:
            _close_fd(self._fds.popleft())
        for _, fds, owned in self._out:
            if owned:
                for fd in fds:
                    _close_fd(fd)
        self._out.clear()
        self.sock.close()
        self.on_close(reason)


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)
