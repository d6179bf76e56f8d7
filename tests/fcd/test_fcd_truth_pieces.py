"""The time probes took on a light-controlled road, over SUMO's edgeData intervals: a report's
window is a light phase, so its car-seconds and metres come cut on the aggregator's periodic clock
(``RoadReport.pieces``) and the model reads them per interval, as SUMO computes ``traveltime``
(length x sampledSeconds / metres driven over the steps in [begin, end))."""
import numpy as np
import pytest

from fcd.aggregate import MAX_PIECES, Aggregator, RoadReport
from fcd.model import Model
from fcd.trace import PROBE_DTYPE


def _probes_on(city, road, times, speeds):
    """One car on ``road``, at the road's middle third, one probe per time."""
    out = np.zeros(len(times), dtype=PROBE_DTYPE)
    share = np.linspace(0.35, 0.65, len(times))
    out["t"] = times
    out["car"] = 7
    out["x"] = city.x0[road] + share * (city.x1[road] - city.x0[road])
    out["y"] = city.y0[road] + share * (city.y1[road] - city.y0[road])
    out["speed"] = speeds
    out["heading"] = city.heading[road]
    out["road"] = road
    return out


def _sumo_style(city, road, times, speeds, begin, end):
    """SUMO's traveltime over [begin, end) from 1 s steps: each step on the road counts its
    second and the metres driven in it; a car's first step counts none (it just appeared)."""
    seconds = metres = 0.0
    for i, (t, v) in enumerate(zip(times, speeds)):
        if i and begin <= t < end:
            seconds += t - times[i - 1]
            metres += (t - times[i - 1]) * v
    return city.length[road] * seconds / metres


def test_a_phase_across_an_interval_edge_is_read_per_interval(small_city):
    city = small_city
    road = int(np.flatnonzero(city.exit_light >= 0)[0])
    light = int(city.exit_light[road])
    bit = city.lights[light].roads.index(road)
    # moving until 58, halted 58-70 (all in the second interval), moving again
    times = np.arange(46.0, 76.0)
    speeds = np.where((times >= 58) & (times < 70), 0.0, 8.0)
    agg = Aggregator(city, unlit_period=60.0)
    agg.light_change(light, 45.0, 1 << bit)                 # the phase starts at 45 ...
    agg.feed(_probes_on(city, road, times, speeds))
    report = next(r for r in agg.light_change(light, 75.0, 0) if r.road == road)   # ... and ends at 75
    assert report.interval == 30.0
    assert [p[0] for p in report.pieces] == [0.0, 60.0]
    assert sum(p[1] for p in report.pieces) == pytest.approx(report.samples)
    assert sum(p[2] for p in report.pieces) == pytest.approx(report.distance)
    again = RoadReport.from_xmlrpc(report.to_xmlrpc(), city.n_roads)
    assert again == report

    model = Model(city)
    model.observe(again)
    for begin, end in ((0.0, 60.0), (60.0, 120.0)):
        assert model._travel_over(road, begin, end) == pytest.approx(
            _sumo_style(city, road, times, speeds, begin, end))
    # shared out by overlap (the report without its pieces) the halt is smeared over both intervals
    smeared = Model(city)
    smeared.observe(RoadReport(**{**again.__dict__, "pieces": []}))
    assert smeared._travel_over(road, 60.0, 120.0) < 0.8 * _sumo_style(city, road, times, speeds, 60.0, 120.0)


def test_probes_at_the_reports_own_tick_count_in_the_interval_it_starts(small_city):
    """A switch at 60 on the clock's tick: the probe at 60 belongs to [60, 120) (SUMO's step at
    60), a piece of no length at the window's end, counted where it lies."""
    city = small_city
    road = int(np.flatnonzero(city.exit_light >= 0)[0])
    light = int(city.exit_light[road])
    bit = city.lights[light].roads.index(road)
    times = np.arange(50.0, 61.0)
    speeds = np.where(times == 60, 0.0, 6.0)
    agg = Aggregator(city, unlit_period=60.0)
    agg.light_change(light, 49.0, 1 << bit)
    agg.feed(_probes_on(city, road, times, speeds))
    report = next(r for r in agg.light_change(light, 60.0, 0) if r.road == road)
    assert [p[0] for p in report.pieces] == [0.0, 60.0] and report.pieces[1][1] == 1.0
    model = Model(city)
    model.observe(report)
    assert model._travel_over(road, 0.0, 60.0) == pytest.approx(_sumo_style(city, road, times, speeds, 0.0, 60.0))
    assert model._travel_over(road, 60.0, 120.0) is None        # one halted second: no metres


def test_a_phase_whose_probes_all_lie_in_a_later_interval_is_read_there(small_city):
    """A phase from 45 to 75 whose probes all come after 60 (the road was empty before): the
    report carries that one tick as its piece, so nothing is shared out into [0, 60), where
    SUMO saw no car, and [60, 120) reads what the probes took (read over the whole window, a
    half of their seconds and metres went to [0, 60))."""
    city = small_city
    road = int(np.flatnonzero(city.exit_light >= 0)[0])
    light = int(city.exit_light[road])
    bit = city.lights[light].roads.index(road)
    times = np.arange(62.0, 75.0)
    speeds = np.where(times < 68, 0.0, 7.0)
    agg = Aggregator(city, unlit_period=60.0)
    agg.light_change(light, 45.0, 1 << bit)
    agg.feed(_probes_on(city, road, times, speeds))
    report = next(r for r in agg.light_change(light, 75.0, 0) if r.road == road)
    assert [p[0] for p in report.pieces] == [60.0]
    model = Model(city)
    model.observe(RoadReport.from_xmlrpc(report.to_xmlrpc(), city.n_roads))
    assert model._travel_over(road, 0.0, 60.0) is None
    assert model._travel_over(road, 60.0, 120.0) == pytest.approx(_sumo_style(city, road, times, speeds, 60.0, 120.0))
    # a window that starts in its probes' tick needs no piece
    agg.feed(_probes_on(city, road, np.arange(76.0, 80.0), np.full(4, 7.0)))
    assert next(r for r in agg.light_change(light, 80.0, 1 << bit) if r.road == road).pieces == []


@pytest.mark.parametrize("pieces, error", [
    ("x", "list"), ([[0.0, 1.0]], "bad report piece"), ([[0.0, -1.0, 1.0]], "bad report piece"),
    ([[0.0, float("nan"), 1.0]], "bad report piece"), ([[60.0, 1.0, 1.0], [0.0, 1.0, 1.0]], "increasing"),
    ([[float(i), 1.0, 1.0] for i in range(MAX_PIECES + 1)], "at most"), ([[True, 1.0, 1.0]], "bad report piece"),
])
def test_bad_pieces_are_refused_saying_what(small_city, pieces, error):
    road = int(np.flatnonzero(small_city.exit_light >= 0)[0])
    data = RoadReport(road=road, t=75.0, green=False, queue=0, cars=1, density=1.0, mean_speed=8.0, departures=0,
                      interval=30.0, was_green=True, samples=29.0, distance=150.0).to_xmlrpc()
    data["pieces"] = pieces
    with pytest.raises(ValueError, match=error):
        RoadReport.from_xmlrpc(data, small_city.n_roads)


def test_a_light_that_never_switches_keeps_its_pieces_bounded(small_city):
    city = small_city
    road = int(np.flatnonzero(city.exit_light >= 0)[0])
    agg = Aggregator(city, unlit_period=1.0)
    times = np.arange(0.0, MAX_PIECES + 20.0)
    agg.feed(_probes_on(city, road, times, np.full(len(times), 1.0)))
    assert len(agg.pieces[road]) <= MAX_PIECES and agg.stats["pieces_folded"] > 0
    assert sum(s for s, _ in agg.pieces[road].values()) == pytest.approx(agg.samples[road])
