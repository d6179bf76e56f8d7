"""fcd.stream units: the entry format (strict, fuzzed), partitions, and the scripts on a real redis-server."""

from __future__ import annotations

import asyncio
import secrets

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from boxcore.redisconn import open_redis
from fcd import wire
from fcd.aggregate import RoadReport
from fcd.stream import (APPEND, APPLY, GROUP, Keys, Partitioner, RawEntry, StreamDecodeError, decode_entry,
                        encode_raw, encode_reports, ensure_groups)
from tests.redis_support import redis_node  # noqa: F401  (fixture)


def _probes(n: int) -> np.ndarray:
    arr = np.zeros(n, dtype=wire.PROBE_WIRE_DTYPE)
    arr["magic"], arr["version"], arr["kind"] = wire.MAGIC, wire.VERSION, wire.KIND_PROBE
    arr["car"], arr["t"], arr["x"], arr["y"] = np.arange(n), 1.0, 10.0, 20.0
    return arr


def _report(road: int, t: float) -> RoadReport:
    return RoadReport(road=road, t=t, green=True, queue=0, cars=1, density=1.0, mean_speed=3.0, departures=0,
                      interval=0.0, was_green=True)


def test_entries_round_trip():
    light = wire.encode(wire.LightChange(1, 7, 2, 5.0, 0, 3))
    entry = decode_entry(encode_raw(_probes(5), [light], [3]), n_roads=10)
    assert isinstance(entry, RawEntry) and entry.items == 6 and entry.at.tolist() == [3]
    assert entry.lights[0].light == 2 and entry.probes["car"].tolist() == [0, 1, 2, 3, 4]
    box, reports = decode_entry(encode_reports("b1", [_report(4, 2.0)]), n_roads=10)
    assert box == "b1" and reports[0].road == 4


@pytest.mark.parametrize("fields, says", [
    ({b"k": b"raw", b"p": b"x" * 37}, "whole records"),
    ({b"k": b"raw", b"p": _probes(2).tobytes(), b"l": b"", b"a": np.array([1], "<u4").tobytes()}, "light positions"),
    ({b"k": b"rep", b"b": b"b", b"r": msgpack.packb([{"road": 99}])}, "report entry"),
    ({b"k": b"what"}, "unknown entry kind"),
])
def test_bad_entries_say_what_is_wrong(fields, says):
    with pytest.raises(StreamDecodeError, match=says):
        decode_entry(fields, n_roads=10)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from([b"k", b"p", b"l", b"a", b"b", b"r"]),
                       st.one_of(st.sampled_from([b"raw", b"rep"]), st.binary(max_size=120)), max_size=6))
def test_any_entry_decodes_or_raises_stream_decode_error(fields):
    try:
        decode_entry(fields, n_roads=10)
    except StreamDecodeError:
        pass


def test_partitions_follow_roads_and_lights(small_city):
    part = Partitioner(small_city, 2)
    assert set(part.road.tolist()) == {0, 1} and len(part.light) == len(small_city.lights)
    # a probe in the middle of a road, heading along it, goes to that road's partition
    for road, (u, v) in enumerate(small_city.roads[:20]):
        (x0, y0), (x1, y1) = small_city.junction_xy(u), small_city.junction_xy(v)
        arr = _probes(1)
        shape = small_city.lane_shapes[road][0]
        mid = shape[len(shape) // 2 - 1:len(shape) // 2 + 1].mean(axis=0) if len(shape) > 2 else shape.mean(axis=0)
        arr["x"], arr["y"] = mid
        arr["heading"] = np.degrees(np.arctan2(x1 - x0, y1 - y0)) % 360.0
        assert part.of_probes(arr)[0] == part.road[road], road


def test_scripts_fence_dedup_and_bound(redis_node):
    async def scenario():
        client = open_redis(redis_node.url)
        keys = Keys(f"u{secrets.token_hex(3)}")
        append, apply_ = client.register_script(APPEND), client.register_script(APPLY)
        try:
            await ensure_groups(client, keys, 1)
            state, stream = keys.state(0), keys.stream(0)
            ids = [await append(keys=[state, stream], args=[5, 2, b"k", b"rep"]) for _ in range(2)]
            assert all(ids)
            assert await append(keys=[state, stream], args=[5, 2, b"k", b"rep"]) is None   # 6 > 5: refused
            await client.xreadgroup(GROUP, "a", {stream: ">"}, count=10)
            all_keys = [state, keys.last_t(0), keys.reports(0), stream, keys.owner(0)]

            def args(entry_id, worker, *reports):
                out = [entry_id, worker, "box", 0, 0, 2, 100, GROUP]
                for road, t in reports:
                    out += [road, repr(t), b"blob"]
                return out

            assert await apply_(keys=all_keys, args=args(ids[0], "a", (1, 5.0))) == [-2]    # no lease
            await client.set(keys.owner(0), "a")
            assert await apply_(keys=all_keys, args=args(ids[0], "a", (1, 5.0), (2, 1.0))) == [2, 0]
            assert await apply_(keys=all_keys, args=args(ids[0], "a", (1, 5.0))) == [-1]    # redelivered
            assert await apply_(keys=all_keys, args=args(ids[1], "a", (1, 5.0), (2, 2.0))) == [1, 1]
            state_now = {k.decode(): v.decode() for k, v in (await client.hgetall(state)).items()}
            assert state_now["backlog"] == "0" and state_now["refused_items"] == "2"
            assert state_now["reports_box"] == "3" and state_now["duplicate_reports"] == "1"
            assert state_now["redelivered"] == "1" and state_now["applied_by:a"] == "4"
            assert await client.xlen(keys.reports(0)) == 3
            assert (await client.xpending(stream, GROUP))["pending"] == 0
        finally:
            await client.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize("argv, says", [
    (["--worker"], "--worker and --workers need --store"),
    (["--workers", "2"], "--worker and --workers need --store"),
    (["--store", "http://x"], "--store takes a Redis URL"),
])
def test_server_refuses_worker_options_that_do_not_fit(argv, says, small_trace, tmp_path, capsys):
    from fcd.server import main
    city = tmp_path / "trace.npz"
    small_trace.save(city)
    assert main(["--city", str(city), "--udp", "127.0.0.1:0", "--http", "127.0.0.1:0", *argv]) == 2
    assert says in capsys.readouterr().err


def test_a_lease_round_the_store_never_answers_is_cut_and_the_next_takes_the_share(redis_node, small_city):
    """A round of balance() stuck on the store (a reply that never comes) once kept a worker out of
    the deployment for good: its leases lapsed, another worker took every partition, and it never
    came back for its share.  Now the round is cut after one lease and the next one starts over."""
    from cliruntime.supervisor import Supervisor, within
    from fcd.stream import Worker
    from tests.polling import until

    async def scenario():
        client = open_redis(redis_node.url)
        keys = Keys(f"u{secrets.token_hex(3)}")
        try:
            await ensure_groups(client, keys, 2)
            worker = Worker(client, small_city, keys, name="w", lease=0.3)
            worker.partitions = 2
            answered = worker._live_workers
            stuck = asyncio.Event()

            async def never_answers_once() -> int:
                if not stuck.is_set():
                    stuck.set()
                    await asyncio.Event().wait()          # the store's reply never comes
                return await answered()

            worker._live_workers = never_answers_once
            stop = asyncio.Event()
            async with Supervisor("test-worker") as tasks:
                balance = tasks.spawn(worker.balance(stop, tasks), name="balance")
                await until(lambda: len(worker.owned) == 2)     # before: balance() waited for ever
                stop.set()
                await within(balance, 10)
            assert worker.stats["balance_stalled"] == 1 and worker.stats["acquired"] == 2
            assert await client.get(keys.owner(0)) is None and await client.get(keys.owner(1)) is None
        finally:
            await client.aclose()

    asyncio.run(scenario())
