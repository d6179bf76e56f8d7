"""fcd-route keeps planning across a closed tuplespace connection: the tuplespace's idle timeout
and a tuplespace restart, with fcd-route and fcd-tuplespace as real processes over loopback."""

from __future__ import annotations

import pytest

from boxcore.procs import ProcessGroup, free_port, python_module
from fcd.city import grid_city
from fcd.tuplespace import TupleSpaceClient


@pytest.fixture
async def group(tmp_path):
    g = ProcessGroup(tmp_path / "roles")
    yield g
    await g.stop_all()


@pytest.fixture
def city_file(tmp_path):
    city = grid_city(3, 3, block=200.0, cycle=60.0, offsets="zero")
    path = tmp_path / "city.json"
    city.save(path)
    return city, path


async def start_tuplespace(group, port, *extra):
    role = group.start("ts", [*python_module("fcd.tuplespace"), "--listen", f"127.0.0.1:{port}", *extra], ready=True)
    await group.wait_ready(role, timeout=60)
    return role


async def publish(port, city, seconds, run):
    """One prediction run: every road takes ``seconds``."""
    client = await TupleSpaceClient.connect("127.0.0.1", port)
    for road in range(city.n_roads):
        await client.out(("fcd.traverse", road, run, [seconds]))
    await client.out(("fcd.run", run, 100.0, 60.0))
    await client.close()


def routes(role):
    return [line for line in role.output().splitlines() if line.startswith("route ")]


async def test_fcd_route_reconnects_after_the_idle_timeout(group, city_file):
    city, path = city_file
    port = free_port()
    ts = await start_tuplespace(group, port, "--idle-timeout", "0.5")
    await publish(port, city, 10.0, 1)
    # plans 1.5 s apart: the tuplespace closes the idle connection between two plans
    route = group.start("route", [*python_module("fcd.route"), "--city", str(path), "--tuplespace", f"127.0.0.1:{port}",
                                  "--from", "0_0", "--to", "2_2", "--every", "1.5", "--count", "3"])
    assert group.wait_exit_sync(route, timeout=60) == 0, route.tail()
    lines = routes(route)
    assert len(lines) == 3 and all("predicted 40.0 s (prediction run 1" in line for line in lines), lines
    assert route.read_stats()["reconnects"] >= 1
    await group.stop(ts)
    assert ts.read_stats()["server"]["idle_closed"] >= 1


async def test_fcd_route_reconnects_to_a_restarted_tuplespace(group, city_file):
    city, path = city_file
    port = free_port()
    ts = await start_tuplespace(group, port)
    await publish(port, city, 10.0, 1)
    route = group.start("route", [*python_module("fcd.route"), "--city", str(path), "--tuplespace", f"127.0.0.1:{port}",
                                  "--from", "0_0", "--to", "2_2", "--every", "0.2"])
    await group.wait_until(route, lambda: any("predicted 40.0 s" in line for line in routes(route)), timeout=60)
    assert await group.stop(ts) == 0
    ts = await start_tuplespace(group, port)               # the same address, an empty space
    await publish(port, city, 20.0, 2)
    await group.wait_until(route, lambda: any("predicted 80.0 s (prediction run 2" in line for line in routes(route)),
                           timeout=60)
    assert await group.stop(route) == 0
    stats = route.read_stats()
    assert stats["reconnects"] >= 1 and stats["connection_losses"] >= 1


async def test_fcd_route_gives_up_after_reconnect_for(group, city_file):
    city, path = city_file
    port = free_port()
    ts = await start_tuplespace(group, port)
    await publish(port, city, 10.0, 1)
    route = group.start("route", [*python_module("fcd.route"), "--city", str(path), "--tuplespace", f"127.0.0.1:{port}",
                                  "--from", "0_0", "--to", "2_2", "--every", "0.2", "--reconnect-for", "1"])
    await group.wait_until(route, lambda: bool(routes(route)), timeout=60)
    assert await group.stop(ts) == 0                        # and never comes back
    assert group.wait_exit_sync(route, timeout=60) == 1
    assert f"tuplespace at 127.0.0.1:{port} unusable for 1 s" in route.output()


async def test_a_refused_request_is_not_retried():
    """Only a lost connection is cured by a new one: a request the tuplespace refuses goes up at once."""
    import asyncio
    import collections

    from fcd.route import Reconnecting
    from fcd.tuplespace import TupleSpaceConnectionError, TupleSpaceError

    conn = Reconnecting("127.0.0.1:9", retry_for=60, stop=asyncio.Event(), stats=collections.Counter())
    conn.space = object()                 # a live connection: no open() needed

    async def refused(space):
        raise TupleSpaceError("tuplespace full (10 tuples)")

    with pytest.raises(TupleSpaceError, match="tuplespace full"):
        await asyncio.wait_for(conn.call(refused), 5)
    assert conn.stats["connection_losses"] == 0
    assert issubclass(TupleSpaceConnectionError, TupleSpaceError)
