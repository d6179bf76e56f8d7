"""The road network: junctions with traffic lights, directed roads, turning probabilities.

A :class:`City` is a networkx ``DiGraph`` (nodes = junctions with ``x``/``y``,
edges = roads) plus flat numpy arrays indexed by road id that the simulator,
the map matcher and the model use.  Cities are generated (:func:`grid_city`),
imported from SUMO (:func:`from_sumo_net`) or loaded from JSON / a trace.

Geometry: a road ``u -> v`` is drawn as a straight segment that starts
``junction_radius`` metres after ``u`` and stops the same distance before
``v`` (the junction box is left out), so two roads never share a point and a
car's position plus heading identifies its road.  Headings are degrees
clockwise from north (+y), as in SUMO.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from cliruntime import ConfigError

CAR_SPACING = 7.5  # metres a stopped car occupies in one lane (length + gap)


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

    @property
    def cycle(self) -> float:
        return sum(p.duration for p in self.phases)

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
        """Green seconds per cycle for ``road``."""
        bit = self.roads.index(road)
        return sum(p.duration for p in self.phases if p.green >> bit & 1)


@dataclass
class City:
    graph: nx.DiGraph
    lights: list[Light]
    junction_radius: float = 10.0
    name: str = "city"
    districts: int = 1
    # flat per-road arrays, filled by _index()
    roads: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._index()

    # ------------------------------------------------------------ indexing
    def _index(self) -> None:
        edges = sorted(self.graph.edges(data=True), key=lambda e: e[2]["id"])
        self.roads = [(u, v) for u, v, _ in edges]
        n = len(edges)
        if n == 0:
            raise ConfigError("city has no roads")
        if [d["id"] for _, _, d in edges] != list(range(n)):
            raise ConfigError("road ids must be 0..n-1")
        self.length = np.array([d["length"] for _, _, d in edges], dtype=np.float64)
        self.speed = np.array([d["speed"] for _, _, d in edges], dtype=np.float64)
        self.lanes = np.array([d["lanes"] for _, _, d in edges], dtype=np.int32)
        geom = np.array([d["geometry"] for _, _, d in edges], dtype=np.float64)
        self.x0, self.y0, self.x1, self.y1 = geom.T
        dx, dy = self.x1 - self.x0, self.y1 - self.y0
        seg = np.hypot(dx, dy)
        seg[seg == 0] = 1e-9
        self.seg_length = seg
        self.ux, self.uy = dx / seg, dy / seg
        self.heading = np.degrees(np.arctan2(self.ux, self.uy)) % 360.0
        self.exit_light = np.full(n, -1, dtype=np.int32)
        for light in self.lights:
            for road in light.roads:
                self.exit_light[road] = light.id
        self.road_id = {(u, v): i for i, (u, v) in enumerate(self.roads)}
        # successors: roads leaving the junction where each road ends
        self.successors: list[list[int]] = [
            [self.graph.edges[v, w]["id"] for w in self.graph.successors(v)] for u, v in self.roads
        ]
        self.predecessors: list[list[int]] = [
            [self.graph.edges[w, u]["id"] for w in self.graph.predecessors(u)] for u, v in self.roads
        ]
        self.turn_probs: list[dict[int, float]] = []
        for road, (u, v) in enumerate(self.roads):
            given = self.graph.edges[u, v].get("turns")
            if given:
                probs = {int(k): float(p) for k, p in given.items()}
            else:
                probs = default_turns(self, road)
            self.turn_probs.append(probs)
        xs = [d["x"] for _, d in self.graph.nodes(data=True)]
        ys = [d["y"] for _, d in self.graph.nodes(data=True)]
        self.bbox = (min(xs), min(ys), max(xs), max(ys))

    @property
    def n_roads(self) -> int:
        return len(self.roads)

    def junction_xy(self, node: str) -> tuple[float, float]:
        data = self.graph.nodes[node]
        return data["x"], data["y"]

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
            raise ConfigError("districts must be >= 1")
        self.districts = districts
        return self

    # ------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "fcd-city/1",
            "name": self.name,
            "junction_radius": self.junction_radius,
            "districts": self.districts,
            "junctions": [{"id": n, "x": d["x"], "y": d["y"]} for n, d in self.graph.nodes(data=True)],
            "roads": [
                {
                    "id": i, "from": u, "to": v,
                    "length": float(self.length[i]), "speed": float(self.speed[i]),
                    "lanes": int(self.lanes[i]),
                    "geometry": [float(self.x0[i]), float(self.y0[i]), float(self.x1[i]), float(self.y1[i])],
                    "turns": {str(k): p for k, p in self.turn_probs[i].items()},
                }
                for i, (u, v) in enumerate(self.roads)
            ],
            "lights": [
                {
                    "id": l.id, "junction": l.junction, "roads": l.roads, "offset": l.offset,
                    "phases": [[p.duration, p.green] for p in l.phases],
                }
                for l in self.lights
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "City":
        if data.get("format") != "fcd-city/1":
            raise ConfigError(f"not an fcd city (format {data.get('format')!r})")
        try:
            g = nx.DiGraph()
            for j in data["junctions"]:
                g.add_node(str(j["id"]), x=float(j["x"]), y=float(j["y"]))
            for r in data["roads"]:
                g.add_edge(
                    str(r["from"]), str(r["to"]), id=int(r["id"]), length=float(r["length"]),
                    speed=float(r["speed"]), lanes=int(r["lanes"]),
                    geometry=tuple(float(c) for c in r["geometry"]), turns=r.get("turns") or None,
                )
            lights = [
                Light(id=int(l["id"]), junction=str(l["junction"]), roads=[int(r) for r in l["roads"]],
                      phases=[Phase(float(d), int(m)) for d, m in l["phases"]], offset=float(l["offset"]))
                for l in data["lights"]
            ]
            return cls(g, lights, junction_radius=float(data["junction_radius"]),
                       name=str(data.get("name", "city")), districts=int(data.get("districts", 1)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed city description: {exc!r}") from None

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))


def default_turns(city: City, road: int) -> dict[int, float]:
    """Turning probabilities by angle: straight 0.6, right and left share the rest; U-turn
    only at a dead end."""
    u, v = city.roads[road]
    outs = [w for w in city.graph.successors(v) if w != u] or list(city.graph.successors(v))
    if not outs:
        return {}
    h_in = city.heading[road]
    weights = {}
    for w in outs:
        out = city.graph.edges[v, w]["id"]
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
        raise ConfigError("a grid needs at least 2x2 junctions")
    if block <= 4 * junction_radius:
        raise ConfigError("block must be longer than 4 junction radii")
    rng = np.random.default_rng(seed)
    g = nx.DiGraph()
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
                    g.add_edge(f"{i}_{j}", f"{a}_{b}", id=rid, length=length, speed=speed,
                               lanes=lanes, geometry=geometry, turns=None)
                    rid += 1
    lights = []
    half = cycle / 2.0
    for node in g.nodes:
        incoming = sorted(g.edges[p, node]["id"] for p in g.predecessors(node))
        ns = ew = 0
        x = g.nodes[node]["x"]
        for bit, road in enumerate(incoming):
            u = next(p for p in g.predecessors(node) if g.edges[p, node]["id"] == road)
            if abs(g.nodes[u]["x"] - x) < 1e-9:
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

def _shape_ends(shape: str) -> tuple[float, float, float, float]:
    points = [tuple(float(c) for c in p.split(",")[:2]) for p in shape.split()]
    if len(points) < 2:
        raise ValueError(f"lane shape needs two points: {shape!r}")
    (ax, ay), (bx, by) = points[0], points[-1]
    return ax, ay, bx, by


def from_sumo_net(path: Path, districts: int = 1) -> City:
    """Import a SUMO ``.net.xml``: junctions, normal edges (lane 0 shape as straight
    segment), traffic-light programs and connections (turns uniform over connections)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise ConfigError(f"cannot read SUMO network {path}: {exc}") from None
    if root.tag != "net":
        raise ConfigError(f"{path}: not a SUMO network (root <{root.tag}>)")
    g = nx.DiGraph()
    for j in root.iter("junction"):
        if j.get("type") == "internal":
            continue
        g.add_node(j.get("id"), x=float(j.get("x")), y=float(j.get("y")))
    edge_ids: dict[str, int] = {}
    for e in root.iter("edge"):
        if e.get("function") in ("internal", "crossing", "walkingarea"):
            continue
        u, v = e.get("from"), e.get("to")
        lanes = e.findall("lane")
        if not lanes or u not in g or v not in g or g.has_edge(u, v):
            continue
        lane = lanes[0]
        try:
            geometry = _shape_ends(lane.get("shape", ""))
        except ValueError as exc:
            raise ConfigError(f"{path}: edge {e.get('id')}: {exc}") from None
        edge_ids[e.get("id")] = len(edge_ids)
        g.add_edge(u, v, id=edge_ids[e.get("id")], length=float(lane.get("length")),
                   speed=float(lane.get("speed")), lanes=len(lanes), geometry=geometry, turns=None,
                   sumo_id=e.get("id"))
    # connections: turning options and traffic light link indices
    outs: dict[int, set[int]] = {}
    tl_links: dict[str, dict[int, int]] = {}
    for c in root.iter("connection"):
        a, b = edge_ids.get(c.get("from")), edge_ids.get(c.get("to"))
        if a is None or b is None:
            continue
        outs.setdefault(a, set()).add(b)
        if c.get("tl") is not None and c.get("linkIndex") is not None:
            tl_links.setdefault(c.get("tl"), {})[int(c.get("linkIndex"))] = a
    for u, v, d in g.edges(data=True):
        options = outs.get(d["id"])
        if options:
            d["turns"] = {str(o): 1.0 / len(options) for o in sorted(options)}
    lights = []
    for tl in root.iter("tlLogic"):
        links = tl_links.get(tl.get("id"), {})
        roads = sorted(set(links.values()))
        if not roads:
            continue
        phases = []
        for ph in tl.findall("phase"):
            state = ph.get("state", "")
            mask = 0
            for index, road in links.items():
                if index < len(state) and state[index] in "Gg":
                    mask |= 1 << roads.index(road)
            phases.append(Phase(float(ph.get("duration")), mask))
        junction = _road_nodes(g, roads[0])[1]
        lights.append(Light(id=len(lights), junction=junction, roads=roads, phases=phases,
                            offset=float(tl.get("offset", 0))))
    city = City(g, lights, junction_radius=0.0, name=Path(path).stem, districts=districts)
    city.sumo_edges = edge_ids  # type: ignore[attr-defined]
    city.sumo_tl_links = tl_links  # type: ignore[attr-defined]
    city.sumo_lights = {tl.get("id"): i for i, tl in enumerate(  # type: ignore[attr-defined]
        t for t in root.iter("tlLogic") if tl_links.get(t.get("id")))}
    return city


def _road_nodes(g: nx.DiGraph, road: int) -> tuple[str, str]:
    for u, v, d in g.edges(data=True):
        if d["id"] == road:
            return u, v
    raise KeyError(road)


def load_city(path: Path, districts: int | None = None) -> City:
    """Load a city from JSON, a trace (.npz, embedded city) or a SUMO .net.xml."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no such city file: {path}")
    if path.name.endswith(".net.xml"):
        city = from_sumo_net(path)
    elif path.suffix == ".npz":
        from fcd.trace import Trace
        city = Trace.load(path).city
    else:
        try:
            city = City.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not JSON: {exc}") from None
    if districts is not None:
        city.with_districts(districts)
    return city
