"""Where the dashboard meets boxd's hardening: the token in a browser's reach (query, cookie),
/api/events never cut by the per-request deadline, boxd's own record of departures (exact
eviction reasons, per-booster counts), and booster-fleet with a token."""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import sys

import aiohttp

from boxcore.dashboard import DashboardHub
from boxcore.fleet import FleetHub, read_events
from boxcore.http import TOKEN_COOKIE, cookie_for, start_http
from boxcore.procs import free_port
from boxcore.testing import BoxdProcess, MemoryBox
from tests.dashboard.conftest import REPO

TOKEN = "a-token-of-32-characters-exactly"


def token_file(tmp_path):
    path = tmp_path / "http.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


async def first_events(response, n: int) -> list[str]:
    seen = []
    async for event, _ in read_events(response.content, collections.Counter()):
        seen.append(event)
        if len(seen) == n:
            return seen
    return seen


async def test_with_a_token_the_stream_takes_it_from_the_query_or_the_page_cookie(tmp_path):
    async with BoxdProcess(tmp_path / "boxd", extra=["--http-token-file", str(token_file(tmp_path))]) as boxd:
        url = boxd.http_url
        async with aiohttp.ClientSession() as http:
            # the stream carries per-booster data: with a token configured it needs it
            async with http.get(url + "/api/events") as r:
                assert r.status == 401
            async with http.get(url + "/api/events?token=" + "x" * 32) as r:
                assert r.status == 401
            async with http.get(url + "/api/events", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                assert r.status == 200 and await first_events(r, 1) == ["snapshot"]
            async with http.get(url + f"/api/events?token={TOKEN}") as r:
                assert r.status == 200 and await first_events(r, 1) == ["snapshot"]
            # the page stays open on loopback; loaded with the token, it sets the cookie
            async with http.get(url + "/") as r:
                assert r.status == 200 and TOKEN_COOKIE not in r.cookies
            async with http.get(url + f"/?token={TOKEN}") as r:
                assert r.status == 200
                cookie = r.cookies[TOKEN_COOKIE]
                assert cookie["httponly"] and cookie["samesite"] == "Strict"
                assert cookie.value == cookie_for(TOKEN) and TOKEN not in cookie.value
        async with aiohttp.ClientSession(cookies={TOKEN_COOKIE: cookie_for(TOKEN)}) as browser_like:
            async with browser_like.get(url + "/api/events") as r:
                assert r.status == 200 and await first_events(r, 2) == ["snapshot", "tick"]
            async with browser_like.get(url + "/api/boosters") as r:     # the cookie is the token's stand-in
                assert r.status == 200
        async with aiohttp.ClientSession(cookies={TOKEN_COOKIE: cookie_for("another-token-of-enough-length")}) as other:
            async with other.get(url + "/api/events") as r:
                assert r.status == 401
        status = await boxd.query("status")
        assert status["counters"]["http_unauthorized"] == 3
        assert TOKEN not in boxd.log_path.read_text()          # never logged


async def test_the_stream_outlives_the_request_deadline_that_cuts_idle_connections(tmp_path):
    async with MemoryBox(state=tmp_path) as box:
        server = await start_http(box.controller, "127.0.0.1", 0, header_timeout=0.3)
        try:
            # a connection that sends nothing is closed at the deadline...
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            # ...while the stream, a response in progress, goes on well past it
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{server.port}/api/events") as r:
                    started = asyncio.get_running_loop().time()
                    assert await first_events(r, 3) == ["snapshot", "tick", "tick"]
                    assert asyncio.get_running_loop().time() - started > 3 * 0.3
        finally:
            await server.cleanup()


async def test_departures_carry_boxds_reason_and_the_dashboard_shows_them(tmp_path):
    async with MemoryBox(state=tmp_path) as box:
        hub = DashboardHub(box.controller)
        await hub.sample()
        stays = await box.connect("stays")
        flaky = await box.connect("flaky")
        leaves = await box.connect("leaves")
        await hub.sample()
        controller = box.controller
        for attempt in range(2):                 # evicted twice under the same name
            sess = next(s for s in controller.sessions.values() if s.booster.name == "flaky")
            controller.evict(sess, f"unhealthy: test reason {attempt}")
            await asyncio.wait_for(flaky.session.gone.wait(), 5)
            await flaky.close()
            flaky = await box.connect("flaky")
        await leaves.close()
        await asyncio.sleep(0)
        departed = controller.departures_view()
        assert [(d["name"], d["evicted"]) for d in departed] == [("flaky", True), ("flaky", True), ("leaves", False)]
        assert departed[0]["reason"] == "unhealthy: test reason 0" and departed[0]["uid"] == os.getuid()
        assert {b["name"]: b["evictions"] for b in controller.boosters_view()} == {"stays": 0, "flaky": 2}
        tick = (await hub.sample())[0][1]
        told = [(e["booster"], e["what"], e.get("reason")) for e in tick["events"] if e["what"] != "joined"]
        assert told == [("flaky", "evicted", "unhealthy: test reason 0"), ("flaky", "evicted", "unhealthy: test reason 1"),
                        ("leaves", "left", departed[2]["reason"])]
        assert {b["name"]: b["evictions"] for b in tick["boosters"]} == {"stays": 0, "flaky": 2}
        assert len((await hub.sample())[0][1]["events"]) == len(tick["events"])     # each departure told once
        for b in (stays, flaky):
            await b.close()
        await hub.stop()


async def test_departures_are_bounded_and_need_the_token(tmp_path):
    from boxcore import controller as controller_module

    async with BoxdProcess(tmp_path / "boxd", extra=["--http-token-file", str(token_file(tmp_path))]) as boxd:
        from boxcore.booster import Booster

        async with Booster("brief", control=boxd.control):
            pass
        async with aiohttp.ClientSession() as http:
            async with http.get(boxd.http_url + "/api/boosters/departures") as r:
                assert r.status == 401
            async with http.get(boxd.http_url + "/api/boosters/departures",
                                headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                departed = await r.json()
        assert [(d["name"], d["evicted"]) for d in departed] == [("brief", False)]
    assert controller_module.MAX_DEPARTURES == 100
    async with MemoryBox(state=tmp_path / "memory") as box:
        for i in range(controller_module.MAX_DEPARTURES + 5):
            await (await box.connect(f"b{i}")).close()
        await asyncio.sleep(0)
        departed = box.controller.departures_view()
        assert len(departed) == controller_module.MAX_DEPARTURES and departed[-1]["name"] == "b104"


async def test_fleet_follows_a_box_that_needs_a_token(tmp_path):
    path = token_file(tmp_path)
    async with BoxdProcess(tmp_path / "boxd", extra=["--http-token-file", str(path)]) as boxd:
        for token, expected in ((None, "unreachable: HTTP 401"), (TOKEN, "live")):
            hub = FleetHub([boxd.http_url], token=token)
            await hub.start()
            try:
                client = hub.subscribe()
                while True:          # the hub publishes each change of the box's state
                    message = await asyncio.wait_for(client.next(), 10)
                    if f'"status":"{expected}"'.encode() in message:
                        break
            finally:
                await hub.stop()
        # the command line: a token file, and then only a loopback page
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "boxcore.fleet", "--listen", f"0.0.0.0:{free_port(socket.SOCK_STREAM)}",
            "--token-file", str(path), "--box", boxd.http_url, cwd=str(REPO),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 2 and b"loopback" in err and TOKEN.encode() not in err
