"""Real vertical objects in a known state, for the panel builders (no network needed).

Each function returns a ready panel builder (``.build() -> panel``) over the objects that vertical's
booster holds: fcd's BoxAggregator fed with a simulated city's probes and light changes, a
GnutellaBooster adapter whose core saw local servents and booster peers, an mmpog
ReflectorService with members and traffic counters.
"""

from __future__ import annotations

from collections import Counter


def fcd_builder(grid: int = 4, cars: int = 120, seconds: float = 90.0):
    from fcd.booster import BoxAggregator
    from fcd.city import grid_city
    from fcd.gen import Stream
    from fcd.panel import BoxPanel
    from fcd.rpc import KeepAliveClient, ReliableUplink
    from fcd.sim import Simulator

    city = grid_city(grid, grid, block=200.0, seed=1)
    trace = Simulator(city, cars=cars, seed=1).run(seconds)
    stream = Stream(trace, None, 1)
    datagrams = stream.encode(0, len(stream), 1, 0, 0)
    # The uplink only queues here: nothing is sent (no server in this test).
    box = BoxAggregator(city, "test-box", ReliableUplink(KeepAliveClient("127.0.0.1", 9)))
    box.on_batch(datagrams)
    box.flush()
    return BoxPanel(box), city


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
