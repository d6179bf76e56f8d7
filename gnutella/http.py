"""HTTP file transfer on the servent's port: uploads (GET with Range), downloads, push (GIV).

Requests served::

    GET /get/<index>/<name> HTTP/1.1          by index (the name must match)
    GET /uri-res/N2R?urn:sha1:<BASE32> HTTP/1.1   by SHA-1
    Range: bytes=<first>-[<last>]             206 Partial Content with Content-Range

A firewalled servent that receives a PUSH connects to the requester and
sends ``GIV <index>:<servent guid hex>/<name>\\n\\n``; the requester then sends
its GET on that same connection.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from .share import ShareIndex, SharedFile

MAX_REQUEST_HEAD = 8192
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")
_GIV = re.compile(r"^GIV (\d+):([0-9a-fA-F]{32})/(.*)$")


class HttpError(Exception):
    pass


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


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive for a single byte range, None when unsatisfiable."""
    match = _RANGE.match(value)
    if not match:
        return None
    first_s, last_s = match.groups()
    if first_s == "" and last_s == "":
        return None
    if first_s == "":                      # suffix: the last N bytes
        length = int(last_s)
        if length == 0:
            return None
        return max(0, size - length), size - 1
    first = int(first_s)
    last = int(last_s) if last_s else size - 1
    if first >= size or last < first:
        return None
    return first, min(last, size - 1)


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


async def read_head(reader: asyncio.StreamReader, first_line: bytes = b"") -> tuple[str, dict[str, str]]:
    """Read a request or status line and headers (bounded); return (first line, lower-cased headers)."""
    head = bytearray(first_line)
    while not (head.endswith(b"\r\n\r\n") or head.endswith(b"\n\n")):
        line = await reader.readline()
        if not line:
            raise HttpError("connection closed inside the HTTP head")
        head += line
        if len(head) > MAX_REQUEST_HEAD:
            raise HttpError("HTTP head too long")
    lines = head.decode("latin-1").splitlines()
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return lines[0].strip(), headers


def _status(code: int) -> str:
    return f"HTTP/1.1 {code} {HTTPStatus(code).phrase}\r\n"


async def serve_upload(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, shares: ShareIndex,
                       first_line: bytes, server_name: str, stats) -> None:
    """Answer one HTTP request for a shared file (then the caller closes)."""
    try:
        request, headers = await read_head(reader, first_line)
    except HttpError:
        stats["http_bad_requests"] += 1
        return
    parts = request.split()
    if len(parts) != 3 or parts[0] not in ("GET", "HEAD"):
        writer.write((_status(400) + "Connection: close\r\n\r\n").encode())
        stats["http_bad_requests"] += 1
        return
    method, path, _ = parts
    shared = resolve(path, shares)
    if shared is None:
        writer.write((_status(404) + f"Server: {server_name}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").encode())
        stats["http_not_found"] += 1
        return
    size = shared.size
    first, last, code = 0, size - 1, 200
    if "range" in headers:
        wanted = parse_range(headers["range"], size)
        if wanted is None:
            writer.write((_status(416) + f"Content-Range: bytes */{size}\r\nContent-Length: 0\r\n"
                          "Connection: close\r\n\r\n").encode())
            stats["http_bad_range"] += 1
            return
        first, last = wanted
        code = 206
    length = max(0, last - first + 1)
    head = (_status(code) + f"Server: {server_name}\r\nContent-Type: application/binary\r\n"
            f"Content-Length: {length}\r\nX-Gnutella-Content-URN: {shared.urn}\r\n"
            "Connection: close\r\n")
    if code == 206:
        head += f"Content-Range: bytes {first}-{last}/{size}\r\n"
    writer.write((head + "\r\n").encode())
    if method == "GET" and length:
        with shared.path.open("rb") as fh:
            fh.seek(first)
            remaining = length
            while remaining:
                chunk = fh.read(min(remaining, 1 << 16))
                if not chunk:
                    break
                writer.write(chunk)
                remaining -= len(chunk)
                await writer.drain()
    await writer.drain()
    stats["uploads"] += 1
    stats["upload_bytes"] += length


@dataclass
class DownloadResult:
    ok: bool
    status: int
    size: int
    sha1: str | None
    path: str | None
    error: str | None = None

    def as_dict(self) -> dict:
        return {"ok": self.ok, "status": self.status, "size": self.size, "sha1": self.sha1,
                "path": self.path, "error": self.error}


async def fetch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, dest: Path | None,
                expect_sha1: str | None, max_bytes: int, byte_range: tuple[int, int] | None = None) -> DownloadResult:
    """Send one GET on an open connection, read the body, verify the SHA-1 (whole files only)."""
    request = f"GET {path} HTTP/1.1\r\nUser-Agent: booster-boxes/0.1\r\nConnection: close\r\n"
    if byte_range is not None:
        request += f"Range: bytes={byte_range[0]}-{byte_range[1]}\r\n"
    writer.write((request + "\r\n").encode())
    await writer.drain()
    status_line, headers = await read_head(reader)
    parts = status_line.split(" ", 2)
    try:
        status = int(parts[1])
    except (IndexError, ValueError):
        return DownloadResult(False, 0, 0, None, None, f"bad status line {status_line[:60]!r}")
    if status not in (200, 206):
        return DownloadResult(False, status, 0, None, None, f"HTTP {status}")
    try:
        length = int(headers.get("content-length", "-1"))
    except ValueError:
        length = -1
    if length < 0 or length > max_bytes:
        return DownloadResult(False, status, 0, None, None, f"content length {length} not accepted (limit {max_bytes})")
    digest = hashlib.sha1()
    out = dest.open("wb") if dest is not None else None
    received = 0
    try:
        while received < length:
            chunk = await reader.read(min(1 << 16, length - received))
            if not chunk:
                break
            digest.update(chunk)
            received += len(chunk)
            if out is not None:
                out.write(chunk)
    finally:
        if out is not None:
            out.close()
    if received != length:
        return DownloadResult(False, status, received, None, None, f"short body: {received} of {length}")
    sha1 = base64.b32encode(digest.digest()).decode()
    if status == 200 and expect_sha1 and sha1 != expect_sha1.upper():
        return DownloadResult(False, status, received, sha1, str(dest) if dest else None,
                              f"SHA-1 mismatch: got {sha1}, expected {expect_sha1}")
    return DownloadResult(True, status, received, sha1, str(dest) if dest else None)


async def download(host: str, port: int, path: str, dest: Path | None, expect_sha1: str | None,
                   max_bytes: int = 1 << 30, timeout: float = 30.0,
                   byte_range: tuple[int, int] | None = None) -> DownloadResult:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        return DownloadResult(False, 0, 0, None, None, f"connect to {host}:{port} failed: {exc!r}")
    try:
        return await asyncio.wait_for(fetch(reader, writer, path, dest, expect_sha1, max_bytes, byte_range), timeout)
    except (OSError, asyncio.TimeoutError, HttpError) as exc:
        return DownloadResult(False, 0, 0, None, None, f"download failed: {exc!r}")
    finally:
        writer.close()
