"""The model's online correction (``Model._score_correction``): learned from the scored record
alone, per class of road, and used only once its own record says it helps."""

import dataclasses

import numpy as np
import pytest

from fcd.aggregate import RoadReport
from fcd.city import City, grid_city
from fcd.model import Model


@pytest.fixture(scope="module")
def half_lit():
    grid = grid_city(3, 3, block=200.0, cycle=60.0, offsets="zero")
    lights = [dataclasses.replace(light, id=i) for i, light in enumerate(grid.lights[::2])]
    return City(grid.graph, lights, junction_radius=grid.junction_radius)


def test_correction_learns_what_the_level_cannot_see(half_lit):
    """A road without a light whose cars take 3x the free-flow time in the minute after a report
    showing it half full of queued cars, and the free-flow time after one showing it empty, at
    the same traffic: its level (past windows at that traffic) sits between the two and misses
    both; the correction, fitted on the scored windows (reports covering each predicted minute),
    learns the queue's effect, and its record switches it on only after CORRECTION_MIN windows."""
    city = half_lit
    road = int(np.flatnonzero(city.exit_light < 0)[0])
    length, free = city.length[road], city.length[road] / city.speed[road]
    full = int(0.5 * city.length[road] * city.lanes[road] / 7.5)
    model = Model(city)
    model.window = 60.0
    rng = np.random.default_rng(3)
    queued = False
    errors = {"early": [], "late": []}
    for k in range(1, Model.CORRECTION_MIN + 120):
        t = 60.0 * k
        travel = 3 * free if queued else free          # the minute that just ended
        queued = bool(rng.random() < 0.5)              # the state this report shows
        # 10 car-seconds per second either way: the traffic the level's kernel compares is equal
        model.observe(RoadReport(road, t, True, queue=full if queued else 0, cars=full if queued else 2,
                                 density=0.0, mean_speed=-1.0 if queued else city.speed[road], departures=5,
                                 interval=60.0, was_green=True, samples=600.0, distance=600.0 * length / travel))
        predicted = model.predict(1, now=t).traverse[0][road]
        truth = 3 * free if queued else free
        phase = "early" if model.corr_scored[0] < Model.CORRECTION_MIN else "late"
        if k > 20:
            errors[phase].append(abs(predicted - truth) / truth)
    assert model.corr_scored[0] >= Model.CORRECTION_MIN and model.corr_scored[1] == 0
    assert model.corr_shrink[0] == 1.0
    assert np.mean(errors["early"]) > 0.3                # the level alone: between the two times
    assert np.mean(errors["late"][-50:]) < 0.12          # corrected: close to each minute's own time
