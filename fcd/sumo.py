"""Reading SUMO's outputs against an imported network (``fcd.city.from_sumo_net``).

- :func:`read_fcd`: ``--fcd-output`` -> probes.  Records on internal lanes are in a junction
  (ground truth road -1); records on edges skipped by vehicle class (footways, tram tracks, ...)
  and persons are skipped; a record on a lane the network does not have means the trace belongs
  to another network: :class:`SumoError` naming the lanes.
- :func:`read_tls`: ``SaveTLSSwitchStates`` -> light changes (green masks by the GREEN_STATES
  rule); a light the network does not have, or a state string of another length than the light's
  links, is a SumoError.
- :func:`read_queues`, :func:`read_edgedata`, :func:`read_vehroutes`: the ground truth the
  validation compares with (``--queue-output``, ``edgeData`` and ``--vehroute-output``).

Every reader returns its records and a summary of what was matched, skipped and why.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fcd.city import City, CityError
from fcd.trace import LIGHT_DTYPE, PROBE_DTYPE


class SumoError(CityError):
    """A SUMO output file that cannot be read or belongs to another network."""


JUNCTION = -1     # ground truth road of a probe inside a junction (on an internal lane)


def _lane_edge(lane: str) -> str:
    return lane.rsplit("_", 1)[0]


def _iterparse(path: Path, what: str):
    try:
        yield from ET.iterparse(path, events=("end",))
    except OSError as exc:
        raise SumoError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except ET.ParseError as exc:
        raise SumoError(f"{path}: not a SUMO {what} file: {exc}") from None


def _require_sumo(city: City, what: str) -> None:
    if city.source.get("kind") != "sumo":
        raise SumoError(f"{what} needs a city imported from a SUMO network (--sumo-net NET)")


def read_fcd(path: Path, city: City) -> tuple[np.ndarray, dict[str, Any]]:
    """SUMO ``--fcd-output`` XML -> (probes sorted by time then car, summary)."""
    _require_sumo(city, "a SUMO FCD trace")
    skipped_edges = set(city.source.get("skipped_edges", ()))
    ids: dict[str, int] = {}
    rows = []
    counts: Counter = Counter()
    unknown: Counter = Counter()
    try:
        for _, el in _iterparse(path, "FCD output"):
            if el.tag != "timestep":
                continue
            t = float(el.get("time"))
            for veh in el:
                if veh.tag != "vehicle":
                    counts["skipped_persons_and_containers"] += 1
                    continue
                counts["records"] += 1
                lane = veh.get("lane")
                if lane is None:
                    raise SumoError(f"{path}: vehicle records have no lane attribute "
                                      "(run SUMO with plain --fcd-output, not --fcd-output.geo)")
                edge = _lane_edge(lane)
                if edge in city.internal:
                    road = JUNCTION
                    counts["in_junction"] += 1
                elif edge in city.road_id:
                    road = city.road_id[edge]
                    counts["on_roads"] += 1
                elif edge in skipped_edges:
                    counts["skipped_vehicle_class"] += 1
                    continue
                else:
                    unknown[lane] += 1
                    continue
                car = ids.setdefault(veh.get("id"), len(ids))
                rows.append((t, car, float(veh.get("x")), float(veh.get("y")), float(veh.get("speed")),
                             float(veh.get("angle")) % 360.0, road))
            el.clear()
    except CityError:
        raise  # already says what is wrong
    except (TypeError, ValueError) as exc:
        raise SumoError(f"{path}: malformed FCD record: {exc}") from None
    if unknown:
        n = sum(unknown.values())
        raise SumoError(f"{path} does not fit network {city.source.get('net', city.name)}: {n} of "
                          f"{counts['records']} records are on lanes it does not have "
                          f"(e.g. {', '.join(list(unknown)[:5])})")
    probes = np.array(rows, dtype=PROBE_DTYPE)
    probes = probes[np.lexsort((probes["car"], probes["t"]))]
    summary = {"records": counts["records"], "matched_road": counts["on_roads"],
               "matched_junction": counts["in_junction"], "skipped_vehicle_class": counts["skipped_vehicle_class"],
               "skipped_persons_and_containers": counts["skipped_persons_and_containers"],
               "unmatched": 0, "vehicles": len(ids)}
    return probes, summary


def read_tls(path: Path, city: City) -> tuple[np.ndarray, dict[str, Any]]:
    """SUMO ``SaveTLSSwitchStates`` XML -> (light changes sorted by time, summary)."""
    _require_sumo(city, "a SUMO light-switch file")
    by_name = {l.name: l for l in city.lights}
    skipped_lights = set(city.source.get("skipped_lights", ()))
    steady_lights = set(city.source.get("steady_lights", ()))
    rows = []
    counts: Counter = Counter()
    unknown: Counter = Counter()
    try:
        for _, el in _iterparse(path, "light-switch output"):
            if el.tag != "tlsState":
                continue
            counts["records"] += 1
            name, state = el.get("id"), el.get("state", "")
            light = by_name.get(name)
            if light is None:
                if name in skipped_lights:
                    counts["skipped_no_car_roads"] += 1
                elif name in steady_lights:
                    counts["skipped_never_switches"] += 1
                else:
                    unknown[name] += 1
                continue
            if len(state) != len(light.links):
                raise SumoError(f"{path} does not fit network {city.source.get('net', city.name)}: light {name} "
                                  f"switched a state of {len(state)} links, the network's has {len(light.links)}")
            rows.append((float(el.get("time")), light.id, int(el.get("phase", 0)) & 0xFF, light.mask_of_state(state)))
            counts["matched"] += 1
    except CityError:
        raise  # already says what is wrong
    except (TypeError, ValueError) as exc:
        raise SumoError(f"{path}: malformed light-switch record: {exc}") from None
    if unknown:
        raise SumoError(f"{path} does not fit network {city.source.get('net', city.name)}: "
                          f"{sum(unknown.values())} switches of lights it does not have "
                          f"(e.g. {', '.join(list(unknown)[:5])})")
    lights = np.array(rows, dtype=LIGHT_DTYPE)
    lights = lights[np.argsort(lights["t"], kind="stable")]
    return lights, {"records": counts["records"], "matched": counts["matched"],
                    "skipped_no_car_roads": counts["skipped_no_car_roads"],
                    "skipped_never_switches": counts["skipped_never_switches"], "unmatched": 0}


def read_queues(path: Path, city: City) -> dict[float, dict[int, list[tuple[str, float]]]]:
    """SUMO ``--queue-output`` -> {time: {road: [(lane, queueing_length m) per kept lane that has
    one]}}.  SUMO writes a lane only while it has a queue, so a road missing at a time has none."""
    out: dict[float, dict[int, list[tuple[str, float]]]] = {}
    kept = {edge: set(lanes) for edge, lanes in city.source.get("sumo_lanes", {}).items()}
    for _, el in _iterparse(path, "queue output"):
        if el.tag != "data":
            continue
        t = float(el.get("timestep"))
        roads: dict[int, list[tuple[str, float]]] = {}
        for lane in el.iter("lane"):
            lane_id = lane.get("id", "")
            edge, _, index = lane_id.rpartition("_")
            road = city.road_id.get(edge)
            if road is not None and (edge not in kept or int(index) in kept[edge]):
                roads.setdefault(road, []).append((lane_id, float(lane.get("queueing_length"))))
        out[t] = roads
        el.clear()
    return out


def read_lane_positions(path: Path, times: set[float]) -> dict[float, dict[str, list[float]]]:
    """SUMO ``--fcd-output`` -> {time: {lane: [vehicle front positions (m from the lane start)]}},
    for the given times only."""
    out: dict[float, dict[str, list[float]]] = {}
    for _, el in _iterparse(path, "FCD output"):
        if el.tag != "timestep":
            continue
        t = round(float(el.get("time")), 2)
        if t in times:
            lanes = out.setdefault(t, {})
            for veh in el.iter("vehicle"):
                lanes.setdefault(veh.get("lane", ""), []).append(float(veh.get("pos", 0.0)))
        el.clear()
    return out


def read_edgedata(path: Path, city: City) -> list[tuple[float, float, int, float, float]]:
    """SUMO ``edgeData`` -> [(begin, end, road, traveltime s, sampledSeconds)] for kept roads with
    traffic in the interval."""
    rows = []
    for _, el in _iterparse(path, "edgeData output"):
        if el.tag != "interval":
            continue
        begin, end = float(el.get("begin")), float(el.get("end"))
        for edge in el.iter("edge"):
            road = city.road_id.get(edge.get("id", ""))
            if road is None or edge.get("traveltime") is None:
                continue
            rows.append((begin, end, road, float(edge.get("traveltime")), float(edge.get("sampledSeconds", 0))))
        el.clear()
    return rows


def read_vehroutes(path: Path) -> list[tuple[str, float, float, list[str]]]:
    """SUMO ``--vehroute-output`` -> [(vehicle, depart, arrival, edges driven)] of vehicles that
    arrived."""
    trips = []
    for _, el in _iterparse(path, "vehroute output"):
        if el.tag == "vehicle" and el.get("arrival") is not None:
            route = el.find("route")
            if route is not None:
                trips.append((el.get("id"), float(el.get("depart")), float(el.get("arrival")),
                              route.get("edges", "").split()))
            el.clear()
    return trips


def read_vtypes(paths: list[Path]) -> dict[str, tuple[float, float]]:
    """{vType id: (length, minGap)} from route files (SUMO's defaults 5 m and 2.5 m where unset)."""
    types = {}
    for path in paths:
        for _, el in _iterparse(path, "route file"):
            if el.tag == "vType":
                types[el.get("id")] = (float(el.get("length", 5.0)), float(el.get("minGap", 2.5)))
    return types
