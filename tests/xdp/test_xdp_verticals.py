"""A vertical's booster, unchanged, on the xdp engine in transparent placement: fcd-booster
redirects the cars' probes (socket delivery through bpf_sk_assign), aggregates, reports by
XML-RPC; with the booster gone, packets pass again (fail-open)."""

import pytest

from tests.fcd.conftest import small_city, small_trace  # noqa: F401 (fixtures)
from tests.fcd.test_fcd_transparent import fcd_through_a_transparent_box


@pytest.mark.root
@pytest.mark.slow
async def test_fcd_booster_on_the_xdp_engine(tmp_path, small_trace):  # noqa: F811
    from tests.xdp.conftest import bpf_problem
    from tests.xdp.test_xdp_engine import api

    problem = bpf_problem()
    if problem:
        pytest.fail(problem)
    await fcd_through_a_transparent_box(
        tmp_path, small_trace, "xdp", "socket", boxd_extra=["--http", "127.0.0.1:8710"],
        rules_gone=lambda lab: api(lab, "/api/status")["engine_status"]["rules"] == 0)
