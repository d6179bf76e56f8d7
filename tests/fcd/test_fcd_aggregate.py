import numpy as np
import pytest

from fcd.aggregate import HALT_SPEED, QUEUE_SPEED, Aggregator, MapMatcher, RoadReport


def test_map_matching_is_exact_on_simulated_positions(small_trace):
    p = small_trace.probes
    matched = MapMatcher(small_trace.city).match(p["x"], p["y"], p["heading"])
    assert np.array_equal(matched, p["road"])


def test_heading_tells_the_two_directions_apart(small_city):
    m = MapMatcher(small_city)
    road = 0
    u, v = small_city.roads[road]
    back = small_city.road_between(v, u)
    x = (small_city.x0[road] + small_city.x1[road]) / 2
    y = (small_city.y0[road] + small_city.y1[road]) / 2
    h = small_city.heading[road]
    assert list(m.match(np.array([x, x]), np.array([y, y]), np.array([h, (h + 180) % 360]))) == [road, back]
    # far away or perpendicular: no road
    assert list(m.match(np.array([x, 1e5]), np.array([y, 1e5]), np.array([(h + 90) % 360, h]))) == [-1, -1]


def test_reports_match_simulator_ground_truth(small_trace):
    city = small_trace.city
    agg = Aggregator(city, max_cars=1000)
    reports = 0
    departures = np.zeros(city.n_roads, dtype=int)
    truth_departures = np.zeros(city.n_roads, dtype=int)
    prev_road = {}
    for t, probes, lights in small_trace.steps():
        for car, road in zip(probes["car"].tolist(), probes["road"].tolist()):
            if car in prev_road and prev_road[car] != road:
                truth_departures[prev_road[car]] += 1
            prev_road[car] = road
        agg.feed(probes)
        for change in lights:
            for rep in agg.light_change(int(change["light"]), t, int(change["green"])):
                on_road = probes[probes["road"] == rep.road]
                assert rep.cars == len(on_road)
                # queue: from the stop line back to the last halted car
                to_end = np.hypot(on_road["x"] - city.x1[rep.road], on_road["y"] - city.y1[rep.road])
                halted = on_road["speed"] < HALT_SPEED
                back = to_end[halted].max() if halted.any() else -1.0
                assert rep.queue == int((to_end <= back + 1e-3).sum())
                moving = on_road["speed"][on_road["speed"] >= QUEUE_SPEED]
                if len(moving):
                    assert abs(rep.mean_speed - moving.mean()) < 1e-3
                assert abs(rep.density - len(on_road) / (city.length[rep.road] / 1000)) < 1e-9
                assert sum(rep.turns.values()) == rep.departures      # no junction probes here
                assert rep.crossed <= rep.departures and rep.crossing_time >= rep.crossed * city.length[rep.road] / city.speed[rep.road] - 2 * rep.crossed
                assert all(out in city.successors[rep.road] for out in rep.turns)
                departures[rep.road] += rep.departures
                truth_departures[rep.road] -= rep.departures
                reports += 1
                again = RoadReport.from_xmlrpc(rep.to_xmlrpc(), city.n_roads)
                assert again == rep
    assert reports > 100
    # every departure counted in a report really happened (the rest are after the last change)
    assert np.all(truth_departures >= 0)
    assert departures.sum() > 0.8 * (departures.sum() + truth_departures.sum())


def test_car_table_is_bounded_and_counts_refusals(small_trace):
    agg = Aggregator(small_trace.city, max_cars=10, stale_after=5.0)
    first = small_trace.probes[small_trace.probes["t"] == 0]
    agg.feed(first)
    assert len(agg.slot_of) == 10
    assert agg.stats["cars_refused"] == len(first) - 10


from hypothesis import given, settings, strategies as st

values = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True), st.text(max_size=3),
                   st.dictionaries(st.text(max_size=3), st.integers(-2, 5), max_size=3))
fields = ["road", "t", "green", "queue", "cars", "density", "mean_speed", "departures", "interval", "was_green",
          "turns"]


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(fields), values, max_size=len(fields)), st.integers(1, 50))
def test_report_validation_raises_value_error_only(data, n_roads):
    try:
        rep = RoadReport.from_xmlrpc(data, n_roads)
    except ValueError:
        return
    assert 0 <= rep.road < n_roads and 0 <= rep.queue <= rep.cars


def _periodic_reports(trace, steps_per_batch: int) -> list:
    agg = Aggregator(trace.city, max_cars=1000, unlit_period=10.0)
    agg.unlit = np.arange(trace.city.n_roads)        # every road reported periodically (the grid lights all)
    steps = [probes for _, probes, _ in trace.steps()]
    reports = []
    for i in range(0, len(steps), steps_per_batch):
        reports += agg.feed(np.concatenate(steps[i:i + steps_per_batch]))
    return reports


def test_periodic_reports_hold_only_probes_before_their_time_however_batched(small_trace):
    """feed splits a batch where a periodic report falls due: batches of 7 or 25 steps give the
    reports one step at a time gives (a report at T holds the probes before T, none after)."""
    one = _periodic_reports(small_trace, 1)
    assert len({r.t for r in one}) >= 20 and sum(r.departures for r in one) > 0
    for steps in (7, 25):
        batched = _periodic_reports(small_trace, steps)
        assert [(r.road, r.t, r.cars, r.queue, r.departures, r.crossed, r.turns) for r in batched] == \
               [(r.road, r.t, r.cars, r.queue, r.departures, r.crossed, r.turns) for r in one]
        for a, b in zip(batched, one):
            assert a.samples == pytest.approx(b.samples) and a.distance == pytest.approx(b.distance)
            assert a.crossing_time == pytest.approx(b.crossing_time)
            assert a.mean_speed == pytest.approx(b.mean_speed)
