"""The booster in the three-clusters lab (root): linux engine, TPROXY, real servents as processes.

Runs the experiment at small scale in both modes and checks that the boosters intercepted
the servents' connections to other clusters, kept the overlay inside the clusters, and cut
inter-cluster traffic without losing searches or downloads."""

import pytest

from gnutella.experiment import ExperimentConfig, run_experiment


@pytest.mark.root
@pytest.mark.slow
async def test_boosters_cluster_the_overlay_in_three_clusters(tmp_path):
    cfg = ExperimentConfig(servents=9, files=12, queries_per_servent=2, warmup=5.0, query_gap=1.0,
                           wait_hits=2.0, tail=4.0, seed=3)
    lines = []
    out = await run_experiment(cfg, tmp_path, lines.append)
    without, with_ = out["without"], out["with"]
    assert without["queries_completed"] == with_["queries_completed"] == 18
    # without boosters the random overlay spans the clusters
    assert without["servent_messages_crossing"] > 50
    # with them, every servent link to another cluster ended at its own edge's booster ...
    assert with_["servent_messages_crossing"] == 0
    for edge in ("edge1", "edge2", "edge3"):
        stats = with_["boosters"][edge]
        assert stats["intercepted"] >= 3 and stats["pings_answered"] >= 1
        assert stats["local_queries"] >= 1
    # ... and only booster-to-booster traffic crossed: far less of it, same search results
    assert out["reduction"]["messages"] >= 0.8
    assert with_["query_success"] >= without["query_success"] - 0.06
    assert with_["download_success"] >= without["download_success"] - 0.06
    assert with_["query_success"] >= 0.9
