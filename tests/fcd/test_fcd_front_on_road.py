"""A road's car-seconds and metres as SUMO's edgeData counts them for a vehicle's front: the step
in which the front crosses the road's start counts only from the crossing, the step in which it
crosses the road's end only up to it, and time spent in the junction (before the start, past the
end, even where a probe is still matched to the road within the matcher's margin) counts on no
road.  On a road of a few seconds' drive the whole-step count was off by tens of percent."""
import numpy as np
import pytest

from fcd.aggregate import Aggregator
from fcd.trace import PROBE_DTYPE


def _probes_along(city, road, along, speeds, car=7, t0=0.0):
    """One car on ``road``'s lane 0 at metres ``along`` its start (negative: before it), 1 s apart."""
    shape = np.asarray(city.lane_shapes[road][0], dtype=float)
    start, end = shape[0], shape[-1]
    unit = (end - start) / np.hypot(*(end - start))
    out = np.zeros(len(along), dtype=PROBE_DTYPE)
    out["t"] = t0 + np.arange(len(along))
    out["car"] = car
    out["x"] = start[0] + np.asarray(along) * unit[0]
    out["y"] = start[1] + np.asarray(along) * unit[1]
    out["speed"] = speeds
    out["heading"] = city.heading[road]
    out["road"] = road
    return out


def _sumo_front(along, speeds, length):
    """SUMO's front sampled seconds and metres on a lane [0, length] from 1 s steps (Euler: in the
    step ending at probe k the front moves from along[k-1] to along[k] at speeds[k]): each step
    counts the part of its path on the lane, and that part / speed of its second."""
    seconds = metres = 0.0
    for k in range(1, len(along)):
        a, b = along[k - 1], along[k]
        part = max(0.0, min(b, length) - max(a, 0.0))
        if speeds[k] > 0:
            seconds += part / speeds[k]
        metres += part
    return seconds, metres


def test_entry_and_exit_steps_count_the_fraction_the_front_was_on_the_road(small_city):
    city = small_city
    road = int(np.flatnonzero(city.exit_light >= 0)[0])
    length = float(np.hypot(*np.diff(np.asarray(city.lane_shapes[road][0], dtype=float), axis=0).T).sum())
    # slow in (2 m/s across the start), faster along, 12 m/s across the end, then standing
    # 0.3 m past the end (still matched to the road: within the matcher's margin) for 3 s
    speeds = [2.0, 2.0, 4.0, 8.0, 12.0, 12.0]
    along = [-1.5]
    for v in speeds[1:]:
        along.append(along[-1] + v)
    while along[-1] + 12.0 < length:
        along.append(along[-1] + 12.0)
        speeds.append(12.0)
    along.append(length + 0.3)
    speeds.append((length + 0.3 - along[-2]))
    along += [length + 0.3] * 3
    speeds += [0.0] * 3
    probes = _probes_along(city, road, along, speeds)
    agg = Aggregator(city, unlit_period=60.0)
    assert agg.matcher.lane_length[agg.matcher.lane_road.tolist().index(road)] == pytest.approx(length)
    agg.feed(probes)
    seconds, metres = _sumo_front(along, speeds, length)
    assert agg.samples[road] == pytest.approx(seconds, rel=1e-6)
    assert agg.distance[road] == pytest.approx(metres, rel=1e-6)
    assert metres == pytest.approx(length)
    # whole steps (every probe matched to the road counts its second and speed x second) miss it
    matched = agg.matcher.match(probes["x"].astype(float), probes["y"].astype(float),
                                probes["heading"].astype(float)) == road
    whole = float(matched[1:].sum())
    assert abs(whole - seconds) > 0.1 * seconds


def test_a_junction_between_two_roads_counts_on_neither(small_city):
    """A car leaves road A past its end, crosses the junction in 3 s and enters B: A gets the
    part of its leaving step before its end, B the part of its entering step after its start,
    and the junction's seconds go to no road (they used to go to B with the first probe there)."""
    city = small_city
    a = int(np.flatnonzero(city.exit_light >= 0)[0])
    b = city.successors[a][0]
    agg = Aggregator(city, unlit_period=60.0)
    len_a = float(agg.matcher.lane_length[agg.matcher.lane_road.tolist().index(a)])
    on_a = _probes_along(city, a, [len_a - 9.0, len_a - 3.0], [6.0, 6.0])
    # in the junction (well past A's end) for 3 s, then 2 m into B moving 6 m/s
    mid = _probes_along(city, a, [len_a + 6.0, len_a + 9.0, len_a + 9.5], [6.0, 3.0, 0.5], t0=2.0)
    on_b = _probes_along(city, b, [2.0], [6.0], t0=5.0)
    probes = np.concatenate([on_a, mid, on_b])
    agg.feed(probes)
    # A: the step to t=2 moves 6 m, of which 3 are on A: half a second; B: 2 m of 6, a third
    assert agg.samples[a] == pytest.approx(1.0 + 0.5)
    assert agg.distance[a] == pytest.approx(6.0 + 3.0)
    assert agg.samples[b] == pytest.approx(1.0 / 3.0)
    assert agg.distance[b] == pytest.approx(2.0)
