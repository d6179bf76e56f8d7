"""The dashboard's event stream: the hub on an in-process controller, and /api/events of a real boxd."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from boxcore.dashboard import DashboardHub
from boxcore.fleet import read_events
from boxcore.packet import Packet
from boxcore.panels import PANEL_KEY, publish_panel
from boxcore.rules import Match
from boxcore.testing import BoxdProcess, MemoryBox
from tools import demo_panels


async def test_hub_rates_panels_and_departures(tmp_path):
    async with MemoryBox(state=tmp_path) as box:
        hub = DashboardHub(box.controller)
        booster = await box.connect("counter")
        await booster.copy(Match(proto="udp", dst_port=7000), lambda pkt: None)
        assert [event for event, _ in (await hub.sample())] == ["tick"]             # no panel yet
        for _ in range(10):
            await box.inject(Packet(17, "10.0.0.1", 5000, "10.0.0.2", 7000, b"x" * 100))
        await publish_panel(booster, demo_panels.mmpog_builder()[0].build())
        events = (await hub.sample())
        tick = events[0][1]
        assert tick["rules"][0]["packets"] == 10 and tick["rules"][0]["pps"] > 0
        assert tick["traffic"]["pps"] == tick["rules"][0]["pps"]
        assert tick["boosters"][0]["name"] == "counter" and tick["boosters"][0]["heartbeat"] == "ok"
        assert [d["booster"] for e, d in events if e == "panel"] == ["counter"]
        assert tick["directory"][0]["names"] == [PANEL_KEY] and tick["directory"][0]["connected"]
        assert hub.snapshot()["panels"][0]["panel"]["title"].startswith("game reflector")
        await booster.directory.put(PANEL_KEY, {"title": "broken"})        # around the publisher
        refused = [d for e, d in (await hub.sample()) if e == "panel"]
        assert "parts" in refused[0]["error"] and hub.stats["panel_invalid"] == 1
        await booster.close()
        await asyncio.sleep(0)
        events = (await hub.sample())
        assert ("panel_removed", {"booster": "counter"}) in events
        assert events[0][1]["events"][-1]["what"] in ("left", "evicted")
        assert hub.panels == {}
        await hub.stop()


async def test_a_client_that_does_not_read_is_dropped_not_buffered(tmp_path):
    async with MemoryBox(state=tmp_path) as box:
        hub = DashboardHub(box.controller, client_queue=4)
        slow, fast = hub.subscribe(), hub.subscribe()
        for _ in range(6):
            hub.broadcast(await hub.sample())
            while fast.buffer:
                await fast.next()
        assert slow.closed and await slow.next() is None
        hub.unsubscribe(slow)
        assert hub.stats["sse_slow_clients_dropped"] == 1 and not fast.closed
        hub.max_clients = 1
        assert hub.subscribe() is None and hub.stats["sse_refused"] == 1
        await hub.stop()


async def test_boxd_streams_events_limits_clients_and_stops_promptly(tmp_path):
    boxd = BoxdProcess(tmp_path / "boxd")
    await boxd.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(boxd.http_url + "/api/events") as response:
                assert response.headers["Content-Type"].startswith("text/event-stream")
                seen = []
                async for event, data in read_events(response.content, __import__("collections").Counter()):
                    seen.append((event, data))
                    if len(seen) == 3:
                        break
                assert [e for e, _ in seen] == ["snapshot", "tick", "tick"]
                assert seen[1][1]["engine"] == "user" and seen[2][1]["point"] is not None
            async with http.get(boxd.http_url + "/") as page:
                assert "default-src 'none'" in page.headers["Content-Security-Policy"]
                assert "/api/events" in await (await http.get(
                    boxd.http_url + "/dashboard/static/dashboard.js")).text()
            assert (await http.get(boxd.http_url + "/dashboard/static/../boxd.py")).status == 404
            # an open stream must not hold boxd's shutdown (aiohttp would wait up to a minute)
            stream = await http.get(boxd.http_url + "/api/events")
            await stream.content.readline()
            started = time.monotonic()
            boxd.proc.terminate()
            assert await asyncio.wait_for(boxd.proc.wait(), 20) == 0
            assert time.monotonic() - started < 10
            stream.close()
    finally:
        await boxd.stop()


async def test_directory_shows_key_names_not_values_and_stays_bounded(tmp_path):
    async with MemoryBox(state=tmp_path) as box:
        hub = DashboardHub(box.controller)
        booster = await box.connect("keeper")
        for i in range(60):
            await booster.directory.put(f"k{i:03d}", "x" * 1000)
        box.directory.put("offline-booster", "state", 1)       # a booster that is not connected
        rows = (await hub.sample())[0][1]["directory"]
        assert [r["booster"] for r in rows] == ["keeper", "offline-booster"]     # connected first
        assert rows[0]["keys"] == 60 and rows[0]["names"] == [f"k{i:03d}" for i in range(50)]
        assert not rows[1]["connected"]
        assert "x" * 1000 not in json.dumps(rows)
        await hub.stop()


class _LinuxShapedController:
    """The views' shapes as the linux engine gives them (counters at the top of its status)."""

    def __init__(self) -> None:
        self.engine_status = {"hooks": ["FORWARD"], "rules": 1, "stalls": 0, "restore_failures": 0, "queues": {}}
        self.directory = None

    def status(self) -> dict:
        return {"engine": "linux", "uptime_s": 1.0, "boosters": 0, "rules": 0, "groups": 0, "control": "x",
                "counters": {}, "engine_status": dict(self.engine_status)}

    def boosters_view(self) -> list:
        return []

    def rules_view(self) -> list:
        return []


async def test_linux_engine_failopen_and_health_from_its_top_level_counters():
    controller = _LinuxShapedController()
    hub = DashboardHub(controller)
    first = (await hub.sample())[0][1]
    assert first["failopen"]["counters"] == {"stalls": 0} and first["health"]["state"] == "ok"
    controller.engine_status.update(stalls=2, restore_failures=1)
    tick = (await hub.sample())[0][1]
    assert tick["failopen"]["rates"]["stalls"] > 0 and tick["failopen"]["state"].startswith("passing")
    assert tick["health"] == {"state": "degraded", "rising": ["engine.restore_failures", "engine.stalls"],
                              "window_s": 60.0}
    assert "NFQUEUE --queue-bypass" in tick["failopen"]["mode"]
