"""Fit the online correction's prior offline (``python -m fcd.train_prior``).

The model's online correction (``Model._score_correction``) is a ridge regression per class of
road (without / with a light) of log(travel taken / prediction) on what was known at the
prediction's moment.  Online it starts from this prior instead of from "no correction": the
prior is its estimate before enough windows are scored, and what the online fit shrinks toward.

The prior is fitted here on SUMO scenarios made by SUMO's own tools (netgenerate grid, spider
and random networks, static and actuated lights, some with priority junctions and lights only
where netgenerate guesses them; randomTrips demand at several rates) that are NOT fcd-validate's
scenarios: other sizes, other seeds (TRAINING_SEED_BASE + i, never the validation's default
seed 1), and never the RESCO city cuts.  Each is run through the same replay as fcd-validate
(in process, with the present state), the model logs every window it scores, and the windows of
all scenarios are fitted at once (weighted like the online fit, without fading).  Deterministic:
SUMO, netgenerate and randomTrips are seeded and the replay runs in data time.

Writes fcd/data/correction_prior.json (package data): per class the coefficients, the weighted
mean of x x^T over the training windows (so the online fit can weigh the prior as a number of
windows), the power of the correction and how it was made.  The power is chosen against SUMO's
own edge travel times (what fcd-validate measures), each training scenario predicted with a
prior fitted on the others (``choose_power``), and held online for the whole run: the online
record, scored on the probes' travel times, preferred higher powers than SUMO's times favour.
With it, the light-delay factor's starting exponent (``light_delay``: used online until the
factor's own record has scored Model.DELAY_SKILL_MIN windows), chosen together with the power:
the exponent whose windows and held-out power give the least held-out ratio (``choose_exponents``).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cliruntime import ConfigError, make_parser, run_sync
from fcd.model import CLASSES, PRIOR_FILE, CorrectionPrior, Model

log = logging.getLogger("fcd.train_prior")

TRAINING_SEED_BASE = 100
WARMUP = 120.0     # seconds before SUMO's edge times are compared (fcd-validate's default)
POWER_TIE = 0.001   # mean ratios to free flow within this of the least are a tie (choose_power)
# the classes a prior is shipped for: on fcd-validate's 18 scenarios an unlit-road prior from these
# networks made the small city cuts worse (Ingolstadt 1 actuated 0.673 -> 0.736 x free flow's MAPE;
# docs/fcd.md), so unlit roads start from no correction as before
PRIOR_CLASSES = ("lit",)
# (name, lights, junction type, netgenerate shape arguments, seconds between trips): sizes unlike
# fcd-validate's (grid 4x200 m, spider 6 arms x 4 circles, random 60 iterations, all lit)
TRAINING = [
    ("train-grid3", "static", "traffic_light",
     ["--grid", "--grid.number", "3", "--grid.length", "250", "--default.lanenumber", "1"], 1.0),
    ("train-grid5", "actuated", "traffic_light",
     ["--grid", "--grid.number", "5", "--grid.length", "150", "--default.lanenumber", "2"], 0.6),
    ("train-spider5", "static", "traffic_light",
     ["--spider", "--spider.arm-number", "5", "--spider.circle-number", "3", "--spider.space-radius", "150"], 0.8),
    ("train-spider7", "actuated", "traffic_light",
     ["--spider", "--spider.arm-number", "7", "--spider.circle-number", "5", "--spider.space-radius", "100"], 1.0),
    ("train-random40", "static", "priority",
     ["--rand", "--rand.iterations", "40", "--rand.min-distance", "100", "--rand.max-distance", "200",
      "--default.lanenumber", "2", "--tls.guess"], 0.7),
    ("train-random80", "actuated", "priority",
     ["--rand", "--rand.iterations", "80", "--rand.min-distance", "150", "--rand.max-distance", "300",
      "--default.lanenumber", "1", "--tls.guess"], 1.0),
    ("train-random50-lit", "static", "traffic_light",
     ["--rand", "--rand.iterations", "50", "--rand.min-distance", "150", "--rand.max-distance", "250",
      "--default.lanenumber", "1"], 1.2),
    ("train-grid4-priority", "actuated", "priority",
     ["--grid", "--grid.number", "4", "--grid.length", "180", "--default.lanenumber", "1", "--tls.guess"], 0.8),
]


@dataclass
class TrainingRun:
    """One training scenario replayed: what fcd-validate's predictions_from and compare_traverse
    need to score a model on it against SUMO's edge travel times."""
    name: str
    city: object
    reports: list
    present: dict
    boundaries: list[float]
    edges: list
    warmup: float
    window: float


def replayed(name: str, lights: str, junctions: str, shape: list[str], period: float, seed: int,
             work: Path, duration: float, interval: float) -> tuple[list[str], TrainingRun]:
    """Run one training scenario through fcd-validate's replay: the commands that made it and the
    run (what predictions_from and compare_traverse need)."""
    from fcd.city import from_sumo_net
    from fcd.sumo import read_edgedata, read_fcd, read_tls
    from fcd.trace import Trace
    from fcd.validate import generated_scenario, predictions_from, replay, run_sumo
    sc = generated_scenario(name, work, duration, seed, lights, shape, junctions=junctions, period=period)
    outputs = run_sumo(sc, work, interval, seed)
    city = from_sumo_net(sc.net)
    probes, _ = read_fcd(outputs["fcd"], city)
    switches, _ = read_tls(outputs["tls"], city)
    trace = Trace(city, probes, switches, meta={"source": "sumo", "scenario": name})
    boundaries = list(np.arange(sc.begin, sc.end, interval))
    # the windows are scored below by a model of its own: the packaged prior (the one being
    # replaced, refused after a feature change) is not needed
    rep = replay(trace, boundaries, window=interval, present=True, correction_prior=False)
    run = TrainingRun(name, city, rep.reports, rep.present, boundaries, read_edgedata(outputs["edges"], city),
                      sc.begin + WARMUP, interval)
    # netgenerate's and randomTrips' commands (relative paths: the file does not depend on --work)
    return sc.commands[:2], run


def scored_windows(run: TrainingRun, delay_power: float | None) -> list:
    """The windows the model scored on ``run`` (class, features, log(taken / predicted), weight),
    starting from no correction, the light-delay factor's exponent from ``delay_power`` (then
    its own record's choice, as online)."""
    from fcd.validate import predictions_from
    model = Model(run.city, correction_prior=None, delay_power=delay_power)
    model.correction_log = []
    predictions_from(run.city, run.reports, run.boundaries, run.window, run.present, model=model)
    return model.correction_log


def choose_exponents(runs: list[TrainingRun], classes=PRIOR_CLASSES) -> tuple[dict, list[list], dict]:
    """The light-delay factor's starting exponent (until its own record has DELAY_SKILL_MIN
    windows, as online) and the correction's power (held): for each exponent in
    Model.DELAY_WEIGHTS the training scenarios' windows are scored starting from it, and each
    class's power chosen on held-out scenarios with it (:func:`choose_power`); the exponent whose
    best power gives the least mean held-out ratio to free flow's MAPE against SUMO's edge times
    wins (the lit class's, or the first class's without one).  Returns (the exponent's record
    {"power", "held_out_ratio_by_power", "hold": False}, the windows scored with it per scenario,
    choose_power's result with it)."""
    judge = "lit" if "lit" in classes else classes[0]
    best = None
    ratios = {}
    for power in Model.DELAY_WEIGHTS:
        windows = [scored_windows(run, power) for run in runs]
        chosen = choose_power(runs, windows, classes, power)
        ratio = chosen[judge]["held_out_ratio_by_power"][str(chosen[judge]["power"])]
        ratios[str(power)] = ratio
        log.info("light-delay exponent %s: correction power %s, held-out ratio %.4f", power,
                 chosen[judge]["power"], ratio)
        if best is None or ratio < best[0]:
            best = (ratio, power, windows, chosen)
    _, power, windows, chosen = best
    return {"power": power, "held_out_ratio_by_power": ratios, "hold": False}, windows, chosen


def choose_power(runs: list[TrainingRun], windows: list[list], classes=PRIOR_CLASSES,
                 delay_power: float | None = None) -> dict:
    """Per class in ``classes``: the power of the correction, held for the whole run, with the
    least mean ratio of the model's traverse-time MAPE to free flow's against SUMO's own edge
    travel times (what fcd-validate measures), each training scenario predicted with a prior
    fitted on the other scenarios' windows only (``windows[i]``: scenario i's; leave one
    scenario out, so the power is not chosen in sample; the light-delay exponent held at
    ``delay_power``, as the windows were scored).  Scenarios without a road of the
    class are skipped.  Returns {class: {"power": p, "held_out_ratio_by_power": {p: mean}}}."""
    from fcd.validate import compare_traverse, predictions_from
    k = Model.CORRECTION_FEATURES
    out: dict = {}
    for c, name in enumerate(CLASSES):
        if name not in classes:
            continue
        ratios: dict[float, list[float]] = {p: [] for p in Model.CORRECTION_SHRINKS}
        for i, run in enumerate(runs):
            if not (run.city.exit_light >= 0 if c else run.city.exit_light < 0).any():
                continue
            others = [w for j, got in enumerate(windows) if j != i for w in got]
            fold = fit(others, (name,))
            for power in Model.CORRECTION_SHRINKS:
                fold[name]["power"], fold[name]["hold"] = power, True
                prior = CorrectionPrior.from_json({"features": k, "classes": fold})
                model = Model(run.city, correction_prior=prior, delay_power=delay_power)
                predictions = predictions_from(run.city, run.reports, run.boundaries, run.window, run.present,
                                               model=model)
                traverse = compare_traverse(run.city, run.edges, predictions, run.warmup)
                ratios[power].append(traverse["all"]["model_vs_free_flow"])
        if not ratios[Model.CORRECTION_SHRINKS[0]]:
            raise ConfigError(f"no training scenario has a road of class {name}")
        mean = {p: float(np.mean(v)) for p, v in ratios.items()}
        # less correction where the training scenarios cannot tell the powers apart: a difference
        # of a few 1e-5 in the mean ratio is a tie, and a tie must not flip the power
        least = min(mean.values())
        power = min(p for p, m in mean.items() if m <= least + POWER_TIE)
        out[name] = {"power": power, "held_out_ratio_by_power": {str(p): m for p, m in mean.items()},
                     "held_out_scenarios": len(ratios[Model.CORRECTION_SHRINKS[0]])}
    return out


def fit(windows: list, classes=PRIOR_CLASSES) -> dict:
    """Per class in ``classes`` the weighted ridge fit (Model's weighting, no fading), the
    weighted mean of x x^T, and the power of the correction with the least APE on the training
    windows; None for the other classes (they start from no correction)."""
    k = Model.CORRECTION_FEATURES
    out: dict = {}
    bound = np.log(Model.CORRECTION_RANGE)
    for c, name in enumerate(CLASSES):
        if name not in classes:
            out[name] = None
            continue
        rows = [w for w in windows if w[0] == c]
        if not rows:
            raise ConfigError(f"no training window of road class {name}")
        X = np.array([w[1] for w in rows])
        y = np.array([w[2] for w in rows])
        weight = np.array([w[3] for w in rows])
        A = (X * weight[:, None]).T @ X
        beta = np.linalg.solve(A + Model.CORRECTION_RIDGE * np.eye(k), (X * weight[:, None]).T @ y)
        correction = np.clip(X @ beta, -bound, bound)
        # APE of base * exp(s correction) against taken = base * exp(y), relative to taken
        ape = [float(np.abs(np.exp(s * correction - y) - 1.0).sum()) for s in Model.CORRECTION_SHRINKS]
        out[name] = {"beta": beta.tolist(), "gram": (A / weight.sum()).tolist(),
                     "power": Model.CORRECTION_SHRINKS[int(np.argmin(ape))], "windows": len(rows),
                     "training_mape_by_power": dict(zip(map(str, Model.CORRECTION_SHRINKS),
                                                        (a / len(rows) for a in ape)))}
    return out


def build_parser():
    p = make_parser("fcd-train-prior", "Fit the online correction's prior on generated SUMO scenarios "
                    "(never fcd-validate's) and write it as package data.", examples=[
        "python -m fcd.train_prior",
        "python -m fcd.train_prior --out /tmp/prior.json --work /tmp/train",
    ])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "data" / PRIOR_FILE)
    p.add_argument("--duration", type=float, default=900.0)
    p.add_argument("--interval", type=float, default=60.0)
    p.add_argument("--classes", default=",".join(PRIOR_CLASSES),
                   help=f"comma list of the road classes to fit a prior for ({', '.join(CLASSES)})")
    p.add_argument("--work", type=Path, default=None, help="directory for SUMO files (default: a temporary one)")
    return p


def run(args, stats) -> int:
    classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    if not set(classes) <= set(CLASSES):
        raise ConfigError(f"--classes: unknown {sorted(set(classes) - set(CLASSES))} (known: {', '.join(CLASSES)})")
    work = args.work or Path(tempfile.mkdtemp(prefix="fcd-train-prior-"))
    windows: list = []
    per_scenario: list[list] = []
    runs: list[TrainingRun] = []
    scenarios = []
    try:
        for i, (name, lights, junctions, shape, period) in enumerate(TRAINING):
            seed = TRAINING_SEED_BASE + i
            commands, run = replayed(name, lights, junctions, shape, period, seed, work / name,
                                     args.duration, args.interval)
            runs.append(run)
            scenarios.append({"name": name, "seed": seed, "commands": commands})
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    # the light-delay factor's starting exponent and the correction's power chosen together on
    # held-out training scenarios against SUMO's times (the correction's power held online: its
    # record, scored on the probes' times, chose powers SUMO's times do not favour; docs/fcd.md)
    delay, per_scenario, chosen_powers = choose_exponents(runs, classes)
    print(f"light delay: power {delay['power']} (held-out ratio to free flow by power: "
          f"{ {p: round(m, 4) for p, m in delay['held_out_ratio_by_power'].items()} })", flush=True)
    for scenario, got in zip(scenarios, per_scenario):
        windows += got
        scenario["windows"] = len(got)
        print(f"{scenario['name']}: {len(got)} scored windows", flush=True)
    fitted = fit(windows, classes)
    # the power used online: chosen against SUMO's edge times on held-out scenarios and held for
    # the whole run (the online record, scored on the probes' travel times, chose higher powers
    # than SUMO's times favour: docs/fcd.md)
    for name, chosen in chosen_powers.items():
        fitted[name]["power_in_sample"] = fitted[name]["power"]
        fitted[name].update(chosen, hold=True)
        print(f"{name}: power {chosen['power']} (held-out ratio to free flow by power: "
              f"{ {p: round(m, 4) for p, m in chosen['held_out_ratio_by_power'].items()} })", flush=True)
    data = {"features": Model.CORRECTION_FEATURES, "classes": fitted, "light_delay": delay,
            "generated_by": f"python -m fcd.train_prior --classes {','.join(classes)} --duration {args.duration:g} "
                            f"--interval {args.interval:g}", "duration": args.duration, "interval": args.interval,
            "training": scenarios,
            "disjoint_from": "fcd-validate's scenarios: other netgenerate sizes and seeds, no RESCO city cut"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    stats["windows"] = len(windows)
    return 0


def main(argv=None) -> int:
    return run_sync(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
