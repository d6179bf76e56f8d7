import json

import pytest

from tools.bench_fcd import knee
from tools.loadgen import main as loadgen


def test_knee_interpolates_the_first_crossing():
    rows = [{"offered_pps": 1000, "loss": 0.0}, {"offered_pps": 2000, "loss": 0.0},
            {"offered_pps": 3000, "loss": 0.03}, {"offered_pps": 4000, "loss": 0.0},
            {"offered_pps": 5000, "loss": 0.5}]
    assert knee(rows, "loss") == pytest.approx(2000 + 1000 / 3)
    assert knee(rows[:2], "loss") is None
    assert knee([{"offered_pps": 500, "loss": 0.2}], "loss") == 500


@pytest.mark.slow
def test_experiment_smoke_without_budgets(tmp_path, small_trace, capsys):
    trace = tmp_path / "t.npz"
    small_trace.save(trace)
    out = tmp_path / "fcd.json"
    assert loadgen(["fcd", "--no-cgroups", "--trace", str(trace), "--rates", "500,1000", "--boxes", "0,1",
                    "--duration", "0.5", "--settle", "1.0", "--calibration-rate", "1000", "--raw-reps", "1",
                    "--workdir", str(tmp_path / "w"), "--json", str(out), "--plot", str(tmp_path / "f.png")]) == 0
    result = json.loads(out.read_text())
    assert result["budget_cpu"] is None
    assert {r["boxes"] for r in result["rows"]} == {0, 1}
    for row in result["rows"]:
        assert {"boxes", "offered_pps", "server_received_pps", "server_loss", "box_loss"} <= set(row)
    assert result["reduction_factor"] > 1
    assert set(result["knee_pps"]) == {"0", "1"}
    assert len(result["raw_ingest_ratios"]) == 1 and result["raw_ingest_ratio"] > 0
    assert (tmp_path / "f.png").stat().st_size > 1000
    assert loadgen(["fcd", "--rates", "0", "--json", str(out)]) == 2


@pytest.mark.slow
@pytest.mark.root
def test_raw_ingest_is_measured_interleaved_per_cpu_second_in_budgets(tmp_path, small_trace, capsys):
    """With cgroup budgets: the sink and the server alternate who goes first, and each repetition
    carries the CPU each role's group used, so the ratio is per CPU second, with its spread."""
    trace = tmp_path / "t.npz"
    small_trace.save(trace)
    out = tmp_path / "fcd.json"
    assert loadgen(["fcd", "--boxes", "0", "--rates", "4000", "--budget", "0.2", "--trace", str(trace),
                    "--duration", "0.5", "--settle", "0.5", "--raw-reps", "2",
                    "--workdir", str(tmp_path / "w"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    reps = result["raw_reps"]
    assert [r["first"] for r in reps] == ["sink", "server"]
    for rep in reps:
        assert rep["sink_cpu_s"] > 0 and rep["server_cpu_s"] > 0
        assert rep["ratio_per_cpu"] == pytest.approx(rep["server_per_cpu_s"] / rep["sink_per_cpu_s"], rel=1e-2)
    assert result["raw_ingest_ratio_kind"] == "per_cpu"
    spread = result["raw_ingest_spread"]
    assert spread[0] <= result["raw_ingest_ratio"] <= spread[1]
    assert result["raw_ingest_ratios"] == [r["ratio_per_cpu"] for r in reps]


def test_ingest_bench_compares_one_pass_with_run_by_run(small_trace, tmp_path):
    """``python -m tools.bench_ingest``: both paths measured on the same stream, same reports."""
    from tools import bench_ingest
    trace = tmp_path / "trace.npz"
    small_trace.save(trace)
    out = tmp_path / "ingest.json"
    assert bench_ingest.main(["--trace", str(trace), "--batch", "512", "--warmup", "0", "--kept", "0.5",
                              "--json", str(out), "--plot", str(tmp_path / "ingest.png")]) == 0
    result = json.loads(out.read_text())
    assert result["same_reports"] and result["reports"] > 0 and result["light_changes"] > 0
    assert result["passes"]["one_pass"] > 0 and result["passes"]["per_run"] == 0
    assert result["us_per_datagram"]["one_pass"] > 0 and result["us_per_datagram"]["per_run"] > 0
    assert (tmp_path / "ingest.png").stat().st_size > 0
