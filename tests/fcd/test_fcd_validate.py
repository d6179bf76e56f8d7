"""fcd-validate end to end: SUMO runs a small netgenerate grid and a RESCO city cut, fcd's reports,
predictions and routes are compared with SUMO's outputs (about 30 s)."""

import json
import os
from importlib.util import find_spec

import pytest

from fcd.validate import main

IN_CI = os.environ.get("CI") == "true"


def need(module: str, why: str) -> None:
    if find_spec(module) is None:
        if IN_CI:
            pytest.fail(f"{module} is not installed ({why}); tools/bootstrap.sh installs it")
        pytest.skip(f"{module} is not installed ({why})")


@pytest.mark.slow
def test_validation_on_a_generated_grid_and_a_city_cut(tmp_path, capsys):
    need("sumo", "the eclipse-sumo wheel, the sumo extra")
    need("sumo_rl", "the RESCO networks: pip install --no-deps sumo-rl")
    out = tmp_path / "v.json"
    assert main(["--scenarios", "grid-static,cologne1", "--duration", "480", "--json", str(out),
                 "--plot", str(tmp_path / "v.png"), "--work", str(tmp_path / "work")]) == 0
    printed = capsys.readouterr().out
    assert "grid-static: map matching" in printed and "cologne1: map matching" in printed
    data = json.loads(out.read_text())
    assert (tmp_path / "v.png").stat().st_size > 10_000
    for res in data["scenarios"]:
        assert res["fcd"]["records"] > 1000 and res["fcd"]["unmatched"] == 0
        assert res["replay"]["lost"] == 0 and res["replay"]["ingest"]["malformed"] == 0
        assert res["map_matching"]["on_road_correct"] > 0.97 and res["map_matching"]["in_junction_correct"] > 0.9
        queue = res["queue"]["all"]
        assert queue["n"] > 100
        assert queue["mae"] <= 0.3 and queue["r"] >= 0.95, queue
        targets = res["targets"]
        assert targets["routes_car_roads_only"] and targets["every_controlled_road_reported_at_every_switch"]
        traverse = res["traverse"]["all"]
        assert traverse["n"] > 50
        # the model does better than both baselines (the full targets are reported in docs/fcd.md)
        assert traverse["model_vs_free_flow"] < 1.0 and traverse["model_vs_persistence"] < 1.0, traverse
        assert res["routes"]["n"] > 10


def test_unknown_scenario_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--scenarios", "atlantis"])
    assert exit_.value.code == 2
    assert "unknown scenario 'atlantis'" in capsys.readouterr().err
