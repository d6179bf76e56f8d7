"""The linux engine's forwarding table becomes kernel routes; boxd refuses to start without iptables."""

import json
import sys
import textwrap

import pytest

from boxcore.lab import Lab

pytestmark = pytest.mark.root

SCRIPT = textwrap.dedent("""
    import asyncio, json, subprocess
    from boxcore.engines.linux import LinuxEngine, EngineRefused
    from boxcore.engines.base import Route

    def routes():
        out = subprocess.run(["ip", "-j", "route", "show", "proto", "176"], capture_output=True, text=True).stdout
        return sorted(r["dst"] + " via " + r.get("gateway", "-") for r in json.loads(out or "[]"))

    async def main():
        engine = LinuxEngine()
        await engine.start()
        seen = {}
        await engine.set_forwarding([Route("10.99.0.0/16", via="10.2.0.2"), Route("10.98.1.0/24", via="10.1.0.2")])
        seen["first"] = routes()
        await engine.set_forwarding([Route("10.98.1.0/24", via="10.2.0.2", dev="srv")])
        seen["replaced"] = routes()
        try:
            await engine.set_forwarding([Route("10.97.0.0/16", dev="nosuchdev")])
        except EngineRefused as exc:
            seen["refused"] = str(exc)
        await engine.stop()
        seen["stopped"] = routes()
        print(json.dumps(seen))

    asyncio.run(main())
""")


def test_forwarding_table_becomes_kernel_routes():
    with Lab.up("transparent") as lab:
        out = lab.run("box", [sys.executable, "-c", SCRIPT], timeout=60)
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        assert seen["first"] == ["10.98.1.0/24 via 10.1.0.2", "10.99.0.0/16 via 10.2.0.2"]
        assert seen["replaced"] == ["10.98.1.0/24 via 10.2.0.2"]       # 10.99/16 withdrawn
        assert "nosuchdev" in seen["refused"]
        assert seen["stopped"] == []
        # the lab's own static routes were never touched
        assert "default via 10.1.0.1" in lab.run("client", ["ip", "route"]).stdout


def test_boxd_refuses_to_start_without_iptables(tmp_path):
    with Lab.up("transparent") as lab:
        proc = lab.run("box", ["env", "PATH=/nonexistent", sys.executable, "-m", "boxcore.boxd", "--engine", "linux",
                               "--control", f"{tmp_path}/c.sock", "--state", f"{tmp_path}/st"], check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "needs iptables" in errors[0]
