"""The game server's store, the same on every backend: in memory, one Redis node and a 3-node Redis
Cluster (real servers).  Time is an argument: expiry is exact, no test sleeps."""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmpog.store import (AccountExists, MemoryStore, MovePlan, Presence, StoreError, StoreFull, StoreLimits,
                         StoreUnavailable)
from mmpog.store_redis import RedisStore, split_store_url
from tests.redis_support import redis_cluster, redis_node  # noqa: F401  (fixtures)

_games = itertools.count()
NOW = 1_800_000_000.0
LIMITS = StoreLimits(max_accounts=5, max_sessions=4, sessions_per_address=2, session_ttl=100.0, max_reflectors=3,
                     login_failures_per_account=3, login_failures_per_address=5, login_window=60.0)


async def open_store(kind: str, request, limits: StoreLimits = LIMITS):
    if kind == "memory":
        return MemoryStore(limits)
    node = request.getfixturevalue("redis_node" if kind == "redis" else "redis_cluster")
    separator = "&" if "?" in node.url else "?"
    # a game of its own per test: nothing leaks between tests on the shared server
    return await RedisStore.open(f"{node.url}{separator}game=g{next(_games)}", limits)


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def store(request):
    opened = await open_store(request.param, request)
    yield opened
    await opened.aclose()


def presence(location: int, reflector: str = "http://r1", token: bytes = b"t" * 16) -> Presence:
    return Presence(location, token, reflector)


async def test_accounts_are_unique_numbered_and_bounded(store):
    assert await store.create_account("ann", b"s1", b"h1", "scrypt:n=16384,r=8,p=1,dklen=32") == 1
    assert await store.create_account("bob", b"s2", b"h2", "k") == 2
    with pytest.raises(AccountExists):
        await store.create_account("ann", b"x", b"y", "k")
    account = await store.account("ann")
    assert (account.id, account.name, account.salt, account.pw_hash, account.kdf) == (
        1, "ann", b"s1", b"h1", "scrypt:n=16384,r=8,p=1,dklen=32")
    assert await store.account("nobody") is None
    for name in ("cid", "dan", "eve"):
        await store.create_account(name, b"s", b"h", "k")
    with pytest.raises(StoreFull) as full:
        await store.create_account("fay", b"s", b"h", "k")
    assert full.value.what == "accounts" and await store.count_accounts() == 5
    assert store.stats["accounts_refused"] == 1


async def test_a_password_is_replaced_only_over_the_hash_it_had(store):
    await store.create_account("ann", b"s1", b"h1", "k1")
    assert not await store.replace_password("ann", b"other", b"s2", b"h2", "k2")
    assert await store.replace_password("ann", b"h1", b"s2", b"h2", "k2")
    account = await store.account("ann")
    assert (account.id, account.salt, account.pw_hash, account.kdf) == (1, b"s2", b"h2", "k2")
    assert not await store.replace_password("ann", b"h1", b"s3", b"h3", "k3")     # a second instance lost
    assert not await store.replace_password("nobody", b"h1", b"s3", b"h3", "k3")


async def test_two_racing_registrations_of_one_name_one_wins(store):
    results = await asyncio.gather(*(store.create_account("ann", bytes([i]), b"h", "k") for i in range(4)),
                                   return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["AccountExists"] * 3 + ["int"]
    assert await store.count_accounts() == 1


async def test_session_expires_exactly_at_its_deadline(store):
    opened = await store.open_session("k1", 7, "10.0.0.1", NOW)
    assert not opened.replaced and opened.evicted_same_address == 0
    assert await store.session_player("k1", NOW + 99.999) == 7
    assert await store.session_player("k1", NOW + 100.0) is None
    assert await store.session_player("unknown", NOW) is None
    assert await store.count_sessions(NOW) == 1 and await store.count_sessions(NOW + 100) == 0


async def test_one_session_per_player_a_new_login_replaces_it(store):
    await store.open_session("k1", 7, "10.0.0.1", NOW)
    opened = await store.open_session("k2", 7, "10.0.0.2", NOW + 1)
    assert opened.replaced
    assert await store.session_player("k1", NOW + 1) is None and await store.session_player("k2", NOW + 1) == 7
    assert await store.count_sessions(NOW + 1) == 1


async def test_an_address_holds_its_cap_its_oldest_is_dropped(store):
    for n, key in enumerate(("a1", "a2", "a3")):
        await store.open_session(key, n + 1, "10.0.0.1", NOW + n)
    assert await store.session_player("a1", NOW + 3) is None          # the address's oldest went
    assert [await store.session_player(k, NOW + 3) for k in ("a2", "a3")] == [2, 3]
    assert store.stats["sessions_evicted_same_address"] == 1


async def test_sessions_overall_cap_refuses_and_evicts_nobody(store):
    for n in range(4):
        await store.open_session(f"k{n}", n + 1, f"10.0.0.{n}", NOW)
    with pytest.raises(StoreFull) as full:
        await store.open_session("k9", 9, "10.0.0.9", NOW)
    assert full.value.what == "sessions" and store.stats["sessions_refused"] == 1
    assert [await store.session_player(f"k{n}", NOW) for n in range(4)] == [1, 2, 3, 4]
    # once they have expired, they are purged by the next login and it fits
    await store.open_session("k9", 9, "10.0.0.9", NOW + 100)
    assert await store.count_sessions(NOW + 100) == 1 and store.stats["sessions_expired"] == 4


async def test_failed_logins_throttle_the_account_and_the_address_for_the_window(store):
    for n in range(3):
        assert not await store.login_throttled("ann", "10.0.0.1", NOW + n)
        await store.login_failed("ann", "10.0.0.1", NOW + n)
    assert await store.login_throttled("ann", "10.0.0.9", NOW + 3)          # the account, from anywhere
    assert not await store.login_throttled("bob", "10.0.0.9", NOW + 3)
    for n in range(2):
        await store.login_failed(f"other{n}", "10.0.0.1", NOW + 3)
    assert await store.login_throttled("bob", "10.0.0.1", NOW + 3)          # the address, for any account
    assert not await store.login_throttled("ann", "10.0.0.2", NOW + 60.5)   # the first failures aged out
    assert await store.login_throttled("cid", "10.0.0.1", NOW + 59.9)       # all 5 within the window
    assert not await store.login_throttled("cid", "10.0.0.1", NOW + 60.5)   # the one at NOW aged out


async def test_presence_swaps_and_indexes_members_and_occupancy(store):
    assert await store.set_presence(1, presence(0)) is None
    assert await store.set_presence(2, presence(0)) is None
    assert await store.set_presence(3, presence(5, "http://r2")) is None
    assert await store.occupancy() == {0: 2, 5: 1}
    assert await store.set_presence(1, presence(5, "http://r2", b"n" * 16)) == presence(0)
    assert await store.presence(1) == presence(5, "http://r2", b"n" * 16)
    assert await store.members_on("http://r2") == [(1, presence(5, "http://r2", b"n" * 16)),
                                                   (3, presence(5, "http://r2"))]
    assert await store.members_on("http://r1") == [(2, presence(0))]
    assert await store.set_presence(2, None) == presence(0)
    assert await store.occupancy() == {5: 2} and await store.presence(2) is None


async def test_move_context_reads_session_presence_and_map_at_once(store):
    await store.init_map(["http://a", "http://b"])
    await store.open_session("k1", 7, "10.0.0.1", NOW)
    assert await store.move_context("k1", NOW, 1) == (7, None, "http://b")
    await store.set_presence(7, presence(1, "http://b"))
    assert await store.move_context("k1", NOW + 1, 0) == (7, presence(1, "http://b"), "http://a")
    assert await store.move_context("k1", NOW + 100, 0) == (None, None, None)       # expired
    assert await store.move_context("nope", NOW, 0) == (None, None, None)
    assert await store.move_context("k1", NOW, 9) == (7, presence(1, "http://b"), None)


async def test_more_calls_at_once_than_connections_wait_their_turn(store):
    await store.open_session("k1", 7, "10.0.0.1", NOW)
    results = await asyncio.gather(*(store.move_context("k1", NOW, 0) for _ in range(300)))
    assert results == [(7, None, None)] * 300          # redis-py's pool alone refuses past 100


async def test_move_lock_held_until_released_or_expired(store):
    assert await store.try_lock(1, "a", NOW, 10)
    assert not await store.try_lock(1, "b", NOW + 5, 10)
    assert await store.try_lock(2, "b", NOW + 5, 10)          # another player's lock is another lock
    assert not await store.unlock(1, "b") and await store.unlock(1, "a")
    assert await store.try_lock(1, "b", NOW + 6, 10)
    assert await store.try_lock(1, "c", NOW + 16, 10)         # b died holding it: it expired


async def test_reflector_registration_heartbeat_and_restart_seen_once(store):
    assert await store.register_reflector("http://r1", "127.0.0.1:1", NOW, 3)
    assert await store.heartbeat("http://r1", "i1", NOW + 1, 3) == ""
    assert await store.heartbeat("http://r1", "i1", NOW + 2, 3) == "i1"
    assert await store.heartbeat("http://r1", "i2", NOW + 3, 3) == "i1"       # a restart
    assert await store.register_reflector("http://r1", "127.0.0.1:1", NOW, 3)  # never shortens, keeps i2
    [record] = await store.reflectors(NOW)
    assert (record.id, record.udp, record.instance, record.deadline) == ("http://r1", "127.0.0.1:1", "i2", NOW + 6)
    with pytest.raises(StoreError):
        await store.heartbeat("http://unknown", "i", NOW, 3)
    assert await store.register_reflector("http://r2", "127.0.0.1:2", NOW, None)
    assert await store.register_reflector("http://r3", "127.0.0.1:3", NOW, 3)
    assert not await store.register_reflector("http://r4", "127.0.0.1:4", NOW, 3)
    assert store.stats["reflectors_refused"] == 1
    assert [r.deadline for r in await store.reflectors(NOW)] == [NOW + 6, math.inf, NOW + 3]


async def test_map_homes_are_kept_and_a_dead_reflectors_locations_reassigned(store):
    for rid in ("http://a", "http://b", "http://c"):
        await store.register_reflector(rid, "127.0.0.1:1", NOW, 10)
    homes = ["http://a", "http://b", "http://c"] * 2
    await store.init_map(homes)
    await store.init_map(list(reversed(homes)))                # a second instance: nothing changes
    assert await store.location_map() == dict(enumerate(homes))
    assert await store.reassign_dead(NOW + 5) == {}
    await store.heartbeat("http://a", "ia", NOW + 8, 10)
    await store.heartbeat("http://b", "ib", NOW + 8, 10)       # c misses its heartbeats
    moved = await store.reassign_dead(NOW + 12)
    assert moved == {2: ("http://c", "http://a"), 5: ("http://c", "http://b")}   # fewest, then smallest id
    assert await store.reflector_of(2) == "http://a" and await store.reflector_of(5) == "http://b"
    assert await store.reassign_dead(NOW + 12) == {}
    assert await store.reassign_dead(NOW + 100) == {}          # nobody alive: nothing moves
    assert await store.reflector_of(99) is None


async def test_concurrent_reassignments_move_each_location_once(store):
    await store.register_reflector("http://a", "u", NOW, 10)
    await store.register_reflector("http://b", "u", NOW, 1)
    await store.init_map(["http://a", "http://b"] * 4)
    results = await asyncio.gather(*(store.reassign_dead(NOW + 5) for _ in range(3)))
    assert sorted(len(r) for r in results) == [0, 0, 4]
    assert set((await store.location_map()).values()) == {"http://a"}


def test_move_plan_is_make_before_break():
    here = presence(1, "http://a")
    assert MovePlan.decide(None, 1, "http://a", False) == MovePlan(True, None, True)
    assert MovePlan.decide(here, 1, "http://a", False) == MovePlan(False, None, False)
    assert MovePlan.decide(here, 1, "http://a", True) == MovePlan(True, None, True)
    assert MovePlan.decide(here, 2, "http://a", False) == MovePlan(True, here, True)
    assert MovePlan.decide(here, 1, "http://b", False) == MovePlan(True, here, True)   # its reflector died


def test_store_url_game_name():
    assert split_store_url("redis://h:1/2?game=chess") == ("redis://h:1/2", "chess")
    assert split_store_url("unix:///tmp/r.sock?db=3") == ("unix:///tmp/r.sock?db=3", "mmpog")
    with pytest.raises(ValueError):
        split_store_url("redis://h:1/0?game=a{b}")


async def test_unreachable_redis_is_one_line(tmp_path):
    with pytest.raises(StoreUnavailable) as failed:
        await RedisStore.open(f"unix://{tmp_path}/none.sock")
    assert "cannot reach the game store" in str(failed.value) and "\n" not in str(failed.value)


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_random_session_histories_agree_with_a_model(kind, request):
    """Hypothesis: any history of logins over a few players and addresses keeps every bound and
    answers as a plain model does (memory and Redis alike)."""
    node = request.getfixturevalue("redis_node") if kind == "redis" else None
    step = st.tuples(st.integers(1, 5), st.integers(0, 2), st.floats(0, 60))

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(step, max_size=12))
    def check(history):
        async def run():
            store = MemoryStore(LIMITS) if node is None else await RedisStore.open(
                f"{node.url}?game=h{next(_games)}", LIMITS)
            model: dict[str, tuple[int, str, float]] = {}      # key -> player, address, deadline
            now = NOW
            try:
                for n, (player, address, gap) in enumerate(history):
                    now += gap
                    key, addr = f"k{n}", f"10.0.0.{address}"
                    # expired sessions are purged, then the player's own, then the address's oldest
                    model = {k: v for k, v in model.items() if v[0] != player and now < v[2]}
                    mine = sorted((k for k, v in model.items() if v[1] == addr), key=lambda k: int(k[1:]))
                    for k in mine[:max(0, len(mine) - LIMITS.sessions_per_address + 1)]:
                        del model[k]
                    full = len(model) >= LIMITS.max_sessions
                    try:
                        await store.open_session(key, player, addr, now)
                        assert not full
                        model[key] = (player, addr, now + LIMITS.session_ttl)
                    except StoreFull:
                        assert full
                    live = {k for k, v in model.items() if now < v[2]}
                    assert await store.count_sessions(now) == len(live)
                    for k in model:
                        assert await store.session_player(k, now) == (model[k][0] if k in live else None)
            finally:
                await store.aclose()
        asyncio.run(run())

    check()


def test_redis_answers_every_random_history_as_the_memory_store_does(redis_node):  # noqa: F811
    """Differential: one random history of presence, lock, registration and reassignment steps on
    the memory store (the reference) and on Redis gives the same answer at every step."""
    reflectors = ["http://a", "http://b", "http://c"]
    steps = st.one_of(
        st.tuples(st.just("presence"), st.integers(1, 4),
                  st.none() | st.tuples(st.integers(0, 3), st.sampled_from(reflectors), st.binary(min_size=1, max_size=4))),
        st.tuples(st.just("lock"), st.integers(1, 3), st.sampled_from(["x", "y"]), st.floats(0, 20)),
        st.tuples(st.just("unlock"), st.integers(1, 3), st.sampled_from(["x", "y"])),
        st.tuples(st.just("heartbeat"), st.sampled_from(reflectors), st.sampled_from(["i1", "i2"]), st.floats(0.5, 5)),
        st.tuples(st.just("reassign"), st.floats(0, 3)),
    )

    async def apply(store, step, now):
        kind = step[0]
        if kind == "presence":
            _, player, where = step
            new = None if where is None else Presence(where[0], where[2], where[1])
            return await store.set_presence(player, new), await store.members_on(where[1] if where else "http://a")
        if kind == "lock":
            return await store.try_lock(step[1], step[2], now, step[3])
        if kind == "unlock":
            return await store.unlock(step[1], step[2])
        if kind == "heartbeat":
            await store.register_reflector(step[1], "127.0.0.1:1", now, step[3])
            return await store.heartbeat(step[1], step[2], now, step[3])
        return await store.reassign_dead(now), await store.location_map(), await store.occupancy()

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(steps, max_size=25))
    def check(history):
        async def run():
            reference = MemoryStore(LIMITS)
            store = await RedisStore.open(f"{redis_node.url}?game=d{next(_games)}", LIMITS)
            try:
                for target in (reference, store):
                    for n, rid in enumerate(reflectors):       # they die one after the other unless heard
                        await target.register_reflector(rid, "127.0.0.1:1", NOW, 1.0 + n)
                    await target.init_map(reflectors * 2)
                now = NOW
                for step in history:
                    now += step[-1] if step[0] == "reassign" else 0.25
                    assert await apply(store, step, now) == await apply(reference, step, now), step
                assert await store.reflectors(now) == await reference.reflectors(now)
            finally:
                await store.aclose()
        asyncio.run(run())

    check()
