"""Servents over real loopback sockets: handshakes, search, HTTP download, push, CLI processes."""

import asyncio
import base64
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gnutella import http as ghttp
from gnutella.node import NodeConfig
from gnutella.servent import Servent
from gnutella.share import ShareIndex
from tests.polling import EVENT_WAIT, until
from gnutella.wire import HEADER_SIZE, Message, MessageReader, Ping, Pong, Query, QueryHit

BIN = Path(sys.executable).parent


def make_share(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def b32sha1(data: bytes) -> str:
    return base64.b32encode(hashlib.sha1(data).digest()).decode()


@pytest.fixture
async def pair(tmp_path):
    payload = os.urandom(200_000)
    share = make_share(tmp_path / "a", {"ambient drone loop.ogg": payload, "notes.txt": b"hello"})
    a = Servent(listen=("127.0.0.1", 0), shares=ShareIndex.scan(share), seed=1,
                config=NodeConfig(firewalled=False))
    await a.start()
    b = Servent(listen=("127.0.0.1", 0), shares=ShareIndex([]), peers=[("127.0.0.1", a.port)], seed=2)
    await b.start()
    await asyncio.wait_for(b.established.wait(), 5)
    yield a, b, payload
    await b.stop()
    await a.stop()


async def test_two_servents_search_and_download(pair, tmp_path):
    a, b, payload = pair
    hits = await b.search("drone ambient", timeout=EVENT_WAIT, max_hits=1)
    (hit, event) = hits[0]
    assert (hit.ip, hit.port, hit.name, hit.size) == ("127.0.0.1", a.port, "ambient drone loop.ogg", len(payload))
    assert hit.sha1 == b32sha1(payload) and not hit.push
    assert hit.servent_guid == a.guid.hex()
    out = tmp_path / "got"
    out.mkdir()
    result = await b.download(hit, event, out)
    assert result.ok and result.sha1 == b32sha1(payload)
    assert (out / hit.name).read_bytes() == payload


async def test_http_get_by_index_range_and_urn(pair):
    a, b, payload = pair
    shared = next(f for f in a.shares.files.values() if f.name.startswith("ambient"))
    r = await ghttp.download("127.0.0.1", a.port, f"/get/{shared.index}/ambient%20drone%20loop.ogg", None, shared.sha1)
    assert r.ok and r.status == 200 and r.size == len(payload)
    part = await ghttp.download("127.0.0.1", a.port, f"/uri-res/N2R?urn:sha1:{shared.sha1}", None, None,
                                byte_range=(100, 199))
    assert part.ok and part.status == 206 and part.size == 100
    assert part.sha1 == b32sha1(payload[100:200])
    missing = await ghttp.download("127.0.0.1", a.port, "/get/99/nothing", None, None)
    assert not missing.ok and missing.status == 404
    wrong_name = await ghttp.download("127.0.0.1", a.port, f"/get/{shared.index}/other-name", None, None)
    assert wrong_name.status == 404
    bad_range = await ghttp.download("127.0.0.1", a.port, f"/get/{shared.index}/ambient%20drone%20loop.ogg", None,
                                     None, byte_range=(len(payload) + 5, len(payload) + 9))
    assert bad_range.ok and bad_range.status == 206 and bad_range.size == 1     # clamped, as gtk-gnutella does


def test_range_parsing():
    assert ghttp.parse_range("bytes=0-99", 1000) == (0, 99)
    assert ghttp.parse_range("bytes=900-", 1000) == (900, 999)
    assert ghttp.parse_range("bytes=-100", 1000) == (900, 999)
    assert ghttp.parse_range("bytes=0-5000", 1000) == (0, 999)
    assert ghttp.parse_range("bytes=1000-", 1000) == (999, 999)         # clamped like gtk-gnutella
    for bad in ("lines=1-2", "bytes=zz-1", "bytes=500-100", "bytes=-0", "bytes=-"):
        with pytest.raises(ghttp.BadRange):
            ghttp.parse_range(bad, 1000)


async def test_firewalled_source_is_fetched_by_push_and_giv(tmp_path):
    payload = os.urandom(50_000)
    share = make_share(tmp_path / "fw", {"behind the wall.bin": payload})
    hub = Servent(listen=("127.0.0.1", 0), shares=ShareIndex([]), seed=5)
    await hub.start()
    source = Servent(listen=("127.0.0.1", 0), shares=ShareIndex.scan(share), peers=[("127.0.0.1", hub.port)],
                     seed=6, config=NodeConfig(firewalled=True))
    getter = Servent(listen=("127.0.0.1", 0), shares=ShareIndex([]), peers=[("127.0.0.1", hub.port)], seed=7)
    try:
        await source.start()
        await getter.start()
        await asyncio.wait_for(asyncio.gather(source.established.wait(), getter.established.wait()), 5)
        (hit, event), = await getter.search("wall", timeout=EVENT_WAIT, max_hits=1)
        assert hit.push
        result = await getter.download(hit, event, tmp_path)
        assert result.ok, result.error
        assert (tmp_path / "behind the wall.bin").read_bytes() == payload
        assert getter.stats["giv_received"] == 1 and source.stats["push_uploads"] == 1
        assert hub.stats["rx_push"] == 1            # routed through the hub by servent GUID
    finally:
        for s in (getter, source, hub):
            await s.stop()


async def read_headers(reader):
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += await reader.readline()
    return head


async def test_gtk_gnutella_leaf_handshake_alive_ping_and_query(tmp_path, gtk_connect):
    """Replay what gtk-gnutella sends as a leaf: our ultrapeer must accept it, answer its
    TTL-1 alive ping with a pong of the same GUID, and answer a 0x8000 query."""
    share = make_share(tmp_path / "s", {"booster sample alpha.txt": b"x" * 2800})
    up = Servent(listen=("127.0.0.1", 0), shares=ShareIndex.scan(share), seed=9)
    await up.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", up.port)
        writer.write(gtk_connect("leaf"))
        head = await asyncio.wait_for(read_headers(reader), 5)
        assert head.startswith(b"GNUTELLA/0.6 200 OK\r\n")
        text = head.decode().lower()
        assert "x-ultrapeer: true" in text and "x-dynamic-querying:" in text
        degree = int(text.split("x-degree:")[1].split("\r\n")[0])
        assert degree >= 16
        writer.write(b"GNUTELLA/0.6 200 OK\r\n\r\n")
        alive = Message(bytes.fromhex("c0ffee00" * 4), 1, 0, Ping())
        query = Message(bytes.fromhex("abcdef01" * 4), 4, 0, Query("booster sample"))
        assert query.encode()[HEADER_SIZE:HEADER_SIZE + 2] == b"\x80\x00"
        writer.write(alive.encode() + query.encode())
        await writer.drain()
        framer = MessageReader()
        got = []
        while not any(isinstance(m.payload, QueryHit) for m in got):
            got += framer.feed(await asyncio.wait_for(reader.read(65536), 5))
        pongs = [m for m in got if isinstance(m.payload, Pong) and m.guid == alive.guid]
        assert len(pongs) == 1 and pongs[0].payload.port == up.port
        (hit,) = [m for m in got if isinstance(m.payload, QueryHit)]
        assert hit.guid == query.guid and hit.payload.servent_guid == up.guid
        writer.close()
    finally:
        await up.stop()


async def test_duplicate_guid_is_refused_409(tmp_path, gtk_connect):
    up = Servent(listen=("127.0.0.1", 0), shares=ShareIndex([]), seed=10)
    await up.start()
    try:
        r1, w1 = await asyncio.open_connection("127.0.0.1", up.port)
        w1.write(gtk_connect("ultrapeer"))
        assert (await read_headers(r1)).startswith(b"GNUTELLA/0.6 200")
        w1.write(b"GNUTELLA/0.6 200 OK\r\n\r\n")
        await w1.drain()
        await asyncio.wait_for(up.established.wait(), 5)     # the first link is up: its GUID is taken
        r2, w2 = await asyncio.open_connection("127.0.0.1", up.port)
        w2.write(gtk_connect("ultrapeer"))                 # same GUID header again
        assert (await read_headers(r2)).startswith(b"GNUTELLA/0.6 409")
        w1.close()
        w2.close()
    finally:
        await up.stop()


def run_cli(*argv, timeout=30):
    return subprocess.run([str(BIN / "gnutella-servent"), *argv], capture_output=True, text=True, timeout=timeout)


def test_cli_processes_search_and_download(tmp_path):
    payload = os.urandom(30_000)
    share = make_share(tmp_path / "share", {"field recording rain.wav": payload})
    server = subprocess.Popen([str(BIN / "gnutella-servent"), "serve", "--listen", "127.0.0.1:0", "--share", str(share),
                               "--log-level", "info"], stderr=subprocess.PIPE, text=True)
    try:
        line = server.stderr.readline()
        port = int(line.split(" listening on 127.0.0.1:")[1].split()[0])
        found = run_cli("search", "--peer", f"127.0.0.1:{port}", "--query", "rain recording", "--timeout", "1.5", "--leaf")
        assert found.returncode == 0, found.stderr
        hits = [json.loads(l) for l in found.stdout.splitlines()]
        assert [h["name"] for h in hits] == ["field recording rain.wav"] and hits[0]["sha1"] == b32sha1(payload)
        got = run_cli("download", "--peer", f"127.0.0.1:{port}", "--query", "rain", "--out", str(tmp_path / "dl"))
        assert got.returncode == 0, got.stderr
        record = json.loads(got.stdout)
        assert record["ok"] and record["sha1"] == b32sha1(payload)
        assert (tmp_path / "dl" / "field recording rain.wav").read_bytes() == payload
        none = run_cli("search", "--peer", f"127.0.0.1:{port}", "--query", "nothing matches this", "--timeout", "1")
        assert none.returncode == 1 and none.stdout == ""
    finally:
        server.terminate()
        server.wait(10)


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    missing = run_cli("serve", "--share", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert missing.stderr.strip().endswith("does not exist") and len(missing.stderr.strip().splitlines()) == 1
    nopeer = run_cli("search", "--query", "x")
    assert nopeer.returncode == 2 and "needs at least one --peer" in nopeer.stderr


def test_booster_cli_bad_config_exits_2(tmp_path):
    def booster(*argv):
        return subprocess.run([str(BIN / "gnutella-booster"), *argv], capture_output=True, text=True, timeout=30)
    gone = booster("--control", str(tmp_path / "no.sock"), "--name", "e1")
    assert gone.returncode == 2 and "boxd" in gone.stderr and len(gone.stderr.strip().splitlines()) == 1
    bad = booster("--control", str(tmp_path / "no.sock"), "--name", "e1", "--port", "70000")
    assert bad.returncode == 2 and "bad port range" in bad.stderr


async def test_full_ultrapeer_refuses_with_try_ultrapeers_and_the_refused_servent_learns_them():
    hub = Servent(listen=("127.0.0.1", 0), shares=ShareIndex([]), seed=20, max_peers=1)
    await hub.start()
    first = Servent(listen=("127.0.0.1", 0), shares=ShareIndex([]), peers=[("127.0.0.1", hub.port)], seed=21)
    await first.start()
    await asyncio.wait_for(first.established.wait(), 5)
    second = Servent(listen=("127.0.0.1", 0), shares=ShareIndex([]), peers=[("127.0.0.1", hub.port)], seed=22,
                     target_peers=1)
    try:
        await second.start()
        # refused (503, too many ultrapeers) but told of `first`, which it then joins
        await asyncio.wait_for(second.established.wait(), 8)
        assert hub.stats["refused_in_503"] >= 1 and second.stats["refused_by_peer_503"] >= 1
        assert ("127.0.0.1", first.port) in set(second._connected_addrs.values())
    finally:
        for s in (second, first, hub):
            await s.stop()


async def test_429_backs_off_five_minutes():
    async def banning(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"GNUTELLA/0.6 429 Too Many Requests\r\n\r\n")
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(banning, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    s = Servent(listen=("127.0.0.1", 0), shares=ShareIndex([]), peers=[("127.0.0.1", port)], seed=23)
    try:
        await s.start()
        await until(lambda: s.stats["refused_by_peer_429"], what="the peer's 429")
        # the ban is recorded in the same step that counts the refusal
        wait = s._retry_after[("127.0.0.1", port)] - asyncio.get_running_loop().time()
        assert 250 < wait <= 300
    finally:
        await s.stop()
        server.close()


async def test_old_04_servent_searches_a_06_servent(tmp_path):
    share = make_share(tmp_path / "s", {"old school tune.mod": b"m" * 1000})
    new = Servent(listen=("127.0.0.1", 0), shares=ShareIndex.scan(share), seed=30)
    await new.start()
    old = Servent(listen=("127.0.0.1", 0), shares=ShareIndex([]), peers=[("127.0.0.1", new.port)], seed=31,
                  connect_version="0.4")
    try:
        await old.start()
        await asyncio.wait_for(old.established.wait(), 5)
        (hit, _), = await old.search("school tune", timeout=EVENT_WAIT, max_hits=1)
        assert hit.name == "old school tune.mod"
        assert new.node.peers and all(p.version == "0.4" for p in new.node.peers.values())
    finally:
        await old.stop()
        await new.stop()
    refusing = Servent(listen=("127.0.0.1", 0), shares=ShareIndex([]), seed=32, allow_04=False)
    await refusing.start()
    old2 = Servent(listen=("127.0.0.1", 0), shares=ShareIndex([]), peers=[("127.0.0.1", refusing.port)], seed=33,
                   connect_version="0.4")
    try:
        await old2.start()
        await until(lambda: refusing.stats["refused_in_503"], what="the 0.4 handshake's refusal")
        assert refusing.stats["refused_in_503"] == 1 and not old2.links
    finally:
        await old2.stop()
        await refusing.stop()


async def test_oversized_and_malformed_messages_are_counted_never_fatal(tmp_path):
    up = Servent(listen=("127.0.0.1", 0), shares=ShareIndex([]), seed=40, max_payload=1000)
    await up.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", up.port)
        writer.write(b"GNUTELLA CONNECT/0.6\r\nX-Ultrapeer: True\r\n\r\n")
        await read_headers(reader)
        writer.write(b"GNUTELLA/0.6 200 OK\r\n\r\n")
        bad_pong = b"\x01" * 16 + bytes([0x01, 1, 0]) + (3).to_bytes(4, "little") + b"abc"
        alive = Message(b"\x07" * 16, 1, 0, Ping())
        writer.write(bad_pong + alive.encode())          # malformed: dropped, the link goes on
        await writer.drain()
        framer = MessageReader()
        got = []
        while not any(m.guid == alive.guid for m in got):
            got += framer.feed(await asyncio.wait_for(reader.read(65536), 5))
        assert up.stats["malformed_dropped"] == 1
        huge = b"\x02" * 16 + bytes([0x80, 1, 0]) + (5000).to_bytes(4, "little")
        writer.write(huge)                               # cannot be skipped: that link is closed
        await writer.drain()
        while await asyncio.wait_for(reader.read(65536), 5):   # read until the servent closes the link
            pass
        assert up.stats["framing_errors"] == 1 and not up.links
        writer.close()
    finally:
        await up.stop()


@pytest.mark.parametrize("evil", ["../escaped.ogg", "../../escaped.ogg", "/tmp/escaped.ogg", "..", ".", "",
                                  "a\x00b", "sub/escaped.ogg", "back\\slash", "bell\x07"])
async def test_remote_file_names_cannot_leave_the_download_directory(pair, tmp_path, evil):
    """Review finding: ``dest_dir / hit.name`` took the remote QueryHit's name as a path."""
    a, b, payload = pair
    (hit, event), = await b.search("drone ambient", timeout=EVENT_WAIT, max_hits=1)
    out = tmp_path / "deep" / "got"
    out.mkdir(parents=True)
    result = await b.download(dataclasses.replace(hit, name=evil), event, out)
    assert not result.ok and "name" in result.error
    assert b.stats["downloads_unsafe_name"] == 1
    assert not (tmp_path / "deep" / "escaped.ogg").exists() and not (tmp_path / "escaped.ogg").exists()
    assert list(out.iterdir()) == []


async def test_a_download_never_overwrites_an_existing_file(pair, tmp_path):
    a, b, payload = pair
    (hit, event), = await b.search("drone ambient", timeout=EVENT_WAIT, max_hits=1)
    out = tmp_path / "got"
    out.mkdir()
    (out / hit.name).write_bytes(b"mine")
    (out / "ambient drone loop (1).ogg").symlink_to(tmp_path / "planted")
    result = await b.download(hit, event, out)
    assert result.ok and result.path == str(out / "ambient drone loop (2).ogg")
    assert (out / hit.name).read_bytes() == b"mine" and not (tmp_path / "planted").exists()
    assert (out / "ambient drone loop (2).ogg").read_bytes() == payload


async def test_invalid_try_addresses_are_refused_and_a_failed_dial_always_frees_its_slot():
    """Review finding: ``X-Try-Ultrapeers: 1.2.3.4:99999`` entered the host cache; dialling it
    raised OverflowError before ``_connecting.discard``, and each such address lowered ``wanted``
    for good (four, and the servent never dialled again)."""
    bad = ["127.0.0.1:99999", "127.0.0.1:0", "127.0.0.2:65536", "300.1.1.1:6346", "localhost:6346", "1.2.3.4:-1"]

    async def refusing(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"GNUTELLA/0.6 503 Busy\r\nX-Try-Ultrapeers: " + ",".join(bad + ["127.0.0.9:6346"]).encode()
                     + b"\r\n\r\n")
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(refusing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    s = Servent(listen=("127.0.0.1", 0), shares=ShareIndex([]), peers=[("127.0.0.1", port)], seed=24)
    try:
        await s.start()
        await until(lambda: s.stats["refused_by_peer_503"], what="the peer's 503")
        assert s.stats["try_hosts_refused"] == len(bad)
        assert ("127.0.0.9", 6346) in s.node.hosts()
        assert all(port_ in range(1, 65536) for _, port_ in s.node.hosts())
        # an address no socket takes, however it got there, costs one failed dial and no more
        for host, port_ in (("127.0.0.1", 99999), ("127.0.0.1", 70000), ("127.0.0.3", 65536), ("127.0.0.4", 1 << 20)):
            s.connect(host, port_)
        await until(lambda: not s._connecting, what="every dial to end")
        assert s.stats["connect_failed"] >= 4
    finally:
        await s.stop()
        server.close()


async def test_a_serving_servent_stops_when_a_critical_task_dies():
    s = Servent(listen=("127.0.0.1", 0), shares=ShareIndex([]), seed=25, tick=0.01)
    await s.start()

    def broken_tick(now):
        raise RuntimeError("tick broke")
    s.node.tick = broken_tick
    try:
        failed = await asyncio.wait_for(s.run_until(asyncio.Event()), EVENT_WAIT)
        assert failed is not None and "ticker" in str(failed)
    finally:
        await s.stop()


async def test_push_answers_are_deduplicated_and_capped(tmp_path):
    """Review finding: every PUSH naming our GUID and a shared index made us TCP-connect to an
    address the sender chose and hold it ~20 s: no dedup, no cap (reflection, fd exhaustion)."""
    from gnutella.node import PushRequested
    from gnutella.wire import Push
    share = make_share(tmp_path / "a", {"notes.txt": b"hello"})
    s = Servent(listen=("127.0.0.1", 0), shares=ShareIndex.scan(share), seed=26)
    await s.start()
    held: list = []
    arrived = asyncio.Queue()

    async def holding(reader, writer):      # reads the GIV and keeps the connection open
        held.append(writer)
        arrived.put_nowait(await reader.readline())
    servers = [await asyncio.start_server(holding, f"127.0.0.{n}", 0) for n in range(2, 14)]
    targets = [srv.sockets[0].getsockname() for srv in servers]
    index = next(iter(s.shares.files))
    try:
        def push(ip, port, file_index=index):
            s._perform([PushRequested(Push(s.guid, file_index, ip, port))])
        for _ in range(5):
            push(*targets[0])
        assert s.stats["push_duplicate"] == 4
        push("127.0.0.2", 99999)
        push("0.0.0.0", 6346)
        push(targets[1][0], targets[1][1], file_index=4242)
        assert s.stats["push_refused_address"] == 2 and s.stats["push_unknown_file"] == 1
        for ip, port in targets[1:]:
            push(ip, port)
        assert s.stats["push_refused_busy"] == len(targets) - s.max_push_answers
        for _ in range(s.max_push_answers):
            assert (await asyncio.wait_for(arrived.get(), EVENT_WAIT)).startswith(b"GIV ")
        assert arrived.empty()
    finally:
        for w in held:
            w.close()
        for srv in servers:
            srv.close()
        await s.stop()
