import numpy as np
import pytest

from fcd.city import City, load_city
from fcd.sim import SimulationError, Simulator, main
from fcd.trace import Trace


def test_cars_conserved_and_never_overlap(small_city):
    sim = Simulator(small_city, cars=200, seed=11)
    for _ in range(300):
        sim.update_lights()
        sim.move()
        assert len(sim.road) == 200
        assert np.all(sim.s >= -1e-9) and np.all(sim.s <= small_city.length[sim.road] + 1e-9)
        order = np.lexsort((sim.s, sim.road))
        r, s = sim.road[order], sim.s[order]
        same = r[1:] == r[:-1]
        gaps = (s[1:] - s[:-1])[same]
        assert np.all(gaps >= sim.spacing[r[1:]][same] - 1e-6)
    assert sim.counters["crossings"] > 100


def test_queues_form_at_red_and_discharge_at_green(small_trace):
    city = small_trace.city
    p = small_trace.probes
    stopped = p[p["speed"] < 1.0]
    # stopped cars sit near the stop line of red roads: in the last 40% of their road
    frac = ((stopped["x"] - city.x0[stopped["road"]]) ** 2 + (stopped["y"] - city.y0[stopped["road"]]) ** 2) ** 0.5
    frac = frac / city.length[stopped["road"]]
    assert len(stopped) > 0.05 * len(p)
    assert np.median(frac) > 0.6
    # a queue on a red road is served after its light turns green
    light = city.lights[0]
    road = light.roads[0]
    served = 0
    for change in small_trace.lights[small_trace.lights["light"] == 0]:
        if change["green"] & 1:
            t = change["t"]
            before = p[(p["t"] == t) & (p["road"] == road) & (p["speed"] < 1)]
            after = p[(p["t"] == t + 15) & np.isin(p["car"], before["car"])]
            served += int((after["road"] != road).sum())
    assert served > 0


def test_seeded_runs_are_identical(small_city):
    a = Simulator(small_city, cars=50, seed=4).run(60)
    b = Simulator(small_city, cars=50, seed=4).run(60)
    assert np.array_equal(a.probes, b.probes) and np.array_equal(a.lights, b.lights)


def test_too_many_cars_is_a_config_error(small_city):
    with pytest.raises(SimulationError, match="do not fit"):
        Simulator(small_city, cars=100_000)


def test_city_round_trip_and_trace_file(tmp_path, small_trace):
    city = small_trace.city
    again = City.from_dict(city.to_dict())
    assert again.roads == city.roads and np.allclose(again.length, city.length)
    small_trace.save(tmp_path / "t.npz")
    loaded = Trace.load(tmp_path / "t.npz")
    assert np.array_equal(loaded.probes, small_trace.probes)
    assert load_city(tmp_path / "t.npz").n_roads == city.n_roads


def test_cli_1000_cars(tmp_path):
    out = tmp_path / "t.npz"
    assert main(["--cars", "1000", "--duration", "120", "--out", str(out)]) == 0
    trace = Trace.load(out)
    assert len(np.unique(trace.probes["car"])) == 1000
    assert main(["--grid", "nonsense", "--out", str(out)]) == 2


