"""boxcore.splice over real loopback TCP: bytes both ways, half-close, the idle and stall bounds."""

import asyncio
import collections
import socket

import pytest

from boxcore.splice import splice

pytestmark = pytest.mark.timeout(30)


async def _pair():
    """Two connected stream ends: (reader, writer) for our side, a raw socket for the peer."""
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    theirs.setblocking(False)
    return (reader, writer), theirs


@pytest.fixture
async def ends():
    """The client's and the server's side of a splice: ((reader, writer), peer socket) each,
    all closed after the test."""
    client, server = await _pair(), await _pair()
    yield client, server
    for (_, writer), peer in (client, server):
        writer.close()
        peer.close()


async def _recv(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = b""
    while len(got) < n:
        chunk = await loop.sock_recv(sock, n - len(got))
        if not chunk:
            break
        got += chunk
    return got


async def test_bytes_both_ways_and_a_half_close_is_passed_on(ends):
    (client, client_peer), (server, server_peer) = ends
    stats = collections.Counter()
    task = asyncio.create_task(splice(client, server, stats, idle=5, stall=5))
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(client_peer, b"request")
    assert await _recv(server_peer, 7) == b"request"
    client_peer.shutdown(socket.SHUT_WR)                     # the client is done sending
    assert await _recv(server_peer, 1) == b""                # ... and the server sees the EOF
    await loop.sock_sendall(server_peer, b"answer")          # the other way still works
    assert await _recv(client_peer, 6) == b"answer"
    server_peer.close()
    await asyncio.wait_for(task, 5)
    assert stats == {"tcp_bytes_up": 7, "tcp_bytes_down": 6}


async def test_a_connection_silent_both_ways_is_closed_after_idle_but_not_while_one_way_talks(ends):
    (client, client_peer), (server, server_peer) = ends
    stats = collections.Counter()
    task = asyncio.create_task(splice(client, server, stats, idle=1.0, stall=5))
    loop = asyncio.get_running_loop()
    for i in range(8):                                       # 1.6 s of traffic one way only, 0.2 s apart
        await loop.sock_sendall(server_peer, b"x")
        assert await _recv(client_peer, 1) == b"x"
        await asyncio.sleep(0.2)
    assert not task.done()                                   # the quiet way did not end it
    await asyncio.wait_for(task, 5)                          # then silence: closed
    assert stats["tcp_idle_closed"] == 1 and stats["tcp_bytes_down"] == 8


async def test_a_receiver_that_never_reads_ends_the_splice_after_stall(ends):
    (client, client_peer), (server, server_peer) = ends       # server_peer never reads
    server_peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stats = collections.Counter()
    task = asyncio.create_task(splice(client, server, stats, idle=None, stall=0.3))
    loop = asyncio.get_running_loop()
    sent = 0
    with pytest.raises((BlockingIOError, asyncio.TimeoutError, ConnectionError, OSError)):
        while True:                                          # until our side's buffers are full too
            await asyncio.wait_for(loop.sock_sendall(client_peer, b"y" * 65536), 2)
            sent += 65536
    await asyncio.wait_for(task, 5)
    assert stats["tcp_stalled"] == 1 and 0 < stats["tcp_bytes_up"] <= sent + 65536
