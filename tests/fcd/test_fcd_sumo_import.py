"""The SUMO import keeps the network as it is: one test per import rule, on tests/fcd/data/tiny.net.xml."""

from pathlib import Path

import numpy as np
import pytest

from fcd.aggregate import IN_JUNCTION, Aggregator, MapMatcher
from fcd.city import ALL_VCLASSES, CAR, City, CityError, from_sumo_net, load_city, parse_vclasses
from fcd.route import shortest_route
from fcd.sim import Simulator, main
from fcd.sumo import SumoError, read_fcd, read_tls
from fcd.trace import Trace

NET = Path(__file__).parent / "data" / "tiny.net.xml"


@pytest.fixture(scope="module")
def city():
    return from_sumo_net(NET)


def road(city, key):
    return city.road_id[key]


def test_car_roads_only_by_default_with_a_summary(city):
    assert sorted(city.keys) == ["A", "B", "C", "D", "E", "P"]
    summary = city.source["import"]
    assert summary["skipped"] == {"vehicle class": 2}
    assert sorted(summary["skipped_examples"]["vehicle class"]) == ["F", "T"]
    # the sidewalk lane of E is not a car lane
    assert city.lanes[road(city, "E")] == 1 and city.lanes[road(city, "C")] == 2
    assert all(city.allows(r, CAR) for r in range(city.n_roads))


def test_other_vehicle_classes_on_request(city):
    everything = from_sumo_net(NET, vclasses=parse_vclasses("all"))
    assert sorted(everything.keys) == ["A", "B", "C", "D", "E", "F", "P", "T"]
    assert not everything.allows(everything.road_id["F"], CAR)
    assert everything.allows(everything.road_id["T"], parse_vclasses("tram"))
    assert everything.lanes[everything.road_id["E"]] == 2
    with pytest.raises(CityError, match="unknown vehicle class 'hovercraft'"):
        parse_vclasses("passenger,hovercraft")


def test_parallel_edges_are_kept(city):
    assert city.roads_between("J0", "J1") == sorted([road(city, "A"), road(city, "P")])
    with pytest.raises(CityError, match="2 roads from J0 to J1"):
        city.road_between("J0", "J1")
    again = City.from_dict(city.to_dict())
    assert again.keys == city.keys and again.roads_between("J0", "J1") == city.roads_between("J0", "J1")
    assert again.successors == city.successors and again.internal == city.internal


def test_curved_road_is_a_polyline_and_matched_along_its_curve(city):
    p = road(city, "P")
    assert len(city.shapes[p]) == 3
    m = MapMatcher(city)
    # near the apex of the curve, 25 m from the straight line between its ends
    heading = np.degrees(np.arctan2(47.5, -24.0)) % 360
    assert m.match(np.array([40.0]), np.array([-26.2]), np.array([heading]))[0] == p
    # the simulator drives along the curve too
    x, y, h = city.position(np.array([p]), np.array([city.length[p] / 2]))
    assert y[0] < -20


def test_every_lane_is_matched_with_its_lane(city):
    c = road(city, "C")
    m = MapMatcher(city)
    roads, lanes, to_end, _ = m.locate(np.array([101.6, 104.8]), np.array([50.0, 50.0]), np.array([0.0, 0.0]))
    assert list(roads) == [c, c] and lanes[0] != lanes[1]
    assert to_end == pytest.approx([50.0, 50.0])


def test_a_probe_inside_a_junction_belongs_to_the_junction(city):
    m = MapMatcher(city)
    # on the internal lane (A -> C), inside J1's shape beyond the end of A, and on A itself
    roads, *_ = m.locate(np.array([99.0, 97.0, 90.0]), np.array([0.0, -1.6, -1.6]), np.array([60.0, 90.0, 90.0]))
    assert list(roads) == [IN_JUNCTION, IN_JUNCTION, road(city, "A")]
    assert city.internal == {":J1_0": "J1"}


def test_lights_keep_their_type_and_yellow_counts_as_green(city):
    (light,) = city.lights
    assert light.kind == "actuated" and not light.program_driven and light.name == "J1"
    a, d, p = road(city, "A"), road(city, "D"), road(city, "P")
    assert light.roads == sorted([a, d, p])
    assert light.links[3] == -1            # the footway's link is not a car road
    masks = [set(light.green_roads(ph.green)) for ph in light.phases]
    assert masks == [{a, p}, {a, p}, {d}, {d}]      # yellow = the end of green
    assert light.mask_of_state("rrrr") == 0 and light.mask_of_state("uuus") == 0


def test_turns_follow_the_connections_and_dead_ends_are_named(city):
    a = road(city, "A")
    assert city.successors[a] == sorted([road(city, "B"), road(city, "C")])
    assert city.turn_probs[a] == {o: 0.5 for o in city.successors[a]}
    assert city.dead_ends() == [road(city, "E")]
    # the simulator sends cars reaching the dead end elsewhere: nothing is lost
    sim = Simulator(city, cars=12, seed=2)
    trace = sim.run(400)
    assert sim.counters["respawned"] > 0 and len(np.unique(trace.probes["car"])) == 12


def fcd_xml(records):
    steps = {}
    for t, vid, x, y, angle, speed, lane in records:
        steps.setdefault(t, []).append(
            f'<vehicle id="{vid}" x="{x}" y="{y}" angle="{angle}" type="t" speed="{speed}" pos="0" lane="{lane}"/>')
    body = "".join(f'<timestep time="{t:.2f}">{"".join(v)}</timestep>' for t, v in sorted(steps.items()))
    return f"<fcd-export>{body}</fcd-export>"


RECORDS = [
    (0, "car", 10, -1.6, 90, 10, "A_0"), (0, "tram", 120, -12, 90, 10, "T_0"),
    (1, "car", 99, 0, 60, 5, ":J1_0_0"), (1, "tram", 130, -12, 90, 10, "T_0"),
    (2, "car", 101.6, 20, 0, 8, "C_0"),
]
TLS = """<tlsStates><tlsState time="0.00" id="J1" programID="0" phase="0" state="GrGr"/>
<tlsState time="30.00" id="J1" programID="0" phase="1" state="yryr"/>
<tlsState time="33.00" id="J1" programID="0" phase="2" state="rGrG"/></tlsStates>"""


def test_fcd_and_switches_are_read_with_a_summary(city, tmp_path):
    (tmp_path / "fcd.xml").write_text(fcd_xml(RECORDS))
    (tmp_path / "tls.xml").write_text(TLS)
    probes, summary = read_fcd(tmp_path / "fcd.xml", city)
    assert list(probes["road"]) == [road(city, "A"), -1, road(city, "C")]
    assert summary == {"records": 5, "matched_road": 2, "matched_junction": 1, "skipped_vehicle_class": 2,
                       "skipped_persons_and_containers": 0, "unmatched": 0, "vehicles": 1}
    lights, tls = read_tls(tmp_path / "tls.xml", city)
    light = city.lights[0]
    assert [set(light.green_roads(int(m))) for m in lights["green"]] == [
        {road(city, "A"), road(city, "P")}, {road(city, "A"), road(city, "P")}, {road(city, "D")}]
    assert tls["matched"] == 3


def test_inputs_of_another_network_are_refused(city, tmp_path):
    (tmp_path / "fcd.xml").write_text(fcd_xml(RECORDS + [(3, "x", 5, 5, 0, 1, "elsewhere_0")]))
    with pytest.raises(SumoError, match="does not fit network tiny.net.xml: 1 of 6 records .* elsewhere_0"):
        read_fcd(tmp_path / "fcd.xml", city)
    (tmp_path / "tls.xml").write_text('<tlsStates><tlsState time="0" id="K9" phase="0" state="Gr"/></tlsStates>')
    with pytest.raises(SumoError, match="lights it does not have .*K9"):
        read_tls(tmp_path / "tls.xml", city)
    (tmp_path / "tls.xml").write_text('<tlsStates><tlsState time="0" id="J1" phase="0" state="Gr"/></tlsStates>')
    with pytest.raises(SumoError, match="state of 2 links, the network's has 4"):
        read_tls(tmp_path / "tls.xml", city)


def test_cli_refuses_what_does_not_fit_and_summarises(city, tmp_path, capsys):
    (tmp_path / "fcd.xml").write_text(fcd_xml(RECORDS))
    (tmp_path / "tls.xml").write_text(TLS)
    out = tmp_path / "t.npz"
    # a network with lights and no switches: no report would ever be made
    assert main(["--sumo-net", str(NET), "--sumo-fcd", str(tmp_path / "fcd.xml"), "--out", str(out)]) == 2
    assert "needs --sumo-tls" in capsys.readouterr().err
    assert main(["--sumo-net", str(NET), "--sumo-fcd", str(tmp_path / "fcd.xml"), "--sumo-tls",
                 str(tmp_path / "tls.xml"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "5 vehicle records: 2 on roads, 1 in junctions, 2 skipped (vehicle class), 0 unmatched" in printed
    assert "1 dead-end roads" in printed
    trace = Trace.load(out)
    assert len(trace.probes) == 3 and trace.meta["fcd"]["skipped_vehicle_class"] == 2
    assert load_city(out).keys == city.keys


def test_every_controlled_road_is_reported_at_every_switch(city, tmp_path):
    (tmp_path / "tls.xml").write_text(TLS)
    lights, _ = read_tls(tmp_path / "tls.xml", city)
    agg = Aggregator(city)
    seen = []
    for change in lights:
        reports = agg.light_change(int(change["light"]), float(change["t"]), int(change["green"]))
        seen.append(sorted(r.road for r in reports))
    assert seen == [city.lights[0].roads] * 3      # the green->yellow switch flips no state, reported anyway


def test_router_never_uses_a_road_cars_may_not_use():
    everything = from_sumo_net(NET, vclasses=ALL_VCLASSES)
    footway = everything.road_id["F"]
    # the footway made the fastest road from J0 to J1: a car route still avoids it
    times = {r: 100.0 for r in range(everything.n_roads)}
    times[footway] = 0.1
    route = shortest_route(everything, times, "J0", "J1")
    assert footway not in route.roads and route.roads
    assert shortest_route(everything, times, "J0", "J1", vclasses=parse_vclasses("pedestrian")).roads == [footway]


def test_a_light_that_never_switches_is_no_light(tmp_path):
    """A program of one state (netgenerate's corner junctions: one phase "GG") never switches, so its
    roads would never be reported at a switch: they are imported as roads without a light (reported
    periodically), and the light's one switch record (its initial state) is counted as skipped."""
    text = NET.read_text()
    start, end = text.index("<tlLogic"), text.index("</tlLogic>") + len("</tlLogic>")
    steady = text[:start] + ('<tlLogic id="J1" type="static" programID="0" offset="0">'
                             '<phase duration="90" state="GGGG"/></tlLogic>') + text[end:]
    (tmp_path / "steady.net.xml").write_text(steady)
    city = from_sumo_net(tmp_path / "steady.net.xml")
    assert city.lights == [] and (city.exit_light == -1).all()
    assert city.source["steady_lights"] == ["J1"]
    assert city.source["import"]["skipped"]["light that never switches (one state)"] == 1
    (tmp_path / "tls.xml").write_text('<tlsStates><tlsState time="0.00" id="J1" programID="0" phase="0" '
                                      'state="GGGG"/></tlsStates>')
    lights, tls = read_tls(tmp_path / "tls.xml", city)
    assert len(lights) == 0
    assert tls == {"records": 1, "matched": 0, "skipped_no_car_roads": 0, "skipped_never_switches": 1,
                   "unmatched": 0}
    # the same switch record against the network's own program still matches
    lights, tls = read_tls(tmp_path / "tls.xml", from_sumo_net(NET))
    assert tls["matched"] == 1 and tls["skipped_never_switches"] == 0
