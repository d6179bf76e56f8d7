"""Stopping a servent is bounded: a cancellation that lands just as a wait ends is never lost.

Python 3.11's ``asyncio.wait_for`` returns the inner result when its caller is cancelled in the
same loop iteration as the inner awaitable finishes: the cancellation is dropped.  A servent
stopped at that moment went on with its handshake, opened a link after ``stop()`` had closed them
all, and ``stop()`` then waited on that link (kept alive by the still-running peer) without bound
(the 300 s hang seen once in CI).  Here the stop is started exactly at that point: from inside the
read that brings the peer's handshake answer."""

import asyncio
import socket
from collections import Counter

import pytest

from cliruntime.supervisor import within
from gnutella import http as ghttp
from gnutella.channel import Channel, tls_contexts
from boxcore.splice import splice
from gnutella.booster import SPLICE_COUNTERS
from gnutella.servent import Servent
from gnutella.share import ShareIndex
from gnutella.stream import MessageStream, pump_messages
from gnutella.wire import DEFAULT_MAX_PAYLOAD, Message, Ping, new_guid

from tests.polling import until


async def test_stop_landing_as_a_handshake_read_ends_is_not_lost(tmp_path, monkeypatch):
    peer_writers: list[asyncio.StreamWriter] = []
    peer_saw_eof = asyncio.Event()

    async def silent_peer(reader, writer):
        """Answers the CONNECT with a 200, then says nothing (a real peer's alive pings would keep
        a link open just the same); notes when the servent closes the connection."""
        peer_writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"GNUTELLA/0.6 200 OK\r\nX-Ultrapeer: True\r\nUser-Agent: probe\r\n\r\n")
        await writer.drain()
        while await reader.read(1 << 16):
            pass
        peer_saw_eof.set()

    server = await asyncio.start_server(silent_peer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    (tmp_path / "b").mkdir()
    b = Servent(listen=("127.0.0.1", 0), shares=ShareIndex.scan(tmp_path / "b"), seed=2, tick=0.1, tls=False,
                compress=False, idle_timeout=60)
    await b.start()
    stopping: list[asyncio.Task] = []
    read_raw = Channel._read_raw

    async def read_then_stop(channel: Channel) -> bytes:
        data = await read_raw(channel)
        if b"GNUTELLA/0.6 200" in data and not stopping:
            # stop() runs before the reader's caller resumes: its cancel meets a finished read
            stopping.append(asyncio.get_running_loop().create_task(b.stop()))
        return data

    monkeypatch.setattr(Channel, "_read_raw", read_then_stop)
    async with server:
        try:
            b.connect("127.0.0.1", port)
            await until(lambda: stopping, "the peer's handshake answer")
            done, _ = await asyncio.wait(stopping, timeout=20)      # past STOP_TIMEOUT
            assert done, "stop() did not return: a cancellation was lost and a link outlived the servent"
            stopping[0].result()
            assert not b.links and b.supervisor.active == 0
            await asyncio.wait_for(peer_saw_eof.wait(), 10)
        finally:
            for writer in peer_writers:      # ends a link left behind, so a failing run does not hang
                writer.close()
            if stopping:
                await asyncio.wait(stopping, timeout=10)


async def test_within_keeps_a_cancellation_that_lands_as_the_wait_ends():
    """The unit of the fix: asyncio.wait_for on 3.11 would return 1 here and drop the cancel."""
    finished = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(within(finished, 10))
    await asyncio.sleep(0)                  # the task now waits on ``finished``
    finished.set_result(1)
    task.cancel()                           # same iteration: before the task resumes
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_within_times_out():
    with pytest.raises(TimeoutError):
        await within(asyncio.sleep(10), 0.01)


async def test_a_dial_that_connects_to_itself_is_a_down_peer_not_a_tls_failure(tmp_path, monkeypatch):
    """The UNEXPECTED_MESSAGE of the CI hang: a servent kept dialling a stopped peer's closed port
    (in TLS, as it was known to speak it) until the kernel picked that very port as the source and
    TCP connected the socket to itself; the ClientHello came back as the answer."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.connect(("127.0.0.1", port))           # simultaneous open with itself: nothing listens there
    sock.setblocking(False)

    open_connection = asyncio.open_connection

    async def self_connected(*args, **kw):
        return await open_connection(sock=sock)

    (tmp_path / "a").mkdir()
    a = Servent(listen=("127.0.0.1", 0), shares=ShareIndex.scan(tmp_path / "a"), seed=1, tick=60)
    await a.start()
    try:
        a._learn_tls(("127.0.0.1", port))
        monkeypatch.setattr("gnutella.servent.asyncio.open_connection", self_connected)
        a.connect("127.0.0.1", port)
        await until(lambda: a.stats["connect_self"] == 1 and not a._connecting)
        assert a.stats["tls_direct_failed"] == 0 and ("127.0.0.1", port) in a.tls_hosts
    finally:
        await a.stop()


class _PeerNotReading:
    """A channel (unit-test fake) whose peer sent one ping and never reads what we write: our
    write buffer stays above its high-water mark, so drain() never returns."""

    def __init__(self) -> None:
        self.reads = [Message(new_guid(bytes(16)), 1, 0, Ping()).encode()]

    async def read(self) -> bytes:
        return self.reads.pop() if self.reads else await asyncio.Event().wait()

    async def drain(self) -> None:
        await asyncio.Event().wait()


async def test_a_peer_that_stops_reading_ends_the_pump_after_the_idle_timeout():
    stats: Counter = Counter()
    got = []
    pump = pump_messages(MessageStream(_PeerNotReading()), b"", DEFAULT_MAX_PAYLOAD, stats,
                         lambda msg, now: got.append(msg), keep_going=lambda: True, idle_timeout=0.05)
    await within(pump, 10)          # before: the pump waited in drain() for ever
    assert len(got) == 1 and stats["stalled_peers"] == 1


async def test_an_upload_whose_client_stalls_in_the_tls_upgrade_ends_after_the_header_timeout(tmp_path):
    """Slowloris on uploads: a GET asking for the TLS upgrade, then silence after the 101."""
    (tmp_path / "song.ogg").write_bytes(b"s" * 1000)
    shares = ShareIndex.scan(tmp_path)
    (shared,) = shares.files.values()
    stats: Counter = Counter()
    served = asyncio.Event()

    async def handle(reader, writer):
        channel = Channel(reader, writer)
        try:
            await ghttp.serve_upload(channel, shares, b"", "test", stats, tls_contexts(), header_timeout=0.3)
        finally:
            channel.close()
            served.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.write(f"GET /get/{shared.index}/song.ogg HTTP/1.1\r\nHost: x\r\nUpgrade: TLS/1.0\r\n"
                     "Connection: Upgrade\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
        await within(served.wait(), 10)             # before: the upload waited in the handshake for ever
        assert stats["http_upload_stalled"] == 1 and stats["http_tls_upgrades"] == 0
        assert await within(reader.read(), 10) == b""
        writer.close()


async def test_a_stall_bound_ends_the_pump_even_without_an_idle_timeout():
    """The booster's links have no idle timeout (a quiet leaf is fine) but a stalled one ends."""
    stats: Counter = Counter()
    pump = pump_messages(MessageStream(_PeerNotReading()), b"", DEFAULT_MAX_PAYLOAD, stats,
                         lambda msg, now: None, keep_going=lambda: True, idle_timeout=None, stall_timeout=0.05)
    await within(pump, 10)          # before: no idle timeout meant drain() was waited on for ever
    assert stats["stalled_peers"] == 1


class _EndlessSource:
    """A download's sender (unit-test fake) that always has another chunk."""

    async def read(self, n: int) -> bytes:
        return b"x" * n


async def test_a_splice_whose_receiver_stops_reading_ends_after_the_stall_timeout():
    """A relayed upload whose receiver never reads: real kernel buffers fill, then the splice
    ends (and frees its slot) instead of waiting in drain() for ever."""
    accepted: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    server = await asyncio.start_server(lambda r, w: accepted.append((r, w)), "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        up = await asyncio.open_connection("127.0.0.1", port)             # its far end never reads
        _, client_writer = await asyncio.open_connection("127.0.0.1", port)
        stats: Counter = Counter()
        await within(splice((_EndlessSource(), client_writer), up, stats, idle=None, stall=0.2,
                            counters=SPLICE_COUNTERS), 30)
        assert stats["splice_stalled"] == 1 and stats["spliced_bytes_up"] > 65536
        for _, w in [up, (None, client_writer), *accepted]:
            w.close()
