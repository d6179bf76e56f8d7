"""A review's findings on the tuplespace, as the requests that got through: a NaN lease that
stopped every expiry, limits and timeouts that crashed a request (no answer: the client hung),
a client that waited for ever on a server that never answered."""

import asyncio
import math

import pytest

from boxcore.testing import FakeClock
from fcd.tuplespace import (LocalTupleSpace, Space, SpaceDriver, TupleSpaceClient, TupleSpaceError,
                            TupleSpaceServer)


@pytest.fixture(params=["local", "tcp"])
async def ts(request):
    clock = FakeClock(1000.0)
    if request.param == "local":
        space = LocalTupleSpace(driver=SpaceDriver(clock=clock))
        space.clock = clock
        yield space
        return
    server = TupleSpaceServer(clock=clock)
    host, port = await server.start("127.0.0.1", 0)
    client = await TupleSpaceClient.connect(host, port)
    client.server, client.driver, client.clock = server, server.driver, clock
    yield client
    await client.close()
    await server.close()


BAD_LEASES = [math.nan, math.inf, -1.0, 0, True, 1e300, "5"]


@pytest.mark.parametrize("lease", BAD_LEASES)
async def test_a_bad_lease_is_refused_and_expiry_goes_on(ts, lease):
    with pytest.raises(TupleSpaceError, match="lease"):
        await ts.out(("p", 1), lease=lease)
    with pytest.raises(TupleSpaceError, match="lease"):
        await ts.notify(("p", int), lease=lease)
    await ts.out(("p", 2), lease=5.0)
    await ts.clock.advance(6.0)
    assert await ts.rdp(("p", int)) is None          # expired: nothing stuck at the heap's top
    assert ts.driver.space.stats["expired"] == 1


@pytest.mark.parametrize("timeout", [math.nan, math.inf, -1.0, True, 1e300])
async def test_a_bad_timeout_is_refused(ts, timeout):
    with pytest.raises(TupleSpaceError, match="timeout"):
        await ts.rd(("p", int), timeout=timeout)
    assert not ts.driver.space.waiters


@pytest.mark.parametrize("limit", [math.inf, math.nan, 0, -1, 10_001, True, 2.0, 2 ** 62])
async def test_a_bad_limit_is_refused_with_an_answer(ts, limit):
    await ts.out(("p", 1))
    for call in (ts.rd_all, ts.in_all):
        with pytest.raises(TupleSpaceError, match="limit"):
            await call(("p", int), limit=limit)
    assert await ts.rd_all(("p", int), limit=1) == [("p", 1)]


def test_the_core_refuses_a_nan_deadline():
    space = Space()
    with pytest.raises(TupleSpaceError):
        space.wait(1, ("p", int), False, math.nan)
    with pytest.raises(TupleSpaceError):
        space.subscribe(1, ("p", int), math.nan, 0.0)
    assert not space._deadlines


async def test_the_client_does_not_wait_for_ever_on_a_silent_server():
    received = asyncio.Event()

    async def silent(reader, writer):
        await reader.read(1)
        received.set()
        await reader.read()            # never answers
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = await TupleSpaceClient.connect("127.0.0.1", port)
    client.answer_timeout = 0.2
    for call in (lambda: client.out(("p", 1)), lambda: client.rdp(("p", int)),
                 lambda: client.rd_all(("p", int)), lambda: client.notify(("p", int)),
                 lambda: client.rd(("p", int), timeout=0.1)):
        with pytest.raises(TupleSpaceError, match="no answer"):
            await call()
    assert received.is_set() and client.stats["unanswered"] == 5 and not client._pending
    await client.close()
    server.close()
    await server.wait_closed()
