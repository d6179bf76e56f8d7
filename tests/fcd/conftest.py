import pytest

from fcd.city import grid_city
from fcd.sim import Simulator


@pytest.fixture(scope="session")
def small_city():
    return grid_city(4, 4, block=150.0, cycle=40.0, seed=3, districts=2)


@pytest.fixture(scope="session")
def small_trace(small_city):
    return Simulator(small_city, cars=150, seed=5).run(240.0)
