"""booster-loadgen fcd-scale: route look-ups against a real fcd-tuplespace and a real redis-server."""

import json

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
