"""The fleet directory (boxcore.directory_redis): bounds stay exact when several boxes write at
once, names bind once across the fleet, watches cross boxes; then two real boxd processes sharing
one redis-server, and boxd refusing an unreachable Redis with one line."""

import asyncio
import itertools
import socket
import subprocess
import sys

import pytest

from boxcore.booster import Booster
from boxcore.booster.errors import InvalidRequest
from boxcore.directory import DirectoryOpenError, DirectoryUnavailable, QuotaExceeded, encode_value
from boxcore.directory_redis import RedisDirectory, redacted, split_directory_url
from boxcore.procs import free_port
from boxcore.testing import BoxdProcess
from hostile import NOBODY, as_uid, outputs, shared_dir
from tests.redis_support import redis_cluster, redis_node  # noqa: F401  (module fixtures)

pytestmark = pytest.mark.timeout(120)
_fleets = itertools.count()


@pytest.fixture(params=["redis", "redis-cluster"])
def fleet_url(request):
    server = request.getfixturevalue("redis_node" if request.param == "redis" else "redis_cluster")
    sep = "&" if "?" in server.url else "?"
    return f"{server.url}{sep}fleet=fleet{next(_fleets)}"


@pytest.fixture
async def two_boxes(fleet_url):
    """Two directories on one fleet, as two boxd would hold them."""
    boxes = []

    async def open_box(**limits):
        d = await RedisDirectory.open(fleet_url, **limits)
        boxes.append(d)
        return d

    yield open_box
    for d in boxes:
        await d.aclose()


async def _outcomes(calls):
    results = await asyncio.gather(*calls, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, QuotaExceeded):
            raise r
    return results


async def test_the_fleet_wide_byte_bound_is_exact_under_concurrent_puts(two_boxes):
    a, b = await two_boxes(max_total_bytes=10_000), await two_boxes(max_total_bytes=10_000)
    value = b"v" * 997                   # 1000 bytes as msgpack
    results = await _outcomes(box.put(f"booster{i}", "k", value)
                              for i, box in zip(range(40), itertools.cycle((a, b))))
    stored = [r for r in results if r is None]
    assert len(stored) == 10 and await a.total_bytes() == 10_000
    assert a.stats["refused_directory_full"] + b.stats["refused_directory_full"] == 30


async def test_the_per_uid_bound_is_exact_across_boxes(two_boxes):
    a, b = await two_boxes(), await two_boxes()
    for i in range(4):
        assert await (a, b)[i % 2].bind_name(f"name{i}", 7) is None
    value = b"v" * 997
    results = await _outcomes((a, b)[i % 2].put(f"name{i % 4}", f"k{i}", value, uid=7, max_uid_bytes=5_500)
                              for i in range(30))
    assert sum(r is None for r in results) == 5 and await a.uid_bytes(7) == 5_000


async def test_the_key_quota_is_exact_across_boxes(two_boxes):
    a, b = await two_boxes(max_keys_per_booster=5), await two_boxes(max_keys_per_booster=5)
    results = await _outcomes((a, b)[i % 2].put("one", f"k{i}", i) for i in range(20))
    assert sum(r is None for r in results) == 5 and await b.count("one") == 5


async def test_a_name_binds_to_exactly_one_uid_across_boxes(two_boxes):
    a, b = await two_boxes(), await two_boxes()
    results = await asyncio.gather(*((a, b)[uid % 2].bind_name("contested", uid) for uid in range(1, 21)))
    winners = [uid for uid, bound in zip(range(1, 21), results) if bound is None]
    assert len(winners) == 1
    assert all(bound in (None, winners[0]) for bound in results)
    assert await b.name_owner("contested") == winners[0] and await a.names_of(winners[0]) == ["contested"]


async def test_a_put_on_one_box_reaches_a_watcher_on_another(two_boxes):
    a, b = await two_boxes(), await two_boxes()
    await a.put("fcd", "road/0", "before")
    watch = b.watch("fcd", "road/", initial=True)
    await watch.ready()
    assert watch.pending() == [("road/0", "before")]
    await a.put("fcd", "road/1", {"q": 1})
    await a.put("fcd", "light/1", "not watched")
    await a.delete("fcd", "road/0")
    got = [await asyncio.wait_for(watch.get(), 10) for _ in range(2)]
    assert got == [("road/1", {"q": 1}), ("road/0", None)]
    await b.sync_watches()
    assert watch.pending() == [] and b.boosters() == {"fcd": {"keys": 2, "bytes": await b.bytes_of("fcd")}}
    watch.close()


def _publish_while_the_loop_waits(url: str, channel: str, payload: bytes) -> None:
    """PUBLISH from a synchronous client on the node owning ``channel``'s slot (where the
    directory's scripts publish): the event loop runs nothing meanwhile, so no listener of this
    process has read the message when this returns."""
    import redis
    from redis.cluster import RedisCluster

    redis_url, _ = split_directory_url(url)
    if "cluster=1" in redis_url:
        cluster = RedisCluster.from_url(redis_url.split("?")[0])
        try:
            cluster.get_redis_connection(cluster.get_node_from_key(channel)).publish(channel, payload)
        finally:
            cluster.close()
    else:
        with redis.Redis.from_url(redis_url) as node:
            node.publish(channel, payload)


async def test_a_change_made_before_a_watch_is_not_delivered_as_new(two_boxes, fleet_url):
    a, b = await two_boxes(), await two_boxes()
    await a.put("fcd", "road/0", "before")
    # the change message of a put made just before the watch, still unread when the watch starts
    _publish_while_the_loop_waits(fleet_url, b.channel, b"p 1 9 3 6|fcdroad/0" + encode_value("before"))
    watch = b.watch("fcd", "road/")
    await watch.ready()
    await a.put("fcd", "road/1", "after")
    await b.sync_watches()
    assert watch.pending() == [("road/1", "after")]


async def test_a_lost_redis_is_one_line_and_the_directory_recovers(tmp_path):
    from boxcore.redisproc import RedisServer

    server = await RedisServer(tmp_path).start()
    try:
        d = await RedisDirectory.open(server.url)
        watch = d.watch("b")
        await watch.ready()
        await d.put("b", "k", 1)
        await server.stop()
        with pytest.raises(DirectoryUnavailable, match="^the fleet directory is unreachable: "):
            await d.put("b", "k", 2)
        await server.start()                       # same socket, empty (no persistence)
        await d.put("b", "k", 3)                   # the client reconnects by itself
        deadline = asyncio.get_running_loop().time() + 30
        while True:                                # no event tells when the listener is back
            try:
                await asyncio.wait_for(d.sync_watches(), 0.5)
                break
            except asyncio.TimeoutError:
                assert asyncio.get_running_loop().time() < deadline, "the subscription never came back"
        await d.put("b", "k", 4)
        await d.sync_watches()
        assert watch.pending()[-1] == ("k", 4) and d.stats["watch_resubscribes"] >= 1
        assert d.stats["unavailable"] >= 1
        await d.aclose()
    finally:
        await server.stop()


def test_urls_name_the_fleet_and_never_show_a_password():
    assert split_directory_url("redis://h:1/0?fleet=city-1&cluster=1") == ("redis://h:1/0?cluster=1", "city-1")
    assert split_directory_url("unix:///run/r.sock?db=2") == ("unix:///run/r.sock?db=2", "boxes")
    with pytest.raises(DirectoryOpenError, match="fleet name"):
        split_directory_url("redis://h:1/0?fleet=a{b}")
    assert redacted("redis://boxd:hunter2@h:1/0") == "redis://boxd:***@h:1/0"


# ------------------------------------------------------ real boxd processes


@pytest.fixture
def workdir():
    with shared_dir() as path:
        yield path


def fleet_boxd(workdir, name, url, *extra):
    """A boxd of the fleet whose control socket uid 65534 may reach (its group is nogroup)."""
    port = free_port(socket.SOCK_DGRAM)
    return BoxdProcess(workdir / name, http=False, listens=[f"udp:127.0.0.1:{port}=127.0.0.1:{port + 1}"],
                       extra=["--directory", url, "--control-group", str(NOBODY), *extra])


async def test_two_boxd_share_state_and_watches(workdir, fleet_url):
    url = fleet_url                                 # one node over a Unix socket, or a cluster
    async with fleet_boxd(workdir, "a", url) as box_a, fleet_boxd(workdir, "b", url) as box_b:
        async with Booster("fcd-booster", control=box_a.control) as on_a, \
                Booster("fcd-booster", control=box_b.control) as on_b:
            await on_a.directory.put("road/1", {"queue": 3})
            assert await on_b.directory.get("road/1") == {"queue": 3}
            events: asyncio.Queue = asyncio.Queue()

            async def watch():
                async for change in on_b.directory.watch("road/"):
                    events.put_nowait(change)

            watcher = asyncio.create_task(watch())
            await asyncio.sleep(0)                    # the task sends dir_watch first ...
            assert await on_b.directory.get("nothing") is None   # ... and B serves a session in order
            await on_a.directory.put("road/1", {"queue": 4})
            await on_a.directory.put("road/2", {"queue": 5})
            got = [await asyncio.wait_for(events.get(), 10) for _ in range(2)]
            assert got == [("road/1", {"queue": 4}), ("road/2", {"queue": 5})]
            await on_a.directory.delete("road/1")       # (changes of one key not yet read coalesce)
            await on_a.directory.delete("road/2")
            got = [await asyncio.wait_for(events.get(), 10) for _ in range(2)]
            assert got == [("road/1", None), ("road/2", None)]
            watcher.cancel()
            directory_on_b = await box_b.query("directory")
            assert directory_on_b == {}               # deleted fleet-wide


async def test_a_name_bound_on_one_box_cannot_be_taken_on_another(workdir, redis_node):
    url = f"{redis_node.url}?fleet=names{next(_fleets)}"
    async with fleet_boxd(workdir, "a", url) as box_a, fleet_boxd(workdir, "b", url) as box_b:
        async with Booster("root-owned", control=box_a.control) as owner:
            await owner.directory.put("totals", {"packets": 7})
        probe = as_uid(f"""
            c = Raw({str(box_b.control)!r})
            emit(c.request({{"t": "hello", "name": "root-owned", "version": 1}}))
            emit(c.request({{"t": "dir_get", "key": "totals"}}))
        """)
        hello, get = outputs(probe)
        assert hello["status"] == "PERMISSION_DENIED" and "bound to uid 0" in hello["reason"]
        assert get["status"] == "PERMISSION_DENIED" and "result" not in get
        async with Booster("root-owned", control=box_b.control) as owner_on_b:   # the right uid may
            assert await owner_on_b.directory.get("totals") == {"packets": 7}


async def test_quotas_hold_fleet_wide(workdir, redis_node):
    url = f"{redis_node.url}?fleet=quota{next(_fleets)}"
    bounds = ["--max-directory-bytes", "200000", "--max-directory-bytes-per-uid", "150000"]
    async with fleet_boxd(workdir, "a", url, *bounds) as box_a, fleet_boxd(workdir, "b", url, *bounds) as box_b:
        async with Booster("writer", control=box_a.control) as on_a, \
                Booster("other", control=box_b.control) as on_b:
            for i in range(2):
                await on_a.directory.put(f"k{i}", "v" * 60_000)       # uid 0: 120 kB through box A
            with pytest.raises(InvalidRequest, match="byte quota of booster 'other''s uid"):
                await on_b.directory.put("k", "v" * 40_000)          # box B counts uid 0's bytes on A
            await on_b.directory.put("k", "v" * 25_000)              # what is left still fits
            probe = as_uid(f"""
                c = Raw({str(box_b.control)!r})
                emit(c.request({{"t": "hello", "name": "nobody-booster", "version": 1}})["status"])
                emit(c.request({{"t": "dir_put", "key": "k", "value": "v" * 60000}}))
                emit(c.request({{"t": "dir_put", "key": "k", "value": "v" * 50000}})["status"])
            """)
            hello, full, fits = outputs(probe)
            assert hello == "OK" and full["status"] == "INVALID" and "directory is full" in full["reason"]
            assert fits == "OK"                                        # 195 kB of 200 kB in the fleet
            await on_a.directory.delete("k0")
            await on_b.directory.put("k2", "v" * 50_000)             # freed bytes are free everywhere


def test_an_unreachable_redis_is_one_line_and_exit_2(tmp_path):
    port = free_port(socket.SOCK_STREAM)
    out = subprocess.run([sys.executable, "-m", "boxcore.boxd", "--state", str(tmp_path / "s"), "--control",
                          str(tmp_path / "c.sock"), "--directory", f"redis://boxd:pw@127.0.0.1:{port}/0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "cannot reach the directory at redis://boxd:***@" in out.stderr and "pw@" not in out.stderr
    bad = subprocess.run([sys.executable, "-m", "boxcore.boxd", "--state", str(tmp_path / "s"), "--control",
                          str(tmp_path / "c.sock"), "--directory", "http://example.invalid/"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a Redis URL" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
