"""Issue 11's probes against fcd-server and fcd-tuplespace, as real processes over loopback.

Each test is a probe that got through before the limits existed (8 concurrent 64 MiB XML-RPC
bodies: server RSS 87 -> 599 MB; 200 half-sent 1 MiB tuplespace frames: 26 -> 141 MB; slowloris
connections kept forever) and now shows bounded memory and the refusal counters.  Waiting is
on events (a response, the server closing a connection), never on sleeps.
"""

import asyncio
import json
import struct
import urllib.request

import pytest

from boxcore.procs import ProcessGroup, free_port, python_module
from fcd.rpc import KeepAliveClient
from fcd.tuplespace import (TupleSpaceClient, TupleSpaceServer, encode_frame)

MiB = 1 << 20


def rss(pid: int) -> int:
    """Resident set size of a process, bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def http_status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=20) as resp:
        return json.loads(resp.read())


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Read until the server closes (FIN or reset): True; data instead: False."""
    try:
        return await asyncio.wait_for(reader.read(), 30) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
async def group(tmp_path):
    g = ProcessGroup(tmp_path / "roles")
    yield g
    await g.stop_all()


async def start_server(group, tmp_path, small_trace, *extra):
    city = tmp_path / "city.npz"
    small_trace.save(city)
    http = free_port()
    role = group.start("server", [*python_module("fcd.server"), "--city", str(city), "--http", f"127.0.0.1:{http}",
                                  "--udp", f"127.0.0.1:{free_port(2)}", *extra], ready=True)
    await group.wait_ready(role, timeout=60)
    return role, http


async def oversized_post(port: int, chunked: bool, peak: list, pid: int) -> bytes:
    """POST a 64 MiB body (declared, or chunked without a length) until the server answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    length = 64 * MiB
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"
    writer.write(f"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\n{framing}\r\n\r\n".encode())
    answer = asyncio.ensure_future(reader.read(4096))
    chunk = b"<" * MiB
    try:
        for _ in range(64):
            if answer.done():
                break
            writer.write((b"%x\r\n" % len(chunk) + chunk + b"\r\n") if chunked else chunk)
            await writer.drain()
            peak[0] = max(peak[0], rss(pid))
    except (ConnectionError, OSError):
        pass                         # the server closed the connection after answering
    head = await answer
    writer.close()
    return head


async def test_concurrent_huge_xmlrpc_bodies_are_refused_with_bounded_memory(group, tmp_path, small_trace):
    role, port = await start_server(group, tmp_path, small_trace)
    client = KeepAliveClient("127.0.0.1", port)
    assert "fcd.report" in await client.call("system.listMethods")
    base = rss(role.proc.pid)
    peak = [base]
    heads = await asyncio.gather(*[oversized_post(port, chunked, peak, role.proc.pid)
                                   for chunked in (False, True) for _ in range(8)])
    assert all(h.startswith(b"HTTP/1.1 413") for h in heads[:8]), heads
    assert all(h.startswith(b"HTTP/1.1 411") for h in heads[8:]), heads
    counters = http_status(port)["counters"]
    assert counters["http_refused_body"] == 8 and counters["http_refused_length"] == 8
    # before: +512 MB; now nothing of a refused body is read
    print(f"8+8 x 64 MiB bodies: server RSS {base / MiB:.0f} -> {peak[0] / MiB:.0f} MiB")
    assert peak[0] - base < 16 * MiB, (base, peak)
    assert "fcd.report" in await client.call("system.listMethods")    # the legitimate client is served
    await client.aclose()


async def test_concurrent_bodies_at_the_limit_are_processed_a_few_at_a_time(group, tmp_path, small_trace):
    role, port = await start_server(group, tmp_path, small_trace)
    base = rss(role.proc.pid)
    peak = [base]

    async def post_at_limit() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Length: {MiB}\r\n\r\n".encode())
        for _ in range(16):
            writer.write(b"<" * (MiB // 16))
            await writer.drain()
            peak[0] = max(peak[0], rss(role.proc.pid))
        head = await reader.read(4096)
        writer.close()
        return head

    heads = await asyncio.gather(*[post_at_limit() for _ in range(32)])
    assert all(h.startswith(b"HTTP/1.1 200") and b"malformed request" in h for h in heads)
    counters = http_status(port)["counters"]
    assert counters["rpc_malformed"] == 32 and counters["rpc_waited"] > 0
    print(f"32 x 1 MiB bodies: server RSS {base / MiB:.0f} -> {peak[0] / MiB:.0f} MiB")
    assert peak[0] - base < 40 * MiB, (base, peak)


async def test_slowloris_and_excess_connections_are_closed(group, tmp_path, small_trace):
    role, port = await start_server(group, tmp_path, small_trace, "--header-timeout", "0.5",
                                    "--idle-timeout", "1", "--max-connections", "40")
    conns = []
    for _ in range(50):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nX-Slow: ")     # a head that never ends
        conns.append((reader, writer))
    # every one is closed by the server: 10 at once (over the cap), 40 at the header timeout
    assert all(await asyncio.gather(*[closed_by_server(r) for r, _ in conns]))
    for _, w in conns:
        w.close()
    # a connection idle after a request is closed too (aiohttp's keep-alive timeout)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 30)).startswith(b"HTTP/1.1 200")   # read() ends at close
    writer.close()
    counters = http_status(port)["counters"]
    assert counters["http_refused_connections"] == 10
    assert counters["http_header_timeouts"] == 40


async def half_sent_frame(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(struct.pack("!I", MiB) + b"\0" * (MiB // 2))      # a 1 MiB frame, half of it
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    closed = await closed_by_server(reader)
    writer.close()
    return closed


async def test_tuplespace_half_sent_frames_are_bounded(group, tmp_path):
    port = free_port()
    role = group.start("ts", [*python_module("fcd.tuplespace"), "--listen", f"127.0.0.1:{port}",
                              "--frame-timeout", "2"], ready=True)
    await group.wait_ready(role, timeout=60)
    client = await TupleSpaceClient.connect("127.0.0.1", port)
    await client.out(("alive", 1))
    base = rss(role.proc.pid)
    probes = [asyncio.ensure_future(half_sent_frame(port)) for _ in range(200)]
    peak = base
    while not all(p.done() for p in probes):
        peak = max(peak, rss(role.proc.pid))
        await asyncio.wait(probes, timeout=0.05)          # sample memory while the probes are held
    assert all(p.result() for p in probes)
    assert await client.rdp(("alive", int)) == ("alive", 1)              # the legitimate client is served
    await client.close()
    # before: +115 MB; now incomplete frames are bounded at 16 MiB over all connections
    print(f"200 half-sent 1 MiB frames: tuplespace RSS {base / MiB:.0f} -> {peak / MiB:.0f} MiB")
    assert peak - base < 40 * MiB, (base, peak)
    assert await group.stop(role) == 0
    stats = role.read_stats()["server"]
    assert stats["refused_buffer"] > 0 and stats["frame_timeouts"] > 0
    assert stats["refused_buffer"] + stats["frame_timeouts"] == 200


async def test_tuplespace_caps_connections_and_closes_idle_ones_but_not_blocked_callers():
    server = TupleSpaceServer(max_connections=3, idle_timeout=0.3, frame_timeout=0.3)
    host, port = await server.start("127.0.0.1", 0)
    blocked = await TupleSpaceClient.connect(host, port)
    waiting = asyncio.ensure_future(blocked.in_(("job", int)))           # blocks beyond the idle timeout
    await server.driver.until(lambda: len(server.space.waiters) == 1)
    idle_r, idle_w = await asyncio.open_connection(host, port)
    slow_r, slow_w = await asyncio.open_connection(host, port)
    slow_w.write(struct.pack("!I", 100) + b"\x81")                        # a frame that never completes
    over_r, over_w = await asyncio.open_connection(host, port)           # the fourth: refused
    assert await closed_by_server(over_r)
    assert await closed_by_server(idle_r) and await closed_by_server(slow_r)
    writer = await TupleSpaceClient.connect(host, port)
    await writer.out(("job", 1))
    assert await waiting == ("job", 1)
    assert server.stats["refused_connections"] == 1
    assert server.stats["idle_closed"] == 1 and server.stats["frame_timeouts"] == 1
    for w in (idle_w, slow_w, over_w):
        w.close()
    await writer.close()
    await blocked.close()
    await server.close()


async def test_tuplespace_closes_a_client_that_does_not_read():
    server = TupleSpaceServer(max_output=64 * 1024)
    host, port = await server.start("127.0.0.1", 0)
    writer = await TupleSpaceClient.connect(host, port)
    for i in range(50):
        await writer.out(("big", i, "x" * 20_000))
    reader, w = await asyncio.open_connection(host, port)
    w.transport.pause_reading()                          # never reads its replies
    request = encode_frame({"op": "rd_all", "id": 1, "template": ["big", int, str]})
    for _ in range(200):
        w.write(request)
    await w.drain()
    w.transport.resume_reading()
    try:
        while await reader.read(1 << 20):              # what was sent before the server gave up
            pass
    except ConnectionError:
        pass
    assert server.stats["slow_readers_closed"] == 1
    assert await writer.rdp(("big", 0, str)) is not None
    w.close()
    await writer.close()
    await server.close()
