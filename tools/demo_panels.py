"""The verticals' panel builders over real vertical objects, for the demo's dashboard and the tests.

* :func:`fcd_builder` - fcd's :class:`fcd.booster.BoxAggregator` fed with a simulated city's probes
  and light changes (the same encoding fcd-gen sends), and its :class:`fcd.panel.BoxPanel`.
* :func:`gnutella_builder` - a :class:`gnutella.booster.GnutellaBooster` whose core saw local
  servents and booster peers of other clusters, and its :class:`gnutella.panel.OverlayPanel`.
* :func:`mmpog_builder` - an mmpog :class:`mmpog.reflector.ReflectorService` with members, and its
  :class:`mmpog.panel.ReflectorPanel`.

``python -m tools.demo_panels --control SOCK`` is a booster that replays a simulated city into
an fcd BoxAggregator at ``--speed`` times real time and publishes its panel every second: the
demo's dashboard shows the map changing as lights switch and queues form.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter


def _fcd_box(grid: int, cars: int, seconds: float):
    from fcd.booster import BoxAggregator
    from fcd.city import grid_city
    from fcd.gen import Stream
    from fcd.rpc import KeepAliveClient, ReliableUplink
    from fcd.sim import Simulator

    city = grid_city(grid, grid, block=200.0, seed=1)
    trace = Simulator(city, cars=cars, seed=1).run(seconds)
    stream = Stream(trace, None, 1)
    # The uplink only queues here (bounded): no FCD server takes part.
    box = BoxAggregator(city, "demo-box", ReliableUplink(KeepAliveClient("127.0.0.1", 9), max_queue=10_000))
    return box, stream


def fcd_builder(grid: int = 4, cars: int = 120, seconds: float = 90.0):
    from fcd.panel import BoxPanel

    box, stream = _fcd_box(grid, cars, seconds)
    box.on_batch(stream.encode(0, len(stream), 1, 0, 0))
    box.flush()
    return BoxPanel(box), box.city


def gnutella_builder(local_servents: int = 5, peers: tuple[str, ...] = ("edge2", "edge3")):
    from gnutella.booster import GnutellaBooster
    from gnutella.boostercore import BoosterConfig, BoosterCore
    from gnutella.panel import OverlayPanel

    core = BoosterCore(BoosterConfig("edge1", ("10.11.0.0/24",)), b"secret", stats=Counter())
    adapter = GnutellaBooster(core)
    for cid in range(1, local_servents + 1):
        core.local_up(cid, 0.0, f"10.11.0.{cid + 1}", (f"10.11.0.{cid + 1}", 6346), ("10.12.0.2", 6346), leaf=False)
    for pid, name in enumerate(peers, start=100):
        core.peer_up(pid)
        core.peer_message(pid, {"t": "hello", "id": name, "cluster": [f"10.{12 + pid - 100}.0.0/24"]}, 0.0)
        adapter.peer_names[pid] = name
        adapter.peer_traffic[name].update({"msgs_out": 40 + pid - 100, "msgs_in": 7, "query_out": 12,
                                           "bytes_out": 4000, "bytes_in": 700})
    return OverlayPanel(adapter), core


def mmpog_builder(locations: int = 3, members: int = 4):
    from mmpog.panel import ReflectorPanel
    from mmpog.reflector import ReflectorService
    from mmpog.reliability import ReflectorCore

    core = ReflectorCore()
    for location in range(1, locations + 1):
        for player in range(members):
            core.add_member(location, location * 100 + player, bytes([player]) * 16)
    service = ReflectorService(core)
    service.counters["datagrams_in"] += 500
    service.counters["datagrams_out"] += 2000
    return ReflectorPanel(service), service


class FcdReplay:
    """Feeds the trace to the box ``speed`` seconds of city time per wall-clock second, in a loop."""

    def __init__(self, grid: int, cars: int, seconds: float, speed: float) -> None:
        from fcd.panel import BoxPanel

        self.args = (grid, cars, seconds)
        self.speed = speed
        self.box, self.stream = _fcd_box(*self.args)
        self.panel = BoxPanel(self.box)
        self.position = 0
        self.city_time = float(self.stream.t[0]) if len(self.stream) else 0.0
        self.loops = 0

    def step(self) -> int:
        """One wall-clock second: the next ``speed`` seconds of the trace into the box."""
        import numpy as np

        stream = self.stream
        if self.position >= len(stream):           # the trace is over: start again, a fresh box
            self.box, self.stream = _fcd_box(*self.args)
            self.panel.box = self.box
            self.position, self.loops = 0, self.loops + 1
            stream = self.stream
            self.city_time = float(stream.t[0])
        self.city_time += self.speed
        end = int(np.searchsorted(stream.t, self.city_time, side="right"))
        batch = stream.encode(self.position, end, 1, self.position, 0)
        self.position = end
        self.box.on_batch(batch)
        self.box.flush()
        return len(batch)


async def run_replay_booster(control: str, speed: float, grid: int, cars: int, stop: asyncio.Event) -> None:
    from boxcore.booster import Booster
    from boxcore.panels import publish_panel

    replay = FcdReplay(grid, cars, 300.0, speed)
    async with Booster("fcd-demo-city", control=control) as booster:
        def tick() -> None:
            replay.step()

        booster.call_every(1.0, tick)
        booster.call_every(1.0, lambda: publish_panel(booster, replay.panel.build()))
        await booster.run_until_stopped(stop)


def build_parser() -> argparse.ArgumentParser:
    from cliruntime import make_parser, positive_int

    parser = make_parser("python -m tools.demo_panels",
                         "A booster replaying a simulated city into fcd's aggregator, publishing its panel.",
                         examples=["python -m tools.demo_panels --control /tmp/boxd.sock --speed 5"])
    parser.add_argument("--control", required=True, help="boxd's control socket")
    parser.add_argument("--speed", type=float, default=5.0, help="city seconds per wall-clock second")
    parser.add_argument("--grid", type=positive_int, default=6, help="junctions per side of the simulated city")
    parser.add_argument("--cars", type=positive_int, default=300)
    return parser


async def amain(args: argparse.Namespace, ctx) -> int:
    await run_replay_booster(args.control, args.speed, args.grid, args.cars, ctx.stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    from cliruntime import run_async

    return run_async(build_parser(), amain, argv)


if __name__ == "__main__":
    sys.exit(main())
