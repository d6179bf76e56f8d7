"""MapMatcher.locate against a brute force over every segment: the grid's candidate lists and the
heading-first pruning must never change which segment a probe goes to."""
import numpy as np
from hypothesis import given, settings, strategies as st

from fcd.aggregate import MapMatcher


def brute_force_segment(m: MapMatcher, x: float, y: float, heading: float) -> int:
    """The first segment of least ``distance + 0.1 x heading difference`` among those within
    max_distance and max_heading (-1: none), by MapMatcher.project over all segments."""
    every = np.arange(len(m.sx0))
    dist, dh, _, _ = m.project(every, np.full(len(every), x), np.full(len(every), y), np.full(len(every), heading))
    cost = np.where((dist <= m.max_distance) & (dh <= m.max_heading), dist + dh * 0.1, np.inf)
    best = int(np.argmin(cost))
    return best if np.isfinite(cost[best]) else -1


def probes(city, n):
    """Points near the lanes (most matched) and anywhere around the city (many not)."""
    xmin, ymin, xmax, ymax = city.bbox
    near_lane = st.tuples(st.sampled_from([tuple(p) for shapes in city.lane_shapes for s in shapes for p in s]),
                          st.floats(-25, 25), st.floats(-25, 25)).map(lambda t: (t[0][0] + t[1], t[0][1] + t[2]))
    anywhere = st.tuples(st.floats(xmin - 60, xmax + 60), st.floats(ymin - 60, ymax + 60))
    return st.lists(st.tuples(st.one_of(near_lane, anywhere), st.floats(0, 360, exclude_max=True)),
                    min_size=1, max_size=n)


def test_locate_picks_the_brute_force_segment(small_city):
    m = MapMatcher(small_city)
    assert not m.has_internal     # the grid city: no junction lanes, the cost alone decides

    @settings(max_examples=150, deadline=None)
    @given(probes(small_city, 40))
    def check(points):
        x = np.array([p[0][0] for p in points])
        y = np.array([p[0][1] for p in points])
        h = np.array([p[1] for p in points])
        road, lane, to_end, seg = m.locate(x, y, h)
        expected = [brute_force_segment(m, *args) for args in zip(x.tolist(), y.tolist(), h.tolist())]
        assert seg.tolist() == expected
        assert road.tolist() == [int(m.s_road[k]) if k >= 0 else -1 for k in expected]

    check()


def test_locate_matches_some_and_not_all(small_city):
    """The property above is not vacuous: the sample has matched and unmatched probes."""
    m = MapMatcher(small_city)
    xmin, ymin, xmax, ymax = small_city.bbox
    rng = np.random.default_rng(7)
    pts = np.concatenate([np.asarray(s) for shapes in small_city.lane_shapes for s in shapes])
    x = np.r_[pts[:, 0] + rng.normal(0, 3, len(pts)), rng.uniform(xmin, xmax, 200)]
    y = np.r_[pts[:, 1] + rng.normal(0, 3, len(pts)), rng.uniform(ymin, ymax, 200)]
    h = rng.uniform(0, 360, len(x))
    seg = m.locate(x, y, h)[3]
    assert seg.tolist() == [brute_force_segment(m, *a) for a in zip(x.tolist(), y.tolist(), h.tolist())]
    assert 0 < int((seg >= 0).sum()) < len(seg)
