"""The transport comparison: the analysis in memory, and (root) the three stacks for real in namespaces."""

import json
import subprocess
import sys

import pytest

from tools.compare_mmpog import Workload, analyse, plot, table

FIELDS = {"reliable", "unreliable", "duplicates_delivered", "updates_relayed_per_s", "datagrams_sent_per_s"}


def test_analysis_counts_expected_pairs_of_the_static_placement():
    w = Workload(players=3, locations=1, deadline=1.0)
    sent = [(0, 0, 0, True, 10.0), (1, 0, 0, False, 10.5), (2, 0, 0, True, 12.0)]
    got = {(1, 0, 0): 0.002, (2, 0, 0): 1.5, (0, 1, 0): 0.001, (0, 2, 0): 0.004, (1, 2, 0): 0.003}
    result = analyse(w, sent, got, duplicates=1, t_start=10.0)
    reliable = result["reliable"]
    assert (reliable["sent"], reliable["expected"]) == (2, 4)
    assert reliable["delivered_ratio"] == 1.0 and reliable["delivered_within_deadline_ratio"] == 0.75
    assert reliable["latency_ms"]["max"] == 1500.0
    assert reliable["first_second_latency_ms"]["max"] == 1500.0     # sent at t_start: in the first second
    assert result["unreliable"]["delivered_ratio"] == 0.5
    assert result["duplicates_delivered"] == 1


def test_location_placement_is_mmpog_bots_placement():
    import random
    w = Workload(players=10, locations=4, seed=3)
    assert [w.location_of(i) for i in range(10)] == [random.Random(3 * 1_000_003 + i).randrange(4) for i in range(10)]


@pytest.mark.root
def test_compare_runs_all_three_stacks_side_by_side(tmp_path):
    pytest.importorskip("kcp")
    pytest.importorskip("enet")
    out = tmp_path / "cmp.json"
    plot = tmp_path / "cmp.png"
    proc = subprocess.run([sys.executable, "-m", "tools.loadgen", "mmpog", "--compare", "kcp,enet", "--scenarios", "4x1",
                           "--losses", "0.05", "--duration", "1.5", "--workers", "1",
                           "--reflector-mode", "standalone", "--budget", "0.5", "--json", str(out), "--plot", str(plot)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [(r["workload"]["players"], r["workload"]["loss"]) for r in result["runs"]] == [(4, 0.05)]
    run = result["runs"][0]
    for stack in ("mmpog", "kcp", "enet"):
        section = run[stack]
        assert FIELDS <= section.keys(), stack
        assert {"p50", "p90", "p99", "max"} <= section["reliable"]["latency_ms"].keys()
        # same workload, same audience: the same number of expected reliable deliveries in every stack
        assert section["reliable"]["expected"] > 0
        assert section["reliable"]["delivered_ratio"] == 1.0, (stack, section.get("drain"))
        assert section["duplicates_delivered"] == 0
        # every role ran in its own cgroup at the same budget, and its CPU over the play was measured
        assert section["cpu_budget"]["cores_per_role"] == 0.5
        assert set(section["cpu_share"]) == set(section["cpu_budget"]["throttled_periods"]) >= {"worker0"}
        # (/proc counts CPU in 10 ms ticks: a nearly idle role of a 1.5 s run may show 0)
        assert all(0 <= share <= 0.5 * 1.2 for share in section["cpu_share"].values()), section["cpu_share"]
    assert "| kcp |" in proc.stderr and "| enet |" in proc.stderr
    assert plot.stat().st_size > 0


def test_compare_unknown_stack_exits_2():
    proc = subprocess.run([sys.executable, "-m", "tools.loadgen", "mmpog", "--compare", "quic"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "quic" in proc.stderr


def _section(p99: float) -> dict:
    latency = {"p50": 1.0, "p90": 2.0, "p99": p99, "max": 2 * p99}
    return {"reliable": {"delivered_ratio": 1.0, "delivered_within_deadline_ratio": 0.99, "latency_ms": latency,
                         "first_second_latency_ms": latency, "arrival_latency_ms": latency},
            "duplicates_delivered": 0, "updates_relayed_per_s": 1000.0, "datagrams_sent_per_s": 500.0,
            "cpu_share": {"relay": 0.2, "worker0": 0.1, "worker1": 0.15}}


def test_matrix_table_and_plot_have_a_row_per_scenario_loss_and_stack(tmp_path):
    runs = [{"workload": {**Workload(players=p, locations=l, loss=loss).__dict__}, "mmpog": _section(10.0 * k + 1),
             "kcp": _section(20.0 * k + 1)}
            for k, (p, l, loss) in enumerate([(32, 4, 0.01), (32, 4, 0.1), (64, 1, 0.01), (64, 1, 0.1)])]
    result = {"stacks": ["mmpog", "kcp"], "runs": runs}
    lines = table(result).splitlines()
    assert len(lines) == 2 + 4 * 2
    assert lines[2].startswith("| 32x4, 1% | mmpog | 99.00% (100.00%) | 1.0 / 2.0 / 1.0 / 2.0 |")
    assert lines[3].startswith("|  | kcp |") and lines[-1].endswith("| 0.2 / 0.25 |")
    plot(result, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0


@pytest.mark.parametrize("args, says", [
    (["--scenarios", "64y1"], "PLAYERSxLOCATIONS"),
    (["--losses", "0.1,2"], "--losses"),
    (["--budget", "0.05", "--budget-period-us", "10000"], "1000 us"),
])
def test_compare_bad_matrix_or_budget_exits_2(args, says):
    if "--budget" in args:
        pytest.importorskip("kcp")       # checked after the stack's package is found
    proc = subprocess.run([sys.executable, "-m", "tools.loadgen", "mmpog", "--compare", "kcp", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr
