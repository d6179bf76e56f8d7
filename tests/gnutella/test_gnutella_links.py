"""Links as gtk-gnutella 1.2.3 runs them: deflate both ways, the TLS upgrade, the third handshake step.

The captured handshakes are replayed against our negotiation, the captured deflate streams are
inflated and decoded message by message, and real servents over real sockets negotiate, compress,
upgrade to TLS, refuse a decompression bomb and log a refusal with the peer's status line."""

import asyncio
import logging
import re
import zlib

import pytest

from gnutella.channel import CompressionError, Deflater, Inflater
from gnutella.handshake import (ConnectRequest, Established, Handshake, Headers, LinkOptions, Negotiated, Response,
                                answer_headers, final_headers, negotiated, offer_headers)
from gnutella.servent import Servent
from gnutella.share import ShareIndex
from gnutella.wire import MessageReader, RawMessage

from conftest import FIXTURES
from tests.polling import EVENT_WAIT, until

LINKS = {"leaf": FIXTURES / "gtk-gnutella-1.2.3-deflate-leaf-link.txt",
         "ultrapeer": FIXTURES / "gtk-gnutella-1.2.3-deflate-ultrapeer-link.txt"}


def _hs_blocks(kind: str) -> dict[str, bytes]:
    """'hs <dir> <what> <hex>' lines: e.g. {'C->A connect request': b'GNUTELLA CONNECT/0.6...'}."""
    out = {}
    for line in LINKS[kind].read_text().splitlines():
        if line.startswith(("hs ", "hs-clear ")):       # hs-clear: the handshake before the TLS one
            words = line.replace("_", " ").split()
            out[" ".join(words[1:-1])] = bytes.fromhex(words[-1])
    return out


def _streams(kind: str) -> dict[str, tuple[bytes, list[dict]]]:
    """direction -> (deflated bytes, the inflated messages as the capture lists them)."""
    deflated: dict[str, bytearray] = {}
    inflated: dict[str, list[dict]] = {}
    pattern = re.compile(r"^\+\s*[\d.]+s (\S+) guid=([0-9a-f]{32}) type=0x([0-9a-f]{2})\(\w+\) ttl=(\d+) hops=(\d+) "
                         r"len=(\d+) payload=([0-9a-f]*)$")
    for line in LINKS[kind].read_text().splitlines():
        if line.startswith("deflate "):
            _, direction, hx = line.split()
            deflated.setdefault(direction, bytearray()).extend(bytes.fromhex(hx))
        elif (m := pattern.match(line)):
            inflated.setdefault(m.group(1), []).append({
                "guid": bytes.fromhex(m.group(2)), "type": int(m.group(3), 16), "ttl": int(m.group(4)),
                "hops": int(m.group(5)), "len": int(m.group(6)), "payload": bytes.fromhex(m.group(7))})
    return {d: (bytes(deflated[d]), inflated[d]) for d in deflated}


@pytest.mark.parametrize("kind", ["leaf", "ultrapeer"])
def test_captured_deflate_streams_inflate_and_decode_exactly(kind):
    streams = _streams(kind)
    assert len(streams) == 2
    for direction, (deflated, expected) in streams.items():
        inflater = Inflater()
        raw = bytearray()
        reader = MessageReader()
        got = []
        for i in range(0, len(deflated), 97):          # in pieces, as a socket delivers them
            for chunk in inflater.feed(deflated[i:i + 97]):
                raw += chunk
                got += reader.feed(chunk)
        assert reader.buffered == 0, direction        # messages end exactly where the inflated data ends
        assert len(got) == len(expected), direction
        offset = 0
        for msg, want in zip(got, expected):
            header = raw[offset:offset + 23]
            body = bytes(raw[offset + 23:offset + 23 + want["len"]])
            offset += 23 + want["len"]
            assert not isinstance(msg, RawMessage), (direction, want)
            assert (header[:16], header[16], header[17], header[18]) == (want["guid"], want["type"], want["ttl"],
                                                                          want["hops"])
            assert body == want["payload"]
            assert msg.encode() == bytes(header) + body     # decoded and re-encoded byte for byte
        assert offset == len(raw)


def test_gtk_gnutella_leaf_connect_gets_deflate_and_tls_accepted():
    blocks = _hs_blocks("leaf")
    server = Handshake("server")
    (request,) = server.receive_data(blocks["C->A connect request"])
    assert isinstance(request, ConnectRequest)
    sent = answer_headers(Headers({"X-Ultrapeer": "True"}), request.headers, LinkOptions())
    assert sent.get("Accept-Encoding") == "deflate" and sent.get("Content-Encoding") == "deflate"
    assert sent.get("Upgrade") == "TLS/1.0" and sent.get("Connection") == "Upgrade"
    server.respond(200, "OK", sent)
    (est,) = server.receive_data(blocks["C->A final acknowledgement"])
    assert isinstance(est, Established)
    assert negotiated("server", sent, est.headers) == Negotiated(deflate_out=True, inflate_in=True, tls=True)
    # declined cleanly when configured off: neither header is answered
    off = answer_headers(Headers(), request.headers, LinkOptions(compress=False, tls=False))
    assert "Upgrade" not in off and "Content-Encoding" not in off and "Accept-Encoding" not in off


@pytest.mark.parametrize("kind,client", [("leaf", "C->A"), ("ultrapeer", "A->B")])
def test_our_third_step_is_what_gtk_gnutella_sends(kind, client):
    """Given gtk-gnutella's answer, our final block is byte for byte its own: only the settled headers."""
    blocks = _hs_blocks(kind)
    me, server = client.split("->")
    response_raw = blocks[f"{server}->{me} response"]
    expected_final = blocks[f"{client} final acknowledgement"]
    hs = Handshake("client")
    offered = offer_headers(Headers({"X-Ultrapeer": "True"}), LinkOptions())
    assert offered.get("Upgrade") == "TLS/1.0" and offered.get("Accept-Encoding") == "deflate"
    hs.connect(offered)
    (response,) = hs.receive_data(response_raw)
    assert isinstance(response, Response)
    final = final_headers(response.headers, LinkOptions(), offered_tls=True)
    out, _ = hs.confirm(final)
    assert out == expected_final
    assert negotiated("client", final, response.headers).tls


def test_inflater_refuses_a_decompression_bomb():
    bomb = zlib.compress(b"\0" * (40 << 20), 9)         # 40 MiB of zeros in ~40 KB
    inflater = Inflater()
    produced = 0
    with pytest.raises(CompressionError, match="decompression bomb"):
        for chunk in inflater.feed(bomb):
            produced += len(chunk)
            assert len(chunk) <= inflater.chunk          # bounded buffers, whatever comes in
    assert produced < 8 << 20
    with pytest.raises(CompressionError, match="corrupt"):
        list(Inflater().feed(b"\x78\xda\xff\xff\xff\xff garbage"))


def test_deflater_output_is_one_stream_flushed_per_send():
    deflater, inflater = Deflater(), Inflater()
    for part in (b"first message", b"second", b"x" * 5000):
        assert b"".join(inflater.feed(deflater.compress(part))) == part


async def _servent(tmp_path, name, **kw):
    d = tmp_path / name
    d.mkdir()
    s = Servent(listen=("127.0.0.1", 0), shares=ShareIndex.scan(d), seed=hash(name) & 0xffff, tick=0.1, **kw)
    await s.start()
    return s


@pytest.mark.parametrize("a_opts,b_opts,compressed,tls", [
    ({}, {}, True, True),
    ({"tls": False}, {}, True, False),
    ({}, {"compress": False}, False, True),
    ({"tls": False, "compress": False}, {}, False, False),
])
async def test_servents_negotiate_compression_and_tls(tmp_path, a_opts, b_opts, compressed, tls):
    a = await _servent(tmp_path, "a", **a_opts)
    b = await _servent(tmp_path, "b", peers=[("127.0.0.1", a.port)], **b_opts)
    try:
        await until(lambda: a.links and b.links and a.stats["rx_ping"] and b.stats["rx_pong"])
        for s in (a, b):
            (link,) = s.links.values()
            assert link.stream.channel.tls == tls
            assert (link.stream.deflater is not None) == compressed
            assert (link.stream.inflater is not None) == compressed
        assert a.stats["links_compressed"] == int(compressed) and a.stats["tls_upgrades"] == int(tls)
    finally:
        await b.stop()
        await a.stop()


async def test_compressed_link_carries_a_search(tmp_path):
    a = await _servent(tmp_path, "a")
    (tmp_path / "a" / "deflated sonata.ogg").write_bytes(b"z" * 1000)
    a.shares = ShareIndex.scan(tmp_path / "a")
    a.node.shares = a.shares
    b = await _servent(tmp_path, "b", peers=[("127.0.0.1", a.port)], ultrapeer=False)
    try:
        await until(lambda: a.links and a.stats["qrp_tables"] >= 1)
        hits = await b.search("deflated sonata", timeout=EVENT_WAIT, max_hits=1)
        assert len(hits) == 1
        (link,) = b.links.values()
        assert link.stream.deflater.bytes_out > 0 and link.stream.inflater.bytes_in > 0
    finally:
        await b.stop()
        await a.stop()


async def _raw_connect(port: int, extra: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(("GNUTELLA CONNECT/0.6\r\nX-Ultrapeer: True\r\nUser-Agent: probe\r\n"
                  f"{extra}\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, head


async def test_a_decompression_bomb_on_a_link_is_refused_and_counted(tmp_path):
    a = await _servent(tmp_path, "a", tls=False)
    try:
        reader, writer, head = await _raw_connect(a.port, "Accept-Encoding: deflate\r\n")
        assert b"Content-Encoding: deflate" in head
        writer.write(b"GNUTELLA/0.6 200 OK\r\nContent-Encoding: deflate\r\n\r\n")
        z = zlib.compressobj(9)
        # valid zero-length pings would keep a naive inflater busy forever: 64 MiB of zeros
        for _ in range(64):
            writer.write(z.compress(b"\0" * (1 << 20)))
        writer.write(z.flush(zlib.Z_SYNC_FLUSH))
        await writer.drain()
        await until(lambda: a.stats["decompression_refused"] == 1)
        await until(lambda: not a.links)
        # refused at the 64x ratio: a few MiB were read, never the 64 MiB (2.9 million pings) sent
        assert 0 < a.stats["rx_ping"] * 23 < 8 << 20
        writer.close()
    finally:
        await a.stop()


async def test_a_refusal_is_logged_with_the_peers_status_line(tmp_path, caplog):
    async def refuse(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"GNUTELLA/0.6 403 Gnet connection not compressed\r\nX-Ultrapeer: True\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    caplog.set_level(logging.WARNING, logger="gnutella.servent")
    async with server:
        b = await _servent(tmp_path, "b", peers=[("127.0.0.1", port)])
        try:
            await until(lambda: b.stats["refused_by_peer_403"] == 1)
        finally:
            await b.stop()
    assert f"127.0.0.1:{port} refused the connection: GNUTELLA/0.6 403 Gnet connection not compressed" in caplog.text


async def test_a_peer_known_to_speak_tls_is_dialled_in_tls_from_the_first_byte(tmp_path):
    a = await _servent(tmp_path, "a")
    b = await _servent(tmp_path, "b")
    try:
        b._learn_tls(("127.0.0.1", a.port))
        b.connect("127.0.0.1", a.port)
        await until(lambda: a.links and b.links)
        assert b.stats["tls_direct_out"] == 1 and a.stats["tls_direct_in"] == 1
        (link,) = a.links.values()
        assert link.stream.channel.tls and a.stats["tls_upgrades"] == 0      # no in-band upgrade needed
    finally:
        await b.stop()
        await a.stop()


async def test_connection_cap_and_idle_timeout(tmp_path):
    a = await _servent(tmp_path, "a", max_connections=2, idle_timeout=0.3, tls=False)
    try:
        first = [await asyncio.open_connection("127.0.0.1", a.port) for _ in range(2)]
        await until(lambda: a._accepting == 2)
        reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""          # closed at once: over the cap
        assert a.stats["accept_refused_cap"] == 1
        for _, w in first:
            w.close()
        await until(lambda: a._accepting == 0)
        # a link that goes silent after its handshake is closed after the idle timeout
        reader, writer, head = await _raw_connect(a.port, "")
        writer.write(b"GNUTELLA/0.6 200 OK\r\n\r\n")
        await writer.drain()
        await until(lambda: a.stats["idle_timeouts"] == 1)
        writer.close()
    finally:
        await a.stop()


async def test_a_slow_handshake_is_closed_after_the_handshake_timeout(tmp_path):
    """Slowloris: a CONNECT that never ends holds a slot only for the handshake timeout."""
    a = await _servent(tmp_path, "a", handshake_timeout=0.3, tls=False)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
        writer.write(b"GNUTELLA CONNECT/0.6\r\nX-Ultrapeer: True\r\n")      # and never the blank line
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        await until(lambda: a.stats["handshake_failed"] == 1 and a._accepting == 0)
        writer.close()
    finally:
        await a.stop()


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_inflater_gives_bounded_chunks_or_a_compression_error(data):
    inflater = Inflater(slack=4096, chunk=1024)
    try:
        for chunk in inflater.feed(zlib.compress(data)[:2] + data):
            assert len(chunk) <= 1024
    except CompressionError:
        pass


async def test_a_peer_whose_pong_says_tls_is_dialled_in_tls(tmp_path):
    a = await _servent(tmp_path, "a")
    c = await _servent(tmp_path, "c")
    b = await _servent(tmp_path, "b", peers=[("127.0.0.1", a.port)])
    try:
        assert a.node.own_pong().ggep[0].id == "TLS"        # as gtk-gnutella's pongs say it
        c.connect("127.0.0.1", a.port)                      # a now caches c's pong (GGEP TLS) ...
        await until(lambda: len(a.links) == 2 and ("127.0.0.1", c.port) in a.node.pong_cache)
        b.node.tls_hosts.clear()
        b._perform(b.node.tick(1e9))                        # ... b's refresh ping brings it from a's cache
        await until(lambda: ("127.0.0.1", c.port) in b.node.tls_hosts)
        b.connect("127.0.0.1", c.port)
        await until(lambda: b.stats["tls_direct_out"] == 1 and c.stats["tls_direct_in"] == 1)
    finally:
        for s in (b, c, a):
            await s.stop()


async def test_a_message_that_cannot_be_encoded_costs_only_itself():
    """Review finding: Pong(99999) raised struct.error out of the send and tore the link down."""
    from collections import Counter

    from gnutella.channel import Channel
    from gnutella.stream import MessageStream
    from gnutella.wire import HEADER_SIZE, Message, MessageReader, Ping, Pong

    received = asyncio.Queue()

    async def reading(reader, writer):
        received.put_nowait(await reader.readexactly(HEADER_SIZE))
        writer.close()
    server = await asyncio.start_server(reading, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    stats = Counter()
    stream = MessageStream(Channel(reader, writer), stats=stats)
    try:
        assert stream.send(Message(b"\x01" * 16, 1, 0, Pong(99999, "10.0.0.1", 0, 0))) == 0
        assert stream.send(Message(b"\x02" * 16, 256, 0, Ping())) == 0
        assert stats["encode_failed"] == 2
        assert stream.send(Message(b"\x03" * 16, 1, 0, Ping())) == HEADER_SIZE
        header = await asyncio.wait_for(received.get(), 10)
        assert header[:16] == b"\x03" * 16
    finally:
        writer.close()
        server.close()
