"""``fcd-validate``: run SUMO scenarios and compare what fcd makes of their data with SUMO's own
measurements.

For each scenario: SUMO (the ``eclipse-sumo`` wheel, the ``sumo`` extra) runs the network with
its demand and writes FCD, light switches (``SaveTLSSwitchStates``), queues (``--queue-output``),
per-interval edge travel times (``edgeData``) and the routes vehicles drove
(``--vehroute-output``).  The FCD and switches become a trace (``fcd.sumo``), are encoded as
datagrams by the generators' code (``fcd.gen.Stream``), aggregated by ``fcd.aggregate.Ingest``
(the code a booster box and the server run) and the reports feed ``fcd.model.Model`` as the
server does.  By default all of it runs in this process, in data time; ``--through processes``
replays through real processes over loopback instead (``fcd-gen`` -> ``boxd`` + ``fcd-booster``
-> ``fcd-server``) and reads every road's reports back from the server's
``/api/roads/<road>/history``.  Either way one function (:func:`predictions_from`) feeds the
reports to the model and predicts at every interval start from the reports whose data all lie
before it (:func:`usable_at`).
Compared with SUMO:

- queue at every light switch, for every road the light controls: our report vs the cars in
  SUMO's queue (per lane, the vehicles within SUMO's queueing length of the lane's end);
  MAE, bias and Pearson r per road class (lanes);
- traverse time per road and ``--interval``: the model's prediction made at the interval's start
  vs SUMO's edge travel time in the interval; the same for free-flow (length / speed limit) and
  persistence (the road's SUMO travel time in the latest earlier interval with traffic); MAPE
  and median APE;
- trips: predicted time of each vehicle's own route (sum of predicted traverse times when it
  departed) and the time of ``fcd-route``'s route between the same junctions, vs the time the
  vehicle took; every road of every route is checked to allow cars.

Scenarios: SUMO's netgenerate grid / spider / random networks with static or actuated lights and
randomTrips demand, and the RESCO city cuts (Cologne 1/3/8, Ingolstadt 1/7/21) with their real
demand from the ``sumo-rl`` package (data files only: ``pip install --no-deps sumo-rl``), as
they are (static lights) and with actuated programs (``<cut>-actuated``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from cliruntime import ConfigError, make_parser, run_sync, non_negative_float
from fcd.city import CAR, City, CityError, from_sumo_net
from fcd.route import RouteError
from fcd.trace import Trace

log = logging.getLogger("fcd.validate")

GENERATED = ("grid-static", "grid-actuated", "spider-static", "spider-actuated", "random-static", "random-actuated")
RESCO = ("cologne1", "cologne3", "cologne8", "ingolstadt1", "ingolstadt7", "ingolstadt21")
# the same city cuts with their lights actuated (SUMO detects traffic and extends greens)
RESCO_ACTUATED = tuple(f"{name}-actuated" for name in RESCO)
ALL_SCENARIOS = GENERATED + RESCO + RESCO_ACTUATED
# networks nothing in fcd was developed or tuned on: sumo-rl's other networks (their own demand),
# for checking that the figures hold beyond the 18 above (--scenarios held-out)
HELD_OUT = ("RESCO/grid4x4/grid4x4.sumocfg", "RESCO/arterial4x4/arterial4x4.sumocfg", "3x3grid/3x3grid.sumocfg",
            "4x4-Lucas/4x4.sumocfg", "single-intersection/single-intersection.sumocfg", "4x4loop/4x4loop.sumocfg",
            "Nguyen/nguyen.sumocfg", "OW/OW-traci.sumocfg")
TARGETS = {"queue_mae": 0.3, "queue_r": 0.95, "traverse_vs_free_flow": 0.7, "traverse_vs_persistence": 0.85}


# ---------------------------------------------------------------- SUMO tools

def sumo_home() -> Path:
    """SUMO_HOME of the eclipse-sumo wheel (or the environment's)."""
    if os.environ.get("SUMO_HOME") and Path(os.environ["SUMO_HOME"], "bin").exists():
        return Path(os.environ["SUMO_HOME"])
    spec = find_spec("sumo")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("SUMO is not installed: pip install 'boosterbox[sumo]' (the eclipse-sumo wheel)")
    return Path(list(spec.submodule_search_locations)[0])


def sumo_binary(name: str) -> str:
    path = sumo_home() / "bin" / name
    if not path.exists():
        raise ConfigError(f"SUMO's {name} is missing under {path.parent}")
    return str(path)


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    log.info("%s: %s", what, " ".join(cmd))
    env = dict(os.environ, SUMO_HOME=str(sumo_home()))
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ConfigError(f"{what} failed (exit {done.returncode}): {' | '.join(tail)}")


def resco_dir() -> Path:
    spec = find_spec("sumo_rl")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the RESCO networks come with sumo-rl: pip install --no-deps sumo-rl")
    path = Path(list(spec.submodule_search_locations)[0]) / "nets" / "RESCO"
    if not path.is_dir():
        raise ConfigError(f"sumo-rl has no RESCO networks at {path}")
    return path


@dataclass
class Scenario:
    name: str
    net: Path
    routes: list[Path]
    begin: float
    end: float
    commands: list[str] = field(default_factory=list)
    additional: list[Path] = field(default_factory=list)
    lights_actuated: bool = False     # SUMO runs actuated_programs() instead of the network's own


def sumocfg_scenario(path: Path, duration: float) -> Scenario:
    """A SUMO configuration's network, demand, additional files and begin time (its paths relative
    to the file, as SUMO reads them), run for ``duration`` seconds from its begin: any scenario a
    user has, validated as the built-in ones are."""
    path = path.resolve()           # SUMO runs in the scenario's work directory
    try:
        cfg = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise ConfigError(f"{path}: not a readable SUMO configuration ({exc})") from None

    def files(option: str) -> list[Path]:
        element = cfg.find(f"input/{option}")
        value = "" if element is None else element.get("value", "")
        return [path.parent / f.strip() for f in value.split(",") if f.strip()]

    nets, routes, additional = files("net-file"), files("route-files"), files("additional-files")
    if len(nets) != 1 or not routes:
        raise ConfigError(f"{path}: needs one <net-file> and at least one <route-files> in <input> "
                          f"(found {len(nets)} and {len(routes)})")
    missing = [str(f) for f in nets + routes + additional if not f.is_file()]
    if missing:
        raise ConfigError(f"{path}: files it names do not exist: {', '.join(missing)}")
    begin_element = cfg.find("time/begin")
    try:
        begin = float(begin_element.get("value", "0")) if begin_element is not None else 0.0
    except ValueError:
        raise ConfigError(f"{path}: <time><begin value=...> is not a number") from None
    return Scenario(scenario_label(str(path)), nets[0], routes, begin, begin + duration, additional=additional)


def scenario_label(name: str) -> str:
    """A built-in scenario's name, or a configuration file's name without ``.sumocfg``."""
    return Path(name).name.removesuffix(".sumocfg") if name.endswith(".sumocfg") else name


# netgenerate's arguments per generated network shape (fcd.train_prior trains on other sizes)
GENERATED_SHAPES = {
    "grid": ["--grid", "--grid.number", "4", "--grid.length", "200", "--default.lanenumber", "2"],
    "spider": ["--spider", "--spider.arm-number", "6", "--spider.circle-number", "4", "--spider.space-radius", "120"],
    "random": ["--rand", "--rand.iterations", "60", "--rand.min-distance", "120", "--rand.max-distance", "250",
               "--default.lanenumber", "1"],
}


def generated_scenario(name: str, work: Path, duration: float, seed: int, lights: str,
                       shape_args: list[str], junctions: str = "traffic_light", period: float = 1.0) -> Scenario:
    """A netgenerate network (``shape_args``; junctions of type ``junctions``, lights of kind
    ``lights``: static or actuated) with randomTrips demand (a trip every ``period`` seconds)
    over ``duration`` seconds, both seeded with ``seed``."""
    work.mkdir(parents=True, exist_ok=True)
    net = work / f"{name}.net.xml"
    cmd = [sumo_binary("netgenerate"), "-o", net.name, "--seed", str(seed),
           "--default-junction-type", junctions, "--tls.default-type", lights, *shape_args]
    _run(cmd, work, "netgenerate")
    routes = work / f"{name}.rou.xml"
    trips = [sys.executable, str(sumo_home() / "tools" / "randomTrips.py"), "-n", net.name,
             "-o", f"{name}.trips.xml", "-r", routes.name, "-b", "0", "-e", str(duration), "-p", str(period),
             "--fringe-factor", "5", "--seed", str(seed), "--min-distance", "300"]
    env_path = dict(os.environ, PATH=f"{Path(sumo_binary('duarouter')).parent}:{os.environ.get('PATH', '')}")
    log.info("randomTrips: %s", " ".join(trips))
    done = subprocess.run(trips, cwd=work, env=dict(env_path, SUMO_HOME=str(sumo_home())),
                          capture_output=True, text=True)
    if done.returncode != 0 or not routes.exists():
        raise ConfigError(f"randomTrips failed: {(done.stderr or done.stdout).strip()[-300:]}")
    return Scenario(name, net, [routes], 0.0, duration, [" ".join(cmd[1:]), "randomTrips.py " + " ".join(trips[2:])])


def build_scenario(name: str, work: Path, duration: float, seed: int) -> Scenario:
    """Network and demand of a scenario in ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    if name in GENERATED:
        shape, lights = name.split("-")
        return generated_scenario(name, work, duration, seed, lights, GENERATED_SHAPES[shape])
    if name in RESCO or name in RESCO_ACTUATED:
        city = name.removesuffix("-actuated")
        sc = sumocfg_scenario(resco_dir() / city / f"{city}.sumocfg", duration)
        sc.name = name
        if name in RESCO_ACTUATED:
            sc.additional.append(actuated_programs(sc.net, work / f"{name}.actuated.add.xml"))
            sc.lights_actuated = True
        return sc
    if name.endswith(".sumocfg"):
        return sumocfg_scenario(Path(name), duration)
    raise ConfigError(f"unknown scenario {name!r} (known: {', '.join(ALL_SCENARIOS)}, or a .sumocfg file)")


def actuated_programs(net: Path, out: Path) -> Path:
    """An additional file giving every light of ``net`` an actuated program (loaded after the
    network's, so SUMO runs it): its green phases may last from 5 s to twice their static
    duration, as SUMO's induction loops (built automatically) see traffic; other phases keep
    their duration."""
    root = ET.Element("additional")
    for tl in ET.parse(net).getroot().iter("tlLogic"):
        prog = ET.SubElement(root, "tlLogic", id=tl.get("id"), type="actuated", programID="fcd-actuated",
                             offset=tl.get("offset", "0"))
        for ph in tl.findall("phase"):
            state, duration = ph.get("state", ""), float(ph.get("duration"))
            attrs = {"duration": f"{duration:g}", "state": state}
            if any(c in "Gg" for c in state) and not any(c in "yY" for c in state):
                attrs.update(minDur=f"{min(5.0, duration):g}", maxDur=f"{2 * duration:g}")
            ET.SubElement(prog, "phase", attrs)
    ET.ElementTree(root).write(out)
    return out


def run_sumo(sc: Scenario, work: Path, interval: float, seed: int) -> dict[str, Path]:
    """SUMO with every output the validation needs; returns their paths."""
    tls_ids = [tl.get("id") for tl in ET.parse(sc.net).getroot().iter("tlLogic")]
    out = {k: work / f"{sc.name}.{k}.xml" for k in ("fcd", "tls", "queue", "edges", "vehroutes")}
    add = work / f"{sc.name}.outputs.add.xml"
    events = "".join(f'<timedEvent type="SaveTLSSwitchStates" source="{i}" dest="{out["tls"].name}"/>'
                     for i in dict.fromkeys(tls_ids))
    add.write_text(f'<additional><edgeData id="fcdv" period="{interval}" begin="{sc.begin}" '
                   f'file="{out["edges"].name}" excludeEmpty="true"/>{events}</additional>')
    if not tls_ids:
        out["tls"].write_text("<tlsStates/>")
    cmd = [sumo_binary("sumo"), "-n", str(sc.net), "-r", ",".join(str(r) for r in sc.routes),
           "-a", ",".join(str(a) for a in [add, *sc.additional]), "--begin", str(sc.begin), "--end", str(sc.end),
           "--fcd-output", out["fcd"].name, "--queue-output", out["queue"].name,
           "--vehroute-output", out["vehroutes"].name, "--seed", str(seed), "--no-step-log", "--no-warnings",
           "--ignore-route-errors", "--time-to-teleport", "300"]
    _run(cmd, work, "sumo")
    sc.commands.append("sumo " + " ".join(cmd[1:]))
    return out


# ---------------------------------------------------------------- replay through fcd

@dataclass
class Replay:
    reports: list[Any]
    predictions: dict[float, np.ndarray]          # interval start -> predicted traverse time per road
    stats: dict[str, Any]
    present: dict[float, np.ndarray] | None = None   # interval start -> (cars, queue, speed) x road, if known
    stages: dict[float, dict[str, np.ndarray]] | None = None   # interval start -> the model's stages (Model.stages)


def predict_traverse(model, now: float) -> np.ndarray:
    """What the server publishes for "now" (T_0 of ``fcd.traverse``)."""
    return model.predict(1, now=now).traverse[0]


def usable_at(city: City, report: Any, boundary: float) -> bool:
    """Whether ``report`` holds only data from before ``boundary`` (so a prediction made at the
    boundary may use it).  By the aggregation's contract (``fcd.aggregate``): a periodic report
    of a road without a light, stamped t, holds the probes before t and none at or after it
    (the batch is split where it falls due); a light-controlled road's report is made when its
    light switches at t, after the probes of that instant (a stream sends probes before lights at
    equal times), so it holds probes up to and including t."""
    if city.exit_light[report.road] < 0:
        return report.t <= boundary
    return report.t < boundary


def predictions_from(city: City, reports: list[Any], boundaries: list[float],
                     window: float | None = None, present: dict[float, np.ndarray] | None = None,
                     model=None, stages: dict | None = None) -> dict[float, np.ndarray]:
    """The model fed the reports in data-time order (then by road); at every boundary its
    prediction from the reports whose data all lie before it (:func:`usable_at`: no probe at or
    after the boundary is seen, no leakage) and, where ``present`` has it, the state of every
    road at the boundary (``Model.present``; from the probes before it): its queue, or rows of
    cars, queue and moving speed.  Both replays score
    their reports with this one function.  ``model``: a fresh Model of ``city`` to use (default:
    ``Model(city)``; fcd.train_prior passes one that logs its scored windows).  ``stages``: a
    dict filled with what each stage of the model gave at every boundary (``Model.stages``: the
    level, with the light delay, corrected), for :func:`compare_traverse`'s decomposition."""
    from fcd.model import Model
    model = Model(city) if model is None else model
    model.window = window
    # reports in the order they become usable: at equal times a periodic report (data before t)
    # before a light's (data up to t)
    ordered = sorted(reports, key=lambda rep: (rep.t, bool(city.exit_light[rep.road] >= 0), rep.road))
    predictions: dict[float, np.ndarray] = {}
    fed = 0
    for boundary in sorted(boundaries):
        while fed < len(ordered) and usable_at(city, ordered[fed], boundary):
            model.observe(ordered[fed])
            fed += 1
        if present is not None and boundary in present:
            state = np.asarray(present[boundary])
            if state.ndim == 2:     # cars, queue, moving speed per road
                model.present(boundary, state[1], cars=state[0], speed=state[2])
            else:                   # the queue alone
                model.present(boundary, state)
        predictions[boundary] = predict_traverse(model, boundary)
        if stages is not None:
            stages[boundary] = dict(model.stages)
    return predictions


def replay(trace: Trace, boundaries: list[float], batch: int = 2048, window: float | None = None,
           present: bool = True, correction_prior: bool = True) -> Replay:
    """In this process: trace -> datagrams (generators' encoding) -> Ingest (box / server
    aggregation) in ``batch``-datagram batches -> reports -> model predictions.  Batches are cut
    at every boundary; with ``present``, the aggregator's cars, queue and moving speed on every
    road there (from the probes before the boundary, ``Aggregator.road_states``) are given to
    the model too.  Without ``correction_prior`` the model's online correction starts from no
    correction instead of the packaged offline prior (``fcd.train_prior``)."""
    from fcd.aggregate import Ingest
    from fcd.gen import Stream
    city = trace.city
    stream = Stream(trace, None, 1)
    ingest = Ingest(city)
    reports: list[Any] = []
    cuts = np.searchsorted(stream.t, sorted(boundaries), side="left")
    edges = sorted(set(range(0, len(stream), batch)) | {int(c) for c in cuts} | {len(stream)})
    cut_at: dict[int, list[float]] = {}
    for cut, boundary in zip(cuts.tolist(), sorted(boundaries)):
        cut_at.setdefault(cut, []).append(boundary)
    queues: dict[float, np.ndarray] = {}

    def state_at(cut: int) -> None:
        for boundary in cut_at.get(cut, []) if present else []:
            # cars, queue and moving speed (-1: none moved) on every road, one row each
            queues[boundary] = np.stack(ingest.aggregator.road_states(boundary)).astype(float)

    seq = 0
    for start, stop in zip(edges, edges[1:]):
        state_at(start)
        datagrams = stream.encode(start, stop, 1, seq, 0)
        seq += len(datagrams)
        reports.extend(ingest.ingest(datagrams))
    state_at(len(stream))
    stats = {"path": "in-process", "ingest": dict(ingest.stats), "aggregator": dict(ingest.aggregator.stats),
             "lost": ingest.seq.snapshot()["lost"],
             "present_state": "the aggregator's queues at every boundary" if present else "none"}
    known = queues if present else None
    from fcd.model import Model
    model = None if correction_prior else Model(city, correction_prior=None)
    stats["correction_prior"] = "packaged" if correction_prior else "none"
    stages: dict = {}
    predictions = predictions_from(city, reports, boundaries, window, known, model=model, stages=stages)
    return Replay(reports, predictions, stats, known, stages)


HISTORY_DEPTH = 100_000    # reports kept per road by the validation's server: all of a run


def replay_processes(trace: Trace, boundaries: list[float], workdir: Path, window: float | None = None,
                     speed: float = 20.0) -> Replay:
    """Through real processes over loopback: the trace saved, ``fcd-gen`` sends it at ``speed``x
    to a box (``boxd --engine user`` + ``fcd-booster``) in front of ``fcd-server``; once the
    server has every datagram the box took, every road's reports are read back over HTTP
    (``/api/roads/<road>/history``, what ``fcd.history`` returns over XML-RPC) and scored like
    the in-process replay's.  The aggregation runs in data time, so the speed changes nothing
    but the wall time."""
    import asyncio
    return asyncio.run(_replay_processes(trace, sorted(boundaries), Path(workdir), window, speed))


async def _replay_processes(trace: Trace, boundaries: list[float], workdir: Path, window: float | None,
                            speed: float) -> Replay:
    import asyncio
    import tempfile
    from fcd.aggregate import RoadReport
    from fcd.demo import settled
    from fcd.stack import Stack, free_port, run_gen_async
    workdir.mkdir(parents=True, exist_ok=True)
    trace_path = workdir / "trace.npz"
    trace.save(trace_path)
    city = Trace.load(trace_path).city          # the city as the processes see it
    udp, http, box_port = free_port(2), free_port(), free_port(2)
    stack = Stack(workdir / "roles")
    sockets = Path(tempfile.mkdtemp(prefix="fcdv-"))    # boxd's control socket: AF_UNIX paths are short
    try:
        server = stack.server(trace_path, udp, http, None, ["--history", str(HISTORY_DEPTH)])
        await stack.wait_ready(server, timeout=120)
        await stack.box("box1", trace_path, box_port, udp, http, control=sockets / "box1.sock")
        gen = await run_gen_async(trace_path, [("127.0.0.1", box_port)], ["--speed", f"{speed:g}"])
        status = await settled(http, gen["sent"], timeout=120)

        def history(road: int) -> list[dict]:
            import urllib.request
            url = f"http://127.0.0.1:{http}/api/roads/{road}/history?limit={HISTORY_DEPTH}"
            with urllib.request.urlopen(url, timeout=30) as resp:
                return json.loads(resp.read())["reports"]

        reports = []
        for road in range(city.n_roads):
            for data in await asyncio.to_thread(history, road):
                data.pop("source", None)
                reports.append(RoadReport.from_xmlrpc(data, city.n_roads))
    finally:
        await stack.stop_all()
        shutil.rmtree(sockets, ignore_errors=True)
    box = status["boxes"].get("box1", {})
    stats = {"path": "processes", "speed": speed, "generator": gen, "box_datagrams": box.get("received", 0),
             "server_raw_datagrams": status["udp"]["received"], "reports_box": status["counters"].get("reports_box", 0),
             "server_model_runs": status["model"]["runs"], "history": status.get("history", {}),
             "lost": gen["sent"] - box.get("received", 0) - status["udp"]["received"],
             "present_state": "none (a box sends reports, not the state between them)"}
    stages: dict = {}
    return Replay(reports, predictions_from(city, reports, boundaries, window, stages=stages), stats, stages=stages)


# ---------------------------------------------------------------- comparisons

def _errors(ours: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    n = len(ours)
    if n == 0:
        return {"n": 0}
    diff = ours - truth
    r = float(np.corrcoef(ours, truth)[0, 1]) if n > 2 and ours.std() > 0 and truth.std() > 0 else float("nan")
    return {"n": n, "mae": float(np.abs(diff).mean()), "bias": float(diff.mean()), "r": r,
            "truth_mean": float(truth.mean())}


def road_class(city: City, road: int) -> str:
    lanes = int(city.lanes[road])
    return f"{lanes} lane" + ("s" if lanes > 1 else "") if lanes < 3 else "3+ lanes"


def compare_queues(city: City, reports: list[Any], queues: dict[float, dict[int, list[tuple[str, float]]]],
                   positions: dict[float, dict[str, list[float]]], car_space: float) -> dict[str, Any]:
    """Our queue at every switch vs the cars in SUMO's queue: per lane, the vehicles whose front
    is within SUMO's queueing length of the lane's end (SUMO measures from the end to the back of
    the last halted vehicle, so every vehicle in front of it counts, and none behind).  Also
    (``by_length``) SUMO's queueing length divided by the space a stopped car takes
    (``car_space`` = vehicle length + minGap), which overcounts where cars stopped apart."""
    ours, truth, by_length, classes = [], [], [], []
    for rep in reports:
        if city.exit_light[rep.road] < 0:
            continue              # periodic reports of roads without a light
        t = round(rep.t, 2)
        cars = 0
        spaced = 0
        for lane, length in queues.get(t, {}).get(rep.road, []):
            if length > 0:
                cars += sum(1 for pos in positions.get(t, {}).get(lane, ())
                            if city.length[rep.road] - pos < length)
                spaced += round(length / car_space)
        ours.append(rep.queue)
        truth.append(cars)
        by_length.append(spaced)
        classes.append(road_class(city, rep.road))
    ours_a, truth_a, cls = np.array(ours, float), np.array(truth, float), np.array(classes)
    out = {"all": _errors(ours_a, truth_a)}
    for c in sorted(set(classes)):
        out[c] = _errors(ours_a[cls == c], truth_a[cls == c])
    out["by_length"] = _errors(ours_a, np.array(by_length, float))
    out["_points"] = (ours_a, truth_a)
    return out


def _ape(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    ape = np.abs(pred - truth) / truth
    return {"mape": float(ape.mean()), "median_ape": float(np.median(ape))} if len(ape) else {}


def map_matching(city: City, probes: np.ndarray) -> dict[str, Any]:
    """Located road (or junction) of every probe vs the lane SUMO had the vehicle on."""
    from fcd.aggregate import IN_JUNCTION, MapMatcher
    road, *_ = MapMatcher(city).locate(probes["x"], probes["y"], probes["heading"])
    truth = probes["road"]
    on_road, in_junction = truth >= 0, truth < 0
    return {"probes": int(len(probes)),
            "on_road_correct": float(np.mean(road[on_road] == truth[on_road])) if on_road.any() else None,
            "on_road_in_junction": float(np.mean(road[on_road] == IN_JUNCTION)) if on_road.any() else None,
            "on_road_unmatched": float(np.mean(road[on_road] == -1)) if on_road.any() else None,
            "in_junction_correct": float(np.mean(road[in_junction] == IN_JUNCTION)) if in_junction.any() else None}


CONGESTION = (("free", 0.0, 1.5), ("slowed", 1.5, 5.0), ("jammed", 5.0, math.inf))   # SUMO time / free flow


def mape_optimal_constant(values) -> float:
    """The one constant c that minimises mean(|c - y| / y) over ``values`` (all > 0): their
    1/y-weighted median (the smallest value where the 1/y weights reach half their sum)."""
    y = np.sort(np.asarray(values, dtype=float))
    weight = np.cumsum(1.0 / y)
    return float(y[np.searchsorted(weight, weight[-1] / 2)])


def hindsight_constant(roads: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per road, the one constant that minimises its MAPE over the whole run (the 1/y-weighted
    median of its measured times): knows the future and is fitted on the very intervals it is
    judged on (in sample: about 13 per road in 15 minutes), so a reference, never a prediction."""
    out = np.empty_like(truth)
    for road in np.unique(roads):
        k = np.flatnonzero(roads == road)
        out[k] = mape_optimal_constant(truth[k])
    return out


def online_constant(edges: list[tuple], free: np.ndarray, rows: list[tuple[float, int]]) -> np.ndarray:
    """For each (interval start, road) of ``rows``: the MAPE-optimal constant of the road's SUMO
    times in the intervals before it (every earlier interval with traffic, the warm-up's too) and
    its free-flow time (one pseudo-observation, as the model's level has; alone before any):
    the best a per-road constant learned online could do with SUMO's own times as observations.
    A reference computed from SUMO's truth after the run, never fed to the model."""
    past: dict[int, list[tuple[float, float]]] = {}
    for begin, _, road, travel, _ in edges:
        if travel > 0:
            past.setdefault(road, []).append((begin, travel))
    return np.array([mape_optimal_constant([free[road]] + [y for b, y in past.get(road, []) if b < begin])
                     for begin, road in rows])


def compare_traverse(city: City, edges: list[tuple], predictions: dict[float, np.ndarray],
                     warmup: float, stages: dict[float, dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Traverse-time errors of the model, free flow and persistence against SUMO's edge times, by
    road class and congestion; the per-road constant references (in hindsight, online); and, with
    ``stages`` (predictions_from's), each stage of the model's ratio to free flow's MAPE per class
    (``stages``: where the model gains or loses)."""
    free = city.length / city.speed
    last: dict[int, float] = {}
    rows = []     # (model, free, persistence, truth, lit, road)
    keys = []     # (interval start, road) of each row
    for begin, end, road, travel, sampled in sorted(edges):
        if begin >= warmup and begin in predictions and travel > 0:
            rows.append((predictions[begin][road], free[road], last.get(road, free[road]), travel,
                         city.exit_light[road] >= 0, road))
            keys.append((begin, road))
        last[road] = travel
    if not rows:
        return {"n": 0}
    a = np.array(rows, dtype=float)
    total_ape = float((np.abs(a[:, 0] - a[:, 3]) / a[:, 3]).sum())
    congestion = a[:, 3] / a[:, 1]
    subsets = [("all", np.ones(len(a), bool)), ("light-controlled", a[:, 4] > 0), ("other", a[:, 4] == 0)]
    subsets += [(f"congestion {name} (SUMO time / free flow {lo:g}-{hi:g})", (congestion >= lo) & (congestion < hi))
                for name, lo, hi in CONGESTION]
    out: dict[str, Any] = {"n": len(a)}
    for subset, mask in subsets:
        if not mask.any():
            continue
        b = a[mask]
        res = {"n": int(mask.sum()), "model": _ape(b[:, 0], b[:, 3]), "free_flow": _ape(b[:, 1], b[:, 3]),
               "persistence": _ape(b[:, 2], b[:, 3]),
               "share_of_model_error": float((np.abs(b[:, 0] - b[:, 3]) / b[:, 3]).sum() / total_ape)}
        res["model_vs_free_flow"] = res["model"]["mape"] / res["free_flow"]["mape"]
        res["model_vs_persistence"] = res["model"]["mape"] / res["persistence"]["mape"]
        out[subset] = res
    def against_free_flow(values: np.ndarray) -> dict[str, Any]:
        errors = _ape(values, a[:, 3])
        return {**errors, "vs_free_flow": errors["mape"] / out["all"]["free_flow"]["mape"]}

    reference = hindsight_constant(a[:, 5].astype(np.int64), a[:, 3])
    out["hindsight_constant_per_road"] = against_free_flow(reference)
    learned = online_constant(edges, free, keys)
    out["online_constant_per_road"] = against_free_flow(learned)
    if stages:
        names = list(next(iter(stages.values())))
        values = {name: np.array([stages[b][name][r] for b, r in keys]) for name in names}
        values["online_constant"] = learned
        values["hindsight_constant"] = reference
        out["stages"] = {}
        for subset, mask in subsets[:3]:
            if mask.any():
                ff = out[subset]["free_flow"]["mape"]
                out["stages"][subset] = {name: _ape(v[mask], a[mask, 3])["mape"] / ff for name, v in values.items()}
    return out


def compare_routes(city: City, trips: list[tuple], predictions: dict[float, np.ndarray], warmup: float,
                   limit: int = 300) -> dict[str, Any]:
    from fcd.route import shortest_route
    starts = sorted(predictions)
    free = city.length / city.speed
    own, own_free, routed, actual = [], [], [], []
    forbidden = unknown = 0
    for vid, depart, arrival, edges in sorted(trips, key=lambda x: x[1]):
        if depart < warmup or len(own) >= limit:
            continue
        roads = [city.road_id.get(e) for e in edges]
        if any(r is None for r in roads) or arrival <= depart:
            unknown += 1
            continue
        pred = predictions[starts[max(0, int(np.searchsorted(starts, depart, side="right")) - 1)]]
        own.append(float(pred[roads].sum()))
        own_free.append(float(free[roads].sum()))
        src, dst = city.roads[roads[0]][0], city.roads[roads[-1]][1]
        times = {r: float(pred[r]) for r in range(city.n_roads)}
        route = shortest_route(city, times, src, dst)
        forbidden += sum(1 for r in route.roads if not city.allows(r, CAR))
        # fcd-route plans between junctions; the trip covers its first and last road too
        routed.append(route.seconds)
        actual.append(arrival - depart)
    if not actual:
        return {"n": 0, "trips_on_skipped_roads": unknown}
    act = np.array(actual)
    return {"n": len(act), "trips_on_skipped_roads": unknown, "routes_using_roads_cars_may_not_use": forbidden,
            "own_route_model": _ape(np.array(own), act), "own_route_free_flow": _ape(np.array(own_free), act),
            "fcd_route_model": _ape(np.array(routed), act),
            "fcd_route_faster_share": float(np.mean(np.array(routed) < np.array(own) - 1e-6))}


# ---------------------------------------------------------------- one scenario

def validate_scenario(name: str, work: Path, duration: float, interval: float, seed: int,
                      warmup: float, through: str = "in-process", speed: float = 20.0,
                      present: bool = True, correction_prior: bool = True) -> dict[str, Any]:
    from fcd.sumo import (read_edgedata, read_fcd, read_lane_positions, read_queues, read_tls, read_vehroutes,
                          read_vtypes)
    started = time.monotonic()
    sc = build_scenario(name, work, duration, seed)
    outputs = run_sumo(sc, work, interval, seed)
    t_sumo = time.monotonic() - started
    city = from_sumo_net(sc.net)
    if sc.lights_actuated:        # the actuated programs SUMO ran instead of the network's own
        for light in city.lights:
            light.kind = "actuated"
        city.source["import"]["light_kinds"] = {"actuated": len(city.lights)}
    probes, fcd_summary = read_fcd(outputs["fcd"], city)
    lights, tls_summary = read_tls(outputs["tls"], city)
    trace = Trace(city, probes, lights, meta={"source": "sumo", "scenario": sc.name})
    boundaries = list(np.arange(sc.begin, sc.end, interval))
    if through == "processes":
        rep = replay_processes(trace, boundaries, work / "processes", window=interval, speed=speed)
    else:
        rep = replay(trace, boundaries, window=interval, present=present, correction_prior=correction_prior)
    switch_times = {round(float(t), 2) for t in lights["t"]}
    vtypes = read_vtypes(sc.routes)
    car_length, min_gap = next(iter(vtypes.values())) if len(vtypes) == 1 else (5.0, 2.5)
    queues = compare_queues(city, rep.reports, read_queues(outputs["queue"], city),
                            read_lane_positions(outputs["fcd"], switch_times), car_length + min_gap)
    matching = map_matching(city, probes)
    traverse = compare_traverse(city, read_edgedata(outputs["edges"], city), rep.predictions, sc.begin + warmup,
                                rep.stages)
    routes = compare_routes(city, read_vehroutes(outputs["vehroutes"]), rep.predictions, sc.begin + warmup)
    points = queues.pop("_points")
    lit = sorted({r for l in city.lights for r in l.roads})
    switches = len(lights)
    result = {
        "scenario": sc.name, "network": city.source["import"], "dead_end_roads": len(city.dead_ends()),
        "light_kinds": city.source["import"]["light_kinds"], "fcd": fcd_summary, "tls": tls_summary,
        "replay": rep.stats, "vehicle_length_gap": [car_length, min_gap],
        "reports": len(rep.reports), "light_switches": switches, "lit_roads": len(lit),
        "reports_per_switch_roads": (sum(1 for r in rep.reports if city.exit_light[r.road] >= 0)
                                     / max(1, sum(len(city.lights[int(l)].roads) for l in lights["light"]))),
        "map_matching": matching, "queue": queues, "traverse": traverse, "routes": routes,
        "commands": sc.commands, "sumo_seconds": round(t_sumo, 1),
        "seconds": round(time.monotonic() - started, 1),
    }
    result["targets"] = check_targets(result)
    result["_queue_points"] = points
    return result


def check_targets(res: dict[str, Any]) -> dict[str, bool | None]:
    """Each target met (True) or not (False); None where it does not apply (the queue and
    switch targets on a network whose lights never switched, or that has none)."""
    q = res["queue"].get("all", {})
    t = res["traverse"].get("all", {})
    lights = res["light_switches"] > 0
    return {
        "queue_mae": (bool(q.get("n")) and q["mae"] <= TARGETS["queue_mae"]) if lights else None,
        "queue_r": (bool(q.get("n")) and q["r"] >= TARGETS["queue_r"]) if lights else None,
        "traverse_vs_free_flow": bool(t) and t["model_vs_free_flow"] <= TARGETS["traverse_vs_free_flow"],
        "traverse_vs_persistence": bool(t) and t["model_vs_persistence"] <= TARGETS["traverse_vs_persistence"],
        "routes_car_roads_only": res["routes"].get("routes_using_roads_cars_may_not_use", 0) == 0,
        "every_controlled_road_reported_at_every_switch":
            abs(res["reports_per_switch_roads"] - 1.0) < 1e-9 if lights else None,
    }


def all_met(targets: dict[str, bool | None]) -> bool:
    return all(met is not False for met in targets.values())


# ---------------------------------------------------------------- plots

def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(results)
    fig, axes = plt.subplots(2, max(n, 1), figsize=(3.2 * max(n, 1), 6.4), squeeze=False)
    for i, res in enumerate(results):
        ours, truth = res["_queue_points"]
        ax = axes[0][i]
        ax.scatter(truth, ours + np.random.default_rng(0).uniform(-0.15, 0.15, len(ours)), s=3, alpha=0.3)
        top = max(1.0, float(max(truth.max(initial=0), ours.max(initial=0))))
        ax.plot([0, top], [0, top], "k--", lw=0.8)
        q = res["queue"].get("all", {})
        ax.set_title(f"{res['scenario']}\nqueue MAE {q.get('mae', float('nan')):.2f} r {q.get('r', float('nan')):.3f}",
                     fontsize=8)
        ax.set_xlabel("SUMO queue (cars)", fontsize=7)
        ax.set_ylabel("fcd report (cars)", fontsize=7)
        ax = axes[1][i]
        t = res["traverse"].get("all")
        if t:
            names = ["model", "free_flow", "persistence"]
            ax.bar(range(3), [t[k]["mape"] * 100 for k in names], color=["C2", "C0", "C1"])
            ax.set_xticks(range(3), ["model", "free-flow", "persist."], fontsize=7)
            ax.set_title(f"traverse MAPE (%)\nx{t['model_vs_free_flow']:.2f} ff, x{t['model_vs_persistence']:.2f} pers.",
                         fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- CLI

def _expand(name: str) -> list[str]:
    if name == "all":
        return list(ALL_SCENARIOS)
    if name == "held-out":
        nets = resco_dir().parent
        return [str(nets / cfg) for cfg in HELD_OUT]
    return [name]


def _scenarios(text: str) -> list[str]:
    import argparse
    try:
        names = list(dict.fromkeys(n for s in text.split(",") if s.strip() for n in _expand(s.strip())))
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    for s in names:
        if s.endswith(".sumocfg"):
            if not Path(s).is_file():
                raise argparse.ArgumentTypeError(f"no SUMO configuration at {s}")
        elif s not in ALL_SCENARIOS:
            raise argparse.ArgumentTypeError(f"unknown scenario {s!r} (known: {', '.join(ALL_SCENARIOS)}, all, "
                                             "held-out, or a .sumocfg file)")
    return [str(Path(s).resolve()) if s.endswith(".sumocfg") else s for s in names]


def build_parser():
    p = make_parser("fcd-validate", "Run SUMO scenarios and compare fcd's queues, traverse times and routes "
                    "with SUMO's measurements.", examples=[
        "fcd-validate --scenarios grid-static --duration 600 --json out/v.json --plot out/v.png",
        "fcd-validate --scenarios all --json out/fcd-validate.json --plot out/fcd-validate.png",
        "fcd-validate --scenarios grid-static --duration 300 --through processes --json out/v-processes.json",
        "fcd-validate --scenarios mycity/mycity.sumocfg --duration 900 --json out/mycity.json",
    ])
    add_arguments(p)
    return p


def add_arguments(p) -> None:
    p.add_argument("--scenarios", type=_scenarios, default=list(ALL_SCENARIOS),
                   help=f"comma list of {', '.join(ALL_SCENARIOS)}, all (those), held-out (8 sumo-rl networks "
                        "nothing was tuned on); and paths to your own SUMO configurations (.sumocfg: its net-file, "
                        "route-files, additional-files and begin)")
    p.add_argument("--duration", type=non_negative_float, default=900.0, help="simulated seconds per scenario")
    p.add_argument("--interval", type=non_negative_float, default=60.0,
                   help="seconds per traverse-time interval (SUMO edgeData period, model predictions)")
    p.add_argument("--warmup", type=non_negative_float, default=120.0, help="seconds before comparisons start")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--through", choices=("in-process", "processes"), default="in-process",
                   help="replay in this process, or through real processes over loopback (fcd-gen -> boxd + "
                        "fcd-booster -> fcd-server, reports read back from /api/roads/<road>/history)")
    p.add_argument("--speed", type=non_negative_float, default=20.0,
                   help="replay speed-up of fcd-gen with --through processes")
    p.add_argument("--no-present-state", dest="present", action="store_false",
                   help="in process, predict from the reports only, without the aggregator's queue on every "
                        "road at the interval's start (what --through processes sees: a box sends no state)")
    p.add_argument("--no-correction-prior", dest="correction_prior", action="store_false",
                   help="in process, start the model's online correction from no correction instead of the "
                        "packaged offline prior (fcd/data/correction_prior.json, python -m fcd.train_prior)")
    p.add_argument("--work", type=Path, default=None, help="directory for SUMO files (default: a temporary one)")
    p.add_argument("--json", type=Path, help="write the results as JSON")
    p.add_argument("--plot", type=Path, help="write a PNG plot")


def run_validation(args) -> list[dict[str, Any]]:
    import tempfile
    # absolute: SUMO and its tools run inside each scenario's directory
    work = (args.work or Path(tempfile.mkdtemp(prefix="fcd-validate-"))).resolve()
    results = []
    try:
        for name in args.scenarios:
            res = validate_scenario(name, work / scenario_label(name), args.duration, args.interval, args.seed, args.warmup,
                                    args.through, args.speed, args.present, args.correction_prior)
            results.append(res)
            print(summary_line(res), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"targets": TARGETS, "duration": args.duration, "interval": args.interval,
                                         "warmup": args.warmup, "seed": args.seed, "command": " ".join(sys.argv),
                                         "scenarios": [{k: v for k, v in r.items() if not k.startswith("_")}
                                                       for r in results]}, indent=1, default=_json))
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(results, args.plot)
    return results


def _json(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if math.isnan(value) else float(value)
    raise TypeError(type(value).__name__)


def summary_line(res: dict[str, Any]) -> str:
    q = res["queue"].get("all", {})
    t = res["traverse"].get("all", {})
    r = res["routes"]
    ok = all_met(res["targets"])
    not_applicable = [k for k, v in res["targets"].items() if v is None]
    traverse = (f"traverse MAPE model {t['model']['mape']:.3f} free-flow {t['free_flow']['mape']:.3f} "
                f"persistence {t['persistence']['mape']:.3f} (x{t['model_vs_free_flow']:.2f} free flow, "
                f"x{t['model_vs_persistence']:.2f} persistence; hindsight constant per road "
                f"x{res['traverse']['hindsight_constant_per_road']['vs_free_flow']:.2f}, learned online from SUMO's "
                f"times x{res['traverse']['online_constant_per_road']['vs_free_flow']:.2f})" if t else "no traverse data")
    route = (f"own-route MAPE {r['own_route_model']['mape']:.3f} (free-flow {r['own_route_free_flow']['mape']:.3f})"
             if r.get("n") else "no trips")
    m = res["map_matching"]
    return (f"{res['scenario']}: map matching {m['on_road_correct']:.4f} of road probes right, "
            f"{m['in_junction_correct'] or 0:.4f} of junction probes in the junction; queue MAE {q.get('mae', float('nan')):.3f} bias {q.get('bias', float('nan')):+.3f} "
            f"r {q.get('r', float('nan')):.3f} (n={q.get('n', 0)}); {traverse}; {route}; "
            f"targets {'met' if ok else 'NOT met: ' + ', '.join(k for k, v in res['targets'].items() if v is False)}"
            + (f" (no light switched: {', '.join(not_applicable)} do not apply)" if not_applicable else ""))


def run(args, stats) -> int:
    results = run_validation(args)
    stats["scenarios"] = len(results)
    stats["targets_met"] = sum(all_met(r["targets"]) for r in results)
    return 0


def main(argv=None) -> int:
    return run_sync(build_parser(), run, argv, config_errors=(CityError, RouteError))


if __name__ == "__main__":
    raise SystemExit(main())
