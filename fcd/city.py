"""The road network: junctions, directed roads (several between two junctions if the map has
them), traffic lights, turning probabilities.

A :class:`City` is a networkx ``MultiDiGraph`` (nodes = junctions with ``x``/``y`` and an
optional ``shape`` polygon; edges = roads keyed by their id string, e.g. the SUMO edge id) plus
flat numpy arrays indexed by road number (0..n-1) that the simulator, the map matcher and the
model use.  Cities are generated (:func:`grid_city`), imported from SUMO (:func:`from_sumo_net`,
which keeps the network as it is: see docs/fcd.md) or loaded from JSON / a trace.

Geometry: every road has a polyline ``shape`` (the path the simulator drives along) and the
polylines of all of its lanes (what the map matcher matches against).  A generated grid road is
a straight segment that starts ``junction_radius`` metres after ``u`` and stops the same
distance before ``v``.  Headings are degrees clockwise from north (+y), as in SUMO.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np



class CityError(ValueError):
    """A city description, SUMO network or vehicle-class list that cannot be used (says why).

    The console scripts report it as a configuration error (one line, exit status 2).
    """


CAR_SPACING = 7.5  # metres a stopped car occupies in one lane (length + gap)
MAX_LIGHT_ROADS = 32  # the wire's green mask is 32 bits

# SUMO's vehicle classes, in a fixed order: a road's allowed classes are a bit mask over them.
SUMO_VCLASSES = (
    "private", "emergency", "authority", "army", "vip", "pedestrian", "passenger", "hov", "taxi",
    "bus", "coach", "delivery", "truck", "trailer", "motorcycle", "moped", "bicycle", "evehicle",
    "tram", "rail_urban", "rail", "rail_electric", "rail_fast", "ship", "container", "cable_car",
    "subway", "aircraft", "wheelchair", "scooter", "drone", "custom1", "custom2",
)
VCLASS_BIT = {name: 1 << i for i, name in enumerate(SUMO_VCLASSES)}
ALL_VCLASSES = (1 << len(SUMO_VCLASSES)) - 1
# older SUMO names still found in networks
_VCLASS_ALIASES = {"public_transport": "bus", "public_emergency": "emergency", "public_authority": "authority",
                   "public_army": "army", "public_transport_bus": "bus", "rail_slow": "rail_urban",
                   "bicycles": "bicycle", "e_vehicle": "evehicle", "cablecar": "cable_car"}
CAR = VCLASS_BIT["passenger"]

# The one rule for signal states (SUMO link states): a road may be entered from its light when
# any of its links shows G/g (green), y/Y (yellow: the end of green, cars that cannot stop still
# cross) or o/O (signal off, priority rules apply).  r/R (red), u (red-yellow) and s (stop sign
# in a red phase) hold cars back.
GREEN_STATES = frozenset("GgyYoO")


def vclass_mask(allow: str | None, disallow: str | None) -> int:
    """SUMO allow/disallow attributes -> bit mask over SUMO_VCLASSES (no attribute: all)."""
    def parse(text: str) -> int:
        mask = 0
        for name in text.split():
            name = _VCLASS_ALIASES.get(name, name)
            if name == "all":
                mask |= ALL_VCLASSES
            else:
                mask |= VCLASS_BIT.get(name, 0)
        return mask
    if allow is not None:
        return parse(allow)
    if disallow is not None:
        return ALL_VCLASSES & ~parse(disallow)
    return ALL_VCLASSES


def parse_vclasses(text: str) -> int:
    """``passenger``, ``passenger,bus`` or ``all`` -> mask; unknown names are a CityError."""
    mask = 0
    for name in text.replace(",", " ").split():
        if name == "all":
            mask |= ALL_VCLASSES
        elif name in VCLASS_BIT:
            mask |= VCLASS_BIT[name]
        else:
            raise CityError(f"unknown vehicle class {name!r} (SUMO classes: {', '.join(SUMO_VCLASSES)}, all)")
    if not mask:
        raise CityError("no vehicle class given")
    return mask


def vclass_argument(text: str) -> int:
    """parse_vclasses for argparse (a bad name is a usage error, exit 2)."""
    import argparse
    try:
        return parse_vclasses(text)
    except CityError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class Phase:
    duration: float
    green: int  # bit i set: roads[i] of the light has green


@dataclass(slots=True)
class Light:
    """A traffic light program controlling the roads that end at one junction."""

    id: int
    junction: str
    roads: list[int]               # controlled incoming roads, canonical order (bit index)
    phases: list[Phase]
    offset: float = 0.0
    kind: str = "static"           # SUMO type: static, actuated, delay_based, ...
    name: str = ""                 # SUMO tlLogic id
    links: list[int] = field(default_factory=list)   # road per SUMO link index (-1: not a kept road)

    @property
    def cycle(self) -> float:
        return sum(p.duration for p in self.phases)

    @property
    def program_driven(self) -> bool:
        """Static lights follow their program; actuated / delay-based ones switch as traffic
        demands, so only the switches observed in the data tell their timing."""
        return self.kind == "static"

    def phase_at(self, t: float) -> int:
        pos = (t - self.offset) % self.cycle
        for index, phase in enumerate(self.phases):
            if pos < phase.duration:
                return index
            pos -= phase.duration
        return len(self.phases) - 1

    def green_roads(self, mask: int) -> list[int]:
        return [road for bit, road in enumerate(self.roads) if mask >> bit & 1]

    def green_time(self, road: int) -> float:
        """Green seconds per cycle for ``road`` in the program (yellow included, see GREEN_STATES)."""
        bit = self.roads.index(road)
        return sum(p.duration for p in self.phases if p.green >> bit & 1)

    def mask_of_state(self, state: str) -> int:
        """SUMO link-state string -> green mask over ``roads`` (the rule of GREEN_STATES)."""
        mask = 0
        for index, ch in enumerate(state):
            if ch in GREEN_STATES and index < len(self.links) and self.links[index] >= 0:
                mask |= 1 << self.roads.index(self.links[index])
        return mask


def _polyline(points: Any) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(arr) < 2:
        raise ValueError("a polyline needs two points")
    return arr


def polyline_length(points: np.ndarray) -> float:
    return float(np.hypot(*np.diff(points, axis=0).T).sum())


@dataclass
class City:
    graph: nx.MultiDiGraph
    lights: list[Light]
    junction_radius: float = 10.0
    name: str = "city"
    districts: int = 1
    match_distance: float = 20.0       # metres a probe may be from a lane and still be matched to it
    internal: dict[str, str] = field(default_factory=dict)     # internal (junction) edge id -> junction
    internal_shapes: list[tuple[str, list]] = field(default_factory=list)  # (junction, polyline)
    source: dict[str, Any] = field(default_factory=dict)       # where the city came from, import summary
    # flat per-road arrays, filled by _index()
    roads: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.graph, nx.MultiDiGraph):
            self.graph = nx.MultiDiGraph(self.graph)
        self._index()

    # ------------------------------------------------------------ indexing
    def _index(self) -> None:
        edges = sorted(self.graph.edges(keys=True, data=True), key=lambda e: e[3]["id"])
        n = len(edges)
        if n == 0:
            raise CityError("city has no roads")
        if [d["id"] for *_, d in edges] != list(range(n)):
            raise CityError("road ids must be 0..n-1")
        self.roads = [(u, v) for u, v, _, _ in edges]
        self.keys = [k for _, _, k, _ in edges]
        self.road_id: dict[str, int] = {k: i for i, k in enumerate(self.keys)}
        self.length = np.array([d["length"] for *_, d in edges], dtype=np.float64)
        self.speed = np.array([d["speed"] for *_, d in edges], dtype=np.float64)
        self.lanes = np.array([d["lanes"] for *_, d in edges], dtype=np.int32)
        self.classes = np.array([d.get("classes", ALL_VCLASSES) for *_, d in edges], dtype=np.int64)
        self.shapes = [_polyline(d["shape"]) for *_, d in edges]
        self.lane_shapes = [[_polyline(s) for s in d.get("lane_shapes") or [d["shape"]]] for *_, d in edges]
        ends = np.array([(s[0, 0], s[0, 1], s[-1, 0], s[-1, 1]) for s in self.shapes])
        self.x0, self.y0, self.x1, self.y1 = ends.T
        dx, dy = self.x1 - self.x0, self.y1 - self.y0
        self.heading = np.degrees(np.arctan2(dx, dy)) % 360.0       # start -> end of the road
        self._index_paths()
        self.exit_light = np.full(n, -1, dtype=np.int32)
        for light in self.lights:
            if len(light.roads) > MAX_LIGHT_ROADS:
                raise CityError(f"light {light.name or light.id} controls {len(light.roads)} roads; "
                                  f"at most {MAX_LIGHT_ROADS} fit the wire's green mask")
            for road in light.roads:
                self.exit_light[road] = light.id
        out_of: dict[str, list[int]] = {}
        into: dict[str, list[int]] = {}
        for road, (u, v) in enumerate(self.roads):
            out_of.setdefault(u, []).append(road)
            into.setdefault(v, []).append(road)
        # successors: roads the map lets a road turn into (SUMO connections), else every road
        # leaving the junction where it ends
        self.successors: list[list[int]] = []
        for road, (u, v, k, d) in enumerate(edges):
            if d.get("successors") is not None:
                outs = [int(o) for o in d["successors"]]
            elif d.get("turns") is not None:
                outs = [int(o) for o in d["turns"]]
            else:
                outs = list(out_of.get(v, []))
            self.successors.append(sorted(outs))
        self.predecessors: list[list[int]] = [[] for _ in range(n)]
        for road, outs in enumerate(self.successors):
            for out in outs:
                self.predecessors[out].append(road)
        self.turn_probs: list[dict[int, float]] = []
        for road, (u, v, k, d) in enumerate(edges):
            given = d.get("turns")
            if given:
                probs = {int(o): float(p) for o, p in given.items()}
            else:
                probs = default_turns(self, road, self.successors[road])
            self.turn_probs.append(probs)
        xs = [d["x"] for _, d in self.graph.nodes(data=True)]
        ys = [d["y"] for _, d in self.graph.nodes(data=True)]
        pts = np.concatenate([np.concatenate(s) for s in self.lane_shapes])
        self.bbox = (min(min(xs), pts[:, 0].min()), min(min(ys), pts[:, 1].min()),
                     max(max(xs), pts[:, 0].max()), max(max(ys), pts[:, 1].max()))

    def _index_paths(self) -> None:
        """Flat segment table of every road's driving path, for positions along a road."""
        sx0, sy0, sx1, sy1, base, lo = [], [], [], [], [], []
        geo = np.zeros(len(self.shapes))
        total = 0.0
        for road, shape in enumerate(self.shapes):
            lo.append(len(sx0))
            seg = np.hypot(*np.diff(shape, axis=0).T)
            keep = seg > 1e-9
            if not keep.any():
                keep[:] = True
            a, b = shape[:-1][keep], shape[1:][keep]
            cum = np.concatenate([[0.0], np.cumsum(np.maximum(seg[keep], 1e-9))[:-1]])
            sx0 += a[:, 0].tolist(); sy0 += a[:, 1].tolist(); sx1 += b[:, 0].tolist(); sy1 += b[:, 1].tolist()
            base += (total + cum).tolist()
            geo[road] = max(float(seg[keep].sum()), 1e-9)
            total += geo[road] + 1.0          # a gap so roads never share a global position
        lo.append(len(sx0))
        self._p = {k: np.array(v) for k, v in (("x0", sx0), ("y0", sy0), ("x1", sx1), ("y1", sy1), ("base", base))}
        dx, dy = self._p["x1"] - self._p["x0"], self._p["y1"] - self._p["y0"]
        seg = np.maximum(np.hypot(dx, dy), 1e-9)
        self._p["ux"], self._p["uy"] = dx / seg, dy / seg
        self._p["heading"] = np.degrees(np.arctan2(dx, dy)) % 360.0
        self._p_lo = np.array(lo[:-1], dtype=np.int64)
        self._p_hi = np.array(lo[1:], dtype=np.int64) - 1
        self._p_start = np.array([self._p["base"][i] for i in lo[:-1]])
        self.geo_length = geo

    def position(self, road: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x, y and heading of points ``s`` metres (of road length) along ``road``'s path."""
        road = np.asarray(road, dtype=np.int64)
        frac = np.clip(np.asarray(s, dtype=np.float64) / self.length[road], 0.0, 1.0)
        g = self._p_start[road] + frac * self.geo_length[road]
        j = np.clip(np.searchsorted(self._p["base"], g, side="right") - 1, self._p_lo[road], self._p_hi[road])
        along = g - self._p["base"][j]
        p = self._p
        return p["x0"][j] + p["ux"][j] * along, p["y0"][j] + p["uy"][j] * along, p["heading"][j]

    @property
    def n_roads(self) -> int:
        return len(self.roads)

    def roads_between(self, u: str, v: str) -> list[int]:
        return sorted(d["id"] for d in self.graph.get_edge_data(u, v, default={}).values())

    def road_between(self, u: str, v: str) -> int:
        """The one road from u to v (CityError when there is none or several)."""
        found = self.roads_between(u, v)
        if len(found) != 1:
            raise CityError(f"{len(found)} roads from {u} to {v}: name the road by its id")
        return found[0]

    def allows(self, road: int, vclasses: int = CAR) -> bool:
        return bool(self.classes[road] & vclasses)

    def junction_xy(self, node: str) -> tuple[float, float]:
        data = self.graph.nodes[node]
        return data["x"], data["y"]

    def junction_shape(self, node: str) -> np.ndarray | None:
        shape = self.graph.nodes[node].get("shape")
        return np.asarray(shape, dtype=np.float64).reshape(-1, 2) if shape and len(shape) >= 3 else None

    def dead_ends(self) -> list[int]:
        """Roads with nothing to turn into (the simulator sends cars reaching their end elsewhere)."""
        return [road for road, outs in enumerate(self.successors) if not outs]

    def district_of_xy(self, x: np.ndarray | float, y: np.ndarray | float) -> Any:
        """District = vertical stripe of the bounding box (0 .. districts-1)."""
        xmin, _, xmax, _ = self.bbox
        width = max(xmax - xmin, 1e-9)
        d = np.floor((np.asarray(x) - xmin) / width * self.districts).astype(np.int64)
        return np.clip(d, 0, self.districts - 1)

    def road_district(self) -> np.ndarray:
        """A road belongs to the district of the junction where it ends (its light)."""
        xy = np.array([self.junction_xy(v) for _, v in self.roads])
        return self.district_of_xy(xy[:, 0], xy[:, 1])

    def light_district(self) -> np.ndarray:
        xy = np.array([self.junction_xy(l.junction) for l in self.lights]).reshape(-1, 2)
        return self.district_of_xy(xy[:, 0], xy[:, 1])

    def with_districts(self, districts: int) -> "City":
        if districts < 1:
            raise CityError("districts must be >= 1")
        self.districts = districts
        return self

    # ------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        def pts(a: np.ndarray) -> list:
            return [[round(float(x), 3), round(float(y), 3)] for x, y in a]
        junctions = []
        for n, d in self.graph.nodes(data=True):
            j = {"id": n, "x": d["x"], "y": d["y"]}
            if d.get("shape"):
                j["shape"] = d["shape"]
            junctions.append(j)
        roads = []
        for i, (u, v) in enumerate(self.roads):
            r = {"id": i, "key": self.keys[i], "from": u, "to": v,
                 "length": float(self.length[i]), "speed": float(self.speed[i]), "lanes": int(self.lanes[i]),
                 "classes": int(self.classes[i]), "shape": pts(self.shapes[i]),
                 "turns": {str(k): p for k, p in self.turn_probs[i].items()}, "successors": self.successors[i]}
            if len(self.lane_shapes[i]) > 1 or not np.array_equal(self.lane_shapes[i][0], self.shapes[i]):
                r["lane_shapes"] = [pts(s) for s in self.lane_shapes[i]]
            roads.append(r)
        return {
            "format": "fcd-city/2", "name": self.name, "junction_radius": self.junction_radius,
            "districts": self.districts, "match_distance": self.match_distance,
            "junctions": junctions, "roads": roads,
            "lights": [{"id": l.id, "junction": l.junction, "roads": l.roads, "offset": l.offset, "kind": l.kind,
                        "name": l.name, "links": l.links, "phases": [[p.duration, p.green] for p in l.phases]}
                       for l in self.lights],
            "internal": self.internal,
            "internal_shapes": [[j, s] for j, s in self.internal_shapes],
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "City":
        fmt = data.get("format") if isinstance(data, dict) else None
        if fmt not in ("fcd-city/1", "fcd-city/2"):
            raise CityError(f"not an fcd city (format {fmt!r})")
        try:
            g = nx.MultiDiGraph()
            for j in data["junctions"]:
                g.add_node(str(j["id"]), x=float(j["x"]), y=float(j["y"]), shape=j.get("shape"))
            for r in data["roads"]:
                shape = r["shape"] if "shape" in r else [r["geometry"][:2], r["geometry"][2:]]
                turns = r.get("turns")
                g.add_edge(str(r["from"]), str(r["to"]), key=str(r.get("key", r["id"])), id=int(r["id"]),
                           length=float(r["length"]), speed=float(r["speed"]), lanes=int(r["lanes"]),
                           classes=int(r.get("classes", ALL_VCLASSES)), shape=shape,
                           lane_shapes=r.get("lane_shapes"), turns=turns if turns else None,
                           successors=r.get("successors"))
            lights = [
                Light(id=int(l["id"]), junction=str(l["junction"]), roads=[int(r) for r in l["roads"]],
                      phases=[Phase(float(d), int(m)) for d, m in l["phases"]], offset=float(l["offset"]),
                      kind=str(l.get("kind", "static")), name=str(l.get("name", "")),
                      links=[int(x) for x in l.get("links", [])])
                for l in data["lights"]
            ]
            return cls(g, lights, junction_radius=float(data["junction_radius"]),
                       name=str(data.get("name", "city")), districts=int(data.get("districts", 1)),
                       match_distance=float(data.get("match_distance", 20.0)),
                       internal={str(k): str(v) for k, v in data.get("internal", {}).items()},
                       internal_shapes=[(str(j), s) for j, s in data.get("internal_shapes", [])],
                       source=dict(data.get("source", {})))
        except CityError:
            raise  # already says what is wrong
        except (KeyError, TypeError, ValueError) as exc:
            raise CityError(f"malformed city description: {exc!r}") from None

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))


def default_turns(city: City, road: int, outs: list[int]) -> dict[int, float]:
    """Turning probabilities by angle: straight 3x the weight of a turn; U-turn only at a dead end."""
    u, v = city.roads[road]
    options = [o for o in outs if city.roads[o][1] != u] or list(outs)
    if not options:
        return {}
    h_in = city.heading[road]
    weights = {}
    for out in options:
        turn = (city.heading[out] - h_in + 540.0) % 360.0 - 180.0
        weights[out] = 3.0 if abs(turn) < 30 else 1.0
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items()}


def _segment(ax: float, ay: float, bx: float, by: float, radius: float) -> tuple[float, float, float, float]:
    d = math.hypot(bx - ax, by - ay)
    r = min(radius, d / 4)
    ux, uy = (bx - ax) / d, (by - ay) / d
    return (ax + ux * r, ay + uy * r, bx - ux * r, by - uy * r)


def grid_city(
    nx_: int = 8, ny: int = 8, block: float = 200.0, lanes: int = 1, speed: float = 13.9,
    cycle: float = 60.0, amber: float = 0.0, offsets: str = "random", seed: int = 1,
    districts: int = 1, junction_radius: float = 10.0, straight: float = 0.6,
) -> City:
    """A Manhattan grid: nx_ x ny junctions ``block`` metres apart, two-way roads, a
    two-phase light at every junction (north-south green, then east-west green)."""
    if nx_ < 2 or ny < 2:
        raise CityError("a grid needs at least 2x2 junctions")
    if block <= 4 * junction_radius:
        raise CityError("block must be longer than 4 junction radii")
    rng = np.random.default_rng(seed)
    g = nx.MultiDiGraph()
    for i in range(nx_):
        for j in range(ny):
            g.add_node(f"{i}_{j}", x=i * block, y=j * block)
    rid = 0
    for i in range(nx_):
        for j in range(ny):
            for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                a, b = i + di, j + dj
                if 0 <= a < nx_ and 0 <= b < ny:
                    geometry = _segment(i * block, j * block, a * block, b * block, junction_radius)
                    length = math.hypot(geometry[2] - geometry[0], geometry[3] - geometry[1])
                    g.add_edge(f"{i}_{j}", f"{a}_{b}", key=str(rid), id=rid, length=length, speed=speed,
                               lanes=lanes, classes=ALL_VCLASSES, shape=[geometry[:2], geometry[2:]], turns=None)
                    rid += 1
    lights = []
    half = cycle / 2.0
    for node in g.nodes:
        into = {d["id"]: p for p, _, d in g.in_edges(node, data=True)}
        incoming = sorted(into)
        ns = ew = 0
        x = g.nodes[node]["x"]
        for bit, road in enumerate(incoming):
            if abs(g.nodes[into[road]]["x"] - x) < 1e-9:
                ns |= 1 << bit
            else:
                ew |= 1 << bit
        phases = [Phase(half - amber, ns)] + ([Phase(amber, 0)] if amber else [])
        phases += [Phase(half - amber, ew)] + ([Phase(amber, 0)] if amber else [])
        if offsets == "random":
            offset = float(rng.integers(0, int(cycle)))
        elif offsets == "wave":
            offset = float((x / block) * 0.1 * cycle % cycle)
        else:
            offset = 0.0
        lights.append(Light(id=len(lights), junction=node, roads=incoming, phases=phases, offset=offset))
    city = City(g, lights, junction_radius=junction_radius, name=f"grid{nx_}x{ny}", districts=districts)
    if straight != 0.6:
        for road in range(city.n_roads):
            probs = city.turn_probs[road]
            if len(probs) < 2:
                continue
            weights = {}
            for out in probs:
                turn = (city.heading[out] - city.heading[road] + 540.0) % 360.0 - 180.0
                weights[out] = straight if abs(turn) < 30 else (1 - straight) / max(1, len(probs) - 1)
            total = sum(weights.values())
            city.turn_probs[road] = {k: w / total for k, w in weights.items()}
    return city




# ---------------------------------------------------------------- SUMO import

def _points(text: str | None) -> list[list[float]]:
    return [[float(c) for c in p.split(",")[:2]] for p in (text or "").split()]


def from_sumo_net(path: Path, districts: int = 1, vclasses: int = CAR, match_distance: float = 8.0) -> City:
    """Import a SUMO ``.net.xml`` as it is (docs/fcd.md, "SUMO import").

    Kept: every normal edge with at least one lane that one of ``vclasses`` may use (by default
    passenger cars), with those lanes only (their polylines, speed and count); parallel edges
    between the same junctions (the graph is keyed by SUMO edge id); junction shapes; internal
    lanes (mapped to their junction; a probe on them is in the junction, on no road); SUMO
    connections as the turns (uniform over connections); every ``tlLogic`` that controls a kept
    road, with its type (static / actuated / delay_based) and link states mapped to green masks by
    the GREEN_STATES rule.  The import summary (kept, skipped and why, with examples) is in
    ``city.source["import"]``.
    """
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise CityError(f"cannot read SUMO network {path}: {exc}") from None
    if root.tag != "net":
        raise CityError(f"{path}: not a SUMO network (root <{root.tag}>)")
    g = nx.MultiDiGraph()
    lane_junction: dict[str, str] = {}
    for j in root.iter("junction"):
        if j.get("type") == "internal":
            continue
        try:
            shape = _points(j.get("shape"))
            g.add_node(j.get("id"), x=float(j.get("x")), y=float(j.get("y")), shape=shape if len(shape) >= 3 else None)
        except CityError:
            raise  # already says what is wrong
        except (TypeError, ValueError) as exc:
            raise CityError(f"{path}: junction {j.get('id')}: {exc}") from None
        for lane in (j.get("intLanes") or "").split():
            lane_junction[lane] = j.get("id")
    skipped: Counter = Counter()
    examples: dict[str, list[str]] = {}

    def skip(reason: str, what: str) -> None:
        skipped[reason] += 1
        if len(examples.setdefault(reason, [])) < 5:
            examples[reason].append(what)

    internal: dict[str, str] = {}
    internal_shapes: list[tuple[str, list]] = []
    kept_lanes: dict[str, tuple[int, int]] = {}        # SUMO lane id -> (road, lane index kept)
    skipped_edges: list[str] = []
    road = 0
    for e in root.iter("edge"):
        eid, function = e.get("id"), e.get("function", "normal")
        lanes = e.findall("lane")
        if function == "internal":
            junction = next((lane_junction[l.get("id")] for l in lanes if l.get("id") in lane_junction), None)
            if junction is None:
                junction = eid[1:].rsplit("_", 1)[0]
            if junction in g:
                internal[eid] = junction
                for l in lanes:
                    if vclass_mask(l.get("allow", e.get("allow")), l.get("disallow", e.get("disallow"))) & vclasses:
                        pts = _points(l.get("shape"))
                        if len(pts) >= 2:
                            internal_shapes.append((junction, pts))
            continue
        if function in ("crossing", "walkingarea"):
            skip(function, eid)
            continue
        u, v = e.get("from"), e.get("to")
        if u not in g or v not in g:
            raise CityError(f"{path}: edge {eid} joins unknown junctions {u} -> {v}")
        masks = [vclass_mask(l.get("allow"), l.get("disallow")) for l in lanes]
        usable = [l for l, m in zip(lanes, masks) if m & vclasses]
        if not usable:
            skip("vehicle class", eid)
            skipped_edges.append(eid)
            continue
        try:
            shapes = [_points(l.get("shape")) for l in usable]
            if any(len(s) < 2 for s in shapes):
                raise ValueError("a lane shape needs two points")
            length = float(usable[0].get("length"))
            speed = max(float(l.get("speed")) for l in usable)
        except CityError:
            raise  # already says what is wrong
        except (TypeError, ValueError) as exc:
            raise CityError(f"{path}: edge {eid}: {exc}") from None
        for index, l in enumerate(usable):
            kept_lanes[l.get("id")] = (road, index)
        classes = 0
        for m in masks:
            classes |= m
        g.add_edge(u, v, key=eid, id=road, length=length, speed=speed, lanes=len(usable), classes=classes,
                   shape=shapes[len(shapes) // 2], lane_shapes=shapes, turns=None, successors=None,
                   sumo_lanes=[int(l.get("index", i)) for i, l in enumerate(usable)])
        road += 1
    if road == 0:
        raise CityError(f"{path}: no road the chosen vehicle classes may use")
    edge_road = {k: d["id"] for _, _, k, d in g.edges(keys=True, data=True)}
    outs: dict[int, set[int]] = {}
    tl_links: dict[str, dict[int, int]] = {}
    for c in root.iter("connection"):
        a, b = edge_road.get(c.get("from")), edge_road.get(c.get("to"))
        from_lane = f"{c.get('from')}_{c.get('fromLane')}"
        to_lane = f"{c.get('to')}_{c.get('toLane')}"
        usable = a is not None and b is not None and from_lane in kept_lanes and to_lane in kept_lanes
        if usable:
            outs.setdefault(a, set()).add(b)
        if c.get("tl") is not None and c.get("linkIndex") is not None:
            tl_links.setdefault(c.get("tl"), {})[int(c.get("linkIndex"))] = a if usable else -1
    for _, _, d in g.edges(data=True):
        options = sorted(outs.get(d["id"], ()))
        d["successors"] = options
        d["turns"] = {str(o): 1.0 / len(options) for o in options}
    lights = []
    skipped_lights: list[str] = []
    steady_lights: list[str] = []
    seen_tl: set[str] = set()
    for tl in root.iter("tlLogic"):
        tid = tl.get("id")
        if tid in seen_tl:          # several programs: the first one is the network's own
            continue
        seen_tl.add(tid)
        links = tl_links.get(tid, {})
        roads = sorted({r for r in links.values() if r >= 0})
        if not roads:
            skip("light without car roads", tid)
            skipped_lights.append(tid)
            continue
        link_list = [links.get(i, -1) for i in range(max(links) + 1)]
        light = Light(id=len(lights), junction="", roads=roads, phases=[], offset=float(tl.get("offset", 0)),
                      kind=tl.get("type", "static"), name=tid, links=link_list)
        try:
            light.phases = [Phase(float(ph.get("duration")), light.mask_of_state(ph.get("state", "")))
                            for ph in tl.findall("phase")]
        except CityError:
            raise  # already says what is wrong
        except (TypeError, ValueError) as exc:
            raise CityError(f"{path}: tlLogic {tid}: {exc}") from None
        if not light.phases or light.cycle <= 0:
            raise CityError(f"{path}: tlLogic {tid} has no phases with a duration")
        if len({ph.get("state", "") for ph in tl.findall("phase")}) == 1:
            # one state (netgenerate's corner junctions: "GG"): it never switches, so its roads
            # would never be reported at a switch; they are roads without a light (reported
            # periodically), and its switch records (the initial state) are counted as skipped
            skip("light that never switches (one state)", tid)
            steady_lights.append(tid)
            continue
        ends = Counter(v for _, v, d in g.edges(data=True) if d["id"] in roads)
        light.junction = ends.most_common(1)[0][0]
        lights.append(light)
    summary = {"roads": road, "lanes": len(kept_lanes), "lights": len(lights),
               "light_kinds": dict(Counter(l.kind for l in lights)), "internal_edges": len(internal),
               "skipped": dict(skipped), "skipped_examples": examples,
               "vclasses": [n for n, b in VCLASS_BIT.items() if vclasses & b]}
    source = {"kind": "sumo", "net": Path(path).name, "import": summary, "skipped_edges": skipped_edges,
              "skipped_lights": skipped_lights, "steady_lights": steady_lights,
              "sumo_lanes": {k: d["sumo_lanes"] for _, _, k, d in g.edges(keys=True, data=True)}}
    for _, _, d in g.edges(data=True):
        del d["sumo_lanes"]
    return City(g, lights, junction_radius=0.0, name=Path(path).name.split(".")[0], districts=districts,
                match_distance=match_distance, internal=internal, internal_shapes=internal_shapes, source=source)


def load_city(path: Path, districts: int | None = None, vclasses: int = CAR) -> City:
    """Load a city from JSON, a trace (.npz, embedded city) or a SUMO .net.xml."""
    path = Path(path)
    if not path.exists():
        raise CityError(f"no such city file: {path}")
    if path.name.endswith(".net.xml"):
        city = from_sumo_net(path, vclasses=vclasses)
    elif path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                city = City.from_dict(json.loads(bytes(data["city"]).decode()))
        except CityError:
            raise  # already says what is wrong
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise CityError(f"cannot read the city of trace {path}: {exc}") from None
    else:
        try:
            city = City.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CityError(f"{path}: not JSON: {exc}") from None
    if districts is not None:
        city.with_districts(districts)
    return city
