"""The boxcore demo and the datapath benchmark run end to end (structure, not speed)."""

import json

import pytest

from boxcore.demo import run_demo
from tools import loadgen

pytestmark = pytest.mark.timeout(120)


async def test_demo_runs_and_reports_what_the_booster_saw(tmp_path):
    lines = []
    figures = await run_demo(tmp_path, lines.append)
    assert figures["booster_seen"] == figures["packets_sent"] == 300
    assert figures["dropped"] == 60 and figures["passed"] == 240 and figures["server_received"] == 240
    assert any("booster saw" in line for line in lines)


def test_datapath_benchmark_json(tmp_path):
    out = tmp_path / "dp.json"
    status = loadgen.main(["datapath", "--engine", "user", "--duration", "0.2", "--paced-duration", "0.2",
                           "--paced-rate", "500", "--repeat", "1", "--senders", "1", "--json", str(out)])
    assert status == 0
    figures = json.loads(out.read_text())
    assert figures["engine"] == "user" and figures["ceiling_pps"] > 0
    cases = {c["case"]: c for c in figures["cases"]}
    assert set(cases) == {"ceiling", "redirect_consume", "redirect_consume_channel", "relay"}
    for case in cases.values():
        assert case["pps"] > 0 and 0 <= case["loss"] <= 1
        assert set(case["latency_us"]) >= {"p50", "p99"}
    assert cases["redirect_consume"]["delivery"] == "socket"
    assert cases["redirect_consume_channel"]["delivery"] == "channel"
