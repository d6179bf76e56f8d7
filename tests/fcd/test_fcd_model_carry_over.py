"""The newest window's time carried over on roads that take longer to cross than the coming window
(``Model.carry_over``): cars already on such a road drive most of the window's car-seconds on it, so
a road that holds steady (or trends) far from free flow is not predicted from its older windows and
free flow alone.  Computed by hand on a city without lights (no light delay, no prior: the
corrected prediction is the level)."""

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
    weight, newest = model.carry_over(120.0, WINDOW)
    carried = 1.0 - 60.0 / (2.0 * 1480.0 / 13.9)           # 1 - W / 2T = 0.718243
    assert weight[0] == pytest.approx(0.718243, abs=1e-6) and weight[0] == pytest.approx(carried)
    assert newest[0] == pytest.approx(300.0)
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
    weight, newest = model.carry_over(60.0, WINDOW)
    assert weight[0] == 0.0 and np.isnan(newest[0])
    model.predict(1, now=60.0)
    assert model.stages["carried_over"][0] == model.stages["corrected"][0]


def test_a_road_without_data_in_the_newest_window_does_not_carry_over(long_roads):
    model = model_of(long_roads)
    model.observe(report(0, 60.0, 600.0, 3700.0))
    weight, newest = model.carry_over(180.0, WINDOW)       # [120, 180): nothing reported
    assert weight[0] == 0.0 and np.isnan(newest[0])


def test_a_short_road_keeps_its_level(short_roads):
    model = model_of(short_roads)
    model.observe(report(0, 60.0, 600.0, 1800.0))          # 60 s on a 12.9 s road, 10 traversals
    weight, newest = model.carry_over(60.0, WINDOW)
    assert not weight.any() and np.isnan(newest).all()
    model.predict(1, now=60.0)
    assert np.array_equal(model.stages["carried_over"], model.stages["corrected"])
