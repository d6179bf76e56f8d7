"""booster-loadgen fcd-scale: route look-ups against a real fcd-tuplespace and a real redis-server."""

import json

import pytest

from tests.redis_support import require_redis
from tools.loadgen import main as loadgen


def test_route_lookups_are_measured_on_both_stores(tmp_path, capsys):
    require_redis()
    out = tmp_path / "scale.json"
    assert loadgen(["fcd-scale", "--no-cgroups", "--clients", "1,4", "--grid", "3x3", "--duration", "0.5",
                    "--processes", "2", "--json", str(out), "--plot", str(tmp_path / "scale.png")]) == 0
    figures = json.loads(out.read_text())
    assert set(figures["route_lookups"]) == {"tcp", "redis"}
    for store in ("tcp", "redis"):
        assert set(figures["route_lookups"][store]) == {"1", "4"}
        assert all(rate > 0 for rate in figures["route_lookups"][store].values())
    assert figures["ratio_at_max_clients"] > 0
    assert {row["tuples"] for row in figures["rows"]} == {3 * figures["roads"]}   # every prediction stored
    assert (tmp_path / "scale.png").stat().st_size > 0


def test_worker_knees_are_measured_with_real_workers(tmp_path, capsys):
    """The server side as workers: a real redis-server, front and workers; every point's data applied."""
    require_redis()
    out = tmp_path / "workers.json"
    assert loadgen(["fcd-scale", "--no-cgroups", "--backends", "", "--workers", "1,2", "--rates", "500,1000",
                    "--duration", "1", "--settle", "0.5", "--cars", "100", "--workdir", str(tmp_path / "w"),
                    "--json", str(out), "--plot", str(tmp_path / "workers.png")]) == 0
    figures = json.loads(out.read_text())
    assert set(figures["knee_pps"]) == {"1", "2"}
    rows = figures["worker_rows"]
    assert [(r["workers"], r["offered_pps"]) for r in rows] == [(1, 500), (1, 1000), (2, 500), (2, 1000)]
    for row in rows:
        assert row["sent"] > 0 and row["applied"] + row["refused"] <= row["sent"]
        assert sum(row["applied_by"].values()) == row["applied"]
    assert all(len(r["applied_by"]) == 2 for r in rows if r["workers"] == 2)     # both workers applied data
    assert (tmp_path / "workers.png").stat().st_size > 0


@pytest.mark.root
def test_route_lookups_say_which_side_was_saturated(tmp_path, capsys):
    """In cgroups: each row has the store's and the routers' CPU and throttled periods over the
    measured window, per look-up too, and names the saturated side."""
    require_redis()
    out = tmp_path / "scale.json"
    assert loadgen(["fcd-scale", "--backends", "tcp", "--clients", "4", "--grid", "3x3", "--duration", "1",
                    "--budget", "0.05", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["store_periods"] > 0 and row["routers_periods"] > 0
    assert row["store_cpu_window_s"] > 0 and row["routers_cpu_window_s"] > 0
    assert row["store_cpu_per_lookup_us"] == pytest.approx(1e6 * row["store_cpu_window_s"] / row["lookups"], rel=0.01)
    assert row["bound"] in ("store", "routers", "both", "machine")
    assert row["store_throttled_share"] == round(row["store_throttled_periods"] / row["store_periods"], 3)
