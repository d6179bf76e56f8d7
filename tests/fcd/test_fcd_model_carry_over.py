"""The newest window (the time the probes took over the window before a prediction): carried over on
roads that take longer to cross than the coming window (``Model.carry_over``: cars already on such a
road drive most of the window's car-seconds on it), and on any road whose own record says it predicts
better (``Model._score_regime``), so a road that holds steady (or trends) far from free flow is not
predicted from its older windows and free flow alone.  Computed by hand on a city without lights (no
light delay, no prior: the corrected prediction is the level)."""

import numpy as np
import pytest

from fcd.aggregate import RoadReport
from fcd.city import City, grid_city
from fcd.model import Model

WINDOW = 60.0


@pytest.fixture(scope="module")
def long_roads():
    """Unlit 1480 m roads (1500 m blocks less two 10 m junction radii) at 13.9 m/s: 106.47 s."""
    grid = grid_city(2, 2, block=1500.0, speed=13.9)
    return City(grid.graph, [], junction_radius=grid.junction_radius)


@pytest.fixture(scope="module")
def short_roads():
    """Unlit 180 m roads: 12.9 s, under half the window."""
    grid = grid_city(2, 2, block=200.0, speed=13.9)
    return City(grid.graph, [], junction_radius=grid.junction_radius)


def report(road: int, t: float, samples: float, distance: float) -> RoadReport:
    """A periodic report of an unlit road: the probes' car-seconds and metres over [t - 60, t)."""
    return RoadReport(road=road, t=t, green=True, queue=0, cars=3, density=2.0, mean_speed=5.0,
                      departures=2, interval=WINDOW, was_green=True, samples=samples, distance=distance)


def model_of(city: City) -> Model:
    model = Model(city, correction_prior=None)
    model.window = WINDOW
    return model


def test_a_long_road_carries_over_its_newest_window(long_roads):
    city = long_roads
    model = model_of(city)
    assert city.length[0] == pytest.approx(1480.0) and city.length[0] / city.speed[0] == pytest.approx(106.4748, abs=1e-4)
    # the road took 1480 x 600 / 3700 = 240 s in [0, 60) and 1480 x 600 / 2960 = 300 s in [60, 120)
    model.observe(report(0, 60.0, 600.0, 3700.0))
    model.observe(report(0, 120.0, 600.0, 2960.0))
    newest, traversals = model.newest_window(120.0, WINDOW)
    assert newest[0] == pytest.approx(300.0) and traversals[0] == pytest.approx(2.0)
    weight = model.carry_over(WINDOW, newest, traversals)
    carried = 1.0 - 60.0 / (2.0 * 1480.0 / 13.9)           # 1 - W / 2T = 0.718243
    assert weight[0] == pytest.approx(0.718243, abs=1e-6) and weight[0] == pytest.approx(carried)
    model.predict(1, now=120.0)
    # the level: harmonic mean of 240, 300 and the free-flow 106.47 s, the windows' traffic alike
    # (10 car-seconds per second each, kernel weight 1): 3 / (1/240 + 1/300 + 1/106.47) = 177.60
    level = 3.0 / (1 / 240.0 + 1 / 300.0 + 1 / (1480.0 / 13.9))
    assert model.stages["corrected"][0] == pytest.approx(level) and level == pytest.approx(177.60, abs=0.01)
    assert model.stages["carried_over"][0] == pytest.approx(level ** (1 - carried) * 300.0 ** carried)
    assert model.stages["carried_over"][0] == pytest.approx(258.80, abs=0.01)


def test_a_window_of_a_few_stopped_cars_does_not_carry_over(long_roads):
    model = model_of(long_roads)
    # 120 car-seconds, 100 m driven: under one road length of traversal (a capped 1776 s otherwise)
    model.observe(report(0, 60.0, 120.0, 100.0))
    newest, traversals = model.newest_window(60.0, WINDOW)
    assert newest[0] == pytest.approx(1776.0) and traversals[0] == pytest.approx(100.0 / 1480.0)
    assert model.carry_over(WINDOW, newest, traversals)[0] == 0.0
    model.predict(1, now=60.0)
    assert model.stages["carried_over"][0] == model.stages["corrected"][0]


def test_a_road_without_data_in_the_newest_window_does_not_carry_over(long_roads):
    model = model_of(long_roads)
    model.observe(report(0, 60.0, 600.0, 3700.0))
    newest, traversals = model.newest_window(180.0, WINDOW)       # [120, 180): nothing reported
    assert np.isnan(newest[0]) and traversals[0] == 0.0
    assert model.carry_over(WINDOW, newest, traversals)[0] == 0.0


def test_a_short_road_keeps_its_level(short_roads):
    model = model_of(short_roads)
    model.observe(report(0, 60.0, 600.0, 1800.0))          # 60 s on a 12.9 s road, 10 traversals
    newest, traversals = model.newest_window(60.0, WINDOW)
    assert newest[0] == pytest.approx(60.0)
    assert not model.carry_over(WINDOW, newest, traversals).any()
    model.predict(1, now=60.0)
    assert np.array_equal(model.stages["carried_over"], model.stages["corrected"])


def test_a_steady_slow_road_is_predicted_from_its_newest_window_once_its_record_says_so(short_roads):
    """A 12.95 s road that takes 135 s window after window (a queue that stays): its level, the
    harmonic mean with the free-flow time, stays far below; the newest window's gain over it is
    the same sign every window, so once the fading count of scored windows reaches REGIME_MIN
    (the 9th: 1 + f + .. + f^8 = 8.30, f = exp(-1/50); 8 windows give 7.46) the road uses it."""
    city = short_roads
    model = model_of(city)
    free = 180.0 / 13.9
    blends = []
    for k in range(1, 13):
        t = 60.0 * k
        model.observe(report(0, t, 1350.0, 1800.0))         # 180 x 1350 / 1800 = 135 s, 10 traversals
        blends.append(model.regime_blend[0])
        model.predict(1, now=t)
        level = (k + 1) / (k / 135.0 + 1 / free)            # the k windows at 135 s and free flow
        assert model.stages["corrected"][0] == pytest.approx(level)
        assert model.stages["regime"][0] == pytest.approx(135.0 if blends[-1] == 1.0 else level)
    # window k's prediction is scored when report k + 1 comes: 9 scored by the 10th report
    assert blends == [0.0] * 9 + [1.0] * 3
    assert model.regime_w[0] == pytest.approx(sum(np.exp(-i / 50.0) for i in range(11)))


def test_a_newest_window_of_few_traversals_is_no_candidate(short_roads):
    model = model_of(short_roads)
    for k in range(1, 13):
        model.observe(report(0, 60.0 * k, 270.0, 360.0))    # 135 s, but 2 traversals (< REGIME_MIN_TRAVERSED 3)
        model.predict(1, now=60.0 * k)
    assert model.regime_w[0] == 0.0 and model.regime_blend[0] == 0.0
    assert model.stages["regime"][0] == model.stages["corrected"][0]


def test_the_regime_choice_is_a_test_not_the_least_sum(short_roads):
    """Hand-set sums over 10 unfaded windows: gains of the newest window's blend (index 1) and the
    newest window itself (index 2) over the prediction."""
    model = model_of(short_roads)
    model.regime_w[0] = model.regime_w2[0] = 10.0
    model.regime_gain[0] = [0.0, 1.0, 0.5]                  # mean gains 0.1 and 0.05
    # variances 0.05 - 0.01 = 0.04 and 0.01 - 0.0025 = 0.0075: two standard errors 0.126 and 0.055
    model.regime_gain2[0] = [0.0, 0.5, 0.1]
    assert model._regime_choice(0) == 0                    # both gains within noise
    model.regime_gain2[0] = [0.0, 0.2, 0.1]                # variance 0.01: two standard errors 0.063 < 0.1
    assert model._regime_choice(0) == 1
    model.regime_w[0] = model.regime_w2[0] = 7.9             # fewer than REGIME_MIN windows
    assert model._regime_choice(0) == 0
