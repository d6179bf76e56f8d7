"""The tuplespace's Linda semantics, the same on every backend: in-process, the TCP server, one
Redis node and a 3-node Redis Cluster (real servers)."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from fcd.tuplespace import LocalTupleSpace, Space, TupleSpaceClient, TupleSpaceError, TupleSpaceServer
from fcd.tuplespace_redis import RedisTupleSpace
from tests.redis_support import redis_cluster, redis_node  # noqa: F401  (fixtures)
from tests.polling import until

_names = itertools.count()


def _counter(count):
    async def waiting() -> int:
        return count()
    return waiting


@pytest.fixture(params=["local", "tcp", "redis", "redis-cluster"])
async def space(request):
    kind = request.param
    if kind == "local":
        ts = LocalTupleSpace(Space(max_tuples=50, max_waiters=8))
        ts.waiting_for_test = _counter(lambda: len(ts.driver.space.waiters))
        yield ts
        await ts.close()
    elif kind == "tcp":
        server = TupleSpaceServer(Space(max_tuples=50, max_waiters=8))
        host, port = await server.start("127.0.0.1", 0)
        ts = await TupleSpaceClient.connect(host, port)
        ts.waiting_for_test = _counter(lambda: len(server.space.waiters))
        yield ts
        await ts.close()
        await server.close()
    else:
        url = (request.getfixturevalue("redis_node") if kind == "redis"
               else request.getfixturevalue("redis_cluster")).url
        ts = await RedisTupleSpace.connect(url, name=f"t{next(_names)}", max_tuples=50, max_waiters=8)

        async def redis_waiting() -> int:
            return int(await ts.client.hlen(f"{ts.prefix}:wt"))
        ts.waiting_for_test = redis_waiting
        yield ts
        await ts.close()


async def test_typed_templates_match_like_the_core(space):
    await space.out(("speed", 1, 1.0, True, "a", b"b", [1, 2], {"k": 1}))
    assert await space.rdp(("speed", int, float, bool, str, bytes, list, dict)) is not None
    assert await space.rdp(("speed", float, None, None, None, None, None, None)) is None   # 1 is no float
    assert await space.rdp(("speed", None, None, int, None, None, None, None)) is None     # True is no int
    assert await space.rdp(("speed", 1.0, None, None, None, None, None, None)) is None     # 1.0 != 1 by type
    assert await space.rdp(("speed", 1, 1.0, True, "a", b"b", [1, 2], {"k": 1})) is not None
    assert await space.rdp(("speed", None)) is None                                      # arity


async def test_oldest_match_wins_and_take_removes(space):
    for i in range(3):
        await space.out(("road", "r1", i))
    assert await space.inp(("road", "r1", int)) == ("road", "r1", 0)
    assert await space.rd(("road", "r1", int), timeout=0) == ("road", "r1", 1)
    assert await space.in_all(("road", None, int)) == [("road", "r1", 1), ("road", "r1", 2)]
    assert await space.rd_all(("road", None, int)) == []


async def test_blocked_readers_all_get_it_first_taker_takes_it(space):
    # each caller is queued before the next starts: arrival order is what FIFO is about
    reader = asyncio.create_task(space.rd(("evt", int), timeout=10))
    await _until_waiting(space, 1)
    taker1 = asyncio.create_task(space.in_(("evt", int), timeout=10))
    await _until_waiting(space, 2)
    taker2 = asyncio.create_task(space.in_(("evt", int), timeout=10))
    await _until_waiting(space, 3)
    await space.out(("evt", 1))
    assert await reader == ("evt", 1)
    assert await taker1 == ("evt", 1)
    await space.out(("evt", 2))
    assert await taker2 == ("evt", 2)
    assert await space.rdp(("evt", int)) is None       # both taken, nothing stored


async def test_two_takers_one_tuple_exactly_one_wins(space):
    takers = [asyncio.create_task(space.in_(("job", int), timeout=1.0)) for _ in range(2)]
    await _until_waiting(space, 2)
    await space.out(("job", 7))
    results = await asyncio.gather(*takers)
    assert sorted(results, key=lambda r: r is None) == [("job", 7), None]


async def test_concurrent_takers_never_share(space):
    for i in range(20):
        await space.out(("work", i))
    got = await asyncio.gather(*[space.inp(("work", int)) for _ in range(25)])
    values = [g[1] for g in got if g is not None]
    assert sorted(values) == list(range(20)) and got.count(None) == 5


async def test_timeout_returns_none_and_leaves_no_waiter(space):
    assert await space.in_(("never", int), timeout=0.05) is None
    await space.out(("never", 1))
    assert await space.rdp(("never", int)) == ("never", 1)    # nobody swallowed it


async def test_leases_expire(space):
    await space.out(("lease", 1), lease=2.0)
    await space.out(("lease", 2))
    assert await space.rdp(("lease", 1)) == ("lease", 1)
    # leases run on each backend's own clock: wait for the expiry to be seen, with a deadline
    async def only_the_unleased_one_left():
        return await space.rd_all(("lease", int)) == [("lease", 2)]
    await until(only_the_unleased_one_left, "the leased tuple to expire", timeout=10)


async def test_notify_sees_matching_writes(space):
    sub = await space.notify(("note", str))
    await space.out(("note", 1))
    await space.out(("note", "hello"))
    assert await sub.get(timeout=5) == ("note", "hello")
    await sub.cancel()


async def test_bounds_are_refused_with_a_reason(space):
    with pytest.raises(TupleSpaceError, match="wildcards"):
        await space.out(("bad", int))
    with pytest.raises(TupleSpaceError):
        await space.rdp(())
    for i in range(50):
        await space.out(("fill", i))
    with pytest.raises(TupleSpaceError, match="full"):
        await space.out(("fill", 50))


async def _until_waiting(space, count: int) -> None:
    """Wait until ``count`` callers are queued in the space (each backend shows its own queue)."""
    async def queued():
        return await _waiting(space) >= count
    await until(queued, f"{count} waiters queued")


async def _waiting(space) -> int:
    return await space.waiting_for_test()


# ------------------------------------------------------------------ Redis only: many machines, one space

async def test_redis_clients_share_one_space_and_a_dead_waiter_swallows_nothing(redis_node):
    name = f"shared{next(_names)}"
    a = await RedisTupleSpace.connect(redis_node.url, name=name)
    b = await RedisTupleSpace.connect(redis_node.url, name=name, block_chunk=0.1, waiter_grace=0.1)
    try:
        taker = asyncio.create_task(a.in_(("job", int), timeout=10))
        await _until_queued(a, 1)
        await b.out(("job", 1))
        assert await taker == ("job", 1)

        # a client blocked in a take dies without cancelling: its waiter must expire, not eat tuples
        doomed = asyncio.create_task(b.in_(("late", int)))
        await _until_queued(a, 1)
        doomed.cancel()        # cancellation leaves the queue at once ...
        await asyncio.gather(doomed, return_exceptions=True)
        assert int(await a.client.hlen(f"{a.prefix}:wt")) == 0
        stale = await b._run("get", b._pack_template(("late", int)), 1, 1, 100, 10)   # ... a crash does not:
        assert stale[0] == 2                                                          # queued, never served
        # its deadline (100 ms, Redis's clock) passes with nobody refreshing it
        await until(lambda: _deadline_passed(a, stale[1]), "the dead waiter's deadline")
        await a.out(("late", 1))
        assert await a.rdp(("late", int)) == ("late", 1)
        assert (await a.server_stats())["stale_waiters"] == 1
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("found", [False, True])
async def test_redis_take_cancelled_while_its_script_ran_leaves_nothing_behind(redis_node, found):
    """The cancel lands after Redis ran the take but before its reply came back: a queued waiter
    must leave the queue, a taken tuple go back into the space."""
    space = await RedisTupleSpace.connect(redis_node.url, name=f"cancelled{next(_names)}")
    ran, reply_may_arrive = asyncio.Event(), asyncio.Event()
    real_run = space._run

    async def reply_held_back(script, *args):
        result = await real_run(script, *args)
        if script == "get":
            ran.set()
            await reply_may_arrive.wait()
        return result

    space._run = reply_held_back
    try:
        if found:
            await space.out(("job", 7))
        taker = asyncio.create_task(space.in_(("job", int)))
        await ran.wait()
        taker.cancel()
        reply_may_arrive.set()
        assert (await asyncio.gather(taker, return_exceptions=True))[0].__class__ is asyncio.CancelledError
        assert int(await space.client.hlen(f"{space.prefix}:wt")) == 0
        assert await space.rdp(("job", int)) == (("job", 7) if found else None)
    finally:
        await space.close()


async def _until_queued(space, count: int) -> None:
    async def queued():
        return int(await space.client.hlen(f"{space.prefix}:wt")) >= count
    await until(queued, f"{count} waiters queued in Redis")


async def _deadline_passed(space, waiter_id) -> bool:
    import msgpack
    raw = await space.client.hget(f"{space.prefix}:wt", waiter_id)
    if raw is None:
        return True
    seconds, micros = await space.client.time()
    return msgpack.unpackb(raw, raw=True)[1] <= seconds * 1000 + micros // 1000


async def test_bulk_reads_match_like_the_core_over_every_index(space, monkeypatch):
    """rd_all on the Redis backend ranges one index and matches the rest itself (skipping what the
    index guarantees), in batches: every template finds exactly what the core finds, in order."""
    import fcd.tuplespace_redis as tsr
    monkeypatch.setattr(tsr, "FETCH_BATCH", 4)          # several batches over the 20 tuples below
    reference = LocalTupleSpace()
    tuples = [("t", i, float(i), [i]) for i in range(6)] + [("t", True, 1.0, [1]), ("t", 1, 1, [1]),
              ("u", 1, 1.0, [1]), ("t", 1.0, 1.0, [1]), ("t", "1", 1.0, {"a": 1}), ("t", 1, 1.0),
              (1, "t", 1.0, [1]), ("t", float("nan"), 2.0, [2]), ("t", 2, -0.0, [0]), ("t", 2, 0.0, [0])]
    tuples += [("t", 7, 7.0, [7])] * 4
    for tup in tuples:
        await space.out(tup)
        await reference.out(tup)
    templates = [("t", int, float, list), ("t", None, None, None), ("t", 1, None, None), ("t", 1, float, list),
                 ("t", True, None, None), (None, 1, 1.0, None), ("t", 2, 0.0, list), ("t", 1.0, float, list),
                 ("t", float, None, None), (int, str, float, list), ("t", "1", None, dict), ("t", 7, 7.0, [7]),
                 ("t", 2, None, [0]), ("u", None, None, None), ("t", int, float),
                 ("t", float("nan"), None, None)]
    for template in templates:
        want = repr(await reference.rd_all(template))          # repr: nan == nan
        assert repr(await space.rd_all(template)) == want, template
        assert repr(await space.rd_all(template, limit=2)) == repr((await reference.rd_all(template))[:2]), template
    await reference.close()


async def test_bulk_reads_skip_expired_tuples(space):
    clock = asyncio.get_running_loop()
    await space.out(("lease", 1), lease=0.05)
    await space.out(("lease", 2))
    end = clock.time() + 0.06
    while clock.time() < end:        # the lease is judged by the store's clock: wait it out
        await asyncio.sleep(0.01)
    assert await space.rd_all(("lease", int)) == [("lease", 2)]
