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


@pytest.mark.slow
def test_validation_through_real_processes_agrees_with_the_in_process_replay(tmp_path, capsys):
    """grid-static, 300 s: fcd-gen -> boxd (user engine) + fcd-booster -> fcd-server over
    loopback, the reports read back from /api/roads/<road>/history, scored like the in-process
    replay.  Every report of one path is in the other; the figures agree.  Not bit for bit: the
    aggregation counts a batch's probes into the reports due inside it, and the box's batches are
    cut by a wall-clock flush timer (see docs/fcd.md, "Validation")."""
    need("sumo", "the eclipse-sumo wheel, the sumo extra")
    results = {}
    for through in ("in-process", "processes"):
        out = tmp_path / f"{through}.json"
        # like for like: a box sends reports, not the queues between them, so in process too
        # the model predicts from the reports alone
        assert main(["--scenarios", "grid-static", "--duration", "300", "--through", through, "--speed", "20",
                     "--no-present-state", "--json", str(out), "--work", str(tmp_path / through)]) == 0
        results[through] = json.loads(out.read_text())["scenarios"][0]
    local, real = results["in-process"], results["processes"]
    assert real["replay"]["path"] == "processes" and real["replay"]["lost"] == 0
    assert real["replay"]["box_datagrams"] == real["replay"]["generator"]["sent"] > 10_000
    assert real["replay"]["history"]["reports_evicted"] == 0
    assert real["reports"] == local["reports"] > 300
    for key in ("n", "truth_mean"):
        assert real["queue"]["all"][key] == local["queue"]["all"][key]
    assert real["queue"]["all"]["mae"] == pytest.approx(local["queue"]["all"]["mae"], abs=0.01)
    assert real["queue"]["all"]["r"] == pytest.approx(local["queue"]["all"]["r"], abs=0.005)
    ours, theirs = real["traverse"]["all"], local["traverse"]["all"]
    assert ours["n"] == theirs["n"] and ours["free_flow"] == theirs["free_flow"]
    assert ours["model"]["mape"] == pytest.approx(theirs["model"]["mape"], rel=0.03)


@pytest.mark.slow
def test_validation_of_a_users_own_sumo_configuration(tmp_path, capsys):
    """A network and demand the tool has never seen, named by its .sumocfg (relative paths, a begin
    time and an additional file, as users write them), is validated like the built-in scenarios."""
    need("sumo", "the eclipse-sumo wheel, the sumo extra")
    from fcd.validate import generated_scenario
    mine = tmp_path / "mine"
    sc = generated_scenario("town", mine, 400, seed=7, lights="static",
                            shape_args=["--grid", "--grid.number", "3", "--grid.length", "150"])
    (mine / "empty.add.xml").write_text("<additional/>")
    cfg = mine / "town.sumocfg"
    cfg.write_text(f'<configuration><input><net-file value="{sc.net.name}"/>'
                   f'<route-files value="{sc.routes[0].name}"/><additional-files value="empty.add.xml"/>'
                   '</input><time><begin value="0"/></time></configuration>')
    out = tmp_path / "v.json"
    assert main(["--scenarios", str(cfg), "--duration", "300", "--warmup", "60", "--json", str(out),
                 "--work", str(tmp_path / "work")]) == 0
    assert "town: map matching" in capsys.readouterr().out
    (res,) = json.loads(out.read_text())["scenarios"]
    assert res["scenario"] == "town" and res["fcd"]["records"] > 1000 and res["fcd"]["unmatched"] == 0
    assert res["light_switches"] > 0 and res["queue"]["all"]["n"] > 0 and res["traverse"]["all"]["n"] > 0


def test_a_sumo_configuration_missing_its_files_is_refused_by_name(tmp_path, capsys):
    from cliruntime import ConfigError
    from fcd.validate import sumocfg_scenario
    cfg = tmp_path / "broken.sumocfg"
    cfg.write_text('<configuration><input><net-file value="gone.net.xml"/>'
                   '<route-files value="a.rou.xml,b.rou.xml"/></input></configuration>')
    (tmp_path / "a.rou.xml").write_text("<routes/>")
    with pytest.raises(ConfigError, match=r"do not exist: .*gone\.net\.xml, .*b\.rou\.xml"):
        sumocfg_scenario(cfg, 60)
    cfg.write_text('<configuration><input><route-files value="a.rou.xml"/></input></configuration>')
    with pytest.raises(ConfigError, match="needs one <net-file>"):
        sumocfg_scenario(cfg, 60)
    cfg.write_text("<configuration><input>")
    with pytest.raises(ConfigError, match="not a readable SUMO configuration"):
        sumocfg_scenario(cfg, 60)
    with pytest.raises(SystemExit):
        main(["--scenarios", str(tmp_path / "nowhere.sumocfg")])
    assert "no SUMO configuration at" in capsys.readouterr().err


def test_all_mixes_with_names_and_files_once_each(tmp_path):
    from fcd.validate import ALL_SCENARIOS, _scenarios
    cfg = tmp_path / "mine.sumocfg"
    cfg.write_text("<configuration/>")
    others = [s for s in ALL_SCENARIOS if s != "cologne1"]
    assert _scenarios(f"cologne1,all,{cfg}") == ["cologne1", *others, str(cfg.resolve())]


def test_held_out_names_sumo_rl_networks_outside_the_validation_set():
    need("sumo_rl", "the held-out networks come with sumo-rl")
    from pathlib import Path

    from fcd.validate import ALL_SCENARIOS, _scenarios, resco_dir
    held_out = _scenarios("held-out")
    assert len(held_out) == 8 and all(Path(p).is_file() and p.endswith(".sumocfg") for p in held_out)
    cuts = {n.removesuffix("-actuated") for n in ALL_SCENARIOS}
    assert not cuts & {Path(p).parent.name for p in held_out}      # no validation network among them
    assert all(Path(p).is_relative_to(resco_dir().parent) for p in held_out)


def test_a_network_without_lights_has_no_queue_or_switch_targets_to_miss():
    from fcd.validate import all_met, check_targets
    traverse = {"all": {"model_vs_free_flow": 0.5, "model_vs_persistence": 0.5}}
    unlit = {"queue": {}, "traverse": traverse, "routes": {}, "light_switches": 0, "reports_per_switch_roads": 0.0}
    targets = check_targets(unlit)
    assert targets["queue_mae"] is None and targets["queue_r"] is None
    assert targets["every_controlled_road_reported_at_every_switch"] is None
    assert targets["traverse_vs_free_flow"] is True and all_met(targets)
    lit = dict(unlit, light_switches=12)          # lights that switched but no queue compared: a miss
    assert check_targets(lit)["queue_mae"] is False and not all_met(check_targets(lit))
