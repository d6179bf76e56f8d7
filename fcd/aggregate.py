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
    LUT_SIZE = 1 << 20      # car ids below this find their slot by array lookup; others by dict

    def __init__(self, city: City, max_cars: int = 100_000, stale_after: float = 10.0,
                 matcher: MapMatcher | None = None) -> None:
        self.city = city
        self.matcher = matcher or MapMatcher(city)
        self.max_cars, self.stale_after = max_cars, stale_after
        self.slot_of: dict[int, int] = {}
        self.lut = np.full(self.LUT_SIZE, -1, dtype=np.int64)
        self.free: list[int] = list(range(max_cars - 1, -1, -1))
        self.used = 0            # slots [0, used) have been handed out at least once
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

    # ------------------------------------------------------------ car slots
    def _slots(self, cars: np.ndarray, now: float) -> np.ndarray:
        """Slot per car id (-1: table full, refused); new cars get a slot."""
        small = cars < self.LUT_SIZE
        slots = np.where(small, self.lut[np.where(small, cars, 0)], -1)
        missing = np.flatnonzero(slots < 0)
        for i in missing.tolist():
            car = int(cars[i])
            slot = self.slot_of.get(car)
            if slot is None:
                if not self.free:
                    self._expire(now)
                if not self.free:
                    self.stats["cars_refused"] += 1
                    continue
                slot = self.free.pop()
                self.used = max(self.used, slot + 1)
                self.slot_of[car] = slot
                if car < self.LUT_SIZE:
                    self.lut[car] = slot
                self.car_id[slot] = car
                self.road[slot] = self.last_road[slot] = -1
                self.t_last[slot] = -np.inf
            slots[i] = slot
        return slots

    def _expire(self, now: float) -> None:
        stale = np.flatnonzero((self.t_last < now - self.stale_after) & (self.t_last > -np.inf))
        for slot in stale.tolist():
            car = int(self.car_id[slot])
            del self.slot_of[car]
            if car < self.LUT_SIZE:
                self.lut[car] = -1
            self.t_last[slot] = -np.inf
            self.road[slot] = self.last_road[slot] = -1
            self.free.append(slot)
        self.stats["cars_expired"] += len(stale)

    # ------------------------------------------------------------ probes
    def _match(self, batch: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Map-match; a car still on its previous road is checked against that road only."""
        c, m = self.city, self.matcher
        x = batch["x"].astype(np.float64)
        y = batch["y"].astype(np.float64)
        h = batch["heading"].astype(np.float64)
        prev = np.where(slots >= 0, self.last_road[np.maximum(slots, 0)], -1)
        r = np.maximum(prev, 0)
        px, py = x - c.x0[r], y - c.y0[r]
        along = np.clip(px * c.ux[r] + py * c.uy[r], 0.0, c.seg_length[r])
        dist = np.hypot(px - along * c.ux[r], py - along * c.uy[r])
        dh = np.abs((h - c.heading[r] + 180.0) % 360.0 - 180.0)
        # well inside the previous road (not near its ends, where another road may be closer)
        inner = (along > m.max_distance) & (along < c.seg_length[r] - m.max_distance)
        keep = (prev >= 0) & (dist <= m.max_distance / 2) & (dh <= m.max_heading) & inner
        roads = np.where(keep, prev, -1).astype(np.int32)
        rest = np.flatnonzero(~keep)
        if len(rest):
            roads[rest] = m.match(x[rest], y[rest], h[rest])
        return roads

    def feed(self, batch: np.ndarray) -> None:
        """Take a batch of probes (fields car, t, x, y, speed, heading; any order)."""
        if len(batch) == 0:
            return
        order = np.lexsort((batch["t"], batch["car"]))
        batch = batch[order]
        cars = batch["car"].astype(np.int64)
        ts = batch["t"].astype(np.float64)
        slots = self._slots(cars, float(ts.max()))
        roads = self._match(batch, slots)
        self.stats["probes"] += len(batch)
        self.stats["unmatched"] += int((roads < 0).sum())
        known = slots >= 0
        safe = np.where(known, slots, 0)
        # drop probes older than what we already know of the car (reordered datagrams)
        fresh = known & (ts >= self.t_last[safe])
        self.stats["stale_probes"] += int((known & ~fresh).sum())
        # departures and turns: consecutive matched roads of one car
        idx = np.flatnonzero(fresh & (roads >= 0))
        if len(idx):
            s_idx, r_idx = slots[idx], roads[idx]
            first = np.r_[True, s_idx[1:] != s_idx[:-1]]
            prev = np.where(first, self.last_road[s_idx], np.r_[-1, r_idx[:-1]])
            changed = np.flatnonzero((prev >= 0) & (prev != r_idx))
            if len(changed):
                np.add.at(self.departures, prev[changed], 1)
                for a, b in zip(prev[changed].tolist(), r_idx[changed].tolist()):
                    if b in self.successor_sets[a]:
                        turns = self.turns[a]
                        turns[b] = turns.get(b, 0) + 1
            last = np.r_[s_idx[1:] != s_idx[:-1], True]
            self.last_road[s_idx[last]] = r_idx[last]
        # latest state per car: the last fresh probe in (car, t) order
        li = np.flatnonzero(fresh)
        if len(li):
            li = li[np.r_[slots[li][1:] != slots[li][:-1], True]]
            s = slots[li]
            self.road[s] = roads[li]
            self.speed[s] = batch["speed"][li]
            self.t_last[s] = ts[li]

    # ------------------------------------------------------------ lights
    def road_states(self, now: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cars, queue, mean moving speed or -1) for every road, from the latest probes."""
        n = self.used
        road, speed = self.road[:n], self.speed[:n]
        live = (road >= 0) & (self.t_last[:n] >= now - self.stale_after)
        R = self.city.n_roads
        r, v = road[live], speed[live]
        cars = np.bincount(r, minlength=R)
        queue = np.bincount(r[v < QUEUE_SPEED], minlength=R)
        moving = v >= QUEUE_SPEED
        n_moving = np.bincount(r[moving], minlength=R)
        sum_moving = np.bincount(r[moving], weights=v[moving], minlength=R)
        mean = np.where(n_moving > 0, sum_moving / np.maximum(n_moving, 1), -1.0)
        return cars, queue, mean

    def road_state(self, road: int, now: float) -> tuple[int, int, float]:
        cars, queue, mean = self.road_states(now)
        return int(cars[road]), int(queue[road]), float(mean[road])

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
        changed = [(bit, road) for bit, road in enumerate(roads) if (prev ^ green) >> bit & 1]
        if not changed:
            return []
        cars_all, queue_all, mean_all = self.road_states(t)
        reports = []
        c = self.city
        for bit, road in changed:
            cars = int(cars_all[road])
            interval = 0.0 if math.isnan(self.last_change[road]) else t - self.last_change[road]
            reports.append(RoadReport(
                road=road, t=t, green=bool(green >> bit & 1), queue=int(queue_all[road]), cars=cars,
                density=cars / (c.length[road] / 1000.0 * c.lanes[road]), mean_speed=float(mean_all[road]),
                departures=int(self.departures[road]), interval=interval, was_green=bool(prev >> bit & 1),
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
        n = len(datagrams)
        self.stats["datagrams"] += n
        reports: list[RoadReport] = []
        sizes = np.fromiter(map(len, datagrams), dtype=np.int64, count=n)
        start = 0
        for i in np.flatnonzero(sizes != wire.PROBE_SIZE).tolist():
            self._probes(datagrams[start:i])
            start = i + 1
            try:
                msg = wire.decode(datagrams[i])
            except wire.WireDecodeError as exc:
                self.stats["malformed"] += 1
                self.last_error = str(exc)
                continue
            if isinstance(msg, wire.LightChange):
                self.stats["lights"] += 1
                self.seq.add(msg.generator, msg.seq)
                reports += self.aggregator.light_change(msg.light, msg.t, msg.green)
        self._probes(datagrams[start:] if start else datagrams)
        return reports

    def _probes(self, datagrams: list[bytes]) -> None:
        """A run of probe-sized datagrams."""
        if not datagrams:
            return
        from fcd import wire
        arr = np.frombuffer(b"".join(datagrams), dtype=wire.PROBE_WIRE_DTYPE)
        ok = wire.probe_valid_mask(arr)
        bad = len(arr) - int(ok.sum())
        if bad:
            arr = arr[ok]
            self.stats["malformed"] += bad
        self.stats["probes"] += len(arr)
        self.seq.add_batch(arr["generator"], arr["seq"])
        self.aggregator.feed(arr)
