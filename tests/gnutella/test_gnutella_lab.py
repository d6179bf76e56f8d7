"""The booster in the three-clusters lab (root): linux engine, TPROXY, real servents as processes.

Runs the experiment at small scale through ``booster-loadgen gnutella`` in both modes and
checks that the boosters intercepted the servents' connections to other clusters, kept the
overlay inside the clusters, and cut inter-cluster traffic without losing searches or downloads."""

import json

import pytest

from tools.loadgen import main as loadgen


@pytest.mark.root
@pytest.mark.slow
def test_boosters_cluster_the_overlay_in_three_clusters(tmp_path):
    out_json, out_png = tmp_path / "g.json", tmp_path / "g.png"
    status = loadgen(["gnutella", "--servents", "9", "--files", "12", "--queries", "2", "--warmup", "5",
                      "--query-gap", "1", "--wait-hits", "2", "--seed", "3", "--workdir", str(tmp_path / "work"),
                      "--json", str(out_json), "--plot", str(out_png)])
    assert status == 0
    out = json.loads(out_json.read_text())
    assert out_png.stat().st_size > 10_000
    without, with_ = out["without"], out["with"]
    for mode in (without, with_):
        assert set(mode) >= {"inter_cluster_messages", "inter_cluster_bytes", "query_success", "first_hit_ms",
                             "download_success"}
        assert set(mode["first_hit_ms"]) == {"p50", "p99"}
    assert without["queries_completed"] == with_["queries_completed"] == 18
    # without boosters the random overlay spans the clusters
    assert without["servent_messages_crossing"] > 50
    # with them, every servent link to another cluster ended at its own edge's booster ...
    assert with_["edge_processes_lost"] == []              # every box intercepted for the whole run
    assert with_["servent_messages_crossing"] == 0
    # ... and every connection a servent opened to another cluster (links, downloads, GIV) was
    # handled by its own box: none went past it
    assert with_["connections_past_box"] == 0 and without["connections_past_box"] > 0
    for edge in ("edge1", "edge2", "edge3"):
        stats = with_["boosters"][edge]
        assert stats["intercepted"] >= 3 and stats["pings_answered"] >= 1
        assert stats["local_queries"] >= 1
    # ... and only booster-to-booster traffic crossed: far less of it, same search results
    assert out["reduction"]["messages"] >= 0.8
    assert with_["query_success"] >= without["query_success"] - 0.06
    assert with_["download_success"] >= without["download_success"] - 0.06
    assert with_["query_success"] >= 0.9
