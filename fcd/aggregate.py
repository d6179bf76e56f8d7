"""Map matching and per-road aggregation: the sans-IO core shared by the booster and the server.

:class:`MapMatcher` finds each probe's road and lane with a uniform grid spatial index (every
cell lists the lane-polyline segments within ``max_distance`` of it) and a heading test (a car's
heading must be within ``max_heading`` degrees of the lane's direction there, so the two
directions of a street are told apart); a probe inside a junction belongs to the junction, not
to a road.  Vectorised over a batch.

:class:`Aggregator` keeps the latest state of every car (bounded table, stale cars expire) and
counts road departures, whole-road crossing times and turns from consecutive located probes.
At every switch of a light it produces a :class:`RoadReport` for every road that light controls:
queue at the exit light (per lane, the cars from the stop line back to the last halted one),
cars on the road, density (cars per km per lane), mean speed of moving cars, and the departures,
crossings and turns since that road's previous report.  Roads without a light are reported every
``unlit_period`` seconds of probe time; a batch of probes is split where such a report falls due,
so it holds the probes before its time and none after, however they were batched.  A
light-controlled road's report, whose window is a light phase, also carries its car-seconds and
metres cut where that periodic clock ticks (``RoadReport.pieces``), so the time its probes took
can be read over the same intervals as SUMO's ``edgeData`` (the phase's red and green are not
smeared across an interval's edge).  Time is the probes' own clock: nothing here reads a clock
or touches a socket.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fcd.city import City

QUEUE_SPEED = 1.0   # m/s: a car slower than this counts as not moving (mean speed of moving cars)
HALT_SPEED = 0.1    # m/s: a car slower than this is halted (SUMO's halting threshold)
IN_JUNCTION = -2    # MapMatcher.locate: the probe is inside a junction, on no road
JUNCTION_MARGIN = 0.5   # metres past a road lane's end, inside a junction's shape: in the junction
ON_LANE = 0.5           # metres from a road lane (and not past its end): on that lane
CREDIT_GRID = 2.0 ** 24  # car-seconds and metres are counted in units of 1 / this (Aggregator._time_on_roads):
                        # sums stay exact up to 2**29 per road and report
ON_ROAD_EPS = 1e-6      # metres: a probe matched this close to (or past) a lane's end or start is not
                        # counted on the road (Aggregator._time_on_roads)


class MapMatcher:
    """Probe -> (road, lane, metres to the lane's end), or a junction.

    Candidates are the segments of every lane polyline of every road, and of every internal
    (junction) lane.  A probe goes to the candidate with the least ``distance + 0.1 x heading
    difference`` among those within ``max_distance`` metres and ``max_heading`` degrees.  It is in
    a junction (road ``IN_JUNCTION``) when that candidate is an internal lane, or when it lies
    inside a junction's shape beyond the end (or before the start) of the road lane it is
    nearest to: SUMO's lanes stop at the junction shape, so a car there is crossing.
    """

    def __init__(self, city: City, cell: float = 50.0, max_distance: float | None = None,
                 max_heading: float = 45.0) -> None:
        self.city, self.cell, self.max_heading = city, cell, max_heading
        self.max_distance = city.match_distance if max_distance is None else max_distance
        max_distance = self.max_distance
        # segments of every lane (lane = global lane number) and internal lane (lane -1)
        rows = []          # (x0, y0, x1, y1, road, lane, to_end at segment start, first, last)
        lane_road = []
        for road, shapes in enumerate(city.lane_shapes):
            for shape in shapes:
                lane = len(lane_road)
                lane_road.append(road)
                seg = np.hypot(*np.diff(shape, axis=0).T)
                to_end = seg[::-1].cumsum()[::-1]
                k = len(seg)
                for i in range(k):
                    rows.append((*shape[i], *shape[i + 1], road, lane, to_end[i], i == 0, i == k - 1))
        self.junction_names = sorted({j for j, _ in city.internal_shapes} | {
            n for n in city.graph.nodes if city.junction_shape(n) is not None})
        for junction, pts in city.internal_shapes:
            shape = np.asarray(pts, dtype=np.float64)
            for i in range(len(shape) - 1):
                rows.append((*shape[i], *shape[i + 1], IN_JUNCTION, -1, 0.0, False, False))
        seg = np.array(rows, dtype=np.float64)
        self.lane_road = np.array(lane_road, dtype=np.int32)
        self.n_lanes = len(lane_road)
        # metres of every lane (its first segment's distance to the lane's end): a probe's
        # position from the lane's start is this minus its distance to the end
        self.lane_length = np.zeros(len(lane_road))
        for row in rows:
            if row[7] and row[5] >= 0:
                self.lane_length[int(row[5])] = row[6]
        self.sx0, self.sy0, sx1, sy1 = seg[:, 0], seg[:, 1], seg[:, 2], seg[:, 3]
        self.s_road = seg[:, 4].astype(np.int32)
        self.s_lane = seg[:, 5].astype(np.int32)
        self.s_to_end = seg[:, 6]
        self.s_first, self.s_last = seg[:, 7].astype(bool), seg[:, 8].astype(bool)
        self.has_internal = bool((self.s_road == IN_JUNCTION).any())
        dx, dy = sx1 - self.sx0, sy1 - self.sy0
        self.s_len = np.maximum(np.hypot(dx, dy), 1e-9)
        self.sux, self.suy = dx / self.s_len, dy / self.s_len
        self.s_heading = np.degrees(np.arctan2(dx, dy)) % 360.0
        # junction shapes (matplotlib paths), with their bounding boxes
        from matplotlib.path import Path as MplPath
        self.junction_paths = []
        for name in self.junction_names:
            shape = city.junction_shape(name)
            if shape is not None:
                self.junction_paths.append((shape.min(axis=0), shape.max(axis=0), MplPath(shape)))
        xmin, ymin, xmax, ymax = city.bbox
        pad = max_distance + city.junction_radius + 1.0
        self.ox, self.oy = xmin - pad, ymin - pad
        self.nx = int(math.ceil((xmax - xmin + 2 * pad) / cell)) + 1
        self.ny = int(math.ceil((ymax - ymin + 2 * pad) / cell)) + 1
        buckets: list[list[int]] = [[] for _ in range(self.nx * self.ny)]
        for k in range(len(seg)):
            x0, x1 = sorted((self.sx0[k], sx1[k]))
            y0, y1 = sorted((self.sy0[k], sy1[k]))
            i0, i1 = self._ix(x0 - max_distance), self._ix(x1 + max_distance)
            j0, j1 = self._iy(y0 - max_distance), self._iy(y1 + max_distance)
            for i in range(i0, i1 + 1):
                for j in range(j0, j1 + 1):
                    buckets[i * self.ny + j].append(k)
        width = max(1, max(len(b) for b in buckets))
        self.table = np.full((len(buckets), width), -1, dtype=np.int32)
        for k, b in enumerate(buckets):
            self.table[k, :len(b)] = b

    def _ix(self, x: float) -> int:
        return min(self.nx - 1, max(0, int((x - self.ox) // self.cell)))

    def _iy(self, y: float) -> int:
        return min(self.ny - 1, max(0, int((y - self.oy) // self.cell)))

    def _heading_diff(self, seg: np.ndarray, heading: np.ndarray) -> np.ndarray:
        """Degrees between headings and segments' directions (0..180), elementwise."""
        return np.abs((heading - self.s_heading[seg] + 180.0) % 360.0 - 180.0)

    def _distance(self, seg: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Distance of points to segments, elementwise: the hot loop (:meth:`project`'s arithmetic)."""
        px, py = x - self.sx0[seg], y - self.sy0[seg]
        ux, uy = self.sux[seg], self.suy[seg]
        along = np.clip(px * ux + py * uy, 0.0, self.s_len[seg])
        return np.hypot(px - along * ux, py - along * uy)

    def project(self, seg: np.ndarray, x: np.ndarray, y: np.ndarray, heading: np.ndarray):
        """Distance, heading difference, clipped position along, and overshoot beyond the lane's
        ends, of points against segments (broadcast)."""
        px, py = x - self.sx0[seg], y - self.sy0[seg]
        raw = px * self.sux[seg] + py * self.suy[seg]
        along = np.clip(raw, 0.0, self.s_len[seg])
        dist = np.hypot(px - along * self.sux[seg], py - along * self.suy[seg])
        dh = np.abs((heading - self.s_heading[seg] + 180.0) % 360.0 - 180.0)
        beyond = np.where(self.s_last[seg], raw - self.s_len[seg], 0.0)
        beyond = np.maximum(beyond, np.where(self.s_first[seg], -raw, 0.0))
        return dist, dh, along, beyond

    def along_beyond(self, seg: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`project`'s clipped position along and overshoot only (the same arithmetic),
        for the chosen segments, where distance and heading are already known."""
        px, py = x - self.sx0[seg], y - self.sy0[seg]
        raw = px * self.sux[seg] + py * self.suy[seg]
        s_len = self.s_len[seg]
        along = np.clip(raw, 0.0, s_len)
        beyond = np.where(self.s_last[seg], raw - s_len, 0.0)
        beyond = np.maximum(beyond, np.where(self.s_first[seg], -raw, 0.0))
        return along, beyond

    def locate(self, x: np.ndarray, y: np.ndarray, heading: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(road, lane, metres to the lane's end, segment) per point; road -1: no road close
        enough in position and heading, IN_JUNCTION: inside a junction."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        heading = np.asarray(heading, dtype=np.float64)
        i = np.floor((x - self.ox) / self.cell)
        j = np.floor((y - self.oy) / self.cell)
        inside = (i >= 0) & (i < self.nx) & (j >= 0) & (j < self.ny)
        cells = np.where(inside, i * self.ny + j, 0).astype(np.int64)
        cand = self.table[cells]                         # (n, K)
        valid = (cand >= 0) & inside[:, None]
        # distances of the real candidates only (a cell lists a few of the table's K columns),
        # by flat position: one index array gathers faster than a (row, column) pair
        flat = np.flatnonzero(valid)
        pi = flat // cand.shape[1]
        near = cand.ravel()[flat]
        dh = self._heading_diff(near, heading[pi])
        # heading first: it rules out most candidates (the opposite lanes, the crossing roads),
        # whose distance is then not needed (their cost is infinite either way)
        aligned = np.flatnonzero(dh <= self.max_heading)
        flat, near, pi, dh = flat[aligned], near[aligned], pi[aligned], dh[aligned]
        dist = self._distance(near, x[pi], y[pi])
        cost = np.full(valid.size, np.inf)
        cost[flat] = np.where(dist <= self.max_distance, dist + dh * 0.1, np.inf)
        cost = cost.reshape(valid.shape)
        rows = np.arange(len(x))
        if not self.has_internal:
            best = np.argmin(cost, axis=1)
            found = np.isfinite(cost[rows, best])
            k = cand[rows, best]                         # -1 where not found: masked below
        else:
            seg = np.where(valid, cand, 0)
            internal = self.s_road[seg] == IN_JUNCTION
            best_road = np.argmin(np.where(internal, np.inf, cost), axis=1)
            best_internal = np.argmin(np.where(internal, cost, np.inf), axis=1)
            road_cost = np.where(internal[rows, best_road], np.inf, cost[rows, best_road])
            internal_cost = np.where(internal[rows, best_internal], cost[rows, best_internal], np.inf)
            # internal lanes start where the roads end: a probe on a road lane, not past its end,
            # stays on the road whatever its heading says
            d_road, _, _, beyond_road = self.project(seg[rows, best_road], x, y, heading)
            on_lane = (d_road <= ON_LANE) & (beyond_road <= ON_LANE)
            take_internal = internal_cost < np.where(on_lane, -np.inf, road_cost)
            best = np.where(take_internal, best_internal, best_road)
            found = np.isfinite(np.minimum(road_cost, internal_cost))
            k = seg[rows, best]
        along, beyond = self.along_beyond(k, x, y)
        road = np.where(found, self.s_road[k], -1).astype(np.int32)
        lane = np.where(found, self.s_lane[k], -1).astype(np.int32)
        to_end = np.where(found, self.s_to_end[k] - along, 0.0)
        # beyond a lane's end inside a junction's shape: crossing the junction
        over = np.flatnonzero(found & (road >= 0) & (beyond > JUNCTION_MARGIN))
        if len(over) and self.junction_paths:
            pts = np.column_stack([x[over], y[over]])
            hit = np.zeros(len(over), dtype=bool)
            for lo, hi, path in self.junction_paths:
                near = np.flatnonzero(~hit & np.all(pts >= lo, axis=1) & np.all(pts <= hi, axis=1))
                if len(near):
                    hit[near] = path.contains_points(pts[near])
            road[over[hit]] = IN_JUNCTION
            lane[over[hit]] = -1
        return road, lane, np.maximum(to_end, 0.0), np.where(found, k, -1)

    def match(self, x: np.ndarray, y: np.ndarray, heading: np.ndarray) -> np.ndarray:
        """Road id per point; -1 where no road is close enough or the point is in a junction."""
        road = self.locate(x, y, heading)[0]
        return np.where(road >= 0, road, -1).astype(np.int32)


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
    crossed: int = 0       # cars that crossed the whole road (entry to exit) in the interval
    crossing_time: float = 0.0   # the sum of their crossing times, seconds
    samples: float = 0.0   # car-seconds spent on the road in the interval
    distance: float = 0.0  # metres driven on the road in the interval (samples / distance x length
                           # = the road's travel time, as SUMO's edgeData measures it)
    # samples and distance cut on the periodic reports' clock: (start s, samples, distance) of the
    # probes at or after start (and before the next piece's); empty when the window is one piece
    pieces: list[tuple[float, float, float]] = field(default_factory=list)

    @property
    def key(self) -> tuple[int, float]:
        return (self.road, round(self.t, 3))

    def to_xmlrpc(self) -> dict[str, Any]:
        return {"road": int(self.road), "t": float(self.t), "green": bool(self.green), "queue": int(self.queue),
                "cars": int(self.cars), "density": float(self.density), "mean_speed": float(self.mean_speed),
                "departures": int(self.departures), "interval": float(self.interval),
                "was_green": bool(self.was_green), "turns": {str(k): int(v) for k, v in self.turns.items()},
                "crossed": int(self.crossed), "crossing_time": float(self.crossing_time),
                "samples": float(self.samples), "distance": float(self.distance),
                **({"pieces": [[float(g), float(s), float(d)] for g, s, d in self.pieces]} if self.pieces else {})}

    @classmethod
    def from_xmlrpc(cls, data: Any, n_roads: int) -> "RoadReport":
        """Strict: raises ValueError saying which field is wrong."""
        if not isinstance(data, dict):
            raise ValueError("report must be a struct")
        def num(name, kind=(int, float)):
            value = data.get(name)
            if not _is_number_within(value, kind, MAX_COUNT if kind is int else MAX_REPORT_NUMBER):
                raise ValueError(f"report field {name!r} missing or not a {'count' if kind is int else 'number'} "
                                 f"within +-{MAX_COUNT if kind is int else MAX_REPORT_NUMBER:g}")
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
            if not (isinstance(k, str) and k.isascii() and k.isdigit() and len(k) <= 9 and int(k) < n_roads) \
                    or not _is_number_within(v, int, MAX_COUNT) or v < 0:
                raise ValueError(f"bad turn entry {str(k)[:20]!r}: {str(v)[:20]}")
            parsed[int(k)] = v
        report = cls(road=road, t=float(num("t")), green=data["green"], queue=num("queue", int),
                     cars=num("cars", int), density=float(num("density")), mean_speed=float(num("mean_speed")),
                     departures=num("departures", int), interval=float(num("interval")),
                     was_green=data["was_green"], turns=parsed)
        # optional (older boxes do not send them)
        if "crossed" in data or "crossing_time" in data:
            report.crossed = num("crossed", int)
            report.crossing_time = float(num("crossing_time"))
            if report.crossed < 0 or report.crossing_time < 0:
                raise ValueError("report crossed and crossing_time must be non-negative")
        if "samples" in data or "distance" in data:
            report.samples = float(num("samples"))
            report.distance = float(num("distance"))
            if report.samples < 0 or report.distance < 0:
                raise ValueError("report samples and distance must be non-negative")
        if "pieces" in data:
            report.pieces = _parse_pieces(data["pieces"])
        if min(report.queue, report.cars, report.departures) < 0 or report.queue > report.cars:
            raise ValueError("report counts must be non-negative and queue <= cars")
        if report.t < 0 or report.interval < 0 or report.density < 0:
            raise ValueError("report t, interval and density must be non-negative")
        return report


MAX_PIECES = 64      # pieces a report carries at most (a light silent for an hour: older ones fold)
MAX_COUNT = 1_000_000          # cars, queue, departures, turns, crossings of one road in one report
MAX_REPORT_NUMBER = 2.0 ** 53  # any other number of a report (times, seconds, metres) in magnitude


def _is_number_within(value: Any, kind, bound: float) -> bool:
    """``value`` is of ``kind`` (never a bool), finite and within +-``bound``.  Compared before
    ``math.isfinite``, which raises OverflowError (not ValueError) on an int of 400 digits."""
    if isinstance(value, bool) or not isinstance(value, kind):
        return False
    return -bound <= value <= bound and (isinstance(value, int) or math.isfinite(value))


def _parse_pieces(value: Any) -> list[tuple[float, float, float]]:
    """A report's ``pieces``: at most MAX_PIECES [start, samples, distance], finite, non-negative,
    starts increasing."""
    if not isinstance(value, (list, tuple)) or len(value) > MAX_PIECES:
        raise ValueError(f"report field 'pieces' must be a list of at most {MAX_PIECES} entries")
    out = []
    for item in value:
        if (not isinstance(item, (list, tuple)) or len(item) != 3
                or any(not _is_number_within(x, (int, float), MAX_REPORT_NUMBER) or x < 0 for x in item)):
            raise ValueError(f"bad report piece {item!r}: [start, samples, distance], finite, non-negative")
        if out and item[0] <= out[-1][0]:
            raise ValueError("report pieces must have increasing starts")
        out.append((float(item[0]), float(item[1]), float(item[2])))
    return out


class Aggregator:
    """Per-car state from probes; per-road reports at light changes (and periodically for roads
    without a light).  See the module docstring and docs/fcd.md for every field."""

    LUT_SIZE = 1 << 20      # car ids below this find their slot by array lookup; others by dict

    def __init__(self, city: City, max_cars: int = 100_000, stale_after: float = 10.0,
                 matcher: MapMatcher | None = None, unlit_period: float = 60.0) -> None:
        self.city = city
        self.matcher = matcher or MapMatcher(city)
        self.max_cars, self.stale_after = max_cars, stale_after
        self.slot_of: dict[int, int] = {}
        self.lut = np.full(self.LUT_SIZE, -1, dtype=np.int64)
        self.free: list[int] = list(range(max_cars - 1, -1, -1))
        self.used = 0            # slots [0, used) have been handed out at least once
        self.car_id = np.zeros(max_cars, dtype=np.int64)
        self.loc = np.full(max_cars, -1, dtype=np.int32)        # road, IN_JUNCTION, or -1 (not seen yet)
        self.road = np.full(max_cars, -1, dtype=np.int32)       # road the car is on now (-1: none)
        self.lane = np.full(max_cars, -1, dtype=np.int32)
        self.seg = np.full(max_cars, -1, dtype=np.int32)
        self.to_end = np.zeros(max_cars)
        self.last_road = np.full(max_cars, -1, dtype=np.int32)  # last road the car was on
        self.entry_t = np.zeros(max_cars)                        # when it came onto its location
        self.entry_valid = np.zeros(max_cars, dtype=bool)        # ... from somewhere else (not born there)
        self.speed = np.zeros(max_cars)
        self.t_last = np.full(max_cars, -np.inf)
        R = city.n_roads
        self.departures = np.zeros(R, dtype=np.int64)
        self.crossed = np.zeros(R, dtype=np.int64)
        self.crossing_time = np.zeros(R)
        self.samples = np.zeros(R)
        self.distance = np.zeros(R)
        self.turns: list[dict[int, int]] = [dict() for _ in range(R)]
        self.light_mask: dict[int, int] = {}
        self.last_change = np.full(R, np.nan)
        self.successor_sets = [set(s) for s in city.successors]
        self.unlit = np.flatnonzero(city.exit_light < 0)
        self.unlit_period = unlit_period
        self.next_tick: float | None = None
        # a lit road's car-seconds and metres per tick of the periodic clock: {tick: [samples, metres]}
        self.lit = city.exit_light >= 0
        self.piece_period = unlit_period or 60.0
        self.pieces: list[dict[int, list[float]]] = [dict() for _ in range(R)]
        self.stats = {"probes": 0, "unmatched": 0, "in_junction": 0, "cars_refused": 0, "cars_expired": 0,
                      "stale_probes": 0, "unknown_lights": 0, "reports": 0, "pieces_folded": 0}
        # batches of feed_with_lights taken in one pass, or run by run (eviction)
        self.passes = {"one_pass": 0, "per_run": 0}

    # ------------------------------------------------------------ car slots
    def _slots(self, cars: np.ndarray, now: float) -> np.ndarray:
        """Slot per car id (-1: table full, refused); new cars get a slot."""
        small = cars < self.LUT_SIZE
        slots = np.where(small, self.lut[np.where(small, cars, 0)], -1)
        for i in np.flatnonzero(slots < 0).tolist():
            slots[i] = self._slot_of_new(int(cars[i]), now)
        return slots

    def _slot_of_new(self, car: int, now: float) -> int:
        """The slot of a car the lookup table does not hold: a big id's, or a new car's (a free
        slot, after expiring stale cars if none is free; -1 and counted when still none)."""
        slot = self.slot_of.get(car)
        if slot is not None:
            return slot
        if not self.free:
            self._expire(now)
        if not self.free:
            self.stats["cars_refused"] += 1
            return -1
        slot = self.free.pop()
        self.used = max(self.used, slot + 1)
        self.slot_of[car] = slot
        if car < self.LUT_SIZE:
            self.lut[car] = slot
        self.car_id[slot] = car
        self._reset(slot)
        return slot

    def _reset(self, slot: int) -> None:
        self.loc[slot] = self.road[slot] = self.lane[slot] = self.seg[slot] = self.last_road[slot] = -1
        self.entry_valid[slot] = False
        self.t_last[slot] = -np.inf

    def _expire(self, now: float) -> None:
        stale = np.flatnonzero((self.t_last < now - self.stale_after) & (self.t_last > -np.inf))
        for slot in stale.tolist():
            car = int(self.car_id[slot])
            del self.slot_of[car]
            if car < self.LUT_SIZE:
                self.lut[car] = -1
            self._reset(slot)
            self.free.append(slot)
        self.stats["cars_expired"] += len(stale)

    # ------------------------------------------------------------ probes
    def _match(self, batch: np.ndarray, slots: np.ndarray):
        """Locate each probe; its car's previous segment is the fast path's guess."""
        prev = np.where(slots >= 0, self.seg[np.maximum(slots, 0)], -1)
        return self._match_from(batch["x"].astype(np.float64), batch["y"].astype(np.float64),
                                batch["heading"].astype(np.float64), prev)

    def _match_from(self, x: np.ndarray, y: np.ndarray, h: np.ndarray, prev: np.ndarray):
        """(road, lane, to_end, segment) per point; a point still well inside its ``prev`` lane
        segment (-1: none) is checked against that segment only.  Each point's result depends on
        its own inputs only, so any subset gives the same answers."""
        m = self.matcher
        n = len(prev)
        k = np.maximum(prev, 0)
        px, py = x - m.sx0[k], y - m.sy0[k]
        ux, uy = m.sux[k], m.suy[k]
        raw = px * ux + py * uy
        # well inside the segment (raw strictly within max_distance of neither end): there the
        # clipped position along is raw itself, so distance and heading (MapMatcher.project's
        # arithmetic) are needed for these points only
        inner = np.flatnonzero((prev >= 0) & (raw > m.max_distance) & (raw < m.s_len[k] - m.max_distance))
        ki, along = k[inner], raw[inner]
        dist = np.hypot(px[inner] - along * ux[inner], py[inner] - along * uy[inner])
        dh = np.abs((h[inner] - m.s_heading[ki] + 180.0) % 360.0 - 180.0)
        fits = (m.s_road[ki] >= 0) & (dist <= min(1.0, m.max_distance / 2)) & (dh <= m.max_heading)
        keep, ki, along = inner[fits], ki[fits], along[fits]
        road, lane = np.empty(n, dtype=np.int32), np.empty(n, dtype=np.int32)
        to_end, seg = np.empty(n), np.empty(n, dtype=np.int32)
        road[keep], lane[keep], to_end[keep], seg[keep] = m.s_road[ki], m.s_lane[ki], m.s_to_end[ki] - along, ki
        rest = np.ones(n, dtype=bool)
        rest[keep] = False
        rest = np.flatnonzero(rest)
        if len(rest):
            road[rest], lane[rest], to_end[rest], seg[rest] = m.locate(x[rest], y[rest], h[rest])
        return road, lane, to_end, seg

    def feed(self, batch: np.ndarray) -> list[RoadReport]:
        """Take a batch of probes (fields car, t, x, y, speed, heading; any order).  Returns the
        periodic reports of roads without a light that fell due (see ``unlit_period``).

        The batch is split at the times those reports fall due: a report at time T holds the
        probes before T and none after, however the probes were batched."""
        if len(batch) == 0:
            return []
        reports = self._tick(float(batch["t"].min()))
        while self.next_tick is not None:
            later = batch["t"] >= self.next_tick
            if not later.any():
                break
            if not later.all():
                self._feed_run(batch[~later])
            batch = batch[later]
            reports += self._tick(float(batch["t"].min()))
        self._feed_run(batch)
        return reports

    def feed_per_run(self, batch: np.ndarray, at, lights) -> list[RoadReport]:
        """Probes with light changes among them, one run at a time: :meth:`feed` of the probes
        before each light change, then :meth:`light_change`.  ``lights[j]`` = (light, t, green)
        came after the first ``at[j]`` probes of ``batch``.  The reference for
        :meth:`feed_with_lights`, which gives the same in one pass."""
        reports: list[RoadReport] = []
        prev = 0
        for (light, t, green), end in zip(lights, np.asarray(at, dtype=np.int64).tolist()):
            reports += self.feed(batch[prev:end])
            reports += self.light_change(light, t, green)
            prev = end
        return reports + self.feed(batch[prev:])

    def feed_with_lights(self, batch: np.ndarray, at, lights) -> list[RoadReport]:
        """Probes with light changes among them, in one pass: ``lights[j]`` = (light, t, green)
        came after the first ``at[j]`` probes of ``batch`` (``at`` non-decreasing).

        The same reports, counters and state as :meth:`feed_per_run`, bit for bit: a light change
        sees exactly the probes before it.  But the batch is sorted, given its car slots,
        map-matched and analysed (freshness, moves, time on roads) once, not once per run (a
        numpy call costs microseconds whatever its size, and light changes cut a received batch
        into ~10 runs); only each run's state updates and counters are applied run by run, before
        the reports that must see them.  A batch with more new cars than free slots (eviction)
        goes run by run."""
        n, k = len(batch), len(lights)
        at = np.asarray(at, dtype=np.int64).reshape(-1)
        if len(at) != k or (k and (at[0] < 0 or at[-1] > n or bool((at[1:] < at[:-1]).any()))):
            raise ValueError(f"at must give, for each of the {k} light changes, the probes before it "
                             f"(non-decreasing, 0..{n}); got {len(at)} positions")
        if n == 0:                      # light changes only
            return self.feed_per_run(batch, at, lights)
        cars = batch["car"].astype(np.int64)
        if not self._room_for(cars):
            self.passes["per_run"] += 1
            return self.feed_per_run(batch, at, lights)
        self.passes["one_pass"] += 1
        ts = batch["t"].astype(np.float64)
        unit_of, steps, n_units = self._plan_units(ts, at)

        # ---- the whole batch at once, in (car, run, t) order: each car's probes across runs in a row
        order = np.lexsort((ts, unit_of, cars))
        slots = self._batch_slots(cars, ts, unit_of)[order]
        t, unit = ts[order], unit_of[order]
        idx = np.arange(n)
        car_first = _run_starts(slots)                  # one slot per car: a car's probes are contiguous
        group_first = car_first | _run_starts(unit)      # a (car, run) group begins
        group_last = np.empty(n, dtype=bool)
        group_last[:-1] = group_first[1:]
        group_last[-1] = True
        group_start = np.maximum.accumulate(np.where(group_first, idx, 0))
        car_start = np.maximum.accumulate(np.where(car_first, idx, 0))
        # t_last as each probe's run begins: the car's before the batch, or its newest probe in an
        # earlier run (a run's fresh probes end with the car's newest; stale ones are older)
        group = np.cumsum(group_first) - 1              # (car, run) group of each probe
        ends = np.flatnonzero(group_last)                # each group's newest probe (sorted by t)
        opens_car = car_first[group_start[ends]]
        upto = _car_cummax(t[ends], opens_car)          # the car's newest so far, group by group
        earlier = np.where(opens_car, -np.inf, _shifted(upto, -np.inf))[group]
        t_start = np.maximum(self.t_last[slots], earlier)
        fresh = t >= t_start
        # map matching: a run starts from the segment of its car's newest fresh probe in an earlier
        # run (or the car's before the batch).  Those depend on matches of earlier runs: match all
        # from the segments before the batch, then again those whose starting segment was another
        # (each pass settles at least one more run of every car; usually one pass does).
        newest = np.maximum.accumulate(np.where(group_last & fresh, idx, -1))
        source = np.where(group_start > 0, newest[np.maximum(group_start - 1, 0)], -1)
        source = np.where(source >= car_start, source, -1)
        # field by field: gathering whole records of the packed (unaligned) dtype costs ten times more
        x = batch["x"][order].astype(np.float64)
        y = batch["y"][order].astype(np.float64)
        h = batch["heading"][order].astype(np.float64)
        seg_before = self.seg[slots]
        prev = seg_before
        roads, lanes, to_end, segs = self._match_from(x, y, h, prev)
        while True:
            want = np.where(source >= 0, segs[np.maximum(source, 0)], seg_before)
            redo = np.flatnonzero(want != prev)
            if not len(redo):
                break
            prev = want
            roads[redo], lanes[redo], to_end[redo], segs[redo] = self._match_from(x[redo], y[redo], h[redo], want[redo])
        self._count_located(roads)
        self.stats["stale_probes"] += n - int(fresh.sum())
        speed = batch["speed"][order]

        # ---- what each run adds, in (run, car, t) order (the order run-by-run adds it: float sums
        # come out bit for bit the same)
        ev = np.flatnonzero(fresh & (roads != -1))
        moves = ((), (), (), (), ())
        move_bounds = (np.zeros(n_units + 1, dtype=np.int64),) * 3
        if len(ev):
            leave, whole, arrive, dep_road, cross_road, cross_dt, turn_from, turn_to = \
                self._move_events(slots[ev], roads[ev], t[ev])
            o_leave, b_leave = _by_unit(unit[ev[leave]], n_units)
            o_whole, b_whole = _by_unit(unit[ev[whole]], n_units)
            o_arrive, b_arrive = _by_unit(unit[ev[arrive]], n_units)
            moves = (dep_road[o_leave], cross_road[o_whole], cross_dt[o_whole], turn_from[o_arrive], turn_to[o_arrive])
            move_bounds = (b_leave, b_whole, b_arrive)
        # time on roads: each fresh probe against the car's previous fresh one (in (car, run, t)
        # order the previous fresh probe is the newest before it, as run by run)
        fr = np.flatnonzero(fresh)
        s_f = slots[fr]
        car_opens = _run_starts(s_f) if len(fr) else np.zeros(0, dtype=bool)
        credit = self._time_on_roads(
            roads[fr], lanes[fr], to_end[fr], speed[fr], t[fr],
            np.where(car_opens, self.road[s_f], _shifted(roads[fr], -1)) if len(fr) else roads[fr],
            np.where(car_opens, self.lane[s_f], _shifted(lanes[fr], -1)) if len(fr) else lanes[fr],
            np.where(car_opens, self.to_end[s_f], _shifted(to_end[fr], 0.0)) if len(fr) else to_end[fr],
            np.where(car_opens, self.t_last[s_f], _shifted(t[fr], 0.0)) if len(fr) else t[fr])
        o_on, b_on = _by_unit(unit[fr][credit[4]], n_units)
        on_road, on_dt, on_metres, on_t = (a[o_on] for a in credit[:4])
        # each car's state after each run: its run's newest probe, when fresh
        last = np.flatnonzero(group_last & fresh)
        o_last, b_last = _by_unit(unit[last], n_units)
        last = last[o_last]
        st_slot, st_road, st_lane, st_to_end = slots[last], roads[last], lanes[last], to_end[last]
        st_seg, st_speed, st_t = segs[last], speed[last], t[last]

        # ---- run by run: counters and state, then the reports that follow the run
        reports: list[RoadReport] = []
        b_leave, b_whole, b_arrive = move_bounds
        for kind, value in steps:
            if kind == _UNIT:
                u = value
                a, b = b_last[u], b_last[u + 1]
                if b > a:
                    self._set_state(st_slot[a:b], st_road[a:b], st_lane[a:b], st_to_end[a:b], st_seg[a:b],
                                    st_speed[a:b], st_t[a:b])
                if len(ev):
                    l0, l1, w0, w1, a0, a1 = b_leave[u], b_leave[u + 1], b_whole[u], b_whole[u + 1], \
                        b_arrive[u], b_arrive[u + 1]
                    self._count_moves(moves[0][l0:l1], moves[1][w0:w1], moves[2][w0:w1], moves[3][a0:a1],
                                      moves[4][a0:a1])
                a, b = b_on[u], b_on[u + 1]
                if b > a:
                    self._count_samples(on_road[a:b], on_dt[a:b], on_metres[a:b], on_t[a:b])
            elif kind == _LIGHT:
                light, lt, green = lights[value]
                reports += self.light_change(light, lt, green)
            else:
                reports += self._unlit_reports(value)
        return reports

    def _room_for(self, cars: np.ndarray) -> bool:
        """Whether every new car among ``cars`` finds a free slot (no eviction needed)."""
        small = cars < self.LUT_SIZE
        missing = cars[~small | (self.lut[np.where(small, cars, 0)] < 0)]
        if not len(missing):
            return True
        new = sum(1 for car in np.unique(missing).tolist() if car not in self.slot_of)
        return new <= len(self.free)

    def _batch_slots(self, cars: np.ndarray, ts: np.ndarray, unit_of: np.ndarray) -> np.ndarray:
        """Slot per probe; new cars get theirs in the order run-by-run meets them ((run, car, t))."""
        small = cars < self.LUT_SIZE
        slots = np.where(small, self.lut[np.where(small, cars, 0)], -1)
        missing = np.flatnonzero(slots < 0)
        if len(missing):
            missing = missing[np.lexsort((ts[missing], cars[missing], unit_of[missing]))]
            now = float(ts.max())
            for i in missing.tolist():
                slots[i] = self._slot_of_new(int(cars[i]), now)
        return slots

    def _plan_units(self, ts: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, list, int]:
        """The runs :meth:`feed_per_run` would feed (``_feed_run`` calls: the probes between light
        changes, split where a periodic report falls due): (run number per probe, steps in order
        as (_UNIT, run) / (_LIGHT, j) / (_TICK, report time), number of runs).  Advances the
        periodic reports' clock as feed would."""
        n, k = len(ts), len(at)
        bounds = np.empty(k + 2, dtype=np.int64)
        bounds[0], bounds[1:-1], bounds[-1] = 0, at, n
        if not (self.unlit_period and len(self.unlit)):
            # no periodic reports: run j = the probes before light change j
            steps = [None] * (2 * k + 1)
            steps[0::2] = [(_UNIT, j) for j in range(k + 1)]
            steps[1::2] = [(_LIGHT, j) for j in range(k)]
            return np.repeat(np.arange(k + 1), np.diff(bounds)), steps, k + 1
        unit_of = np.empty(n, dtype=np.int64)
        steps: list = []
        units = 0
        starts = bounds[:-1][bounds[1:] > bounds[:-1]]
        lows = np.minimum.reduceat(ts, starts).tolist()
        highs = np.maximum.reduceat(ts, starts).tolist()
        nonempty = 0
        for j in range(k + 1):
            lo, hi = int(bounds[j]), int(bounds[j + 1])
            if hi > lo:
                due = self._tick_due(lows[nonempty])
                if due is not None:
                    steps.append((_TICK, due))
                if self.next_tick is None or highs[nonempty] < self.next_tick:
                    unit_of[lo:hi] = units
                else:          # a periodic report falls due inside the run: as feed splits it
                    rest = np.arange(lo, hi)
                    while self.next_tick is not None:
                        later = ts[rest] >= self.next_tick
                        if not later.any():
                            break
                        if not later.all():
                            unit_of[rest[~later]] = units
                            steps.append((_UNIT, units))
                            units += 1
                        rest = rest[later]
                        due = self._tick_due(float(ts[rest].min()))
                        if due is not None:
                            steps.append((_TICK, due))
                    unit_of[rest] = units
                steps.append((_UNIT, units))
                units += 1
                nonempty += 1
            if j < k:
                steps.append((_LIGHT, j))
        return unit_of, steps, units

    def _feed_run(self, batch: np.ndarray) -> None:
        """Probes all before the next periodic report (``batch`` non-empty)."""
        order = np.lexsort((batch["t"], batch["car"]))
        batch = batch[order]
        cars = batch["car"].astype(np.int64)
        ts = batch["t"].astype(np.float64)
        t_max = float(ts.max())
        slots = self._slots(cars, t_max)
        roads, lanes, to_end, segs = self._match(batch, slots)
        self._count_located(roads)
        known = slots >= 0
        safe = np.where(known, slots, 0)
        # drop probes older than what we already know of the car (reordered datagrams)
        fresh = known & (ts >= self.t_last[safe])
        self.stats["stale_probes"] += int((known & ~fresh).sum())
        ev = np.flatnonzero(fresh & (roads != -1))
        if len(ev):
            self._count_moves(*self._move_events(slots[ev], roads[ev], ts[ev])[3:])
        fr = np.flatnonzero(fresh)
        if len(fr):
            # each probe stands for the time since the car's previous probe (wherever that was)
            s_f, t_f, r_f, e_f = slots[fr], ts[fr], roads[fr], to_end[fr]
            opens = _run_starts(s_f)
            credit = self._time_on_roads(
                r_f, lanes[fr], e_f, batch["speed"][fr], t_f, np.where(opens, self.road[s_f], _shifted(r_f, -1)),
                np.where(opens, self.lane[s_f], _shifted(lanes[fr], -1)),
                np.where(opens, self.to_end[s_f], _shifted(e_f, 0.0)), np.where(opens, self.t_last[s_f], _shifted(t_f, 0.0)))
            self._count_samples(*credit[:4])
        # latest state per car: the last fresh probe in (car, t) order
        li = np.flatnonzero(fresh)
        if len(li):
            li = li[_run_ends(slots[li])]
            self._set_state(slots[li], roads[li], lanes[li], to_end[li], segs[li], batch["speed"][li], ts[li])

    def _count_located(self, roads: np.ndarray) -> None:
        self.stats["probes"] += len(roads)
        self.stats["unmatched"] += int((roads == -1).sum())
        self.stats["in_junction"] += int((roads == IN_JUNCTION).sum())

    def _set_state(self, s, roads, lanes, to_end, segs, speed, t) -> None:
        """Each car's latest located probe (``s`` distinct slots)."""
        self.road[s] = np.where(roads >= 0, roads, -1)
        self.lane[s], self.to_end[s], self.seg[s] = lanes, to_end, segs
        self.speed[s] = speed
        self.t_last[s] = t

    MAX_SAMPLE_GAP = 5.0     # seconds: a longer silence is not counted as time on the road

    def _sample_dt(self, t_o: np.ndarray, prev_t: np.ndarray) -> np.ndarray:
        """Seconds each on-road probe stands for: since the car's previous probe (none: 0)."""
        known = np.isfinite(prev_t)
        return np.where(known, np.clip(t_o - np.where(known, prev_t, 0.0), 0.0, self.MAX_SAMPLE_GAP), 0.0)

    def _time_on_roads(self, road, lane, to_end, speed, t, prev_road, prev_lane, prev_to_end, prev_t):
        """Car-seconds and metres each probe's step puts on roads, as SUMO's edgeData counts a
        vehicle's front: a step stands for the time since the car's previous probe (``prev_*``;
        at most MAX_SAMPLE_GAP), moving ``speed`` x that (SUMO's update moves a car at its new
        speed).  A step within one road counts whole; a step that enters a road counts only the
        part after the front crossed the road's start (the probe's metres from its lane's start,
        of the step's metres), and a step that leaves a road gives that road the part before the
        front crossed its end (the previous probe's metres to the end).  A probe matched to a
        road but before its start or past its end (inside the junction, within the matcher's
        margin) is on no road here.  Counting such steps whole made a car's first second on a
        road of a few seconds' drive (often spent in the junction before it) weigh as much as a
        whole one.  Returns (road, seconds, metres, t, index of the probe) per credit, in probe
        order, a leaving credit before its probe's entering one."""
        dt = self._sample_dt(t, prev_t)
        moved = dt * np.asarray(speed, dtype=np.float64)
        has_moved = moved > 0
        per_metre = np.where(has_moved, dt / np.where(has_moved, moved, 1.0), 0.0)
        length = self.matcher.lane_length
        along = np.where(road >= 0, length[np.where(road >= 0, lane, 0)] - to_end, 0.0)
        on = (road >= 0) & (to_end > ON_ROAD_EPS) & (along > ON_ROAD_EPS)
        was_on = (prev_road >= 0) & (prev_to_end > ON_ROAD_EPS) & (
            np.where(prev_road >= 0, length[np.where(prev_road >= 0, prev_lane, 0)] - prev_to_end, 0.0) > ON_ROAD_EPS)
        stay = on & was_on & (road == prev_road)
        in_metres = np.where(stay, moved, np.minimum(np.maximum(along, 0.0), moved))
        # entering without moving (a match that jumped): the step's time, no metres
        in_seconds = np.where(stay, dt, np.where(has_moved, in_metres * per_metre, dt))
        leave = was_on & ~stay
        out_metres = np.where(leave, np.minimum(np.maximum(prev_to_end, 0.0), moved), 0.0)
        n = len(road)
        roads = np.column_stack([np.where(leave, prev_road, -1), np.where(on, road, -1)]).ravel()
        keep = np.flatnonzero(roads >= 0)
        # on a grid of 2**-24 (s, m): sums of such numbers are exact in any order, so reports do
        # not depend on how probes were batched (a box's packets or a trace's steps)
        seconds = np.round(np.column_stack([out_metres * per_metre, in_seconds]).ravel() * CREDIT_GRID) / CREDIT_GRID
        metres = np.round(np.column_stack([out_metres, in_metres]).ravel() * CREDIT_GRID) / CREDIT_GRID
        return (roads[keep], seconds[keep], metres[keep], np.repeat(np.asarray(t, dtype=np.float64), 2)[keep],
                np.repeat(np.arange(n), 2)[keep])

    def _count_samples(self, roads: np.ndarray, dt: np.ndarray, metres: np.ndarray, t: np.ndarray) -> None:
        """Car-seconds and metres on each road (credits at times ``t``, :meth:`_time_on_roads`);
        on lit roads also per tick of the periodic clock (a probe at t counts in the tick
        floor(t / period), as SUMO's interval [b, b + period) holds the step at b)."""
        np.add.at(self.samples, roads, dt)
        np.add.at(self.distance, roads, metres)
        lit = self.lit[roads]
        if not lit.any():
            return
        ticks = np.floor(np.asarray(t, dtype=np.float64)[lit] / self.piece_period).astype(np.int64)
        # one int64 key per (road, tick): a 1-D unique is several times cheaper than unique(axis=1)
        first = int(ticks.min())     # a batch spans far fewer than 2**32 ticks
        keys, inverse = np.unique(roads[lit].astype(np.int64) << 32 | (ticks - first), return_inverse=True)
        s_sum = np.bincount(inverse, weights=dt[lit], minlength=len(keys))
        d_sum = np.bincount(inverse, weights=metres[lit], minlength=len(keys))
        for road, tick, s, d in zip((keys >> 32).tolist(), ((keys & 0xFFFFFFFF) + first).tolist(), s_sum.tolist(),
                                    d_sum.tolist()):
            pieces = self.pieces[road]
            acc = pieces.get(tick)
            if acc is None:
                pieces[tick] = acc = [0.0, 0.0]
                if len(pieces) > MAX_PIECES:     # fold the oldest into the next: memory bounded
                    oldest, second = sorted(pieces)[:2]
                    old = pieces.pop(oldest)
                    pieces[second][0] += old[0]
                    pieces[second][1] += old[1]
                    self.stats["pieces_folded"] += 1
            acc[0] += s
            acc[1] += d

    def _move_events(self, s_e: np.ndarray, l_e: np.ndarray, t_e: np.ndarray):
        """Departures, crossings and turns of located probes (in car, t order; a car's first
        probe here follows its stored location), and each car's location state after them.

        Returns (leave, whole, arrive: positions in the input; the departed road per leave, the
        crossed road and crossing time per whole, (from, to) roads per arrive)."""
        n = len(s_e)
        idx = np.arange(n)
        first = _run_starts(s_e)
        prev = np.where(first, self.loc[s_e], _shifted(l_e, -1))
        changed = prev != l_e
        # entry time and validity of the run of equal locations each probe belongs to
        run_t = np.where(changed, t_e, self.entry_t[s_e])
        run_valid = np.where(changed, prev != -1, self.entry_valid[s_e])
        start = np.maximum.accumulate(np.where(first | changed, idx, 0))
        entry_t, entry_valid = run_t[start], run_valid[start]
        prev_entry = np.where(first, self.entry_t[s_e], _shifted(entry_t, 0.0))
        prev_valid = np.where(first, self.entry_valid[s_e], _shifted(entry_valid, False))
        leave = np.flatnonzero(changed & (prev >= 0))
        whole = leave[prev_valid[leave]]          # came in at the start: crossed the whole road
        # the road before each probe (through junctions): for turn counts
        car_start = np.maximum.accumulate(np.where(first, idx, 0))
        on_road = np.maximum.accumulate(np.where(l_e >= 0, idx, -1))
        before = _shifted(on_road, -1)
        last_before = np.where(before >= car_start, l_e[np.maximum(before, 0)], self.last_road[s_e])
        arrive = np.flatnonzero((l_e >= 0) & changed & (last_before >= 0) & (last_before != l_e))
        last = _run_ends(s_e)
        s_last = s_e[last]
        self.loc[s_last] = l_e[last]
        self.entry_t[s_last] = entry_t[last]
        self.entry_valid[s_last] = entry_valid[last]
        self.last_road[s_last] = np.where(l_e[last] >= 0, l_e[last], last_before[last])
        return (leave, whole, arrive, prev[leave], prev[whole], t_e[whole] - prev_entry[whole],
                last_before[arrive], l_e[arrive])

    def _count_moves(self, dep_road, cross_road, cross_dt, turn_from, turn_to) -> None:
        if len(dep_road):
            np.add.at(self.departures, dep_road, 1)
            np.add.at(self.crossed, cross_road, 1)
            np.add.at(self.crossing_time, cross_road, cross_dt)
        for a, b in zip(turn_from.tolist(), turn_to.tolist()):
            if b in self.successor_sets[a]:
                turns = self.turns[a]
                turns[b] = turns.get(b, 0) + 1

    # ------------------------------------------------------------ reports
    def road_states(self, now: float, roads: list[int] | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cars, queue, mean moving speed or -1) per road (every road, or counted for ``roads``
        only and zero elsewhere), from the latest probes.

        Queue: per lane, the cars from the stop line back to the last halted car (slower than
        HALT_SPEED), as SUMO measures a queue's length."""
        n = self.used
        road = self.road[:n]
        R = self.city.n_roads
        live = road >= 0
        if roads is not None:
            wanted = np.zeros(R + 1, dtype=bool)
            wanted[roads] = True
            live &= wanted[road]
        idx = np.flatnonzero(live)
        idx = idx[self.t_last[idx] >= now - self.stale_after]
        r, v = road[idx], self.speed[idx]
        lane, to_end = self.lane[idx], self.to_end[idx]
        cars = np.bincount(r, minlength=R)
        halted = v < HALT_SPEED
        if halted.any():
            back = np.full(self.matcher.n_lanes, -1.0)
            np.maximum.at(back, lane[halted], to_end[halted])
            queue = np.bincount(r[to_end <= back[lane] + 1e-6], minlength=R)
        else:
            queue = np.zeros(R, dtype=np.int64)
        moving = v >= QUEUE_SPEED
        n_moving = np.bincount(r[moving], minlength=R)
        sum_moving = np.bincount(r[moving], weights=v[moving], minlength=R)
        mean = np.where(n_moving > 0, sum_moving / np.maximum(n_moving, 1), -1.0)
        return cars, queue, mean

    def road_state(self, road: int, now: float) -> tuple[int, int, float]:
        cars, queue, mean = self.road_states(now)
        return int(cars[road]), int(queue[road]), float(mean[road])

    def _states_of(self, roads: list[int], now: float) -> dict[int, tuple[int, int, float]]:
        """(cars, queue, mean moving speed or -1) of each of a few ``roads``: what
        :meth:`road_states` gives for them (the same comparisons and sums, in the same order),
        computed in Python over their few cars: a light change reports two to four roads, and
        road_states' ~30 numpy calls cost more than the arithmetic."""
        n = self.used
        wanted = np.zeros(self.city.n_roads + 1, dtype=bool)     # [-1] (no road) stays False
        wanted[roads] = True
        road = self.road[:n]
        idx = np.flatnonzero((road >= 0) & wanted[road] & (self.t_last[:n] >= now - self.stale_after))
        cars_on = dict.fromkeys(roads, 0)
        n_moving = dict.fromkeys(roads, 0)
        sum_moving = dict.fromkeys(roads, 0.0)
        back: dict[int, float] = {}           # per lane: the furthest halted car from the stop line
        probes = list(zip(self.road[idx].tolist(), self.speed[idx].tolist(), self.lane[idx].tolist(),
                          self.to_end[idx].tolist()))
        for r, v, lane, to_end in probes:
            cars_on[r] += 1
            if v < HALT_SPEED:
                back[lane] = max(back.get(lane, -1.0), to_end)
            if v >= QUEUE_SPEED:
                n_moving[r] += 1
                sum_moving[r] += v
        queue = dict.fromkeys(roads, 0)
        if back:
            for r, _, lane, to_end in probes:
                if to_end <= back.get(lane, -1.0) + 1e-6:
                    queue[r] += 1
        return {r: (cars_on[r], queue[r], sum_moving[r] / max(n_moving[r], 1) if n_moving[r] > 0 else -1.0)
                for r in roads}

    def _reports(self, roads: list[tuple[int, bool, bool]], t: float) -> list[RoadReport]:
        """Reports of (road, green from t on, green before t) and reset of their counters."""
        ids = [road for road, _, _ in roads]
        if len(set(ids)) < len(ids):          # a road twice: its second report follows the reset
            return [rep for entry in roads for rep in self._reports([entry], t)]
        states = self._states_of(ids, t)
        c = self.city
        ix = np.array(ids, dtype=np.intp)    # indexed by 14 times below: converted once
        # the roads' counters read at once (as Python numbers: the same values)
        counters = zip(self.departures[ix].tolist(), self.crossed[ix].tolist(),
                       self.crossing_time[ix].tolist(), self.samples[ix].tolist(), self.distance[ix].tolist(),
                       self.last_change[ix].tolist(), c.length[ix].tolist(), c.lanes[ix].tolist())
        reports = []
        for (road, green, was_green), (departures, crossed, crossing_time, samples, distance, last, length,
                                        lanes) in zip(roads, counters):
            cars, queue, mean_speed = states[road]
            reports.append(RoadReport(
                road=road, t=t, green=green, queue=queue, cars=cars,
                density=cars / (length / 1000.0 * lanes), mean_speed=mean_speed,
                departures=departures, interval=0.0 if math.isnan(last) else t - last, was_green=was_green,
                turns=self.turns[road], crossed=crossed, crossing_time=crossing_time, samples=samples,
                distance=distance, pieces=self._take_pieces(road, last)))
            self.turns[road] = {}
        self.departures[ix] = self.crossed[ix] = 0
        self.crossing_time[ix] = self.samples[ix] = self.distance[ix] = 0.0
        self.last_change[ix] = t
        self.stats["reports"] += len(reports)
        return reports

    def _take_pieces(self, road: int, since: float) -> list[tuple[float, float, float]]:
        """Road's car-seconds and metres per tick since its previous report at ``since`` (none
        when one tick holds them all and the window starts in it: the report's own samples and
        distance say it), and their reset.  A window that starts in an earlier tick than its
        probes' one carries that tick as its piece: read over the whole window, the probes'
        time would be shared out into the earlier interval, where they were not."""
        pieces = self.pieces[road]
        if not pieces:
            return []
        self.pieces[road] = {}
        if len(pieces) == 1:
            tick = next(iter(pieces))
            if math.isnan(since) or since >= tick * self.piece_period:
                return []
        return [(tick * self.piece_period, s, d) for tick, (s, d) in sorted(pieces.items())]

    def light_change(self, light: int, t: float, green: int) -> list[RoadReport]:
        """A light switched: a report for every road it controls (whether its state flipped or not)."""
        if not 0 <= light < len(self.city.lights):
            self.stats["unknown_lights"] += 1
            return []
        prev = self.light_mask.get(light, green)
        self.light_mask[light] = green
        roads = self.city.lights[light].roads
        return self._reports([(road, bool(green >> bit & 1), bool(prev >> bit & 1))
                              for bit, road in enumerate(roads)], t)

    def _tick(self, now: float) -> list[RoadReport]:
        """Roads without a light are reported every ``unlit_period`` seconds of probe time."""
        due = self._tick_due(now)
        return [] if due is None else self._unlit_reports(due)

    def _tick_due(self, now: float) -> float | None:
        """The time of the periodic report due at probe time ``now`` (None: none), advancing
        the clock of periodic reports."""
        if not self.unlit_period or not len(self.unlit):
            return None
        if self.next_tick is None:
            self.next_tick = (math.floor(now / self.unlit_period) + 1) * self.unlit_period
            return None
        if now < self.next_tick:
            return None
        t = self.next_tick
        self.next_tick = (math.floor(now / self.unlit_period) + 1) * self.unlit_period
        return t

    def _unlit_reports(self, t: float) -> list[RoadReport]:
        return self._reports([(road, True, True) for road in self.unlit.tolist()], t)


_UNIT, _LIGHT, _TICK = 0, 1, 2      # steps of Aggregator.feed_with_lights


# run boundaries and shifts of small arrays, as feed's hot path needs them many times per batch:
# written into preallocated arrays because np.r_ costs ~10 us a call, most of a small batch's time

def _run_starts(a: np.ndarray) -> np.ndarray:
    """True where a run of equal values begins (``a`` non-empty)."""
    out = np.empty(len(a), dtype=bool)
    out[0] = True
    np.not_equal(a[1:], a[:-1], out=out[1:])
    return out


def _run_ends(a: np.ndarray) -> np.ndarray:
    """True where a run of equal values ends (``a`` non-empty)."""
    out = np.empty(len(a), dtype=bool)
    out[-1] = True
    np.not_equal(a[1:], a[:-1], out=out[:-1])
    return out


def _shifted(a: np.ndarray, first) -> np.ndarray:
    """``a`` moved one place on: ``[first, a[0], ..., a[-2]]`` (``a`` non-empty)."""
    out = np.empty_like(a)
    out[0] = first
    out[1:] = a[:-1]
    return out


def _car_cummax(t: np.ndarray, car_first: np.ndarray) -> np.ndarray:
    """Running maximum of ``t`` within each car's contiguous values (``car_first`` marks where a
    car's begin): a scan by doubling distances (log2 of the longest car's steps)."""
    if len(t) < 2 or bool(((t[1:] >= t[:-1]) | car_first[1:]).all()):
        return t                       # usual: each car's probes come in time order
    out = t.copy()
    car_no = np.cumsum(car_first)
    k = 1
    while k < len(t):
        same = car_no[k:] == car_no[:-k]
        if not same.any():
            break
        out[k:] = np.where(same, np.maximum(out[k:], out[:-k]), out[k:])
        k *= 2
    return out


def _by_unit(units: np.ndarray, n_units: int) -> tuple[np.ndarray, np.ndarray]:
    """(order that sorts ``units`` stably, where each unit's items begin in that order (n_units + 1))."""
    order = np.argsort(units, kind="stable")
    return order, np.searchsorted(units[order], np.arange(n_units + 1))


# the fields Aggregator.feed reads, in native byte order
NATIVE_PROBE_DTYPE = np.dtype([("car", "=u4"), ("t", "=f8"), ("x", "=f4"), ("y", "=f4"), ("speed", "=f4"),
                               ("heading", "=f4")])


class Ingest:
    """Datagrams in, road reports out: validation, loss accounting and aggregation in order.

    A received batch is decoded and aggregated vectorised in one pass
    (:meth:`Aggregator.feed_with_lights`); a light change sees exactly the probes that arrived
    before it.  Malformed datagrams are counted and dropped (they do not cut the batch).
    """

    def __init__(self, city: City, max_cars: int = 100_000, stale_after: float = 10.0,
                 matcher: MapMatcher | None = None, one_pass: bool = True, clock=None) -> None:
        """``clock``: the :class:`fcd.wire.DataClock` shared with the caller (default: its own).
        ``one_pass=False``: run by run (``Aggregator.feed_per_run``), the reference the
        benchmark compares with."""
        from fcd.wire import DataClock, SeqTracker
        self.aggregator = Aggregator(city, max_cars=max_cars, stale_after=stale_after, matcher=matcher)
        self._feed = self.aggregator.feed_with_lights if one_pass else self.aggregator.feed_per_run
        self.seq = SeqTracker()
        # probes and lights more than max_skew seconds of data time past the newest accepted
        # are refused (``time_ahead``): one spoofed datagram must not move the clock for ever
        self.clock = DataClock() if clock is None else clock
        self.stats = {"datagrams": 0, "probes": 0, "lights": 0, "malformed": 0, "time_ahead": 0}
        self.last_error = ""

    def ingest(self, datagrams: list[bytes]) -> list[RoadReport]:
        """Datagrams in arrival order."""
        from fcd import wire
        sizes = np.fromiter(map(len, datagrams), dtype=np.int64, count=len(datagrams))
        is_probe = sizes == wire.PROBE_SIZE
        probes = np.frombuffer(b"".join(itertools.compress(datagrams, is_probe.tolist())), dtype=wire.PROBE_WIRE_DTYPE)
        return self._batch(probes, is_probe, [(i, datagrams[i]) for i in np.flatnonzero(~is_probe).tolist()])

    def ingest_slots(self, slots: np.ndarray, lengths: np.ndarray) -> list[RoadReport]:
        """The fast path: datagrams as a receive buffer holds them, no object per datagram.

        ``slots`` is an (n, k) uint8 array, row i holding datagram i from its first byte
        (k >= the probe size; a longer datagram is cut to k bytes), ``lengths`` the datagrams' real
        lengths.  Same checks, counts and results as :meth:`ingest`: the probes are viewed as
        ``PROBE_WIRE_DTYPE`` records straight from the rows, other datagrams decoded one by one."""
        from fcd import wire
        size = wire.PROBE_SIZE
        is_probe = lengths == size
        probes = np.ascontiguousarray(slots[is_probe, :size]).view(wire.PROBE_WIRE_DTYPE)[:, 0]
        others: list[tuple[int, bytes]] = []
        for i in np.flatnonzero(~is_probe).tolist():
            length = int(lengths[i])
            if length > slots.shape[1]:
                self.stats["malformed"] += 1
                self.last_error = f"datagram of {length} bytes is longer than any FCD message"
                continue
            others.append((i, slots[i, :length].tobytes()))
        return self._batch(probes, is_probe, others)

    def _batch(self, probes: np.ndarray, is_probe: np.ndarray, others: list[tuple[int, bytes]]) -> list[RoadReport]:
        """``probes``: the probe-sized datagrams as ``PROBE_WIRE_DTYPE`` records; ``is_probe``
        per datagram; ``others``: (position, datagram) of the rest."""
        from fcd import wire
        self.stats["datagrams"] += len(is_probe)
        clock = self.clock
        ok = wire.probe_valid_mask(probes)
        bad = len(probes) - int(ok.sum())
        self.stats["malformed"] += bad
        refused_before = clock.refused
        limit = clock.limit                 # the batch is checked against the clock before it
        ok = clock.admit_mask(probes["t"], ok)
        if bad or clock.refused != refused_before:
            probes = probes[ok]
        self.stats["probes"] += len(probes)
        lights: list[tuple[int, float, int]] = []
        at: list[int] = []
        if others:
            valid = np.zeros(len(is_probe), dtype=bool)
            valid[is_probe] = ok
            before = np.cumsum(valid)           # valid probes up to each datagram
            for i, data in others:
                msg = self._other(data)
                if msg is None:
                    continue
                if msg.t > limit:
                    clock.refused += 1
                    continue
                lights.append((msg.light, msg.t, msg.green))
                at.append(int(before[i]))
        self.stats["time_ahead"] += clock.refused - refused_before
        self.seq.add_batch(probes["generator"], probes["seq"])
        # in native byte order once: every later numpy step on the wire's big-endian fields would
        # convert them again
        native = np.empty(len(probes), dtype=NATIVE_PROBE_DTYPE)
        for name in NATIVE_PROBE_DTYPE.names:
            native[name] = probes[name]
        if len(native):
            clock.advance(native["t"].max())
        for _, t, _ in lights:
            clock.advance(t)
        return self._feed(native, at, lights)

    def _other(self, data: bytes):
        """A datagram that is not a probe: its light change, or None (malformed: counted)."""
        from fcd import wire
        try:
            msg = wire.decode(data)
        except wire.WireDecodeError as exc:
            self.stats["malformed"] += 1
            self.last_error = str(exc)
            return None
        if not isinstance(msg, wire.LightChange):
            return None
        self.stats["lights"] += 1
        self.seq.add(msg.generator, msg.seq)
        return msg
