"""booster-loadgen report: one self-contained page from the experiments' JSON."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.dashboard.conftest import REPO, console_errors, screenshot

NP_JSON = REPO / "docs" / "npdrv-latency.json"

FCD = {"budget_cpu": 0.05, "duration_s": 2.0, "rows": [
    {"boxes": 0, "offered_pps": 1000, "loss": 0.0, "server_received_pps": 1000.0},
    {"boxes": 0, "offered_pps": 4000, "loss": 0.2, "server_received_pps": 3200.0},
    {"boxes": 0, "offered_pps": 12000, "loss": 0.7, "server_received_pps": 3600.0},
    {"boxes": 2, "offered_pps": 1000, "loss": 0.0, "server_received_pps": 9.0},
    {"boxes": 2, "offered_pps": 4000, "loss": 0.0, "server_received_pps": 20.0},
    {"boxes": 2, "offered_pps": 12000, "loss": 0.1, "server_received_pps": 30.0}],
    "knee_pps": {"0": 2500.0, "2": 9000.0}, "reduction_factor_by_boxes": {"2": 111.1}, "reduction_factor": 111.1}
GNUTELLA = {"config": {"servents": 9, "clusters": 3},
            "without": {"inter_cluster_messages": 1000, "inter_cluster_bytes": 90000, "query_success": 0.9,
                        "first_hit_ms": {"p50": 30, "p99": 90}},
            "with": {"inter_cluster_messages": 60, "inter_cluster_bytes": 7000, "query_success": 1.0,
                     "first_hit_ms": {"p50": 20, "p99": 80}},
            "reduction": {"messages": 0.94, "bytes": 0.922}}

DATAPATH = {"engine": "user", "ceiling_pps": 200000.0, "payload_bytes": 64, "cases": [
    {"case": "ceiling", "pps": 200000.0, "loss": 0.0, "latency_us": {"p50": 20.0, "p99": 40.0}},
    {"case": "redirect_consume", "pps": 190000.0, "loss": 0.0, "latency_us": {"p50": 25.0, "p99": 60.0}}]}


def run_report(tmp_path: Path, *extra: str) -> tuple[Path, dict]:
    out = tmp_path / "report.html"
    proc = subprocess.run([sys.executable, "-m", "tools.loadgen", "report", "--dir", str(tmp_path), "--out", str(out),
                           *extra], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout)


def test_nothing_run_every_card_says_not_run_with_its_command(tmp_path):
    out, summary = run_report(tmp_path)
    page = out.read_text()
    assert summary["experiments_found"] == []
    for command in ("booster-loadgen fcd --json out/fcd.json", "booster-loadgen np-latency --json out/np.json",
                    "booster-loadgen gnutella --clusters 3", "booster-loadgen mmpog --players 64",
                    "booster-loadgen datapath --engine user", "booster-loadgen datapath --engine linux"):
        assert command in page
    assert page.count("not run:") == 6


def test_report_is_self_contained_and_keeps_the_model_input_apart(tmp_path):
    (tmp_path / "fcd.json").write_text(json.dumps(FCD))
    (tmp_path / "gnutella.json").write_text(json.dumps(GNUTELLA))
    (tmp_path / "mmpog.json").write_text("{not json")
    (tmp_path / "datapath-user.json").write_text(json.dumps(DATAPATH))
    out, summary = run_report(tmp_path, "--np", str(NP_JSON))
    page = out.read_text()
    assert sorted(summary["experiments_found"]) == ["datapath_user", "fcd", "gnutella", "mmpog", "np"]
    assert summary["not_run"] == ["datapath_linux"]
    assert "190,000 p/s = 0.95 of the ceiling" in page
    # no external fetch of any kind: every image is a data URI, no script, no stylesheet link
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "<script" not in page and "<link" not in page
    assert page.count('src="data:image/svg+xml;base64,') >= 6
    # the paper's numbers with their sections, ours beside them
    for text in ("section III-A", "section II-C", "Fig. 9", "Fig. 12", "10x", "111.1x", "94.0% fewer",
                 "nearly 90% at 11,000 p/s"):
        assert text in page, text
    # the NP card: 15 us is the paper's and the model's input, never ours
    np_card = page[page.index('id="np"'):page.index('id="fig9"')]
    assert "Model input, not a result" in np_card
    assert "not measured (no card); emulator model input 15.0" in np_card
    rows = json.loads(NP_JSON.read_text())["rows"]
    fastest = min(r["latency_us"]["p50"] for r in rows if r["path"] == "np")
    assert f"p50 {fastest:,.1f}-" in np_card                     # the emulator's measured wall clock
    assert "cannot read" in page and "mmpog.json" in page        # a broken file says so, the rest still shows


def test_report_renders_in_chromium_without_errors(tmp_path, browser):
    (tmp_path / "fcd.json").write_text(json.dumps(FCD))
    (tmp_path / "gnutella.json").write_text(json.dumps(GNUTELLA))
    experiments = REPO / "out"
    for name in ("mmpog.json", "fcd.json", "gnutella.json", "datapath-user.json", "datapath-linux.json"):
        # real runs, when this checkout has them
        if (experiments / name).exists():
            shutil.copy(experiments / name, tmp_path / name)
    out, _ = run_report(tmp_path, "--np", str(NP_JSON))
    browser.get(out.as_uri())
    images = browser.execute_script(
        "return [...document.images].map(i => [i.complete, i.naturalWidth]);")
    assert images and all(complete and width > 0 for complete, width in images)
    screenshot(browser, "report.png")
    assert console_errors(browser) == []
