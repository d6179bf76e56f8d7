"""The demo: real processes (boxd on the user engine, gnutella-booster, four servents) on loopback."""

import asyncio

from gnutella.demo import run_demo


async def test_demo_answers_inside_the_cluster_and_verifies_the_download(tmp_path):
    lines = []
    summary = await asyncio.wait_for(run_demo(tmp_path, lines.append), 60)
    assert summary["answered_inside"] is True
    assert summary["download_verified"] is True
    assert summary["remote_queries_received"] == 0          # the outside never saw the query
    assert summary["intercepted_connections"] >= 3
    assert summary["pings_answered_by_booster"] >= 3
    assert summary["elapsed_s"] < 60
    assert any("verified" in line for line in lines)
