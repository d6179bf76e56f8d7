"""booster-demo --scale: the lab deployment (boxes, front, Redis, two workers, one killed) end to end."""

import json

import pytest

from tests.redis_support import require_redis


@pytest.mark.root
@pytest.mark.slow
def test_scale_demo_applies_everything_once_across_a_killed_worker(tmp_path):
    require_redis()
    from tools.demo import main
    stats = tmp_path / "demo.json"
    assert main(["--scale", "--no-dashboard", "--keep", "0", "--workdir", str(tmp_path / "w"),
                 "--stats-json", str(stats)]) == 0
    part = json.loads(stats.read_text())["parts"]["fcd-scale"]
    assert part["ok"] and part["lost_on_the_way"] == 0 and part["refused"] == 0
    assert part["probes_applied"] == part["raw_probes"] > 0                  # every raw probe, once
    assert part["lights_applied"] == part["raw_lights"] > 0
    assert part["reports_box"] > 0 and part["reports_raw"] > 0
    assert set(part["applied_by"]) == {"worker0", "worker1"}
    assert part["applied_by"]["worker1"] >= part["worker1_killed_after"] >= 2000
    assert part["box_datagrams"] + part["raw_datagrams"] == part["packets_sent"]
