"""boxcore.directory: per-booster state with limits, watches, names and byte bounds, the same
tests on every backend - SQLite, one Redis node, a 3-node Redis Cluster (the fleet directory,
boxcore.directory_redis) - plus SQLite's own: persistence across a killed process, a bad file."""

import asyncio
import itertools
import signal
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from boxcore.directory import AsyncDirectory, Directory, DirectoryError, DirectoryOpenError, QuotaExceeded
from boxcore.directory_redis import RedisDirectory
from tests.redis_support import redis_cluster, redis_node  # noqa: F401  (module fixtures)

_fleets = itertools.count()


class SqliteBackend:
    """Opens the async interface over one SQLite file; reopening closes the previous one."""

    def __init__(self, path):
        self.path = path
        self.opened: list = []

    async def open(self, **limits):
        for d in self.opened:
            d.sync.close()
        d = AsyncDirectory(Directory(self.path, **limits))
        self.opened.append(d)
        return d

    async def close(self):
        for d in self.opened:
            await d.aclose()


class RedisBackend:
    """Opens RedisDirectory instances on one fleet of a shared server: reopening is another box."""

    def __init__(self, url):
        sep = "&" if "?" in url else "?"
        self.url = f"{url}{sep}fleet=t{next(_fleets)}"
        self.opened: list = []

    async def open(self, **limits):
        d = await RedisDirectory.open(self.url, **limits)
        self.opened.append(d)
        return d

    async def close(self):
        for d in self.opened:
            await d.aclose()


BACKENDS = ["sqlite", "redis", "redis-cluster"]


def make_backend(request, path):
    if request.param == "sqlite":
        return SqliteBackend(path)
    server = request.getfixturevalue("redis_node" if request.param == "redis" else "redis_cluster")
    return RedisBackend(server.url)


@pytest.fixture(params=BACKENDS)
async def backend(request, tmp_path):
    b = make_backend(request, tmp_path / "state")
    yield b
    await b.close()


@pytest.fixture
async def directory(backend):
    return await backend.open()


async def test_put_get_delete_items(directory):
    assert await directory.get("fcd", "road/1") is None
    assert await directory.get("fcd", "road/1", default=0) == 0
    await directory.put("fcd", "road/1", {"queue": 3, "density": 0.25, "cars": [1, 2]})
    await directory.put("fcd", "road/2", 7)
    await directory.put("fcd", "light/9", b"\x00\x01")
    await directory.put("mmpog", "road/1", "other booster, same key")
    assert await directory.get("fcd", "road/1") == {"queue": 3, "density": 0.25, "cars": [1, 2]}
    assert await directory.items("fcd", "road/") == [("road/1", {"queue": 3, "density": 0.25, "cars": [1, 2]}),
                                                     ("road/2", 7)]
    assert [k for k, _ in await directory.items("fcd")] == ["light/9", "road/1", "road/2"]
    assert await directory.get("mmpog", "road/1") == "other booster, same key"
    await directory.put("fcd", "road/2", 8)                     # overwrite keeps the count
    assert await directory.count("fcd") == 3
    assert await directory.delete("fcd", "road/2") and not await directory.delete("fcd", "road/2")
    assert await directory.count("fcd") == 2
    await directory.sync_watches()                             # Redis: the summary follows the channel
    assert directory.boosters()["fcd"]["keys"] == 2
    assert await directory.clear("fcd") == 2 and await directory.count("fcd") == 0
    assert directory.stats["puts"] == 5 and directory.stats["deletes"] == 3


async def test_unicode_prefixes(directory):
    for key in ("a", "a\U0010ffff", "a\U0010ffffz", "ab", "b", "é/1", "é/2", "ê"):
        await directory.put("x", key, key)
    assert [k for k, _ in await directory.items("x", "a\U0010ffff")] == ["a\U0010ffff", "a\U0010ffffz"]
    assert [k for k, _ in await directory.items("x", "é/")] == ["é/1", "é/2"]
    assert [k for k, _ in await directory.items("x", "a")] == ["a", "ab", "a\U0010ffff", "a\U0010ffffz"]
    assert [k for k, _ in await directory.items("x", "\ud7ff")] == []


def test_keys_lists_names_in_order_without_reading_values(tmp_path, monkeypatch):
    directory = Directory(tmp_path)
    for key in ("b", "a", "ab", "\u00e9t\u00e9", "z"):
        directory.put("keeper", key, {"big": "x" * 1000})
    directory.put("other", "a", 1)
    import boxcore.directory as module

    monkeypatch.setattr(module, "decode_value", lambda blob: pytest.fail("a value was decoded"))
    assert directory.keys("keeper") == ["a", "ab", "b", "z", "\u00e9t\u00e9"]
    assert directory.keys("keeper", "a") == ["a", "ab"]
    assert directory.keys("keeper", limit=2) == ["a", "ab"]
    assert directory.keys("keeper", "\u00e9") == ["\u00e9t\u00e9"]
    assert directory.keys("nobody") == [] and directory.keys("keeper", limit=0) == []
    with pytest.raises(DirectoryError):
        directory.keys("keeper", limit=-1)
    with pytest.raises(DirectoryError):
        directory.keys("keeper", "\ud800")


async def test_keys_are_names_in_utf8_order_on_every_backend(directory):
    for key in ("b", "a", "ab", "\u00e9t\u00e9", "z"):
        await directory.put("keeper", key, {"big": "x" * 100})
    await directory.put("other", "a", 1)
    assert await directory.keys("keeper") == ["a", "ab", "b", "z", "\u00e9t\u00e9"]
    assert await directory.keys("keeper", "a") == ["a", "ab"]
    assert await directory.keys("keeper", limit=2) == ["a", "ab"]
    assert await directory.keys("nobody") == [] and await directory.keys("keeper", limit=0) == []
    with pytest.raises(DirectoryError):
        await directory.keys("keeper", limit=-1)


async def test_limits_are_enforced_and_counted(backend):
    d = await backend.open(max_keys_per_booster=2, max_value_bytes=16, max_key_chars=8)
    await d.put("b", "k1", 1)
    await d.put("b", "k2", 2)
    with pytest.raises(QuotaExceeded, match="already has 2 keys"):
        await d.put("b", "k3", 3)
    await d.put("b", "k2", 22)                  # overwriting is not a new key
    await d.put("other", "k3", 3)               # the quota is per booster
    with pytest.raises(DirectoryError, match="exceeds the limit of 16"):
        await d.put("b", "k1", "x" * 20)
    with pytest.raises(DirectoryError, match="use delete"):
        await d.put("b", "k1", None)
    with pytest.raises(DirectoryError, match="msgpack"):
        await d.put("b", "k1", object())
    with pytest.raises(DirectoryError, match="exceeds the limit of 8"):
        await d.put("b", "k" * 9, 1)
    with pytest.raises(DirectoryError, match="non-empty string"):
        await d.put("b", "", 1)
    with pytest.raises(DirectoryError, match="not valid Unicode"):
        await d.put("b", "\ud800", 1)
    with pytest.raises(DirectoryError, match="Unicode string"):
        await d.items("b", "\udfff")
    assert await d.get("b", "k1") == 1
    assert (d.stats["refused_too_many_keys"], d.stats["refused_value_too_large"],
            d.stats["refused_bad_value"], d.stats["refused_bad_key"]) == (1, 1, 2, 3)
    with pytest.raises(DirectoryOpenError, match="max_keys_per_booster"):
        await backend.open(max_keys_per_booster=0)


async def test_survives_close_and_reopen(backend):
    d = await backend.open(max_keys_per_booster=3)
    await d.put("fcd", "a", [1, 2, 3])
    await d.put("fcd", "b", {"x": 1})
    d = await backend.open(max_keys_per_booster=3)    # SQLite: reopened; Redis: another box
    assert await d.items("fcd") == [("a", [1, 2, 3]), ("b", {"x": 1})]
    assert await d.count("fcd") == 2                   # quota state is reloaded too
    assert d.boosters() == {"fcd": {"keys": 2, "bytes": await d.bytes_of("fcd")}}
    await d.put("fcd", "c", 3)
    with pytest.raises(QuotaExceeded):
        await d.put("fcd", "d", 4)


def test_survives_a_killed_process(tmp_path):
    state = tmp_path / "state"
    child = textwrap.dedent(f"""
        import os, signal
        from boxcore.directory import Directory
        d = Directory({str(state)!r})
        for i in range(100):
            d.put("booster", f"key/{{i:03d}}", {{"i": i}})
        print("written", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)     # no close(), no clean shutdown
    """)
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL and "written" in result.stdout, result.stderr
    d = Directory(state)
    items = d.items("booster", "key/")
    assert len(items) == 100 and items[42] == ("key/042", {"i": 42})
    d.close()


def test_bad_database_is_a_config_error(tmp_path):
    (tmp_path / "directory.sqlite3").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DirectoryOpenError, match="cannot open directory database"):
        Directory(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DirectoryOpenError, match="cannot create state directory"):
        Directory(blocker / "state")


async def test_watch_sees_changes_under_its_prefix(directory):
    watch = directory.watch("fcd", "road/")
    await watch.ready()
    received = []

    async def consume():
        async for key, value in watch.events():
            received.append((key, value))
            if len(received) == 3:
                return

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    await directory.put("fcd", "road/1", 1)
    await directory.put("fcd", "light/1", "not watched")
    await directory.put("other", "road/1", "other booster")
    await asyncio.sleep(0)
    await directory.put("fcd", "road/2", {"q": 2})
    await asyncio.sleep(0)
    await directory.delete("fcd", "road/1")
    await asyncio.wait_for(task, 10)
    assert received == [("road/1", 1), ("road/2", {"q": 2}), ("road/1", None)]
    watch.close()
    assert directory.watcher_count == 0


async def test_watch_initial_coalescing_overflow_and_close(directory):
    await directory.put("b", "k/0", "before")
    watch = directory.watch("b", "k/", initial=True, max_pending=3)
    await watch.ready()
    for i in range(5):
        await directory.put("b", "k/1", i)              # coalesced into one pending change
    await directory.sync_watches()
    assert watch.pending() == [("k/0", "before"), ("k/1", 4)]
    for i in range(5):
        await directory.put("b", f"k/{i}", "x")         # five distinct keys, room for three
    await directory.sync_watches()
    assert watch.overflowed == 2 and directory.stats["watch_overflow"] == 2
    assert [k for k, _ in watch.pending()] == ["k/2", "k/3", "k/4"]
    await directory.put("b", "k/9", "last")
    await directory.sync_watches()
    watch.close()
    # already pending changes are still delivered, then the iteration ends
    assert [item async for item in watch.events()] == [("k/9", "last")]
    await directory.put("b", "k/10", "after close")
    await directory.sync_watches()
    assert watch.pending() == []


async def test_closing_the_directory_ends_watchers(backend):
    d = await backend.open(max_watchers=1)
    watch = d.watch("b")
    with pytest.raises(DirectoryError, match="too many watchers"):
        d.watch("b")
    waiter = asyncio.create_task(watch.get())
    await asyncio.sleep(0)
    await d.aclose()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiter, 5)


# ------------------------------------------------------ model-based check

keys = st.sampled_from(["a", "a/1", "a/2", "b", "b/1", "é"])
values = st.one_of(st.integers(-5, 5), st.text(max_size=5), st.lists(st.integers(0, 3), max_size=3),
                   st.dictionaries(st.sampled_from(["x", "y"]), st.booleans(), max_size=2))
ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.sampled_from(["p", "q"]), keys, values),
    st.tuples(st.just("delete"), st.sampled_from(["p", "q"]), keys, st.none()),
    st.tuples(st.just("reopen"), st.none(), st.none(), st.none()),
), max_size=30)


async def _check_against_a_dict(backend, operations):
    d = await backend.open(max_keys_per_booster=4)
    model: dict[str, dict] = {"p": {}, "q": {}}
    for op, booster, key, value in operations:
        if op == "put":
            if key not in model[booster] and len(model[booster]) >= 4:
                with pytest.raises(QuotaExceeded):
                    await d.put(booster, key, value)
            else:
                await d.put(booster, key, value)
                model[booster][key] = value
        elif op == "delete":
            assert await d.delete(booster, key) == (model[booster].pop(key, None) is not None)
        else:
            d = await backend.open(max_keys_per_booster=4)
    for booster in ("p", "q"):
        assert await d.items(booster) == sorted(model[booster].items())
        assert await d.items(booster, "a/") == sorted((k, v) for k, v in model[booster].items()
                                                      if k.startswith("a/"))
        assert await d.count(booster) == len(model[booster])


@pytest.mark.parametrize("kind", BACKENDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=ops)
def test_directory_behaves_like_a_dict(request, tmp_path_factory, kind, operations):
    request.param = kind
    backend = make_backend(request, tmp_path_factory.mktemp("model"))

    async def run():
        try:
            await _check_against_a_dict(backend, operations)
        finally:
            await backend.close()

    asyncio.run(run())


async def test_names_are_bound_to_their_first_uid_for_good(backend):
    d = await backend.open()
    assert await d.bind_name("fcd-booster", 0) is None
    assert await d.bind_name("fcd-booster", 0) is None
    assert await d.bind_name("fcd-booster", 65534) == 0
    assert await d.names_of(0) == ["fcd-booster"]
    d = await backend.open()                          # persisted (SQLite), shared (Redis)
    assert await d.name_owner("fcd-booster") == 0 and await d.bind_name("fcd-booster", 65534) == 0
    assert await d.release_name("fcd-booster") and await d.bind_name("fcd-booster", 65534) is None


async def test_bytes_are_accounted_and_bounded(backend):
    d = await backend.open(max_total_bytes=1000)
    assert await d.bind_name("a", 1) is None
    await d.put("a", "k", b"x" * 400)
    size = await d.bytes_of("a")
    assert 400 < size < 410 and await d.total_bytes() == size and await d.uid_bytes(1) == size
    with pytest.raises(QuotaExceeded, match="quota"):
        await d.put("a", "k2", b"x" * 100, uid=1, max_uid_bytes=size + 50)
    await d.put("a", "k", b"x" * 10, uid=1, max_uid_bytes=size)  # at the quota, shrinking fits
    await d.put("b", "k", b"y" * 500)
    with pytest.raises(QuotaExceeded, match="directory is full"):
        await d.put("c", "k", b"z" * 600)
    assert d.stats["refused_directory_full"] == 1 and d.stats["refused_quota_bytes"] == 1
    await d.delete("b", "k")
    assert await d.bytes_of("b") == 0 and await d.total_bytes() == await d.bytes_of("a")
    d = await backend.open()                          # reloaded at open
    assert await d.total_bytes() == await d.bytes_of("a") == await d.uid_bytes(1) > 0


async def test_pages_cover_everything_once(directory):
    for i in range(25):
        await directory.put("a", f"k{i:02}", "v" * 100)
    await directory.put("a", "other", 1)
    seen, after = [], None
    while True:
        items, after = await directory.page("a", "k", after, limit=7, max_bytes=1 << 20)
        seen += [k for k, _ in items]
        if after is None:
            break
    assert seen == [f"k{i:02}" for i in range(25)]
    assert await directory.keys("a", limit=3) == ["k00", "k01", "k02"]
    items, after = await directory.page("a", "", None, limit=100, max_bytes=250)   # bounded by bytes too
    assert len(items) == 2 and after == "k01"
