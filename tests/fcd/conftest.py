import pytest

from boxcore.testing import FakeClock
from fcd.city import grid_city
from fcd.sim import Simulator
from fcd.tuplespace import LocalTupleSpace, SpaceDriver, TupleSpaceClient, TupleSpaceServer


@pytest.fixture(scope="session")
def small_city():
    return grid_city(4, 4, block=150.0, cycle=40.0, seed=3, districts=2)


@pytest.fixture(scope="session")
def small_trace(small_city):
    return Simulator(small_city, cars=150, seed=5).run(240.0)


@pytest.fixture(params=["local", "tcp"])
async def ts(request):
    """A tuplespace on a FakeClock, in process and over TCP (the tuplespace tests run on both)."""
    clock = FakeClock(1000.0)
    if request.param == "local":
        space = LocalTupleSpace(driver=SpaceDriver(clock=clock))
        space.clock = clock
        yield space
        return
    server = TupleSpaceServer(clock=clock)
    host, port = await server.start("127.0.0.1", 0)
    client = await TupleSpaceClient.connect(host, port)
    client.server, client.driver, client.clock = server, server.driver, clock
    yield client
    await client.close()
    await server.close()
