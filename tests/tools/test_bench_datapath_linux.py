"""The linux data-path benchmark's booster role reports its NFQUEUE's statistics through the
booster's public stats (the nfqueue receiver's section), not the receiver's private reader; no
tool or application reaches a subscription's receiver."""

import ast
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
USERS_OF_THE_LIBRARY = ["tools", "fcd", "gnutella", "mmpog", "npdrv", "boxcore/examples"]


def receiver_uses(source: str) -> list[str]:
    return [f"line {node.lineno}: {ast.unparse(node)}" for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Attribute) and node.attr == "receiver"]


def test_no_tool_or_application_reaches_a_subscriptions_receiver():
    found = {str(path.relative_to(ROOT)): uses for top in USERS_OF_THE_LIBRARY
             for path in sorted((ROOT / top).rglob("*.py")) if (uses := receiver_uses(path.read_text()))}
    assert found == {}
    assert receiver_uses("queue = sub.receiver.reader.stats") == ["line 1: sub.receiver"]


@pytest.mark.root


def test_booster_role_reports_the_queue_statistics():
    from boxcore.lab import Lab
    from tools.bench_datapath_linux import Bench

    with tempfile.TemporaryDirectory(prefix="bbdpq") as tmp, Lab.up("transparent") as lab:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        control = str(workdir / "boxd.sock")
        boxd = lab.popen("box", [sys.executable, "-m", "boxcore.boxd", "--engine", "linux", "--control", control,
                                 "--state", str(workdir / "state"), "--log-level", "warning"],
                         stderr=open(workdir / "boxd.log", "w"))
        try:
            deadline = time.monotonic() + 20
            while not Path(control).exists():     # boxd has no readiness event to wait on here
                assert boxd.poll() is None and time.monotonic() < deadline, (workdir / "boxd.log").read_text()
                time.sleep(0.05)
            measured = Bench(lab, workdir, 64, 1).run_case("booster", 500, 0.5, control, "consume")
        finally:
            boxd.terminate()
            boxd.wait(10)
    assert measured["delivery"] == "nfqueue" and measured["received"] > 0
    queue = measured["queue"]
    assert queue["packets"] == measured["received"] and queue["batches"] >= 1
    assert queue["verdict_messages"] >= 1 and queue["overruns"] == 0
