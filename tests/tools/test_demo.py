"""booster-demo runs its parts as real processes, reports each, and fails when one fails."""

import json
import subprocess
import sys
import types
from pathlib import Path

from tools import demo

BIN = Path(sys.executable).parent


def test_demo_runs_a_part_end_to_end(tmp_path):
    stats = tmp_path / "demo.json"
    result = subprocess.run([str(BIN / "booster-demo"), "--only", "boxcore", "--stats-json", str(stats)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "[boxcore]" in result.stdout and "== summary" in result.stdout
    part = json.loads(stats.read_text())["parts"]["boxcore"]
    assert part["ok"] is True
    assert part["server_received"] == part["passed"] > 0


def test_a_failing_part_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    calls = []

    async def broken(workdir, say):
        calls.append("broken")
        raise RuntimeError("no route to the server")

    async def fine(workdir, say):
        calls.append("fine")
        say("all good")
        return {"figure": 1}

    for name, fn in (("brokenpart", broken), ("finepart", fine)):
        module = types.ModuleType(f"{name}.demo")
        module.run_demo = fn
        monkeypatch.setitem(sys.modules, f"{name}.demo", module)
    monkeypatch.setattr(demo, "PARTS", (("brokenpart", "breaks"), ("finepart", "works")))
    status = demo.main(["--workdir", str(tmp_path), "--stats-json", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert status == 1
    assert calls == ["broken", "fine"]
    assert "[finepart] all good" in out
    parts = json.loads((tmp_path / "s.json").read_text())["parts"]
    assert parts["brokenpart"]["ok"] is False and "no route" in parts["brokenpart"]["error"]
    assert parts["finepart"] == {"figure": 1, "ok": True, "seconds": parts["finepart"]["seconds"]}
