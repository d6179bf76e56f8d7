"""The demo: real processes (boxd on the user engine, gnutella-booster, four servents) on loopback."""

import asyncio

from gnutella.demo import run_demo


async def test_demo_answers_inside_the_cluster_and_verifies_the_download(tmp_path):
    lines = []
    summary = await asyncio.wait_for(run_demo(tmp_path, lines.append), 60)
    assert summary["answered_inside"] is True
    assert summary["download_verified"] is True
    assert summary["remote_queries_received"] == 1          # only the query the cluster could not answer
    assert summary["outside_query_hits"] >= 1 and summary["outside_download_verified"] is True
    assert summary["forwarded_at_once"] == 1                # no local table may hold it: no local wait
    assert summary["intercepted_connections"] >= 3
    assert summary["pings_answered_by_booster"] >= 3
    assert summary["elapsed_s"] < 60
    assert any("verified" in line for line in lines)
