"""HTTP file transfer on the servent's port (h11, sans-IO): uploads, downloads, push (GIV), TLS upgrade.

Requests served::

    GET /get/<index>/<name> HTTP/1.1              by index (the name must match)
    GET /uri-res/N2R?urn:sha1:<BASE32> HTTP/1.1   by SHA-1
    Range: bytes=<first>-[<last>]                 206 Partial Content with Content-Range

Answers follow gtk-gnutella 1.2.3 (the captures in ``tests/gnutella/fixtures``): an HTTP/1.1
request without ``Host`` gets ``400 Missing Host Header``, an unknown file ``404 Not Found``, a
malformed or reversed range ``400 Malformed Range request``, and a range that starts at or past
the end of the file is clamped to the last byte (206), never 416.  A GET carrying
``Upgrade: TLS/1.0`` and ``Connection: Upgrade`` is answered ``101 Switching Protocols``, both
sides run TLS on the socket and the response follows inside TLS without the request being sent
again.  The request decision (:func:`plan_upload`) is pure; the file is read off the event loop.

A firewalled servent that receives a PUSH connects to the requester and sends
``GIV <index>:<servent guid hex>/<name>\\n\\n``; the requester then sends its GET on that same
connection.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import re
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import h11

from cliruntime.supervisor import within
from .channel import Channel, TlsContexts
from .share import ShareIndex, SharedFile

MAX_REQUEST_HEAD = 8192          # h11's bound on a request's line and headers
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")
_GIV = re.compile(r"^GIV (\d+):([0-9a-fA-F]{32})/(.*)$")
FILE_CHUNK = 1 << 16
USER_AGENT = "booster-boxes/0.1"


class HttpError(Exception):
    pass


class BadRange(ValueError):
    """A Range header that is not one well-formed byte range."""


@dataclass(frozen=True, slots=True)
class Giv:
    index: int
    servent_guid: bytes
    name: str


def parse_giv(line: str) -> Giv:
    match = _GIV.match(line.strip())
    if not match:
        raise HttpError(f"bad GIV line {line[:80]!r}")
    return Giv(int(match.group(1)), bytes.fromhex(match.group(2)), match.group(3))


def format_giv(index: int, servent_guid: bytes, name: str) -> bytes:
    return f"GIV {index}:{servent_guid.hex()}/{name}\n\n".encode("utf-8")


def parse_range(value: str, size: int) -> tuple[int, int]:
    """(first, last) inclusive for a single byte range, as gtk-gnutella serves it.

    A range starting at or past the end is clamped to the last byte; a malformed range, a
    reversed one or an empty suffix raises :class:`BadRange`."""
    match = _RANGE.match(value)
    if not match:
        raise BadRange(f"not a byte range: {value[:60]!r}")
    first_s, last_s = match.groups()
    if first_s == "" and last_s == "":
        raise BadRange("empty byte range")
    if size == 0:
        raise BadRange("range of an empty file")
    if first_s == "":                      # suffix: the last N bytes
        length = int(last_s)
        if length == 0:
            raise BadRange("zero-length suffix range")
        return max(0, size - length), size - 1
    first = int(first_s)
    last = int(last_s) if last_s else max(first, size - 1)
    if last < first:
        raise BadRange(f"range {first}-{last} ends before it starts")
    first = min(first, size - 1)
    return first, max(first, min(last, size - 1))


def resolve(path: str, shares: ShareIndex) -> SharedFile | None:
    if path.startswith("/uri-res/N2R?"):
        urn = urllib.parse.unquote(path[len("/uri-res/N2R?"):])
        if urn.lower().startswith("urn:sha1:"):
            return shares.by_sha1.get(urn[9:].upper())
        return None
    if path.startswith("/get/"):
        index_s, _, name = path[len("/get/"):].partition("/")
        if not index_s.isdigit():
            return None
        shared = shares.get(int(index_s))
        if shared is None or urllib.parse.unquote(name) != shared.name:
            return None
        return shared
    return None


def http_date(when: float) -> str:
    return email.utils.formatdate(when, usegmt=True)


def features(tls: bool) -> str:
    return "tls/1.0" if tls else ""


@dataclass
class UploadPlan:
    """What to answer to one request: status, headers, and the byte range of the file to send."""
    status: int
    reason: str
    headers: list[tuple[str, str]]
    file: SharedFile | None = None
    first: int = 0
    length: int = 0
    counter: str = "uploads"
    upgrade_tls: bool = False


def wants_tls_upgrade(headers: dict[str, str]) -> bool:
    return ("tls/1.0" in headers.get("upgrade", "").lower()
            and "upgrade" in headers.get("connection", "").lower())


def plan_upload(method: str, target: str, headers: dict[str, str], shares: ShareIndex, server_name: str,
                now: float, tls_offered: bool = False) -> UploadPlan:
    """The answer to one request (headers lower-cased), without I/O."""
    base = [("Server", server_name), ("Date", http_date(now)), ("Connection", "close")]
    if method not in ("GET", "HEAD"):
        return UploadPlan(405, "Method Not Allowed", base, counter="http_bad_requests")
    shared = resolve(target, shares)
    if shared is None:
        return UploadPlan(404, "Not Found", base, counter="http_not_found")
    described = base[:]
    if tls_offered:
        described.append(("X-Features", features(True)))
    size = shared.size
    first, last, status, reason = 0, size - 1, 200, "OK"
    if "range" in headers:
        try:
            first, last = parse_range(headers["range"], size)
        except BadRange:
            return UploadPlan(400, "Malformed Range request",
                              described + [("Retry-After", "10"), ("X-Gnutella-Content-URN", shared.urn)],
                              counter="http_bad_range")
        status, reason = 206, "Partial Content"
        described.append(("Content-Range", f"bytes {first}-{last}/{size}"))
    length = max(0, last - first + 1)
    quoted = urllib.parse.quote(shared.name, safe="")
    described += [("Content-Length", str(length)),
                  ("Last-Modified", http_date(shared.path.stat().st_mtime)),
                  ("Content-Type", "application/octet-stream"),
                  ("Content-Disposition", f"inline; filename*=\"utf-8'en'{quoted}\""),
                  ("X-Gnutella-Content-URN", shared.urn)]
    return UploadPlan(status, reason, described, shared, first, length if method == "GET" else 0,
                      upgrade_tls=tls_offered and wants_tls_upgrade(headers))


def _read_chunk(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read(size)


async def _next_event(conn: h11.Connection, channel: Channel):
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await channel.read())


async def serve_upload(channel: Channel, shares: ShareIndex, initial: bytes, server_name: str, stats,
                       tls: TlsContexts | None = None, header_timeout: float = 10.0) -> None:
    """Answer one HTTP request for a shared file (the caller closes the connection)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    if initial:
        conn.receive_data(initial)        # (h11 reads b"" as the end of the stream)
    try:
        request = await within(_next_event(conn, channel), header_timeout)
    except h11.RemoteProtocolError as exc:
        missing_host = "Host" in str(exc)
        stats["http_missing_host" if missing_host else "http_bad_requests"] += 1
        reason = "Missing Host Header" if missing_host else "Bad Request"
        channel.write(conn.send(h11.Response(status_code=400, reason=reason.encode(), headers=[
            ("Server", server_name), ("Date", http_date(time.time())), ("Connection", "close")])))
        await channel.drain()
        return
    except asyncio.TimeoutError:
        stats["http_header_timeouts"] += 1
        return
    if not isinstance(request, h11.Request):
        stats["http_bad_requests"] += 1
        return
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
    plan = plan_upload(request.method.decode("latin-1"), request.target.decode("latin-1"), headers, shares,
                       server_name, time.time(), tls_offered=tls is not None)
    # a client that stalls in the TLS upgrade or stops reading the body holds the upload for at most
    # header_timeout at each step (slowloris)
    try:
        if plan.upgrade_tls and tls is not None:
            channel.write(conn.send(h11.InformationalResponse(status_code=101, reason=b"Switching Protocols", headers=[
                ("Server", server_name), ("Date", http_date(time.time())),
                ("Upgrade", "TLS/1.0, HTTP/1.1"), ("Connection", "Upgrade")])))
            await within(channel.drain(), header_timeout)
            leftover, _ = conn.trailing_data
            await within(channel.start_tls(tls.server, server_side=True, leftover=leftover), header_timeout)
            stats["http_tls_upgrades"] += 1
            # the response follows inside TLS for the request already received
            conn = h11.Connection(h11.SERVER)
            conn.receive_data(_replay_request(request))
            conn.next_event()
        channel.write(conn.send(h11.Response(status_code=plan.status, reason=plan.reason.encode(),
                                             headers=plan.headers)))
        if plan.file is not None and plan.length:
            offset, remaining = plan.first, plan.length
            while remaining:
                chunk = await asyncio.to_thread(_read_chunk, plan.file.path, offset, min(remaining, FILE_CHUNK))
                if not chunk:
                    break                      # the file shrank: the short body tells the client
                channel.write(chunk)
                offset += len(chunk)
                remaining -= len(chunk)
                await within(channel.drain(), header_timeout)
            stats["upload_bytes"] += plan.length - remaining
        await within(channel.drain(), header_timeout)
        stats[plan.counter] += 1
    except asyncio.TimeoutError:
        stats["http_upload_stalled"] += 1


def _replay_request(request: h11.Request) -> bytes:
    head = f"{request.method.decode()} {request.target.decode('latin-1')} HTTP/1.1\r\n".encode("latin-1")
    for name, value in request.headers:
        if name.lower() not in (b"upgrade", b"connection"):
            head += name + b": " + value + b"\r\n"
    return head + b"\r\n"


@dataclass
class DownloadResult:
    ok: bool
    status: int
    size: int
    sha1: str | None
    path: str | None
    error: str | None = None
    tls: bool = False
    headers: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "status": self.status, "size": self.size, "sha1": self.sha1,
                "path": self.path, "error": self.error, "tls": self.tls}


def download_request(path: str, host: str, byte_range: tuple[int, int] | None = None,
                     tls_upgrade: bool = False, user_agent: str = USER_AGENT) -> h11.Request:
    headers = [("Host", host), ("User-Agent", user_agent)]
    if tls_upgrade:
        headers += [("X-Features", features(True)), ("Upgrade", "TLS/1.0"), ("Connection", "Upgrade")]
    else:
        headers.append(("Connection", "close"))
    if byte_range is not None:
        headers.append(("Range", f"bytes={byte_range[0]}-{byte_range[1]}"))
    return h11.Request(method="GET", target=path, headers=headers)


async def fetch(channel: Channel, path: str, host: str, dest: Path | None, expect_sha1: str | None,
                max_bytes: int, byte_range: tuple[int, int] | None = None,
                tls: TlsContexts | None = None) -> DownloadResult:
    """Send one GET on an open connection (offering TLS when ``tls``), read the body, verify the SHA-1."""
    conn = h11.Connection(h11.CLIENT)
    request = download_request(path, host, byte_range, tls_upgrade=tls is not None)
    channel.write(conn.send(request))
    channel.write(conn.send(h11.EndOfMessage()))
    await channel.drain()
    try:
        response = await _next_event(conn, channel)
        if isinstance(response, h11.InformationalResponse) and response.status_code == 101 and tls is not None:
            leftover, _ = conn.trailing_data
            await channel.start_tls(tls.client, server_side=False, leftover=leftover)
            conn = h11.Connection(h11.CLIENT)      # the response comes inside TLS, the request is not repeated
            conn.send(download_request(path, host, byte_range))
            conn.send(h11.EndOfMessage())
            response = await _next_event(conn, channel)
        while isinstance(response, h11.InformationalResponse):
            response = await _next_event(conn, channel)
    except h11.RemoteProtocolError as exc:
        return DownloadResult(False, 0, 0, None, None, f"bad HTTP response: {exc}", channel.tls)
    if not isinstance(response, h11.Response):
        return DownloadResult(False, 0, 0, None, None, "connection closed before a response", channel.tls)
    status = response.status_code
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
    if status not in (200, 206):
        return DownloadResult(False, status, 0, None, None,
                              f"HTTP {status} {response.reason.decode('latin-1')}", channel.tls, headers)
    try:
        length = int(headers.get("content-length", "-1"))
    except ValueError:
        length = -1
    if length < 0 or length > max_bytes:
        return DownloadResult(False, status, 0, None, None,
                              f"content length {length} not accepted (limit {max_bytes})", channel.tls, headers)
    digest = hashlib.sha1()
    try:   # exclusive: a download never replaces a file (nor follows a planted symlink)
        out = dest.open("xb") if dest is not None else None
    except FileExistsError:
        return DownloadResult(False, status, 0, None, None, f"{dest} already exists", channel.tls, headers)
    received = 0
    try:
        while True:
            try:
                event = await _next_event(conn, channel)
            except h11.RemoteProtocolError as exc:
                return DownloadResult(False, status, received, None, None, f"body cut short: {exc}", channel.tls)
            if isinstance(event, h11.Data):
                digest.update(event.data)
                received += len(event.data)
                if out is not None:
                    await asyncio.to_thread(out.write, event.data)
            else:
                break
    finally:
        if out is not None:
            out.close()
    if received != length:
        return DownloadResult(False, status, received, None, None, f"short body: {received} of {length}", channel.tls)
    sha1 = base64.b32encode(digest.digest()).decode()
    if status == 200 and expect_sha1 and sha1 != expect_sha1.upper():
        return DownloadResult(False, status, received, sha1, str(dest) if dest else None,
                              f"SHA-1 mismatch: got {sha1}, expected {expect_sha1}", channel.tls, headers)
    return DownloadResult(True, status, received, sha1, str(dest) if dest else None, None, channel.tls, headers)


async def download(host: str, port: int, path: str, dest: Path | None, expect_sha1: str | None,
                   max_bytes: int = 1 << 30, timeout: float = 30.0,
                   byte_range: tuple[int, int] | None = None, tls: TlsContexts | None = None,
                   local_addr: tuple[str, int] | None = None) -> DownloadResult:
    try:
        reader, writer = await within(asyncio.open_connection(host, port, local_addr=local_addr), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        return DownloadResult(False, 0, 0, None, None, f"connect to {host}:{port} failed: {exc!r}")
    channel = Channel(reader, writer)
    try:
        return await within(
            fetch(channel, path, f"{host}:{port}", dest, expect_sha1, max_bytes, byte_range, tls), timeout)
    except (OSError, asyncio.TimeoutError, HttpError, ssl.SSLError) as exc:
        return DownloadResult(False, 0, 0, None, None, f"download failed: {exc!r}")
    finally:
        channel.close()
