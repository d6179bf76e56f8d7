"""fcd-validate's per-road constant references and the model's stage decomposition, against
values computed by hand (fcd.validate.mape_optimal_constant, online_constant, compare_traverse)."""

from types import SimpleNamespace

import numpy as np
import pytest

from fcd.validate import compare_traverse, hindsight_constant, mape_optimal_constant, online_constant


def test_mape_optimal_constant_is_the_inverse_weighted_median():
    # sorted 1, 2, 4: weights 1, 1/2, 1/4, cumulated 1, 1.5, 1.75; half of 1.75 is reached at 1
    assert mape_optimal_constant([4.0, 1.0, 2.0]) == 1.0
    # weights 1/2, 1/3, 1/10, 1/10: cumulated 0.5, 0.833, ...; half of 1.033 is reached at 3
    assert mape_optimal_constant([2.0, 3.0, 10.0, 10.0]) == 3.0
    # and it is the minimiser: no candidate on a fine grid does better
    y = np.array([2.0, 3.0, 10.0, 10.0])
    grid = np.linspace(1.0, 12.0, 2201)
    best = grid[np.argmin([np.mean(np.abs(c - y) / y) for c in grid])]
    assert np.mean(np.abs(3.0 - y) / y) <= np.mean(np.abs(best - y) / y) + 1e-12


def test_online_constant_uses_only_earlier_intervals_and_free_flow():
    free = np.array([2.0, 5.0])
    # (begin, end, road, travel, sampled); an interval without traffic (0) is no observation
    edges = [(0.0, 60.0, 0, 4.0, 1.0), (60.0, 120.0, 0, 1.0, 1.0), (120.0, 180.0, 0, 8.0, 1.0),
             (60.0, 120.0, 1, 0.0, 0.0), (120.0, 180.0, 1, 6.0, 1.0)]
    rows = [(0.0, 0), (60.0, 0), (120.0, 0), (120.0, 1)]
    got = online_constant(edges, free, rows)
    # (0, 0): free flow alone, 2; (60, 0): {2, 4} -> weights 1/2, 1/4: 2; (120, 0): {2, 4, 1} -> 1;
    # (120, 1): the empty interval is skipped, the interval's own 6 is not seen: free flow 5
    assert got.tolist() == [2.0, 2.0, 1.0, 5.0]


def test_stages_decompose_the_ratio_to_free_flow_per_class():
    city = SimpleNamespace(length=np.array([20.0, 10.0]), speed=np.array([10.0, 10.0]),
                           exit_light=np.array([0, -1]))
    # free flow 2 s and 1 s; SUMO's times over three intervals
    edges = [(0.0, 60.0, 0, 4.0, 1.0), (0.0, 60.0, 1, 2.0, 1.0),
             (60.0, 120.0, 0, 4.0, 1.0), (60.0, 120.0, 1, 2.0, 1.0)]
    stages = {b: {"level": np.array([3.0, 1.5]), "corrected": np.array([4.0, 2.0])} for b in (0.0, 60.0)}
    predictions = {b: stages[b]["level"] for b in stages}     # the published one is not exact: no 0 error share
    out = compare_traverse(city, edges, predictions, 0.0, stages)
    # free flow's APE 0.5 on both roads; the level's 0.25 on both: ratio 0.5; corrected exact: 0
    assert out["stages"]["all"]["level"] == pytest.approx(0.5)
    assert out["stages"]["light-controlled"]["corrected"] == 0.0
    assert out["stages"]["other"]["level"] == pytest.approx(0.5)
    # online constant: the first interval free flow (ratio 1), the second the constant of {free, 4}
    # = 2 on road 0 ({1, 2} -> 1 on road 1): ratio 1 as well; in hindsight exact
    assert out["stages"]["all"]["online_constant"] == pytest.approx(1.0)
    assert out["online_constant_per_road"]["vs_free_flow"] == pytest.approx(1.0)
    assert out["stages"]["all"]["hindsight_constant"] == 0.0
    assert hindsight_constant(np.array([0, 0]), np.array([4.0, 4.0])).tolist() == [4.0, 4.0]
