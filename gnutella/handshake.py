"""Gnutella connection handshakes, sans-IO: 0.6 (three-way, headers, status codes) and 0.4.

0.6::

    client: GNUTELLA CONNECT/0.6<CRLF>headers<CRLF><CRLF>
    server: GNUTELLA/0.6 200 OK<CRLF>headers<CRLF><CRLF>        (or 503 ... with X-Try-Ultrapeers)
    client: GNUTELLA/0.6 200 OK<CRLF>headers<CRLF><CRLF>        (or a refusal of its own)

0.4::

    client: GNUTELLA CONNECT/0.4<LF><LF>
    server: GNUTELLA OK<LF><LF>

:class:`Handshake` consumes bytes and yields events; the owner decides (with
:func:`decide_incoming` for a server) and calls ``respond``/``confirm`` to get
the bytes to send.  Bytes that follow the handshake in the same read are
handed on in :class:`Established` so no message is lost.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Mapping

DEFAULT_MAX_HEADER_BYTES = 16 * 1024
DEFAULT_MAX_HEADERS = 64

CONNECT_06 = b"GNUTELLA CONNECT/0.6"
CONNECT_04 = b"GNUTELLA CONNECT/0.4"
OK_04 = b"GNUTELLA OK\n\n"


class HandshakeError(ValueError):
    """A malformed or oversized handshake; the message says what was wrong."""


class Headers:
    """Case-insensitive handshake headers that keep their order and spelling."""

    def __init__(self, items: Iterable[tuple[str, str]] | Mapping[str, str] = ()) -> None:
        self._items: list[tuple[str, str]] = []
        pairs = items.items() if isinstance(items, Mapping) else items
        for name, value in pairs:
            self[name] = value

    def __setitem__(self, name: str, value: str) -> None:
        low = name.lower()
        self._items = [(n, v) for n, v in self._items if n.lower() != low]
        self._items.append((name, str(value)))

    def get(self, name: str, default: str | None = None) -> str | None:
        low = name.lower()
        for n, v in self._items:
            if n.lower() == low:
                return v
        return default

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def flag(self, name: str) -> bool | None:
        value = self.get(name)
        if value is None:
            return None
        return value.strip().lower() in ("true", "1", "yes")

    def int(self, name: str, default: int = 0) -> int:
        value = self.get(name)
        try:
            return int(value.strip()) if value is not None else default
        except ValueError:
            return default

    def encode(self) -> bytes:
        return b"".join(f"{n}: {v}\r\n".encode("latin-1", "replace") for n, v in self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


def parse_header_lines(lines: list[bytes], max_headers: int = DEFAULT_MAX_HEADERS) -> Headers:
    headers: list[tuple[str, str]] = []
    for raw in lines:
        line = raw.decode("latin-1")
        if line[:1] in (" ", "\t"):
            if not headers:
                raise HandshakeError("continuation line before any header")
            name, value = headers[-1]
            headers[-1] = (name, value + " " + line.strip())
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or " " in name.strip():
            raise HandshakeError(f"bad header line {line[:60]!r}")
        headers.append((name.strip(), value.strip()))
        if len(headers) > max_headers:
            raise HandshakeError(f"more than {max_headers} headers")
    return Headers(headers)


# ---------------------------------------------------------------- events

@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """Server side: a client asked to connect."""
    version: str             # "0.6" or "0.4"
    headers: Headers


@dataclass(frozen=True, slots=True)
class Response:
    """Client side: the server answered (code 200 means go on with ``confirm``)."""
    code: int
    reason: str
    headers: Headers


@dataclass(frozen=True, slots=True)
class Established:
    """Both sides agreed; ``leftover`` is the start of the message stream."""
    version: str
    headers: Headers          # the remote side's headers (final ones merged in)
    leftover: bytes


@dataclass(frozen=True, slots=True)
class Refused:
    """The other side refused (server's 503 seen by a client, or a client's final refusal)."""
    code: int
    reason: str
    headers: Headers


# ---------------------------------------------------------------- state machine

@dataclass
class Handshake:
    role: str                               # "client" | "server"
    version: str = "0.6"                    # client: which handshake to send
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    state: str = "start"
    remote: Headers = field(default_factory=Headers)
    _buf: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        if self.role not in ("client", "server"):
            raise ValueError("role is client or server")
        if self.version not in ("0.6", "0.4"):
            raise ValueError("version is 0.6 or 0.4")
        self.state = "send_connect" if self.role == "client" else "read_connect"

    # client
    def connect(self, headers: Headers) -> bytes:
        if self.state != "send_connect":
            raise RuntimeError(f"connect() in state {self.state}")
        self.state = "read_response"
        if self.version == "0.4":
            return CONNECT_04 + b"\n\n"
        return CONNECT_06 + b"\r\n" + headers.encode() + b"\r\n"

    def confirm(self, headers: Headers) -> tuple[bytes, Established]:
        if self.state != "confirm":
            raise RuntimeError(f"confirm() in state {self.state}")
        self.state = "established"
        leftover = bytes(self._buf)
        self._buf.clear()
        return (b"GNUTELLA/0.6 200 OK\r\n" + headers.encode() + b"\r\n",
                Established("0.6", self.remote, leftover))

    def refuse_final(self, code: int, reason: str) -> bytes:
        if self.state != "confirm":
            raise RuntimeError(f"refuse_final() in state {self.state}")
        self.state = "closed"
        return f"GNUTELLA/0.6 {code} {reason}\r\n\r\n".encode("latin-1", "replace")

    # server
    def respond(self, code: int, reason: str, headers: Headers) -> tuple[bytes, Established | None]:
        if self.state != "respond":
            raise RuntimeError(f"respond() in state {self.state}")
        if self.version == "0.4":
            if code != 200:
                self.state = "closed"
                return b"", None     # 0.4 has no refusal message: just close
            self.state = "established"
            leftover = bytes(self._buf)
            self._buf.clear()
            return OK_04, Established("0.4", self.remote, leftover)
        self.state = "read_final" if code == 200 else "closed"
        return (f"GNUTELLA/0.6 {code} {reason}\r\n".encode("latin-1", "replace")
                + headers.encode() + b"\r\n"), None

    # both
    def receive_data(self, data: bytes) -> list[object]:
        self._buf += data
        events: list[object] = []
        while True:
            event = self._step()
            if event is None:
                return events
            events.append(event)

    def _take_block(self) -> list[bytes] | None:
        """The next header block (lines, without the blank line), or None if incomplete."""
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        sep = 4
        lf_end = buf.find(b"\n\n")
        if lf_end >= 0 and (end < 0 or lf_end < end):
            end, sep = lf_end, 2
        if end < 0:
            if len(buf) > self.max_header_bytes:
                raise HandshakeError(f"handshake header block exceeds {self.max_header_bytes} bytes")
            return None
        if end > self.max_header_bytes:
            raise HandshakeError(f"handshake header block exceeds {self.max_header_bytes} bytes")
        block = bytes(buf[:end])
        del buf[:end + sep]
        return [line.rstrip(b"\r") for line in block.split(b"\n")]

    def _step(self) -> object | None:
        if self.state == "read_connect":
            lines = self._take_block()
            if lines is None:
                if len(self._buf) >= len(CONNECT_06) and not self._buf.startswith(b"GNUTELLA CONNECT/"):
                    raise HandshakeError(f"not a Gnutella connect: {bytes(self._buf[:30])!r}")
                return None
            first = lines[0].strip()
            if first == CONNECT_04:
                self.version = "0.4"
                self.state = "respond"
                self.remote = Headers()
                return ConnectRequest("0.4", self.remote)
            if not first.startswith(b"GNUTELLA CONNECT/"):
                raise HandshakeError(f"not a Gnutella connect: {first[:40]!r}")
            version = first[len(b"GNUTELLA CONNECT/"):].decode("latin-1")
            try:
                if float(version) < 0.6:
                    raise HandshakeError(f"unsupported handshake version {version}")
            except ValueError:
                raise HandshakeError(f"bad handshake version {version!r}") from None
            self.version = "0.6"
            self.remote = parse_header_lines(lines[1:])
            self.state = "respond"
            return ConnectRequest("0.6", self.remote)
        if self.state == "read_response":
            if self.version == "0.4":
                if len(self._buf) < len(OK_04):
                    return None
                if not self._buf.startswith(OK_04):
                    raise HandshakeError(f"bad 0.4 answer {bytes(self._buf[:20])!r}")
                del self._buf[:len(OK_04)]
                self.state = "established"
                leftover = bytes(self._buf)
                self._buf.clear()
                return Established("0.4", Headers(), leftover)
            lines = self._take_block()
            if lines is None:
                return None
            code, reason = _status_line(lines[0])
            self.remote = parse_header_lines(lines[1:])
            if code != 200:
                self.state = "closed"
                return Refused(code, reason, self.remote)
            self.state = "confirm"
            return Response(code, reason, self.remote)
        if self.state == "read_final":
            lines = self._take_block()
            if lines is None:
                return None
            code, reason = _status_line(lines[0])
            final = parse_header_lines(lines[1:])
            if code != 200:
                self.state = "closed"
                return Refused(code, reason, final)
            for name, value in final.items():
                self.remote[name] = value
            self.state = "established"
            leftover = bytes(self._buf)
            self._buf.clear()
            return Established("0.6", self.remote, leftover)
        return None


def _status_line(line: bytes) -> tuple[int, str]:
    text = line.decode("latin-1").strip()
    parts = text.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("GNUTELLA/"):
        raise HandshakeError(f"bad status line {text[:60]!r}")
    try:
        code = int(parts[1])
    except ValueError:
        raise HandshakeError(f"bad status code in {text[:60]!r}") from None
    return code, parts[2] if len(parts) > 2 else ""


# ---------------------------------------------------------------- policy

@dataclass(frozen=True, slots=True)
class Identity:
    """What a node says about itself in its handshake headers."""
    guid: bytes
    ip: str
    port: int
    ultrapeer: bool
    user_agent: str = "booster-boxes/0.1"
    degree: int = 32
    max_ttl: int = 4


def identity_headers(me: Identity, remote_ip: str | None = None) -> Headers:
    """Headers that satisfy gtk-gnutella: X-Ultrapeer always; as an ultrapeer X-Degree >= 16
    and X-Dynamic-Querying (its leaves refuse ultrapeers without them)."""
    h = Headers()
    h["User-Agent"] = me.user_agent
    if me.port:                       # port 0: nothing listens, nothing to advertise
        h["Listen-IP"] = f"{me.ip}:{me.port}"
    if remote_ip:
        h["Remote-IP"] = remote_ip
    h["GUID"] = me.guid.hex()
    h["Pong-Caching"] = "0.1"
    h["Bye-Packet"] = "0.1"
    h["GGEP"] = "0.5"
    h["Vendor-Message"] = "0.2"
    h["X-Query-Routing"] = "0.2"
    h["X-Ultrapeer"] = "True" if me.ultrapeer else "False"
    h["X-Ultrapeer-Query-Routing"] = "0.1"
    h["X-Degree"] = str(me.degree)
    h["X-Max-TTL"] = str(me.max_ttl)
    h["X-Dynamic-Querying"] = "0.1"
    h["X-Requeries"] = "False"
    return h


def parse_address(text: str) -> tuple[str, int] | None:
    """``a.b.c.d:port`` as a dialable IPv4 address (port 1..65535, dotted quad in canonical
    form), else None: what a peer names in a header ends up in pongs and dials, whose wire
    formats hold exactly that."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or len(port) > 5:
        return None
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        return None
    number = int(port)
    if not 1 <= number <= 65535 or ip.is_unspecified:
        return None
    return str(ip), number


def listen_address(headers: Headers) -> tuple[str, int] | None:
    """The address a peer listens on, from Listen-IP, X-My-Address or gtk-gnutella's Node
    (the first that holds a valid :func:`parse_address`)."""
    for name in ("Listen-IP", "X-My-Address", "Node"):
        value = headers.get(name)
        if value:
            address = parse_address(value)
            if address is not None:
                return address
    return None


MAX_TRY_HOSTS = 50


def try_addresses(headers: Headers) -> tuple[list[tuple[str, int]], int]:
    """The hosts of ``X-Try-Ultrapeers`` and ``X-Try`` (at most :data:`MAX_TRY_HOSTS`), and how
    many items were refused (invalid, or past the cap)."""
    hosts: list[tuple[str, int]] = []
    refused = 0
    for name in ("X-Try-Ultrapeers", "X-Try"):
        for item in (headers.get(name) or "").split(","):
            if not item.strip():
                continue
            address = parse_address(item)
            if address is None or len(hosts) >= MAX_TRY_HOSTS:
                refused += 1
            else:
                hosts.append(address)
    return hosts, refused


def remote_guid(headers: Headers) -> bytes | None:
    value = headers.get("GUID")
    if value is None:
        return None
    try:
        raw = bytes.fromhex(value.strip())
    except ValueError:
        return None
    return raw if len(raw) == 16 else None


@dataclass(frozen=True, slots=True)
class Decision:
    code: int
    reason: str
    as_leaf: bool = False        # the remote will be our leaf (we are its ultrapeer)

    @property
    def accepted(self) -> bool:
        return self.code == 200


@dataclass
class SlotState:
    """What a servent knows when deciding on an incoming connection."""
    ultrapeer: bool
    my_guid: bytes
    peers: int = 0                 # ultrapeer-ultrapeer (or flat) connections
    max_peers: int = 8
    leaves: int = 0
    max_leaves: int = 30
    ultrapeers: int = 0            # as a leaf: our ultrapeers
    max_ultrapeers: int = 3
    connected_guids: set[bytes] = field(default_factory=set)
    allow_04: bool = True


def decide_incoming(request: ConnectRequest, slots: SlotState) -> Decision:
    """Acceptance rules for an incoming connection.

    - A GUID equal to ours (a loop to ourselves) or to a connected peer's: 409.
    - 0.4 peers (and 0.6 without X-Ultrapeer) are flat peers: accepted while peer slots last.
    - A leaf refuses other leaves (503) and takes ultrapeers while it wants more.
    - An ultrapeer takes leaves while leaf slots last and ultrapeers while peer slots last.
    Refusals are 503 with X-Try-Ultrapeers added by the caller.
    """
    headers = request.headers
    if request.version == "0.4":
        if not slots.allow_04:
            return Decision(503, "0.4 handshakes not accepted")
        if not slots.ultrapeer:
            return Decision(503, "I am a leaf")
        return Decision(200, "OK") if slots.peers < slots.max_peers else Decision(503, "Too many connections")
    guid = remote_guid(headers)
    if guid is not None:
        if guid == slots.my_guid:
            return Decision(409, "Connected to self")
        if guid in slots.connected_guids:
            return Decision(409, "Already connected")
    remote_up = headers.flag("X-Ultrapeer")
    if not slots.ultrapeer:
        if remote_up is False:
            return Decision(503, "I am a leaf")
        if slots.ultrapeers >= slots.max_ultrapeers:
            return Decision(503, "Have enough ultrapeers")
        return Decision(200, "OK")
    if remote_up is False:
        if slots.leaves >= slots.max_leaves:
            return Decision(503, "Too many leaves")
        return Decision(200, "OK", as_leaf=True)
    if slots.peers >= slots.max_peers:
        return Decision(503, "Too many ultrapeers")
    return Decision(200, "OK")


def check_outgoing(response: Response, me: Identity) -> Decision:
    """Whether a client goes on after the server's 200 (the third step of the handshake).

    A leaf wants an ultrapeer with a usable degree and dynamic querying (the
    same demands gtk-gnutella makes), an ultrapeer takes either kind."""
    remote_up = response.headers.flag("X-Ultrapeer")
    if not me.ultrapeer:
        if remote_up is False:
            return Decision(503, "I am a leaf, need an ultrapeer")
        if remote_up and response.headers.int("X-Degree", 0) < 16 and "X-Degree" in response.headers:
            return Decision(503, "Ultrapeer degree too low")
    return Decision(200, "OK", as_leaf=bool(me.ultrapeer and remote_up is False))


# ---------------------------------------------------------------- stream compression and TLS

@dataclass(frozen=True, slots=True)
class LinkOptions:
    """What this side offers and accepts on a link: deflate (both directions) and the TLS upgrade."""
    compress: bool = True
    tls: bool = True


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What the handshake settled: compression of each direction, and TLS after the third step."""
    deflate_out: bool = False
    inflate_in: bool = False
    tls: bool = False


def _has(headers: Headers, name: str, token: str) -> bool:
    return token in [t.strip().lower() for t in (headers.get(name) or "").split(",")]


def _offers_tls(headers: Headers) -> bool:
    return any(t.strip().lower().startswith("tls/") for t in (headers.get("Upgrade") or "").split(","))


def offer_headers(headers: Headers, options: LinkOptions) -> Headers:
    """The first step (``GNUTELLA CONNECT``): offer deflate and the TLS upgrade, as gtk-gnutella does."""
    if options.tls:
        headers["Upgrade"] = "TLS/1.0"
    if options.compress:
        headers["Accept-Encoding"] = "deflate"
    return headers


def answer_headers(headers: Headers, request: Headers, options: LinkOptions) -> Headers:
    """The second step (a 200): accept what the client offered and we allow; offer deflate ourselves."""
    if options.tls and _offers_tls(request):
        headers["Upgrade"] = "TLS/1.0"
        headers["Connection"] = "Upgrade"
    if options.compress:
        headers["Accept-Encoding"] = "deflate"
        if _has(request, "Accept-Encoding", "deflate"):
            headers["Content-Encoding"] = "deflate"
    return headers


def final_headers(response: Headers, options: LinkOptions, offered_tls: bool) -> Headers:
    """The third step carries only what it settles (no repeat of the first step's headers):
    ``Connection: Upgrade`` when the server took our TLS offer, ``Content-Encoding: deflate`` when it
    accepts deflate."""
    headers = Headers()
    if offered_tls and options.tls and _offers_tls(response) and _has(response, "Connection", "upgrade"):
        headers["Connection"] = "Upgrade"
    if options.compress and _has(response, "Accept-Encoding", "deflate"):
        headers["Content-Encoding"] = "deflate"
    return headers


def negotiated(role: str, sent: Headers, received: Headers) -> Negotiated:
    """From our last block (server: the response; client: the final step) and the remote's headers
    (server: request with the final merged in; client: the response)."""
    tls = (_has(sent, "Connection", "upgrade") if role == "client"
           else _offers_tls(sent) and _has(sent, "Connection", "upgrade") and _has(received, "Connection", "upgrade"))
    return Negotiated(deflate_out=_has(sent, "Content-Encoding", "deflate"),
                      inflate_in=_has(received, "Content-Encoding", "deflate"), tls=tls)
