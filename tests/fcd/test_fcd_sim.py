import numpy as np
import pytest

from cliruntime import ConfigError
from fcd.city import City, from_sumo_net, load_city
from fcd.sim import Simulator, main, read_sumo_fcd, read_sumo_tls
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
    with pytest.raises(ConfigError, match="do not fit"):
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


NET = """<net version="1.9">
  <edge id=":J1_0" function="internal"><lane id=":J1_0_0" index="0" speed="10" length="5" shape="100,-2 100,2"/></edge>
  <edge id="A" from="J0" to="J1"><lane id="A_0" index="0" speed="13.9" length="90" shape="0,-1.6 95,-1.6"/></edge>
  <edge id="B" from="J1" to="J0"><lane id="B_0" index="0" speed="13.9" length="90" shape="95,1.6 0,1.6"/></edge>
  <edge id="C" from="J1" to="J2"><lane id="C_0" index="0" speed="13.9" length="90" shape="101.6,5 101.6,100"/><lane id="C_1" index="1" speed="13.9" length="90" shape="104.8,5 104.8,100"/></edge>
  <edge id="D" from="J2" to="J1"><lane id="D_0" index="0" speed="13.9" length="90" shape="98.4,100 98.4,5"/></edge>
  <tlLogic id="J1" type="static" programID="0" offset="0">
    <phase duration="30" state="Gr"/><phase duration="30" state="rG"/>
  </tlLogic>
  <junction id="J0" type="priority" x="0" y="0"/>
  <junction id="J1" type="traffic_light" x="100" y="0"/>
  <junction id="J2" type="priority" x="100" y="100"/>
  <connection from="A" to="C" fromLane="0" toLane="0" tl="J1" linkIndex="0" dir="l"/>
  <connection from="A" to="B" fromLane="0" toLane="0" dir="t"/>
  <connection from="D" to="B" fromLane="0" toLane="0" tl="J1" linkIndex="1" dir="r"/>
  <connection from="B" to="A" fromLane="0" toLane="0" dir="t"/>
  <connection from="C" to="D" fromLane="0" toLane="0" dir="t"/>
</net>"""

FCD = """<fcd-export>
  <timestep time="0.00"><vehicle id="v0" x="10" y="-1.6" angle="90" speed="5" pos="10" lane="A_0"/></timestep>
  <timestep time="1.00"><vehicle id="v0" x="15" y="-1.6" angle="90" speed="5" pos="15" lane="A_0"/>
    <vehicle id="v1" x="98.4" y="50" angle="180" speed="0" pos="50" lane="D_0"/></timestep>
</fcd-export>"""

TLS = """<tlsStates><tlsState time="0.00" id="J1" programID="0" phase="0" state="Gr"/>
<tlsState time="30.00" id="J1" programID="0" phase="1" state="rG"/></tlsStates>"""


def test_sumo_network_and_traces(tmp_path):
    (tmp_path / "n.net.xml").write_text(NET)
    (tmp_path / "fcd.xml").write_text(FCD)
    (tmp_path / "tls.xml").write_text(TLS)
    city = from_sumo_net(tmp_path / "n.net.xml")
    assert city.n_roads == 4 and len(city.lights) == 1
    light = city.lights[0]
    a, d = city.sumo_edges["A"], city.sumo_edges["D"]
    assert light.green_roads(light.phases[0].green) == [a]
    assert light.green_roads(light.phases[1].green) == [d]
    assert city.lanes[city.sumo_edges["C"]] == 2
    assert city.turn_probs[a] == {city.sumo_edges["C"]: 0.5, city.sumo_edges["B"]: 0.5}
    probes = read_sumo_fcd(tmp_path / "fcd.xml", city)
    assert list(probes["road"]) == [a, a, d]
    lights = read_sumo_tls(tmp_path / "tls.xml", city)
    assert [light.green_roads(int(m)) for m in lights["green"]] == [[a], [d]]
    # the imported city map-matches SUMO positions to the right roads
    from fcd.aggregate import MapMatcher
    assert list(MapMatcher(city).match(probes["x"], probes["y"], probes["heading"])) == [a, a, d]
    # our simulator also runs on an imported SUMO network
    sim_trace = Simulator(city, cars=6, seed=1).run(120)
    assert len(np.unique(sim_trace.probes["car"])) == 6 and len(sim_trace.lights) >= 4
    out = tmp_path / "s.npz"
    assert main(["--sumo-net", str(tmp_path / "n.net.xml"), "--sumo-fcd", str(tmp_path / "fcd.xml"),
                 "--sumo-tls", str(tmp_path / "tls.xml"), "--out", str(out)]) == 0
    assert len(Trace.load(out).probes) == 3
