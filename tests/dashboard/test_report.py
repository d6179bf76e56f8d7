"""booster-loadgen report: one self-contained page from the experiments' JSON."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from fcd.validate import TARGETS, check_targets
from tests.dashboard.conftest import REPO, console_errors, screenshot
from tools.bench_datapath_xdp import case as xdp_case, figures as xdp_figures

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



def _xdp_run() -> dict:
    """A ``datapath --engine xdp`` result made by the bench's own writers (case, figures)."""
    us = [30.0, 31.0, 35.0, 60.0]            # one-way latencies of a paced run
    cases = [
        xdp_case("ceiling", "linux", 0, 250_000.0, 0.0, us, sent=500_000, offered_pps=250_000.0, offered="unlimited"),
        # the ceiling and the pass cases offered the knee rate (where plain forwarding starts to lose)
        xdp_case("ceiling", "linux", 0, 200_000.0, 0.0, us, sent=400_000, offered_pps=200_000.0, offered=200_000.0),
        *(xdp_case("pass", "xdp", n, pps, 0.0, [u + 6 for u in us], sent=380_000, offered_pps=pps, offered=200_000.0)
          for n, pps in ((1, 190_000.0), (100, 188_000.0), (1000, 190_000.0))),
        xdp_case("drop", "xdp", 1, 480_000.0, 0.0, None, sent=960_000, offered_pps=480_000.0, leaked_to_server=0),
        xdp_case("redirect_consume", "xdp", 1, 90_000.0, 0.0, [u + 20 for u in us], sent=180_000,
                 offered_pps=90_000.0, consumed_per_booster_cpu_s=95_000.0),
        xdp_case("redirect_consume_batch", "xdp", 1, 110_000.0, 0.0, [u + 15 for u in us], sent=220_000,
                 offered_pps=110_000.0, consumed_per_booster_cpu_s=160_000.0),
        xdp_case("copy", "xdp", 1, 60_000.0, 0.0, [u + 40 for u in us], sent=120_000, offered_pps=60_000.0,
                 copies_pps=30_000.0),
        xdp_case("fanout", "xdp", 1, 800_000.0, 0.0, [u + 70 for u in us], members=64, sent=25_000,
                 offered_pps=12_500.0),
        xdp_case("redirect_consume", "linux", 1, 40_000.0, 0.2, [u + 35 for u in us], sent=100_000,
                 offered_pps=50_000.0, consumed_per_booster_cpu_s=60_000.0),
        xdp_case("redirect_consume_batch", "linux", 1, 41_000.0, 0.18, [u + 36 for u in us], sent=100_000,
                 offered_pps=50_000.0, consumed_per_booster_cpu_s=61_000.0),
        xdp_case("fanout", "user", 0, 80_000.0, 0.9, [2e5, 3e5, 6e5], members=64, sent=30_000, offered_pps=15_000.0),
    ]
    result = xdp_figures(cases, argparse.Namespace(size=64, duration=2.0, paced_rate=2000, repeat=3))
    result["program_ns"] = {"pass_1_rules": 150.0, "pass_100_rules": 160.0, "pass_1000_rules": 155.0,
                            "drop_1000_rules": 180.0}
    return result


XDP = _xdp_run()


def _scenario(name: str, queue: dict, traverse: dict) -> dict:
    """One scenario as fcd.validate's JSON writer keeps it (the fields the report reads, and targets)."""
    result = {"scenario": name, "queue": {"all": queue}, "traverse": traverse, "reports_per_switch_roads": 1.0,
              "routes": {"n": 10, "routes_using_roads_cars_may_not_use": 0}, "light_switches": 40}
    result["targets"] = check_targets(result)
    return result


def _traverse(model: float, free: float, persistence: float) -> dict:
    ape = {"model": {"mape": model, "median_ape": model}, "free_flow": {"mape": free, "median_ape": free},
           "persistence": {"mape": persistence, "median_ape": persistence}}
    return {"n": 120, "all": {"n": 120, **ape, "model_vs_free_flow": model / free,
                              "model_vs_persistence": model / persistence}}


FCD_VALIDATE = {"targets": TARGETS, "duration": 300.0, "interval": 60.0, "warmup": 60.0, "seed": 1,
                "command": "booster-loadgen fcd-validate", "scenarios": [
                    _scenario("grid-static", {"n": 528, "mae": 0.025, "bias": 0.025, "r": 0.997, "truth_mean": 1.0},
                              _traverse(0.2, 0.4, 0.5)),
                    # no queue varied (r is NaN in the JSON) and no traverse interval with traffic
                    _scenario("spider-actuated", {"n": 3, "mae": 0.0, "bias": 0.0, "r": float("nan"),
                                                  "truth_mean": 0.0}, {"n": 0})]}
FCD_SCALE = {"budget_cpu": 0.2, "grid": [8, 8], "roads": 224, "runs": 3, "duration_s": 3.0, "router_processes": 2,
             "route_lookups": {"tcp": {"1": 800.0, "8": 1600.0}, "redis": {"1": 400.0, "8": 2400.0}},
             "rows": [{"store": "tcp", "clients": 1, "lookups": 2400, "lookups_per_s": 800.0, "tuples": 672,
                       "store_cpu_s": 0.6}],
             "ratio_at_max_clients": 1.5, "knee_pps": {"tcp": 1500.0, "redis": None}}


def _stack(name: str, p50: float, p99: float, within: float, **extra) -> dict:
    latency = {"p50": p50, "p90": p50 * 5, "p99": p99, "max": p99 * 3}
    return {"reliable": {"sent": 772, "expected": 6905, "delivered_ratio": 1.0,
                         "delivered_within_deadline_ratio": within, "latency_ms": latency,
                         "first_second_latency_ms": latency},
            "unreliable": {"sent": 2427, "expected": 21680, "delivered_ratio": 0.9,
                           "delivered_within_deadline_ratio": 0.9, "latency_ms": latency,
                           "first_second_latency_ms": latency},
            "duplicates_delivered": 0, "updates_relayed_per_s": 3096.8, "datagrams_sent_per_s": 4018.9,
            "stack": name, **extra}


MMPOG_COMPARE = {"workload": {"players": 32, "locations": 4, "duration": 10.0, "rate": 10.0, "reliable_fraction": 0.25,
                              "deadline": 1.0, "payload": 64, "loss": 0.05, "seed": 1, "workers": 2, "drain": 1.5,
                              "reflector_mode": "standalone"},
                 "loss_mode": "iptables statistic in a namespace, each way, on the relay port",
                 "mmpog": _stack("mmpog (reflector standalone)", 1.1, 38.0, 0.999,
                                 retransmissions={"by_senders": 100, "by_reflector": 435}),
                 "kcp": _stack("kcp (turbo)", 0.6, 70.1, 0.98), "enet": _stack("enet (pyenet defaults)", 0.7, 40.9, 0.97),
                 "loadavg_after": [3.1, 2.9, 2.5]}
NEW = {"datapath-xdp.json": XDP, "fcd-validate.json": FCD_VALIDATE, "fcd-scale.json": FCD_SCALE,
       "mmpog-compare.json": MMPOG_COMPARE}


def write_fixtures(directory: Path, fixtures: dict[str, dict]) -> None:
    for name, data in fixtures.items():
        (directory / name).write_text(json.dumps(data))


def card(page: str, key: str) -> str:
    start = page.index(f'<section class="card" id="{key}">')
    return page[start:page.index("</section>", start)]


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
                    "booster-loadgen datapath --engine user", "booster-loadgen datapath --engine linux",
                    "booster-loadgen datapath --engine xdp", "booster-loadgen fcd-validate --json",
                    "booster-loadgen fcd-scale --json", "booster-loadgen mmpog --compare kcp,enet"):
        assert command in page
    assert page.count("not run:") == 10


def test_report_is_self_contained_and_keeps_the_model_input_apart(tmp_path):
    (tmp_path / "fcd.json").write_text(json.dumps(FCD))
    (tmp_path / "gnutella.json").write_text(json.dumps(GNUTELLA))
    (tmp_path / "mmpog.json").write_text("{not json")
    (tmp_path / "datapath-user.json").write_text(json.dumps(DATAPATH))
    out, summary = run_report(tmp_path, "--np", str(NP_JSON))
    page = out.read_text()
    assert sorted(summary["experiments_found"]) == ["datapath_user", "fcd", "gnutella", "mmpog", "np"]
    assert summary["not_run"] == ["datapath_linux", "datapath_xdp", "fcd_validate", "fcd_scale", "mmpog_compare"]
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
    assert "not run (booster-loadgen datapath --engine xdp" in np_card   # no xdp run: its latency is not made up
    assert "cannot read" in page and "mmpog.json" in page        # a broken file says so, the rest still shows


def test_newer_experiments_each_render_beside_the_paper(tmp_path):
    write_fixtures(tmp_path, NEW)
    out, summary = run_report(tmp_path, "--np", str(NP_JSON))
    page = out.read_text()
    assert sorted(summary["experiments_found"]) == ["datapath_xdp", "fcd_scale", "fcd_validate", "mmpog_compare", "np"]
    for key in ("datapath-xdp", "fcd-validate", "fcd-scale", "mmpog-compare"):
        assert 'src="data:image/svg+xml;base64,' in card(page, key), key        # our figure, drawn from the JSON
        assert "What differs:" in card(page, key), key
    xdp = card(page, "datapath-xdp")
    # the paper's line-rate claim, in packets/s of these frames, beside ours as a share of the ceiling
    assert "line rate of 1 Gbit/s (= 961,538 p/s of 64-byte payloads" in xdp
    assert "1000 rules: 190,000 p/s = 0.95 of kernel forwarding" in xdp
    assert "order of magnitude less" in xdp and "xdp drop / linux engine redirect+consume: 12.0x" in xdp
    assert xdp.count("<tr><td>pass</td><td>xdp</td>") == 3 and "<td>fanout</td><td>user</td>" in xdp
    assert "pass1000_ge_0.95_ceiling: met" in xdp and "consume_ge_3x_linux: NOT met" in xdp
    # the NP card: the paper's 15 us as the model's input, the emulator's wall clock and xdp's latency, measured
    np_card = card(page, "np")
    assert "Model input, not a result" in np_card and "emulator model input 15.0" in np_card
    assert "card emulator, wall clock" in np_card
    p50 = next(c for c in XDP["cases"] if c["case"] == "pass" and c["rules"] == 1)["latency_us"]["p50"]
    assert f"measured: p50 {p50:,.1f} / " in np_card and "with 1 / 100 / 1000 rules" in np_card
    assert "the XDP program itself: 150 ns (pass 1 rules)" in np_card
    validate = card(page, "fcd-validate")
    assert "<td>grid-static</td><td>0.025</td><td>0.997</td><td>528</td><td>20.0</td><td>40.0</td><td>50.0</td>" \
           "<td>0.50</td><td>0.40</td><td>6 / 6</td>" in validate
    assert "<td>spider-actuated</td><td>0.000</td><td>n/a</td><td>3</td><td>n/a</td>" in validate   # NaN r, no data
    assert "1 of 2" in validate and "Peytchev" in validate
    scale = card(page, "fcd-scale")
    assert "tcp 1,600, redis 2,400; Redis / TCP 1.50" in scale
    assert "tcp: 1,500, redis: no knee in the range" in scale
    assert "8x8 grid (224 roads" in scale and "tuplespace" in scale
    compare = card(page, "mmpog-compare")
    for label in ("mmpog (reflector standalone)", "kcp (turbo)", "enet (pyenet defaults)"):
        assert f"<tr><td>{label}</td>" in compare
    assert "mmpog: 0.999 within 1 s; kcp: 0.98; enet: 0.97" in compare
    assert "by senders 100, by reflector 435" in compare and "section III-C" in compare


def test_a_broken_xdp_run_is_said_so_and_the_np_card_still_shows(tmp_path):
    broken = {key: value for key, value in XDP.items() if key != "cases"}
    write_fixtures(tmp_path, {"datapath-xdp.json": broken})
    out, _ = run_report(tmp_path, "--np", str(NP_JSON))
    page = out.read_text()
    assert "cannot read" in card(page, "datapath_xdp") and "KeyError" in card(page, "datapath_xdp")
    np_card = card(page, "np")
    assert "cannot read the xdp run: KeyError" in np_card and "Model input, not a result" in np_card


def test_report_renders_in_a_browser_without_errors(tmp_path, browser):
    (tmp_path / "fcd.json").write_text(json.dumps(FCD))
    (tmp_path / "gnutella.json").write_text(json.dumps(GNUTELLA))
    write_fixtures(tmp_path, NEW)
    experiments = REPO / "out"
    for name in ("mmpog.json", "fcd.json", "gnutella.json", "datapath-user.json", "datapath-linux.json",
                 "datapath-xdp.json", "fcd-validate.json", "fcd-scale.json", "mmpog-compare.json"):
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


def test_xdp_latency_is_read_from_the_pass_cases_offered_the_latency_load():
    from tools.bench_report import _xdp_latency_passes, _xdp_latency_text, _xdp_passes

    def passed(rules, share, p50):
        return {"case": "pass", "engine": "xdp", "rules": rules, "offered_share_of_knee": share,
                "latency_us": {"p50": p50, "p99": p50 * 2}}
    run = {"latency_load_share_of_knee": 0.5, "paced_rate": 2000, "payload_bytes": 18,
           "cases": [passed(1000, 1.0, 900.0), passed(1, 0.5, 31.0), passed(1, 1.0, 800.0), passed(1000, 0.5, 33.0)]}
    assert [c["latency_us"]["p50"] for c in _xdp_latency_passes(run)] == [31.0, 33.0]
    assert [c["latency_us"]["p50"] for c in _xdp_passes(run, 1.0)] == [800.0, 900.0]
    text = _xdp_latency_text(run)
    assert "p50 31.0 / 33.0" in text and "offered 0.5 of the knee rate" in text and "900" not in text
    # a run from before pass was measured at two loads: every pass case counts
    older = {"cases": [{k: v for k, v in c.items() if k != "offered_share_of_knee"} for c in run["cases"][:2]]}
    assert len(_xdp_latency_passes(older)) == 2
