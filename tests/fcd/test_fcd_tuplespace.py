"""Tuplespace semantics, in-process and over TCP, on a FakeClock: timeouts and leases move when
the test moves time, and blocked callers are awaited as state changes, never slept for."""

import asyncio
import struct

import pytest
from hypothesis import given, settings, strategies as st

from boxcore.framing import FramingError
from fcd.tuplespace import (Space, TupleDecodeError, TupleSpaceError, TupleSpaceServer, encode_frame, frame_decoder,
                            matches)


async def blocked(ts, n):
    """Until ``n`` callers are blocked in the space."""
    await ts.driver.until(lambda: len(ts.driver.space.waiters) == n)


def test_template_matching_is_typed():
    assert matches(("a", int), ("a", 1))
    assert not matches(("a", int), ("a", 1.0))
    assert not matches(("a", int), ("a", True))
    assert matches(("a", None, float), ("a", [1, 2], 2.5))
    assert not matches(("a", 1), ("a", 1.0))
    assert not matches(("a",), ("a", 1))
    assert matches((str, list, dict), ("x", [1], {"k": 1}))


async def test_out_rd_in_and_nonblocking(ts):
    await ts.out(("road", 1, 2.5))
    await ts.out(("road", 2, 3.5))
    assert await ts.rdp(("road", 1, float)) == ("road", 1, 2.5)
    assert await ts.rdp(("road", int, str)) is None
    assert await ts.inp(("road", int, float)) == ("road", 1, 2.5)     # oldest first
    assert await ts.rd_all(("road", int, float)) == [("road", 2, 3.5)]
    assert await ts.in_all(("road", None, None)) == [("road", 2, 3.5)]
    assert await ts.inp(("road", None, None)) is None


async def test_blocking_with_timeout_and_wakeup(ts):
    timing_out = asyncio.create_task(ts.in_(("x", int), timeout=0.05))
    await blocked(ts, 1)
    await ts.clock.advance(0.049)
    assert not timing_out.done() and len(ts.driver.space.waiters) == 1
    await ts.clock.advance(0.001)
    assert await timing_out is None
    waiter = asyncio.create_task(ts.in_(("x", int), timeout=5))
    await blocked(ts, 1)
    await ts.out(("x", 7))
    assert await waiter == ("x", 7)
    assert await ts.rdp(("x", int)) is None
    assert ts.driver.space.stats["timeouts"] == 1


async def test_fifo_fairness_among_blocked_takers(ts):
    order = []

    async def taker(name):
        tup = await ts.in_(("job", int), timeout=5)
        order.append((name, tup[1]))

    reader = asyncio.create_task(ts.rd(("job", int), timeout=5))   # queued first: sees job 0
    await blocked(ts, 1)
    tasks = []
    for n, name in enumerate("abc"):
        tasks.append(asyncio.create_task(taker(name)))
        await blocked(ts, n + 2)
    for n in range(3):
        await ts.out(("job", n))
    await asyncio.gather(*tasks)
    assert order == [("a", 0), ("b", 1), ("c", 2)]
    assert await reader == ("job", 0)        # readers see the tuple without taking it
    assert await ts.rdp(("job", int)) is None


async def test_leases_expire(ts):
    await ts.out(("lease", 1), lease=0.05)
    await ts.out(("lease", 2))
    assert len(await ts.rd_all(("lease", int))) == 2
    await ts.clock.advance(0.049)
    assert len(await ts.rd_all(("lease", int))) == 2
    await ts.clock.advance(0.001)
    assert await ts.rd_all(("lease", int)) == [("lease", 2)]
    assert ts.driver.space.stats["expired"] == 1


async def test_notify_on_write(ts):
    sub = await ts.notify(("pred", int, float), lease=10)
    await ts.out(("pred", 1, 1.5))
    await ts.out(("other", 1, 1.5))
    await ts.out(("pred", 2, 2.5))
    # a notification is sent before the reply to the out that caused it: the queue is complete
    assert [sub.queue.get_nowait() for _ in range(sub.queue.qsize())] == [("pred", 1, 1.5), ("pred", 2, 2.5)]
    await sub.cancel()
    await ts.out(("pred", 3, 3.5))
    assert sub.queue.empty()
    expiring = await ts.notify(("pred", int, float), lease=10)
    await ts.clock.advance(10)
    assert [x async for x in expiring] == []          # the lease ended the subscription
    assert not ts.driver.space.subscriptions


async def test_errors_are_reported_not_fatal(ts):
    with pytest.raises(TupleSpaceError):
        await ts.out(("bad", None))
    with pytest.raises(TupleSpaceError):
        await ts.rd(())
    await ts.out(("still", "works"))
    assert await ts.rdp(("still", str)) == ("still", "works")


def test_space_bounds_count_refusals():
    space = Space(max_tuples=2, max_waiters=1)
    space.out(("a",), None, 0)
    space.out(("b",), 1.0, 0)
    with pytest.raises(TupleSpaceError, match="full"):
        space.out(("c",), None, 0.5)
    space.out(("c",), None, 2.0)        # the leased tuple expired and made room
    space.wait(1, ("z",), True, None)
    with pytest.raises(TupleSpaceError, match="blocked"):
        space.wait(2, ("z",), True, None)
    assert space.stats["refused_full"] == 1 and space.stats["refused_waiters"] == 1


async def test_bad_frames_are_counted_and_the_connection_survives():
    server = TupleSpaceServer()
    host, port = await server.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(host, port)
    body = b"\xc1garbage"
    writer.write(struct.pack("!I", len(body)) + body)
    writer.write(encode_frame({"op": "out", "id": 5, "tuple": ["ok", 1]}))
    writer.write(encode_frame([1, 2]))                      # valid msgpack, not a map
    frames = frame_decoder()
    replies = []
    while len(replies) < 3:
        replies += frames.feed(await reader.read(4096))
    errors = [r["error"] for r in replies if r["id"] is None]      # answered at once, in order
    assert "msgpack" in errors[0] and errors[1] == "a frame must hold a map"
    assert {"id": 5, "ok": True, "result": 1} in replies
    assert server.stats["bad_frames"] == 2
    writer.write(struct.pack("!I", 0))                      # a lost boundary closes the connection
    assert await reader.read() == b""
    assert server.stats["bad_frames"] == 3
    writer.close()
    await server.close()


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_frame_decoding_fuzz(data):
    frames = frame_decoder(max_frame=1000)
    try:
        for msg in frames.feed(data):
            assert isinstance(msg, (dict, TupleDecodeError))
    except FramingError:
        pass


@settings(max_examples=100)
@given(st.lists(st.one_of(st.integers(-2**40, 2**40), st.text(max_size=5), st.floats(allow_nan=False),
                          st.binary(max_size=5), st.booleans()), min_size=1, max_size=5))
def test_tuples_survive_the_wire(values):
    msg = {"op": "out", "id": 1, "tuple": values, "template": [int, float, str, None]}
    (decoded,) = frame_decoder().feed(encode_frame(msg))
    assert decoded == msg


def test_unknown_wildcard_is_a_decode_error():
    import msgpack
    from boxcore.framing import encode_frame as raw_frame
    (err,) = frame_decoder().feed(raw_frame({"template": [msgpack.ExtType(1, b"set")]}))
    assert isinstance(err, TupleDecodeError) and "set" in str(err)
