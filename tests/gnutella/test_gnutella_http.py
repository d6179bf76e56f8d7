"""HTTP uploads and downloads against gtk-gnutella 1.2.3's captured requests and responses.

Both directions over real sockets: our server answers the requests gtk-gnutella and a plain client
sent (status line and headers compared with gtk-gnutella's answers, errors included), and our
client downloads from a server that replays gtk-gnutella's responses, the TLS upgrade included."""

import asyncio
import os
import re
from urllib.parse import quote
from collections import Counter

import h11
import pytest

from gnutella import http as ghttp
from gnutella.channel import Channel, tls_contexts
from gnutella.share import ShareIndex, SharedFile

from conftest import FIXTURES

CAPTURE = FIXTURES / "gtk-gnutella-1.2.3-http-download.txt"
SHA1 = "IAZM5LRQON7B7K36SPFH3HZUANINQEZ2"
NAME = "gfx orchard lantern.bin"
SIZE = 204800
# headers of gtk-gnutella's own that we do not send: time, queueing, THEX, alternate locations
NOT_COMPARED = {"date", "server", "x-queued", "x-thex-uri", "x-alt", "last-modified", "x-token", "x-features"}


def _blocks() -> dict[str, bytes]:
    """Every 'hex ...' block of the capture, keyed by the title (or case) it belongs to."""
    out, title = {}, None
    for line in CAPTURE.read_text().splitlines():
        if line.startswith(("=== ", "--- case: ")):
            title = line.strip("=- ").removeprefix("case: ").strip()
        elif line.strip().startswith("hex ") and title is not None:
            out.setdefault(title, bytes.fromhex(line.split()[1]))
    return out


def _cases() -> list[tuple[str, bytes, bytes]]:
    """(case, request bytes, gtk-gnutella's response head) for the hand-written requests."""
    text = CAPTURE.read_text().split("=== Hand-written requests")[1]
    cases = []
    for chunk in text.split("--- case: ")[1:]:
        name = chunk.split(" ---")[0]
        request_lines = re.findall(r"^  (.*)\\r\\n$", chunk.split("response headers")[0], re.M)
        request = "".join(line + "\r\n" for line in request_lines).encode() + b"\r\n"
        response = bytes.fromhex(re.search(r"^  hex ([0-9a-f]+)$", chunk, re.M).group(1))
        cases.append((name, request, response))
    return cases


def _head(raw: bytes) -> tuple[int, str, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    _, code, reason = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(code), reason, headers


@pytest.fixture
def lantern(tmp_path) -> tuple[ShareIndex, bytes]:
    """The captured share: same name, size and URN (the body bytes are ours)."""
    body = os.urandom(SIZE)
    path = tmp_path / NAME
    path.write_bytes(body)
    return ShareIndex([SharedFile(1, NAME, SIZE, SHA1, path)]), body


async def _server(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_capture_has_every_case():
    names = [c[0] for c in _cases()]
    assert len(names) == 7 and "missing Host" in names and "valid Range" in names


@pytest.mark.parametrize("case", [c[0] for c in _cases()])
async def test_our_answers_match_gtk_gnutella(case, lantern):
    shares, body = lantern
    stats = Counter()
    _, request, expected = next(c for c in _cases() if c[0] == case)

    async def handle(reader, writer):
        first = await reader.readline()
        await ghttp.serve_upload(Channel(reader, writer), shares, first, "booster-boxes/0.1", stats)
        writer.close()

    server, port = await _server(handle)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)      # the server closes: Connection: close
        writer.close()
    head, _, got_body = answer.partition(b"\r\n\r\n")
    code, reason, headers = _head(head)
    want_code, want_reason, want_headers = _head(expected.partition(b"\r\n\r\n")[0])
    assert (code, reason) == (want_code, want_reason)
    for name, value in want_headers.items():
        if name in NOT_COMPARED or name == "retry-after":
            continue
        assert headers.get(name) == value, name
    assert headers["connection"] == "close" and "date" in headers and "server" in headers
    expected_len = int(want_headers.get("content-length", "0"))
    if code == 206:
        first = int(want_headers["content-range"].split()[1].split("-")[0])
        assert got_body == body[first:first + expected_len]
    else:
        assert got_body == b""


async def test_gtk_gnutella_download_with_tls_upgrade_is_served(lantern):
    """gtk-gnutella's GET (Upgrade: TLS/1.0) gets 101, TLS, then the 200 inside TLS, unrequested again."""
    shares, body = lantern
    stats = Counter()
    tls = tls_contexts()
    request = _blocks()["B -> A request, on the wire in clear (379 bytes)"]

    async def handle(reader, writer):
        first = await reader.readline()
        channel = Channel(reader, writer)
        await ghttp.serve_upload(channel, shares, first, "booster-boxes/0.1", stats, tls)
        channel.close()

    server, port = await _server(handle)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        channel = Channel(reader, writer)
        conn = h11.Connection(h11.CLIENT)
        channel.write(request)
        conn.send(h11.Request(method="GET", target=f"/uri-res/N2R?urn:sha1:{SHA1}", headers=[
            ("Host", "x"), ("Upgrade", "TLS/1.0"), ("Connection", "Upgrade")]))
        conn.send(h11.EndOfMessage())
        while (event := conn.next_event()) is h11.NEED_DATA:
            conn.receive_data(await channel.read())
        assert isinstance(event, h11.InformationalResponse) and event.status_code == 101
        headers = {k.lower(): v for k, v in event.headers}
        assert headers[b"upgrade"].startswith(b"TLS/1.0") and headers[b"connection"] == b"Upgrade"
        await channel.start_tls(tls.client, server_side=False)
        assert channel.tls_version() in ("TLSv1.3", "TLSv1.2")
        data = b""
        while chunk := await asyncio.wait_for(channel.read(), 10):
            data += chunk
        channel.close()
    head, _, got = data.partition(b"\r\n\r\n")
    code, reason, headers = _head(head)
    want_code, want_reason, want_headers = _head(_blocks()[
        "A -> B response inside TLS: headers (627 bytes), then 204800 body bytes"].partition(b"\r\n\r\n")[0])
    assert (code, reason) == (want_code, want_reason) == (200, "OK")
    for name in ("content-length", "content-type", "content-disposition", "x-gnutella-content-urn"):
        assert headers[name] == want_headers[name]
    assert got == body and stats["http_tls_upgrades"] == 1 and stats["upload_bytes"] == SIZE


async def test_our_download_request_carries_what_gtk_gnutella_expects():
    """Host (gtk-gnutella answers 400 Missing Host Header without it), User-Agent, and the TLS offer."""
    seen: list[bytes] = []

    async def handle(reader, writer):
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(next(c[2] for c in _cases() if c[0] == "unknown URN"))
        await writer.drain()
        writer.close()

    server, port = await _server(handle)
    async with server:
        result = await ghttp.download("127.0.0.1", port, f"/uri-res/N2R?urn:sha1:{SHA1}", None, SHA1, tls=tls_contexts())
    assert not result.ok and result.status == 404 and "Not Found" in result.error
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(seen[0])
    request = conn.next_event()           # h11 itself refuses an HTTP/1.1 request without Host
    headers = {k.decode().lower(): v.decode() for k, v in request.headers}
    assert headers["host"] == f"127.0.0.1:{port}"
    assert headers["upgrade"] == "TLS/1.0" and headers["connection"] == "Upgrade"
    assert "tls/1.0" in headers["x-features"] and headers["user-agent"]


@pytest.mark.parametrize("case,status,reason", [("missing Host", 400, "Missing Host Header"),
                                                ("malformed Range", 400, "Malformed Range request")])
async def test_gtk_gnutella_errors_reach_the_downloader_with_their_status_line(case, status, reason):
    response = next(c[2] for c in _cases() if c[0] == case)

    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        writer.close()

    server, port = await _server(handle)
    async with server:
        result = await ghttp.download("127.0.0.1", port, f"/uri-res/N2R?urn:sha1:{SHA1}", None, SHA1)
    assert (result.ok, result.status) == (False, status) and result.error == f"HTTP {status} {reason}"


async def test_download_from_gtk_gnutella_responses_with_tls_upgrade(tmp_path):
    """A server replaying gtk-gnutella's 101 and (inside TLS) its 200 headers: our client follows it."""
    blocks = _blocks()
    switching = blocks["A -> B response, on the wire in clear (239 bytes)"]
    ok_head = blocks["A -> B response inside TLS: headers (627 bytes), then 204800 body bytes"]
    body = os.urandom(SIZE)
    server_tls = tls_contexts()
    got_request: list[bytes] = []

    async def handle(reader, writer):
        got_request.append(await reader.readuntil(b"\r\n\r\n"))
        channel = Channel(reader, writer)
        channel.write(switching)
        await channel.drain()
        await channel.start_tls(server_tls.server, server_side=True)
        channel.write(ok_head + body)
        await channel.drain()
        channel.close()

    server, port = await _server(handle)
    async with server:
        result = await ghttp.download("127.0.0.1", port, f"/uri-res/N2R?urn:sha1:{SHA1}", tmp_path / "got", None,
                                      tls=tls_contexts())
    assert result.ok and result.tls and result.status == 200 and result.size == SIZE
    assert (tmp_path / "got").read_bytes() == body
    assert result.headers["x-gnutella-content-urn"] == f"urn:sha1:{SHA1}"


async def test_tls_declined_when_off(lantern):
    """Without TLS contexts the server ignores the upgrade and answers 200 in clear."""
    shares, body = lantern
    stats = Counter()

    async def handle(reader, writer):
        first = await reader.readline()
        await ghttp.serve_upload(Channel(reader, writer), shares, first, "booster-boxes/0.1", stats, None)
        writer.close()

    server, port = await _server(handle)
    async with server:
        result = await ghttp.download("127.0.0.1", port, f"/get/1/{quote(NAME)}", None, None, tls=tls_contexts())
    assert result.ok and not result.tls and result.size == SIZE and stats["http_tls_upgrades"] == 0


async def test_header_timeout_closes_a_slow_request(lantern):
    shares, _ = lantern
    stats = Counter()
    done = asyncio.Event()

    async def handle(reader, writer):
        await ghttp.serve_upload(Channel(reader, writer), shares, b"GET /get/1/x HTTP/1.1\r\n", "s", stats,
                                 header_timeout=0.2)
        writer.close()
        done.set()

    server, port = await _server(handle)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"Host: a\r\n")             # and never the blank line
        await writer.drain()
        await asyncio.wait_for(done.wait(), 10)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    assert stats["http_header_timeouts"] == 1


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30), st.integers(1, 10_000))
def test_fuzz_range_is_inside_the_file_or_refused(value, size):
    try:
        first, last = ghttp.parse_range(value, size)
    except ghttp.BadRange:
        return
    assert 0 <= first <= last < size
