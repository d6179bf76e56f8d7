import networkx as nx
import numpy as np
import pytest

from fcd.aggregate import RoadReport
from fcd.city import grid_city
from fcd.model import Model
from fcd.route import latest_times, plan, shortest_route
from fcd.tuplespace import LocalTupleSpace


@pytest.fixture
def city():
    return grid_city(3, 3, block=200.0, cycle=60.0, offsets="zero")


def test_model_conserves_cars_and_drains_queues(city):
    model = Model(city, correction_prior=None)
    model.n[:] = 5.0
    model.q[:] = 3.0
    pred = model.predict(horizon=4)
    # cars only move between roads: totals are conserved (no road saturates here)
    assert np.allclose(pred.n.sum(axis=1), pred.n[0].sum())
    assert np.all(pred.q <= pred.n + 1e-9) and np.all(pred.q >= 0)
    # nothing observed yet (and no offline prior of the correction): the prediction now is the
    # free-flow time, later steps follow the structure
    assert np.allclose(pred.traverse[0], city.length / city.speed)
    structural = model.structural(4)[2]
    assert np.allclose(pred.traverse / pred.traverse[0], structural / structural[0])
    # structural traverse time = driving + queueing: longer queue, longer time
    assert np.all(structural[0] >= city.length / model.v)
    model.q[0] = 5.0
    assert model.structural(0)[2][0][0] > structural[0][0]


def test_model_one_step_matches_the_equations(city):
    model = Model(city)
    rng = np.random.default_rng(1)
    model.n[:] = rng.uniform(0, 10, city.n_roads)
    model.q[:] = model.n * rng.uniform(0, 1, city.n_roads)
    n_pred, q_pred, _ = model.structural(1)
    C = model.cycle
    gamma = model.green / C
    alpha = np.minimum(1, C * model.v / city.length)
    delta = np.minimum(1, model.green * model.v / city.length)
    moving = model.n - model.q
    served = np.minimum(model.q + delta * moving, model.mu * model.green)
    inflow = np.zeros(city.n_roads)
    for p in range(city.n_roads):
        for r, prob in model.turn_probabilities(p).items():
            inflow[r] += prob * served[p]
    q1 = model.q + delta * moving - served + (alpha - delta) * moving + (1 - gamma) * inflow
    n1 = np.clip(model.n + inflow - served, 0, model.n_max)
    assert np.allclose(n_pred[1], n1)
    assert np.allclose(q_pred[1], np.clip(q1, 0, n1))


def test_parameters_are_estimated_from_reports(city):
    model = Model(city)
    road = city.lights[4].roads[0]
    outs = list(city.turn_probs[road])
    model.observe(RoadReport(road, 0.0, True, queue=12, cars=14, density=70.0, mean_speed=8.0, departures=0,
                             interval=30.0, was_green=False))
    model.observe(RoadReport(road, 30.0, False, queue=2, cars=6, density=30.0, mean_speed=9.0, departures=10,
                             interval=30.0, was_green=True, turns={outs[0]: 10}))
    # the state is sampled at the start of green: the green->red report does not replace it
    assert model.mu[road] == pytest.approx(0.7 * 0.5 + 0.3 * 10 / 30)     # saturated green: EWMA
    probs = model.turn_probabilities(road)
    assert probs[outs[0]] > city.turn_probs[road][outs[0]]
    assert sum(probs.values()) == pytest.approx(1.0)
    assert (model.n[road], model.q[road]) == (14, 12)


def switch_reports(road, cycle, green, cycles, t0=0.0, samples=(), length=200.0):
    """Reports of one road whose light runs ``green`` seconds of green per ``cycle``; the i-th
    cycle's car-seconds and metres make an observed travel time ``samples[i]`` (if given)."""
    out = []
    for k in range(cycles):
        start = t0 + k * cycle
        travel = samples[k] if samples else 0.0
        cars = 10.0
        # (time, green from then on, green before, interval): red -> green at start, green -> red
        for t, now_green, interval, share in ((start, True, cycle - green, 0.5), (start + green, False, green, 0.5)):
            out.append(RoadReport(road, t, now_green, queue=0, cars=0, density=0.0, mean_speed=-1.0, departures=0,
                                  interval=interval if out else 0.0, was_green=not now_green,
                                  samples=cars * travel * share, distance=cars * length * share))
    return out


def test_light_timing_is_learned_from_the_switches(city):
    model = Model(city)
    road = city.lights[4].roads[0]
    assert model.cycle_r[road] == 60.0 and model.green_r[road] == 30.0     # the program: the prior
    for rep in switch_reports(road, cycle=80.0, green=20.0, cycles=30):
        model.observe(rep)
    assert model.cycle_r[road] == pytest.approx(80.0, rel=1e-3)
    assert model.green_r[road] == pytest.approx(20.0, rel=1e-3)
    model.predict(0)
    assert model.green[road] == pytest.approx(model.cycle * 20.0 / 80.0, rel=1e-3)


def test_calibrated_traverse_beats_free_flow_and_persistence():
    """A road whose cars either pass on green (slower than the limit: 25 s instead of 14.4) or
    wait a red of up to 60 s: the truth of each cycle is a fresh draw.  Free flow is biased,
    persistence carries the last draw's noise; the calibrated prediction must beat both."""
    city = grid_city(3, 3, block=220.0, cycle=90.0, offsets="zero")
    road = city.lights[4].roads[0]
    assert city.length[road] == pytest.approx(200.0)
    rng = np.random.default_rng(3)
    draws = np.where(rng.random(200) < 0.6, 25.0, 25.0 + rng.uniform(0, 60, 200))
    model = Model(city)
    reports = switch_reports(road, cycle=90.0, green=45.0, cycles=len(draws), samples=list(draws))
    ape_model, ape_free, ape_persist = [], [], []
    free = city.length[road] / city.speed[road]
    for k in range(len(draws) - 1):
        for rep in reports[2 * k:2 * k + 2]:
            model.observe(rep)
        if k < 10:
            continue
        truth = draws[k + 1]
        predicted = model.predict(0, now=(k + 1) * 90.0).traverse[0][road]
        ape_model.append(abs(predicted - truth) / truth)
        ape_free.append(abs(free - truth) / truth)
        ape_persist.append(abs(draws[k] - truth) / truth)
    assert np.mean(ape_model) <= 0.7 * np.mean(ape_free)
    assert np.mean(ape_model) <= 0.85 * np.mean(ape_persist)


def test_latest_run_wins():
    tuples = [("fcd.traverse", 1, 3, [10.0, 11.0]), ("fcd.traverse", 1, 4, [20.0, 21.0]),
              ("fcd.traverse", 2, 3, [5.0])]
    times, run = latest_times(tuples, horizon=1)
    assert times == {1: 21.0, 2: 5.0} and run == 4


async def test_router_agrees_with_networkx_on_known_predictions(city):
    rng = np.random.default_rng(7)
    known = {road: float(rng.uniform(5, 100)) for road in range(city.n_roads)}
    space = LocalTupleSpace()
    for road, seconds in known.items():
        await space.out(("fcd.traverse", road, 1, [seconds + 1000.0]))   # an older run
        await space.out(("fcd.traverse", road, 2, [seconds]))
    g = nx.DiGraph()
    for road, (u, v) in enumerate(city.roads):
        g.add_edge(u, v, w=known[road])
    for src, dst in [("0_0", "2_2"), ("2_0", "0_2"), ("1_1", "0_0")]:
        route = await plan(space, city, src, dst)
        assert route.seconds == pytest.approx(nx.dijkstra_path_length(g, src, dst, weight="w"))
        assert route.run == 2 and route.predicted_roads == len(route.roads)
        assert route.junctions[0] == src and route.junctions[-1] == dst
    # a road made very slow is avoided
    direct = shortest_route(city, known, "0_0", "0_1")
    assert direct.junctions == ["0_0", "0_1"]
    slow = dict(known)
    slow[city.road_between("0_0", "0_1")] = 1e6
    assert shortest_route(city, slow, "0_0", "0_1").junctions != ["0_0", "0_1"]


async def test_fcd_route_cli_prints_the_route_with_its_time(city, tmp_path):
    import asyncio
    import sys

    from fcd.tuplespace import TupleSpaceServer
    server = TupleSpaceServer()
    host, port = await server.start("127.0.0.1", 0)
    space = LocalTupleSpace(driver=server.driver)
    for road in range(city.n_roads):
        await space.out(("fcd.traverse", road, 1, [10.0]))
    await space.out(("fcd.run", 1, 100.0, 60.0))
    city.save(tmp_path / "city.json")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fcd.route", "--city", str(tmp_path / "city.json"), "--tuplespace", f"{host}:{port}",
        "--from", "0_0", "--to", "2_2", "--wait", "5", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    await server.close()
    assert proc.returncode == 0, err.decode()
    line = out.decode().strip().splitlines()[-1]
    assert line.startswith("route 0_0 -> 2_2: 4 roads, predicted 40.0 s (prediction run 1")


def learned_light(model: Model, city) -> tuple[int, float]:
    """A light-controlled road whose light the model has learned: a 60 s cycle with 30 s of green
    from t=0, 0.1 cars/s arriving, 0.5 cars/s served, an empty queue reported at t=0.  Returns the
    road and its free driving time."""
    road = city.lights[4].roads[0]
    model.cycle_r[road], model.green_r[road], model.green_start[road] = 60.0, 30.0, 0.0
    model.report_t[road], model.report_queue[road] = 0.0, 0.0
    model.arrival_rate[road], model.mu[road] = 0.1, 0.5
    return road, city.length[road] / model.v[road]


def test_light_delay_follows_the_queue_through_the_cycle(city):
    """Point queue at a light with a learned 60 s cycle (30 s green from t=0), 0.1 cars/s
    arriving, 0.5 cars/s served: over the red half the queue grows 0 -> 3 cars (mean 1.5), so
    the travel time is L/v + 1.5/0.1 = L/v + 15 s; the next green drains those 3 cars at
    0.4 cars/s in 7.5 s (mean queue over its 30 s 3 x 7.5 / 2 / 30 = 0.375: L/v + 3.75 s).
    The whole-cycle mean is Webster's uniform delay, 60 x 0.5^2 / (2 (1 - 0.4 x 0.5)) = 9.375 s."""
    model = Model(city)
    road, drive = learned_light(model, city)
    red_ahead, mean = model.light_delay(30.0, 30.0)
    green_ahead, _ = model.light_delay(60.0, 30.0)
    assert red_ahead[road] == pytest.approx(drive + 15.0, abs=0.1)
    assert green_ahead[road] == pytest.approx(drive + 3.75, abs=0.1)
    assert mean[road] == pytest.approx(drive + 9.375)
    # a queue reported at the start of green drains at mu - lam = 0.4 cars/s: 4 cars take 10 s
    model.report_queue[road] = 4.0
    drained, _ = model.light_delay(0.0, 10.0)
    assert drained[road] == pytest.approx(drive + 2.0 / 0.1, abs=0.5)
    # roads without a light or without a learned arrival rate have no light delay
    assert np.isnan(red_ahead[~model.lit]).all()
    # a report from long ago starts the queue DELAY_LOOKBACK before now (not a day of steps)
    model.report_t[road], model.report_queue[road] = -86_400.0, 0.0
    stale, _ = model.light_delay(30.0, 30.0)
    assert stale[road] == pytest.approx(red_ahead[road], abs=0.1)


def test_level_weights_windows_with_traffic_like_now():
    """A road whose quiet windows (0.1 car-s/s) take 20 s and busy ones (2 car-s/s) 60 s: after a
    busy window the windows like it count fully and the others with the kernel's weight
    exp(-ln(2.05 / 0.15)^2 / 2) = 0.033; the free-flow time is one pseudo-observation."""
    city = grid_city(3, 3, block=220.0, cycle=90.0, offsets="zero")
    road = city.lights[4].roads[0]
    free = city.length[road] / city.speed[road]
    w = np.exp(-0.5 * np.log(2.05 / 0.15) ** 2)
    model = Model(city)
    for k in range(12):
        busy = k % 2 == 1
        model.history[road].append((60.0 if busy else 20.0, 2.0 if busy else 0.1))
    model.last_rate[road] = 2.0
    busy_level = model.calibrated()[road]
    model.last_rate[road] = 0.1
    quiet_level = model.calibrated()[road]
    assert busy_level == pytest.approx((6 + 6 * w + 1) / (6 / 60 + 6 * w / 20 + 1 / free))
    assert quiet_level == pytest.approx((6 + 6 * w + 1) / (6 / 20 + 6 * w / 60 + 1 / free))
    plain = 13 / (6 / 60 + 6 / 20 + 1 / free)
    assert busy_level > plain + 10 and quiet_level < plain


@pytest.mark.parametrize("truth, weight", [(10.0, 0.0), (20.0, 1.0), (14.0, 0.5)])
def test_light_delay_factor_is_weighted_by_its_own_record(city, truth, weight):
    """Every prediction of a lit road is scored once the reports cover its window: a factor of 2
    on a level of 10 s, the probes then taking ``truth`` seconds: the exponent whose guess
    10 x 2^w came closest over the scored windows wins (2^0.5 x 10 = 14.1)."""
    model = Model(city)
    road = city.lights[4].roads[0]
    length = city.length[road]
    for k in range(Model.DELAY_SKILL_MIN + 5):
        start = 60.0 * k
        model.to_score[road].append((start, start + 60.0, 10.0, 2.0))
        # two reports covering the window: cars took ``truth`` seconds per road length
        for t, interval in ((start + 30.0, 30.0), (start + 60.0, 30.0)):
            model.observe(RoadReport(road, t, bool(k % 2), queue=0, cars=0, density=0.0, mean_speed=-1.0,
                                     departures=0, interval=interval, was_green=not k % 2,
                                     samples=5 * truth * 0.5, distance=5 * length * 0.5))
    assert model.delay_scored == Model.DELAY_SKILL_MIN + 5
    assert model.delay_weight == weight
