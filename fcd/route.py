"""``fcd-route``: the in-car router.

Reads the predicted traverse times from the tuplespace (``("fcd.traverse", road, run, [T_0..T_H])``,
the newest run of each road) and computes the shortest-time path between two junctions with
networkx (Dijkstra on the junction graph, a road weighted by its predicted traverse time
``horizon`` cycles ahead; roads without a prediction use free-flow time).  Only roads the
vehicle class may use (``--vclass``, cars by default) are ever part of a route.  Prints the route with
its predicted time; ``--every`` keeps re-planning as new predictions arrive.

The connection is not assumed to last: the tuplespace closes idle connections (its
``--idle-timeout``, 300 s) and may restart.  A request that fails for want of a connection is
retried on a new one (backoff 0.2 s doubling to 5 s, counted in the stats as ``reconnects``)
for up to ``--reconnect-for`` seconds, then fcd-route exits 1 naming the tuplespace.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from cliruntime import ConfigError, make_parser, non_negative_float, positive_int, run_async
from cliruntime.supervisor import within
from fcd.city import CAR, City, CityError, load_city, vclass_argument

log = logging.getLogger("fcd.route")

TRAVERSE_TEMPLATE = ("fcd.traverse", int, int, list)


@dataclass
class Route:
    junctions: list[str]
    roads: list[int]
    seconds: float
    run: int
    predicted_roads: int

    def describe(self) -> str:
        hops = " -> ".join(self.junctions)
        return (f"route {self.junctions[0]} -> {self.junctions[-1]}: {len(self.roads)} roads, "
                f"predicted {self.seconds:.1f} s (prediction run {self.run}, {self.predicted_roads} roads "
                f"predicted): {hops}")


def latest_times(tuples: list[tuple], horizon: int = 0) -> tuple[dict[int, float], int]:
    """Newest prediction per road -> (road -> seconds, newest run)."""
    best: dict[int, tuple[int, float]] = {}
    for _, road, run, times in tuples:
        if not times:
            continue
        value = float(times[min(horizon, len(times) - 1)])
        if road not in best or run > best[road][0]:
            best[road] = (run, value)
    newest = max((run for run, _ in best.values()), default=0)
    return {road: value for road, (_, value) in best.items()}, newest


class RouteError(ValueError):
    """No route: an unknown junction, or none between the two on roads the vehicles may use."""


def shortest_route(city: City, times: dict[int, float], src: str, dst: str, run: int = 0,
                   vclasses: int = CAR) -> Route:
    """Fastest route using only roads ``vclasses`` may use (cars by default); of parallel roads
    between two junctions the faster one."""
    if src not in city.graph or dst not in city.graph:
        raise RouteError(f"unknown junction {src if src not in city.graph else dst!r}")
    g = nx.DiGraph()
    for road, (u, v) in enumerate(city.roads):
        if not city.allows(road, vclasses):
            continue
        free = float(city.length[road] / city.speed[road])
        time = max(times.get(road, free), 0.0)
        if not g.has_edge(u, v) or time < g.edges[u, v]["time"]:
            g.add_edge(u, v, road=road, time=time)
    if src not in g or dst not in g:
        raise RouteError(f"no route from {src} to {dst} on roads these vehicles may use")
    try:
        path = nx.dijkstra_path(g, src, dst, weight="time")
    except nx.NetworkXNoPath:
        raise RouteError(f"no route from {src} to {dst}") from None
    roads = [g.edges[a, b]["road"] for a, b in zip(path, path[1:])]
    seconds = sum(g.edges[a, b]["time"] for a, b in zip(path, path[1:]))
    return Route(path, roads, seconds, run, sum(1 for r in roads if r in times))


class Reconnecting:
    """fcd-route's tuplespace connection: every request runs on a live connection, made anew
    when the server closed the old one (idle timeout, restart)."""

    FIRST_BACKOFF = 0.2
    MAX_BACKOFF = 5.0

    def __init__(self, address: str, retry_for: float, stop: asyncio.Event, stats) -> None:
        self.address = address
        self.retry_for = retry_for
        self.stop = stop
        self.stats = stats
        self.space = None

    async def open(self) -> None:
        from fcd.tuplespace import connect
        self.space = await connect(self.address)

    async def close(self) -> None:
        if self.space is not None:
            space, self.space = self.space, None
            await space.close()

    async def call(self, request):
        """``await request(space)``, on a new connection if the current one is gone."""
        from fcd.tuplespace import TupleSpaceConnectionError, TupleSpaceError
        deadline = None
        backoff = self.FIRST_BACKOFF
        while True:
            try:
                if self.space is None:
                    await self.open()
                    self.stats["reconnects"] += 1
                    log.info("reconnected to the tuplespace at %s", self.address)
                return await request(self.space)
            except (TupleSpaceConnectionError, OSError) as exc:
                # a closed connection is what a new one cures; a refused request (any other
                # TupleSpaceError) would fail the same way anew, and goes up at once
                await self.close()
                now = time.monotonic()
                deadline = now + self.retry_for if deadline is None else deadline
                if now >= deadline or self.stop.is_set():
                    raise TupleSpaceError(f"tuplespace at {self.address} unusable for "
                                          f"{self.retry_for:g} s: {exc}") from None
                log.warning("tuplespace at %s: %s; reconnecting in %.1f s", self.address, exc, backoff)
                self.stats["connection_losses"] += 1
                try:
                    await within(self.stop.wait(), min(backoff, deadline - now))
                except asyncio.TimeoutError:
                    pass
                backoff = min(2 * backoff, self.MAX_BACKOFF)


async def plan(space, city: City, src: str, dst: str, horizon: int = 0, vclasses: int = CAR) -> Route:
    tuples = await space.rd_all(TRAVERSE_TEMPLATE, limit=10 * city.n_roads + 100)
    times, run = latest_times(tuples, horizon)
    return shortest_route(city, times, src, dst, run, vclasses)


def build_parser():
    p = make_parser("fcd-route", "Shortest-time routes from the predictions in the tuplespace.", examples=[
        "fcd-route --city city.json --tuplespace 127.0.0.1:7400 --from 0_0 --to 7_7",
        "fcd-route --city city.json --tuplespace 127.0.0.1:7400 --from 0_0 --to 7_7 --every 5",
    ])
    p.add_argument("--city", type=Path, required=True)
    p.add_argument("--tuplespace", required=True, help="HOST:PORT of a tuplespace server, or a Redis URL (redis://HOST:PORT/N, unix:///path/redis.sock)")
    p.add_argument("--from", dest="src", required=True, help="start junction id")
    p.add_argument("--to", dest="dst", required=True, help="destination junction id")
    p.add_argument("--horizon", type=int, default=0, help="use the prediction this many cycles ahead")
    p.add_argument("--vclass", type=vclass_argument, default="passenger",
                   help="route over roads this vehicle class may use (SUMO class name)")
    p.add_argument("--wait", type=non_negative_float, default=10.0,
                   help="seconds to wait for a first prediction run")
    p.add_argument("--every", type=non_negative_float, default=0.0, help="re-plan every N seconds (0: once)")
    p.add_argument("--count", type=positive_int, default=None, help="stop after this many plans")
    p.add_argument("--reconnect-for", type=non_negative_float, default=60.0,
                   help="seconds to keep reconnecting to a tuplespace that closed the connection or went away")
    return p


async def amain(args, ctx) -> int:
    from fcd.tuplespace import TupleSpaceError
    city = load_city(args.city)
    if args.src not in city.graph or args.dst not in city.graph:
        raise ConfigError(f"unknown junction: {args.src if args.src not in city.graph else args.dst}")
    session = Reconnecting(args.tuplespace, args.reconnect_for, ctx.stop, ctx.stats)
    try:
        await session.open()
    except OSError as exc:
        raise ConfigError(f"cannot reach the tuplespace at {args.tuplespace}: {exc.strerror}") from None
    try:
        first = await session.call(lambda space: space.rd(("fcd.run", int, float, float), timeout=args.wait))
        if first is None:
            print(f"fcd-route: no prediction within {args.wait:.0f} s; using free-flow times", flush=True)
        plans = 0
        while not ctx.stop.is_set():
            route = await session.call(lambda space: plan(space, city, args.src, args.dst, args.horizon, args.vclass))
            print(route.describe(), flush=True)
            ctx.stats["plans"] += 1
            ctx.stats["last_seconds"] = round(route.seconds, 2)
            plans += 1
            if not args.every or (args.count and plans >= args.count):
                break
            try:
                await within(ctx.stop.wait(), args.every)
            except asyncio.TimeoutError:
                pass
    except TupleSpaceError as exc:
        print(f"fcd-route: {exc}", flush=True)
        return 1
    finally:
        await session.close()
    return 0


def main(argv=None) -> int:
    return run_async(build_parser(), amain, argv, config_errors=(CityError, RouteError))


if __name__ == "__main__":
    raise SystemExit(main())
