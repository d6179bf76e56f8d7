"""Map matching and per-road aggregation: the sans-IO core shared by the booster and the server.

:class:`MapMatcher` finds each probe's road with a uniform grid spatial index (every cell lists
the road segments within ``max_distance`` of it) and a heading test (a car's heading must be
within ``max_heading`` degrees of the road's direction, so the two directions of a street are
told apart); vectorised over a batch.

:class:`Aggregator` keeps the latest state of every car (bounded table, stale cars expire) and
counts road departures and turns from consecutive matched probes.  At every light change it
produces a :class:`RoadReport` for each road whose light changed: queue length at the exit light
(cars slower than ``QUEUE_SPEED``), cars on the road, density (cars per km per lane), mean speed
of moving cars, and the departures and turns since that road's previous report.  Time is the
probes' own clock: nothing here reads a clock or touches a socket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fcd.city import City

QUEUE_SPEED = 1.0   # m/s: a car slower than this is waiting in the queue


class MapMatcher:
    def __init__(self, city: City, cell: float = 50.0, max_distance: float = 20.0,
                 max_heading: float = 45.0) -> None:
        self.city, self.cell, self.max_distance, self.max_heading = city, cell, max_distance, max_heading
        xmin, ymin, xmax, ymax = city.bbox
        pad = max_distance + city.junction_radius + 1.0
        self.ox, self.oy = xmin - pad, ymin - pad
        self.nx = int(math.ceil((xmax - xmin + 2 * pad) / cell)) + 1
        self.ny = int(math.ceil((ymax - ymin + 2 * pad) / cell)) + 1
        buckets: list[list[int]] = [[] for _ in range(self.nx * self.ny)]
        for road in range(city.n_roads):
            x0, x1 = sorted((city.x0[road], city.x1[road]))
            y0, y1 = sorted((city.y0[road], city.y1[road]))
            i0, i1 = self._ix(x0 - max_distance), self._ix(x1 + max_distance)
            j0, j1 = self._iy(y0 - max_distance), self._iy(y1 + max_distance)
            for i in range(i0, i1 + 1):
                for j in range(j0, j1 + 1):
                    buckets[i * self.ny + j].append(road)
        width = max(1, max(len(b) for b in buckets))
        self.table = np.full((len(buckets), width), -1, dtype=np.int32)
        for k, b in enumerate(buckets):
            self.table[k, :len(b)] = b

    def _ix(self, x: float) -> int:
        return min(self.nx - 1, max(0, int((x - self.ox) // self.cell)))

    def _iy(self, y: float) -> int:
        return min(self.ny - 1, max(0, int((y - self.oy) // self.cell)))

    def match(self, x: np.ndarray, y: np.ndarray, heading: np.ndarray) -> np.ndarray:
        """Road id per point, -1 where no road is close enough in position and heading."""
        c = self.city
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        i = np.floor((x - self.ox) / self.cell)
        j = np.floor((y - self.oy) / self.cell)
        inside = (i >= 0) & (i < self.nx) & (j >= 0) & (j < self.ny)
        cells = np.where(inside, i * self.ny + j, 0).astype(np.int64)
        cand = self.table[cells]                         # (n, K)
        valid = (cand >= 0) & inside[:, None]
        r = np.where(valid, cand, 0)
        px, py = x[:, None] - c.x0[r], y[:, None] - c.y0[r]
        seg = c.seg_length[r]
        along = np.clip(px * c.ux[r] + py * c.uy[r], 0.0, seg)
        dist = np.hypot(px - along * c.ux[r], py - along * c.uy[r])
        dh = np.abs((np.asarray(heading, dtype=np.float64)[:, None] - c.heading[r] + 180.0) % 360.0 - 180.0)
        ok = valid & (dist <= self.max_distance) & (dh <= self.max_heading)
        cost = np.where(ok, dist + dh * 0.1, np.inf)
        best = np.argmin(cost, axis=1)
        rows = np.arange(len(x))
        return np.where(np.isfinite(cost[rows, best]), cand[rows, best], -1).astype(np.int32)


@dataclass
class RoadReport:
    """What a box tells the server about one road at one light change."""

    road: int
    t: float
    green: bool            # the road's light state from t on
    queue: int
    cars: int
    density: float         # cars per km per lane
    mean_speed: float      # of moving cars, m/s; -1 when none moved
    departures: int        # cars that left the road since the previous report
    interval: float        # seconds since the previous report (0 for the first)
    was_green: bool        # light state during that interval
    turns: dict[int, int] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, float]:
        return (self.road, round(self.t, 3))

    def to_xmlrpc(self) -> dict[str, Any]:
        return {"road": int(self.road), "t": float(self.t), "green": bool(self.green), "queue": int(self.queue),
                "cars": int(self.cars), "density": float(self.density), "mean_speed": float(self.mean_speed),
                "departures": int(self.departures), "interval": float(self.interval),
                "was_green": bool(self.was_green), "turns": {str(k): int(v) for k, v in self.turns.items()}}

    @classmethod
    def from_xmlrpc(cls, data: Any, n_roads: int) -> "RoadReport":
        """Strict: raises ValueError saying which field is wrong."""
        if not isinstance(data, dict):
            raise ValueError("report must be a struct")
        def num(name, kind=(int, float)):
            value = data.get(name)
            if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
                raise ValueError(f"report field {name!r} missing or not a finite number")
            return value
        road = num("road", int)
        if not 0 <= road < n_roads:
            raise ValueError(f"report road {road} unknown")
        for name in ("green", "was_green"):
            if not isinstance(data.get(name), bool):
                raise ValueError(f"report field {name!r} must be a boolean")
        turns = data.get("turns", {})
        if not isinstance(turns, dict):
            raise ValueError("report field 'turns' must be a struct")
        parsed = {}
        for k, v in turns.items():
            if not (k.isdigit() and 0 <= int(k) < n_roads) or isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"bad turn entry {k!r}: {v!r}")
            parsed[int(k)] = v
        report = cls(road=road, t=float(num("t")), green=data["green"], queue=num("queue", int),
                     cars=num("cars", int), density=float(num("density")), mean_speed=float(num("mean_speed")),
                     departures=num("departures", int), interval=float(num("interval")),
                     was_green=data["was_green"], turns=parsed)
        if min(report.queue, report.cars, report.departures) < 0 or report.queue > report.cars:
            raise ValueError("report counts must be non-negative and queue <= cars")
        if report.t < 0 or report.interval < 0 or report.density < 0:
            raise ValueError("report t, interval and density must be non-negative")
        return report


class Aggregator:
    def __init__(self, city: City, max_cars: int = 100_000, stale_after: float = 10.0,
                 matcher: MapMatcher | None = None) -> None:
        self.city = city
        self.matcher = matcher or MapMatcher(city)
        self.max_cars, self.stale_after = max_cars, stale_after
        self.slot_of: dict[int, int] = {}
        self.free: list[int] = list(range(max_cars - 1, -1, -1))
        self.car_id = np.zeros(max_cars, dtype=np.int64)
        self.road = np.full(max_cars, -1, dtype=np.int32)
        self.last_road = np.full(max_cars, -1, dtype=np.int32)
        self.speed = np.zeros(max_cars)
        self.t_last = np.full(max_cars, -np.inf)
        self.departures = np.zeros(city.n_roads, dtype=np.int64)
        self.turns: list[dict[int, int]] = [dict() for _ in range(city.n_roads)]
        self.light_mask: dict[int, int] = {}
        self.last_change = np.full(city.n_roads, np.nan)
        self.successor_sets = [set(s) for s in city.successors]
        self.stats = {"probes": 0, "unmatched": 0, "cars_refused": 0, "cars_expired": 0,
                      "stale_probes": 0, "unknown_lights": 0, "reports": 0}

    # ------------------------------------------------------------ probes
    def feed(self, batch: np.ndarray) -> None:
        """Take a batch of probes (fields car, t, x, y, speed, heading; any order)."""
        if len(batch) == 0:
            return
        roads = self.matcher.match(batch["x"], batch["y"], batch["heading"])
        self.stats["probes"] += len(batch)
        self.stats["unmatched"] += int((roads < 0).sum())
        order = np.lexsort((batch["t"], batch["car"]))
        cars = batch["car"][order].astype(np.int64)
        ts = batch["t"][order].astype(np.float64)
        speeds = batch["speed"][order].astype(np.float64)
        roads = roads[order]
        uniq, first, inverse = np.unique(cars, return_index=True, return_inverse=True)
        slots = np.empty(len(uniq), dtype=np.int64)
        for k, car in enumerate(uniq.tolist()):
            slot = self.slot_of.get(car)
            if slot is None:
                if not self.free:
                    self._expire(float(ts.max()))
                if not self.free:
                    slot = -1
                    self.stats["cars_refused"] += 1
                else:
                    slot = self.free.pop()
                    self.slot_of[car] = slot
                    self.car_id[slot] = car
                    self.road[slot] = self.last_road[slot] = -1
                    self.t_last[slot] = -np.inf
            slots[k] = slot
        per_probe_slot = slots[inverse]
        known = per_probe_slot >= 0
        # drop probes older than what we already know of the car (reordered datagrams)
        fresh = known & (ts >= self.t_last[np.where(known, per_probe_slot, 0)])
        self.stats["stale_probes"] += int((known & ~fresh).sum())
        idx = np.flatnonzero(fresh & (roads >= 0))
        # departures and turns: consecutive matched roads of one car
        prev_slot = -1
        prev_road = -1
        for i in idx.tolist():
            slot = int(per_probe_slot[i])
            if slot != prev_slot:
                prev_slot, prev_road = slot, int(self.last_road[slot])
            road = int(roads[i])
            if prev_road >= 0 and road != prev_road:
                self.departures[prev_road] += 1
                if road in self.successor_sets[prev_road]:
                    turns = self.turns[prev_road]
                    turns[road] = turns.get(road, 0) + 1
            prev_road = road
            self.last_road[slot] = road
        # latest state per car: the last fresh probe in (car, t) order
        last_idx = np.flatnonzero(fresh)
        if len(last_idx):
            is_last = np.r_[per_probe_slot[last_idx][1:] != per_probe_slot[last_idx][:-1], True]
            li = last_idx[is_last]
            s = per_probe_slot[li]
            self.road[s] = roads[li]
            self.speed[s] = speeds[li]
            self.t_last[s] = ts[li]

    def _expire(self, now: float) -> None:
        stale = np.flatnonzero((self.t_last < now - self.stale_after) & (self.t_last > -np.inf))
        for slot in stale.tolist():
            del self.slot_of[int(self.car_id[slot])]
            self.t_last[slot] = -np.inf
            self.road[slot] = self.last_road[slot] = -1
            self.free.append(slot)
        self.stats["cars_expired"] += len(stale)

    # ------------------------------------------------------------ lights
    def road_state(self, road: int, now: float) -> tuple[int, int, float]:
        """(cars, queue, mean moving speed or -1) on a road from the latest probes."""
        sel = (self.road == road) & (self.t_last >= now - self.stale_after)
        speeds = self.speed[sel]
        moving = speeds[speeds >= QUEUE_SPEED]
        return int(sel.sum()), int((speeds < QUEUE_SPEED).sum()), float(moving.mean()) if len(moving) else -1.0

    def light_change(self, light: int, t: float, green: int) -> list[RoadReport]:
        if not 0 <= light < len(self.city.lights):
            self.stats["unknown_lights"] += 1
            return []
        prev = self.light_mask.get(light)
        self.light_mask[light] = green
        roads = self.city.lights[light].roads
        if prev is None:
            for road in roads:
                self.last_change[road] = t
            return []
        reports = []
        c = self.city
        for bit, road in enumerate(roads):
            was, now_green = bool(prev >> bit & 1), bool(green >> bit & 1)
            if was == now_green:
                continue
            cars, queue, mean_speed = self.road_state(road, t)
            interval = 0.0 if math.isnan(self.last_change[road]) else t - self.last_change[road]
            reports.append(RoadReport(
                road=road, t=t, green=now_green, queue=queue, cars=cars,
                density=cars / (c.length[road] / 1000.0 * c.lanes[road]), mean_speed=mean_speed,
                departures=int(self.departures[road]), interval=interval, was_green=was,
                turns=self.turns[road]))
            self.departures[road] = 0
            self.turns[road] = {}
            self.last_change[road] = t
        self.stats["reports"] += len(reports)
        return reports


class Ingest:
    """Datagrams in, road reports out: validation, loss accounting and aggregation in order.

    Probe runs are decoded and aggregated vectorised; a light change is applied after the probes
    that arrived before it.  Malformed datagrams are counted and dropped.
    """

    def __init__(self, city: City, max_cars: int = 100_000, stale_after: float = 10.0) -> None:
        from fcd.wire import SeqTracker
        self.aggregator = Aggregator(city, max_cars=max_cars, stale_after=stale_after)
        self.seq = SeqTracker()
        self.stats = {"datagrams": 0, "probes": 0, "lights": 0, "malformed": 0}
        self.last_error = ""

    def ingest(self, datagrams: list[bytes]) -> list[RoadReport]:
        from fcd import wire
        self.stats["datagrams"] += len(datagrams)
        reports: list[RoadReport] = []
        start = 0
        for i, d in enumerate(datagrams):
            if len(d) != wire.PROBE_SIZE:
                self._probes(datagrams[start:i])
                start = i + 1
                try:
                    msg = wire.decode(d)
                except wire.WireDecodeError as exc:
                    self.stats["malformed"] += 1
                    self.last_error = str(exc)
                    continue
                if isinstance(msg, wire.LightChange):
                    self.stats["lights"] += 1
                    self.seq.add(msg.generator, msg.seq)
                    reports += self.aggregator.light_change(msg.light, msg.t, msg.green)
                else:  # pragma: no cover - probes always have PROBE_SIZE
                    self.stats["malformed"] += 1
        self._probes(datagrams[start:])
        return reports

    def _probes(self, datagrams: list[bytes]) -> None:
        if not datagrams:
            return
        from fcd import wire
        arr, _, bad = wire.decode_probe_batch(datagrams)
        self.stats["malformed"] += bad
        self.stats["probes"] += len(arr)
        self.seq.add_batch(arr["generator"], arr["seq"])
        self.aggregator.feed(arr)
