"""``fcd-sim``: a seeded, vectorised city traffic simulator (and SUMO trace import).

Model (one step of ``dt`` seconds, all cars at once with numpy):

- cars on a road form one queue ordered by position ``s`` (metres from the road's start); a
  stopped car occupies ``CAR_SPACING / lanes`` metres;
- the car in front of a road sees the stop line as a standing leader when its light is red or the
  road it will turn into has no room at its entrance; otherwise it may cross the junction;
- speed: ``v' = min(v + a dt, v_max, gap / dt, sqrt(v_leader^2 + 2 b gap))`` minus a random
  dawdle ``<= eps a dt`` (seeded), never negative; then ``s' = s + v' dt``;
- a car that reaches the end of its road on green enters the road it chose with the junction's
  turning probabilities, behind the last car there; the next turn is drawn on entry.

Cars never leave the city: their number is conserved.  A car reaching the end of a dead-end road
(nothing to turn into, e.g. where a SUMO network is cut) is sent to the entrance of a road drawn
at random, as if it had left the city and another car had come in (counted as ``respawned``).  Order within a step at time ``t``: the
probes of the state at ``t`` are recorded, lights switch to their phase at ``t`` (changes
recorded), then cars move to ``t + dt``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cliruntime import ConfigError, make_parser, positive_int, progress, run_sync, non_negative_float
from fcd.city import CAR_SPACING, City, CityError, from_sumo_net, grid_city, load_city, vclass_argument
from fcd.trace import LIGHT_DTYPE, PROBE_DTYPE, Trace


class SimulationError(ValueError):
    """Simulator parameters the city cannot take (too many cars, no turns, bad step)."""


class Simulator:
    def __init__(self, city: City, cars: int, seed: int = 1, dt: float = 1.0,
                 accel: float = 2.6, decel: float = 4.5, dawdle: float = 0.2) -> None:
        if dt <= 0:
            raise SimulationError("dt must be positive")
        self.city, self.dt, self.accel, self.decel, self.dawdle = city, dt, accel, decel, dawdle
        self.rng = np.random.default_rng(seed)
        self.t = 0.0
        R = city.n_roads
        self.spacing = CAR_SPACING / city.lanes
        # turn tables: successors and cumulative probabilities per road
        self._turn_out = [np.array(list(p.keys()), dtype=np.int32) for p in city.turn_probs]
        self._turn_cum = [np.cumsum(list(p.values())) for p in city.turn_probs]
        dead_ends = [r for r, o in enumerate(self._turn_out) if len(o) == 0]
        if len(dead_ends) == R:
            raise SimulationError("no road has a road to turn into")
        for road in dead_ends:
            others = np.array([o for o in range(R) if o != road] or [road], dtype=np.int32)
            self._turn_out[road] = others
            self._turn_cum[road] = np.arange(1, len(others) + 1, dtype=np.float64)
        self.dead_end = np.zeros(R, dtype=bool)
        self.dead_end[dead_ends] = True
        # place cars on distinct slots, spread over the city
        capacity = np.floor(city.length / self.spacing).astype(np.int64)
        total = int(capacity.sum())
        if cars > 0.8 * total:
            raise SimulationError(f"{cars} cars do not fit: the city holds about {int(0.8 * total)}")
        slots = np.sort(self.rng.choice(total, size=cars, replace=False))
        starts = np.concatenate([[0], np.cumsum(capacity)[:-1]])
        self.road = (np.searchsorted(starts, slots, side="right") - 1).astype(np.int32)
        index_in_road = slots - starts[self.road]
        self.s = (index_in_road + 0.5) * self.spacing[self.road]
        self.v = np.zeros(cars)
        self.next_road = np.array([self._choose(r) for r in self.road], dtype=np.int32)
        # lights: roads without a light are always green
        self.green = np.ones(R, dtype=bool)
        self.phase = np.full(len(city.lights), -1, dtype=np.int64)
        self.counters = {"crossings": 0, "blocked_entries": 0, "respawned": 0}

    @property
    def n_cars(self) -> int:
        return len(self.road)

    def _choose(self, road: int) -> int:
        cum = self._turn_cum[road]
        return int(self._turn_out[road][min(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"),
                                            len(cum) - 1)])

    # ------------------------------------------------------------ state views
    def positions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.city.position(self.road, self.s)

    def probes(self) -> np.ndarray:
        out = np.empty(self.n_cars, dtype=PROBE_DTYPE)
        x, y, heading = self.positions()
        out["t"] = self.t
        out["car"] = np.arange(self.n_cars)
        out["x"], out["y"], out["heading"] = x, y, heading
        out["speed"] = self.v
        out["road"] = self.road
        return out

    def update_lights(self) -> np.ndarray:
        changes = []
        for light in self.city.lights:
            phase = light.phase_at(self.t)
            if phase != self.phase[light.id]:
                self.phase[light.id] = phase
                mask = light.phases[phase].green
                for bit, road in enumerate(light.roads):
                    self.green[road] = bool(mask >> bit & 1)
                changes.append((self.t, light.id, phase, mask))
        return np.array(changes, dtype=LIGHT_DTYPE)

    # ------------------------------------------------------------ dynamics
    def move(self) -> None:
        c, dt = self.city, self.dt
        order = np.lexsort((-self.s, self.road))
        r = self.road[order]
        s = self.s[order]
        v = self.v[order]
        nxt = self.next_road[order]
        length = c.length[r]
        same = np.empty(len(r), dtype=bool)
        same[0] = False
        same[1:] = r[1:] == r[:-1]
        leader_s = np.concatenate([[np.inf], s[:-1]])
        leader_v = np.concatenate([[0.0], v[:-1]])
        front = ~same
        may_cross = front & self.green[r]
        gap = np.where(same, leader_s - s - self.spacing[r], length - s)
        gap = np.where(may_cross, np.inf, np.maximum(gap, 0.0))
        lead_v = np.where(same, leader_v, 0.0)
        v_safe = np.minimum(gap / dt, np.sqrt(lead_v ** 2 + 2 * self.decel * gap))
        v_new = np.minimum(np.minimum(v + self.accel * dt, c.speed[r]), v_safe)
        if self.dawdle:
            v_new = v_new - self.dawdle * self.accel * dt * self.rng.random(len(v_new))
        v_new = np.maximum(v_new, 0.0)
        s_new = s + v_new * dt
        crossing = may_cross & (s_new >= length)
        s_new = np.where(crossing, s_new, np.minimum(s_new, length))
        # room at each road's entrance: the rearmost car (crossers count where they stand)
        min_s = np.full(c.n_roads, np.inf)
        np.minimum.at(min_s, r, np.minimum(s_new, length))
        for i in np.flatnonzero(crossing):
            target = nxt[i]
            room = min_s[target] - self.spacing[target]
            if room >= 0:
                if self.dead_end[r[i]]:           # left the city; a new car comes in elsewhere
                    self.counters["respawned"] += 1
                    s_new[i] = 0.0
                else:
                    s_new[i] = min(s_new[i] - length[i], room)
                r[i] = target
                min_s[target] = s_new[i]
                nxt[i] = self._choose(target)
                self.counters["crossings"] += 1
            else:
                s_new[i] = length[i]
                v_new[i] = 0.0
                self.counters["blocked_entries"] += 1
        self.road[order] = r
        self.s[order] = s_new
        self.v[order] = v_new
        self.next_road[order] = nxt
        self.t = round(self.t + dt, 9)

    def run(self, duration: float, probe_interval: float = 1.0, advance=lambda n=1: None) -> Trace:
        steps = int(round(duration / self.dt))
        every = max(1, int(round(probe_interval / self.dt)))
        probes, lights = [], []
        for k in range(steps):
            if k % every == 0:
                probes.append(self.probes())
            changes = self.update_lights()
            if len(changes):
                lights.append(changes)
            self.move()
            advance()
        return Trace(
            self.city,
            np.concatenate(probes) if probes else np.empty(0, PROBE_DTYPE),
            np.concatenate(lights) if lights else np.empty(0, LIGHT_DTYPE),
            meta={"source": "fcd-sim", "cars": self.n_cars, "duration": duration, "dt": self.dt,
                  "probe_interval": probe_interval, **self.counters},
        )


# ---------------------------------------------------------------- CLI

def _grid(text: str) -> tuple[int, int]:
    try:
        a, b = text.lower().split("x")
        return int(a), int(b)
    except ValueError:
        raise ConfigError(f"--grid expects NXxNY like 8x8, got {text!r}") from None


def build_parser():
    p = make_parser("fcd-sim", "Simulate cars and traffic lights in a city and write a trace.", examples=[
        "fcd-sim --grid 8x8 --cars 1000 --duration 600 --seed 1 --out city.npz --city-out city.json",
        "fcd-sim --sumo-net net.net.xml --cars 300 --duration 300 --out sumo.npz",
        "fcd-sim --sumo-net net.net.xml --sumo-fcd fcd.xml --sumo-tls tls.xml --out sumo-trace.npz",
    ])
    p.add_argument("--grid", default="8x8", help="grid city NXxNY junctions")
    p.add_argument("--block", type=non_negative_float, default=200.0, help="block length (m)")
    p.add_argument("--lanes", type=positive_int, default=1)
    p.add_argument("--speed", type=non_negative_float, default=13.9, help="speed limit (m/s)")
    p.add_argument("--cycle", type=non_negative_float, default=60.0, help="light cycle (s)")
    p.add_argument("--amber", type=non_negative_float, default=0.0, help="all-red time per phase change (s)")
    p.add_argument("--offsets", choices=["random", "wave", "zero"], default="random")
    p.add_argument("--straight", type=float, default=0.6, help="probability of going straight")
    p.add_argument("--sumo-net", type=Path, help="use a SUMO .net.xml network instead of a grid")
    p.add_argument("--sumo-fcd", type=Path, help="convert SUMO --fcd-output XML (needs --sumo-net)")
    p.add_argument("--sumo-tls", type=Path, help="SUMO SaveTLSSwitchStates XML (with --sumo-fcd; needed when "
                   "the network has lights)")
    p.add_argument("--vclass", type=vclass_argument, default="passenger",
                   help="import the SUMO roads these vehicle classes may use: a class, a comma list or 'all' "
                        "(default passenger: car roads)")
    p.add_argument("--city", type=Path, help="use a saved city (JSON or trace)")
    p.add_argument("--cars", type=positive_int, default=1000)
    p.add_argument("--duration", type=non_negative_float, default=600.0, help="simulated seconds")
    p.add_argument("--dt", type=non_negative_float, default=1.0)
    p.add_argument("--probe-interval", type=non_negative_float, default=1.0, help="seconds between probes")
    p.add_argument("--districts", type=positive_int, default=4, help="city districts (for generators)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="trace file (.npz)")
    p.add_argument("--city-out", type=Path, help="also write the city as JSON")
    return p


def make_city(args) -> City:
    if args.sumo_net:
        return from_sumo_net(args.sumo_net, districts=args.districts, vclasses=args.vclass)
    if args.city:
        return load_city(args.city, districts=args.districts)
    nx_, ny = _grid(args.grid)
    return grid_city(nx_, ny, block=args.block, lanes=args.lanes, speed=args.speed, cycle=args.cycle,
                     amber=args.amber, offsets=args.offsets, seed=args.seed, districts=args.districts,
                     straight=args.straight)


def run(args, stats) -> int:
    started = time.monotonic()
    city = make_city(args)
    if args.sumo_tls and not args.sumo_fcd:
        raise ConfigError("--sumo-tls goes with --sumo-fcd")
    if args.sumo_fcd:
        from fcd.sumo import read_fcd, read_tls
        if not args.sumo_net:
            raise ConfigError("--sumo-fcd needs --sumo-net")
        if city.lights and not args.sumo_tls:
            raise ConfigError(f"the network has {len(city.lights)} traffic lights: --sumo-fcd needs --sumo-tls "
                              "(SUMO's SaveTLSSwitchStates output), or no road report is ever made")
        probes, fcd_summary = read_fcd(args.sumo_fcd, city)
        lights, tls_summary = read_tls(args.sumo_tls, city) if args.sumo_tls else (np.empty(0, LIGHT_DTYPE), {})
        trace = Trace(city, probes, lights, meta={"source": "sumo", "cars": int(len(np.unique(probes["car"]))),
                                                  "fcd": fcd_summary, "tls": tls_summary})
        stats["fcd_records"] = fcd_summary
        stats["tls_records"] = tls_summary
        print(f"fcd-sim: {args.sumo_fcd}: {fcd_summary['records']} vehicle records: {fcd_summary['matched_road']} on "
              f"roads, {fcd_summary['matched_junction']} in junctions, {fcd_summary['skipped_vehicle_class']} skipped "
              f"(vehicle class), {fcd_summary['unmatched']} unmatched")
        if tls_summary:
            print(f"fcd-sim: {args.sumo_tls}: {tls_summary['records']} switches: {tls_summary['matched']} matched, "
                  f"{tls_summary['skipped_no_car_roads']} skipped (light without car roads), "
                  f"{tls_summary['skipped_never_switches']} skipped (light that never switches), 0 unmatched")
    else:
        sim = Simulator(city, args.cars, seed=args.seed, dt=args.dt)
        with progress("simulating", int(args.duration / args.dt)) as advance:
            trace = sim.run(args.duration, args.probe_interval, advance)
    trace.save(args.out)
    if args.city_out:
        city.save(args.city_out)
    elapsed = time.monotonic() - started
    if city.source.get("kind") == "sumo":
        summary = city.source["import"]
        stats["import"] = summary
        print(f"fcd-sim: {args.sumo_net}: kept {summary['roads']} roads ({summary['lanes']} lanes) for "
              f"{','.join(summary['vclasses'])}, {summary['lights']} lights {summary['light_kinds']}, "
              f"{summary['internal_edges']} internal edges as junctions; skipped {summary['skipped'] or 'nothing'}; "
              f"{len(city.dead_ends())} dead-end roads (cars reaching their end re-enter elsewhere)")
    stats.update({"cars": int(trace.meta.get("cars", 0)), "probes": len(trace.probes),
                  "light_changes": len(trace.lights), "roads": city.n_roads, "lights": len(city.lights)})
    stats["elapsed_s"] = round(elapsed, 3)
    print(f"fcd-sim: {city.name}: {city.n_roads} roads, {len(city.lights)} lights, "
          f"{stats['cars']} cars, {len(trace.probes)} probes, {len(trace.lights)} light changes "
          f"in {elapsed:.2f}s -> {args.out}")
    return 0


def main(argv=None) -> int:
    return run_sync(build_parser(), run, argv, config_errors=(CityError, SimulationError))


if __name__ == "__main__":
    raise SystemExit(main())
