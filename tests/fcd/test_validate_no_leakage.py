"""fcd-validate scores a prediction made at an interval's start only with data from before it.

The rule (``fcd.validate.usable_at``) is exact, not conservative: a periodic report of a road
without a light stamped at the boundary holds the 60 s before it and is used there.  Proved by
replaying only what came before each boundary: the reports used there are exactly the reports an
aggregator makes that has seen nothing at or after the boundary, so are the queues measured there
(``Model.present``), and the prediction is the same."""

import dataclasses

import numpy as np
import pytest

from fcd.city import City, grid_city
from fcd.sim import Simulator
from fcd.trace import PROBE_DTYPE, Trace
from fcd.validate import predictions_from, replay, usable_at

INTERVAL = 60.0


@pytest.fixture(scope="module")
def half_lit_trace():
    """A grid where every other junction has no light: half the roads are reported every 60 s."""
    grid = grid_city(4, 4, block=150.0, cycle=40.0, offsets="zero")   # switches at 60 s, 120 s, ...
    lights = [dataclasses.replace(light, id=i) for i, light in enumerate(grid.lights[::2])]
    city = City(grid.graph, lights, junction_radius=grid.junction_radius)
    assert 0 < (city.exit_light < 0).sum() < city.n_roads
    return Simulator(city, cars=150, seed=5).run(300.0)


def before(trace: Trace, boundary: float) -> Trace:
    """The trace's messages before ``boundary``, and one probe at it far off the map: it only
    moves the aggregator's clock to the boundary (the periodic reports fall due), matching no road."""
    probes = trace.probes[trace.probes["t"] < boundary]
    clock = np.zeros(1, dtype=PROBE_DTYPE)
    clock["t"], clock["car"], clock["x"], clock["y"], clock["road"] = boundary, 999_999, -1e5, -1e5, -1
    return Trace(trace.city, np.concatenate([probes, clock]), trace.lights[trace.lights["t"] < boundary],
                 meta=trace.meta)


def test_reports_used_at_a_boundary_hold_no_data_from_at_or_after_it(half_lit_trace):
    trace, city = half_lit_trace, half_lit_trace.city
    boundaries = [float(b) for b in np.arange(0.0, 300.0, INTERVAL)]
    full = replay(trace, boundaries, window=INTERVAL)
    assert full.present is not None and any(q.any() for q in full.present.values())
    lit = city.exit_light >= 0
    # the edges the rule decides: periodic reports stamped at a boundary (used there), light
    # switches at a boundary (their probes of that instant are not before it: not used)
    assert any(not lit[r.road] and r.t in boundaries[1:] for r in full.reports)
    assert any(lit[r.road] and r.t in boundaries[1:] for r in full.reports)
    for boundary in boundaries[1:]:
        used = sorted((r for r in full.reports if usable_at(city, r, boundary)), key=lambda r: r.key)
        past = replay(before(trace, boundary), [b for b in boundaries if b <= boundary], window=INTERVAL)
        seen = sorted((r for r in past.reports if r.t <= boundary), key=lambda r: r.key)
        assert [dataclasses.asdict(r) for r in used] == [dataclasses.asdict(r) for r in seen], boundary
        assert any(not lit[r.road] and r.t == boundary for r in used)
        assert not any(r.t > boundary or (lit[r.road] and r.t == boundary) for r in used)
        # and the prediction made there is the one made from that past alone
        # the queues measured at the boundaries too: from the past alone, the same
        assert past.present is not None and boundary in past.present
        np.testing.assert_array_equal(past.present[boundary], full.present[boundary])
        alone = predictions_from(city, seen, [b for b in boundaries if b <= boundary], INTERVAL, past.present)
        np.testing.assert_array_equal(alone[boundary], full.predictions[boundary])
