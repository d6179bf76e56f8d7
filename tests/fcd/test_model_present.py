"""Model.present: the queue measured on every road at the moment of the prediction starts the
light delay's point queue (instead of the queue at the light's last switch)."""

import numpy as np
import pytest

from fcd.city import grid_city
from fcd.model import Model
from tests.fcd.test_fcd_model_route import learned_light


def test_present_queue_starts_the_point_queue():
    """Learned 60 s cycle, 30 s green from t=0, 0.1 cars/s arriving, 0.5 served.  From the
    switch report (0 cars at t=0) the queue is empty at the start of red (t=30) and grows to 3
    over the red: L/v + 1.5 / 0.1 = L/v + 15 s.  Measured 3 cars at t=30 instead: it grows 3 -> 6,
    mean 4.5 cars, L/v + 45 s."""
    city = grid_city(3, 3, block=200.0, cycle=60.0, offsets="zero")
    model = Model(city)
    road, drive = learned_light(model, city)
    from_switch, _ = model.light_delay(30.0, 30.0)
    assert from_switch[road] == pytest.approx(drive + 15.0, abs=0.1)
    queue = np.zeros(city.n_roads, dtype=np.int64)
    queue[road] = 3
    model.present(30.0, queue)
    from_now, _ = model.light_delay(30.0, 30.0)
    assert from_now[road] == pytest.approx(drive + 45.0, abs=0.1)
    assert model.report_t[road] == 30.0 and model.report_queue[road] == 3.0
    # every lit road's measured queue is taken, an empty one too
    other = city.lights[4].roads[1]
    assert model.report_queue[other] == 0.0 and model.report_t[other] == 30.0


def test_the_point_queue_runs_from_the_lights_last_switch():
    """Learned 60 s cycle, 30 s green; the last green began at t=0 but (actuated) ran until 50,
    so at t=60 the road has been red for 10 s: its red lasts its learned 30 s, to t=80.  From an
    empty queue at 0.1 cars/s the next 20 s are red: the queue grows 0 -> 2, mean 1 car,
    L/v + 10 s.  Extrapolating the cycle from the start of green instead would call them green.
    For a light that keeps its schedule (red from t=30) both agree: green from 60, L/v."""
    city = grid_city(3, 3, block=200.0, cycle=60.0, offsets="zero")
    model = Model(city)
    road = city.lights[4].roads[0]
    model.cycle_r[road], model.green_r[road], model.green_start[road] = 60.0, 30.0, 0.0
    model.arrival_rate[road], model.mu[road] = 0.1, 0.5
    model.present(60.0, np.zeros(city.n_roads, dtype=np.int64))
    drive = city.length[road] / model.v[road]
    model.red_start[road] = 50.0
    late, _ = model.light_delay(60.0, 20.0)
    assert late[road] == pytest.approx(drive + 10.0, abs=0.1)
    model.red_start[road] = 30.0
    on_time, _ = model.light_delay(60.0, 20.0)
    assert on_time[road] == pytest.approx(drive, abs=0.1)
