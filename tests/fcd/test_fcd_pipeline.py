"""The whole vertical over real sockets: real processes for server, boxd, booster, generators."""

import pytest

from fcd.demo import run_demo


@pytest.mark.slow
async def test_full_pipeline_over_real_sockets(tmp_path):
    lines = []
    summary = await run_demo(tmp_path, lines.append)
    # every packet reached the box or the server: nothing lost at this rate
    assert summary["box_datagrams"] + summary["server_raw_datagrams"] == summary["packets_sent"]
    assert summary["box_datagrams"] > 1000 and summary["server_raw_datagrams"] > 1000
    # the box turned its datagrams into a few XML-RPC requests carrying road reports
    assert summary["reports_box"] > 50 and summary["reports_raw"] > 50
    assert summary["box_reduction_factor"] > 40
    assert summary["route"].startswith("0_0") and summary["route"].endswith("4_4")
    assert summary["route_predicted_s"] > 0
    # the model ran every light cycle of the replayed data (240 s of 40 s cycles) and the route
    # used its predictions for every road
    assert summary["prediction_run"] >= 3
    done, total = summary["predicted_roads_on_route"].split("/")
    assert done == total
    assert any("route 0_0 -> 4_4" in line for line in lines)
