"""tools.stats: the percentile every experiment reports, checked against numpy's default."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from tools.stats import percentile, summary

finite = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)


@given(st.lists(finite, min_size=1, max_size=200), st.floats(min_value=0, max_value=1))
def test_percentile_is_numpys_linear_definition(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q * 100)), rel=1e-9, abs=1e-6)


def test_percentile_edges():
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.0) == 1.0
    assert percentile([3.0, 1.0, 2.0], 1.0) == 3.0
    assert percentile([1.0, 2.0], 0.5) == 1.5
    with pytest.raises(ValueError):
        percentile([1.0], 1.5)


def test_summary_scales_rounds_and_adds_max():
    assert summary([0.001, 0.002, 0.003], (50, 90), scale=1000, digits=1, with_max=True) == {
        "p50": 2.0, "p90": 2.8, "max": 3.0}
    assert summary([], (50,)) == {"p50": None}
