"""A review's findings on the tuplespace, as the requests that got through: a NaN lease that
stopped every expiry, limits and timeouts that crashed a request (no answer: the client hung),
a client that waited for ever on a server that never answered."""

import asyncio
import math

import pytest

from boxcore.testing import FakeClock
from fcd.tuplespace import Space, SpaceDriver, TupleSpaceClient, TupleSpaceError, TupleSpaceServer


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


# ---------------------------------------------------------------- 7: memory and fairness

@pytest.fixture
async def served():
    """A server with small bounds and two clients (two connections) over loopback."""
    from fcd.tuplespace import Quotas
    clock = FakeClock(1000.0)
    space = Space(max_bytes=2_000_000, quotas=Quotas(waiters=2, subscriptions=2, unleased=3))
    server = TupleSpaceServer(space, clock=clock)
    host, port = await server.start("127.0.0.1", 0)
    a, b = await TupleSpaceClient.connect(host, port), await TupleSpaceClient.connect(host, port)
    yield server, space, a, b
    await a.close()
    await b.close()
    await server.close()


async def test_bytes_held_and_reply_size_are_bounded(served):
    server, space, a, b = served
    blob = b"x" * 300_000
    for i in range(6):
        await a.out(("blob", i, blob), lease=60.0)
    with pytest.raises(TupleSpaceError, match="bytes"):
        await a.out(("blob", 6, blob), lease=60.0)
    assert space.stats["refused_bytes"] == 1 and space.bytes <= space.max_bytes
    # one reply holds what one frame may: the rest stays for the next call
    got = await b.rd_all(("blob", int, bytes))
    assert 1 <= len(got) < 6 and space.stats["replies_cut"] == 1
    taken = await b.in_all(("blob", int, bytes))
    assert [t[1] for t in taken] == list(range(len(taken)))
    assert space.bytes == sum(space.sizes.values())
    assert await b.rdp(("blob", int, bytes)) is not None       # the connection survived the large replies


async def test_one_connection_cannot_take_all_waiters_subscriptions_or_tuples(served):
    server, space, a, b = served
    blocked = [asyncio.ensure_future(a.in_(("job", int))) for _ in range(2)]
    await server.driver.until(lambda: len(space.waiters) == 2)
    with pytest.raises(TupleSpaceError, match="quota"):
        await a.in_(("job", int))
    other = asyncio.ensure_future(b.in_(("job", int)))          # another connection still may wait
    await server.driver.until(lambda: len(space.waiters) == 3)
    for i in range(3):
        await b.out(("job", i), lease=5.0)
    assert sorted([await f for f in blocked] + [await other]) == [("job", 0), ("job", 1), ("job", 2)]
    assert not space.held                                          # every quota released on delivery
    for _ in range(2):
        await a.notify(("n", int))
    with pytest.raises(TupleSpaceError, match="quota"):
        await a.notify(("n", int))
    await b.notify(("n", int))
    for i in range(3):
        await a.out(("u", i))
    with pytest.raises(TupleSpaceError, match="quota"):
        await a.out(("u", 3))
    await a.out(("u", 3), lease=5.0)                               # leased tuples leave by themselves
    await b.out(("u", 4))
    assert await b.inp(("u", 0)) == ("u", 0)
    await a.out(("u", 5))                                          # one taken: room again
    assert space.stats["refused_quota_waiters"] == space.stats["refused_quota_subscriptions"] == 1
    assert space.stats["refused_quota_unleased"] == 1


from hypothesis import given, settings, strategies as st  # noqa: E402

ANY_ARG = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70), st.floats(),
                    st.text(max_size=3), st.lists(st.integers(), max_size=2))


@settings(max_examples=200, deadline=None)
@given(op=st.sampled_from(["out", "rd", "in", "rd_all", "in_all"]), lease=ANY_ARG, timeout=ANY_ARG, limit=ANY_ARG)
def test_any_argument_is_served_or_refused_with_a_tuplespace_error(op, lease, timeout, limit):
    """What a request's fields may hold: the answer is a result or a TupleSpaceError, never a
    crash (no answer), and nothing unbounded enters the space's deadlines."""
    from fcd.tuplespace import _execute

    async def run():
        driver = SpaceDriver(clock=FakeClock(0.0))
        kw = {"tuple": ("p", 1), "template": ("p", int), "lease": lease, "timeout": timeout, "limit": limit}
        if op in ("rd", "in"):
            driver.out(("p", 0), None)      # found at once: this test never waits on its fake clock
        try:
            await _execute(driver, op, kw)
        except TupleSpaceError:
            pass
        assert all(math.isfinite(when) for when, *_ in driver.space._deadlines)

    asyncio.run(run())
