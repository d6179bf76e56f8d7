"""booster-fleet: several real boxd side by side in one page, in Chromium."""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest

from boxcore.fleet import box_url
from boxcore.procs import free_port
from boxcore.testing import BoxdProcess
from tests.dashboard.conftest import REPO, Traffic, console_errors, screenshot, wait_until
from tests.dashboard.test_browser import count


def test_box_addresses_are_checked():
    assert box_url("http://127.0.0.1:9100/") == "http://127.0.0.1:9100"
    for bad in ("127.0.0.1:9100", "http://127.0.0.1:9100/api", "ftp://x:1", "http://h:1/?a=b"):
        with pytest.raises(Exception, match="expected http://HOST:PORT"):
            box_url(bad)


async def test_fleet_shows_each_box_live_and_a_dead_one_as_unreachable(box, browser, tmp_path):
    dead = f"http://127.0.0.1:{free_port(socket.SOCK_STREAM)}"
    async with BoxdProcess(tmp_path / "second") as second:
        ready = tmp_path / "fleet.url"
        fleet = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "boxcore.fleet", "--listen", "127.0.0.1:0", "--ready-file", str(ready),
            "--box", box.http_url, "--box", second.http_url, "--box", dead, cwd=str(REPO),
            stdout=asyncio.subprocess.DEVNULL, stderr=open(tmp_path / "fleet.log", "wb"))
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while not (ready.exists() and ready.read_text()):
                assert fleet.returncode is None and loop.time() < deadline, (tmp_path / "fleet.log").read_text()
                await asyncio.sleep(0.05)
            browser.get(ready.read_text())
            cards = '#fleet .box[data-box="{}"]'
            wait_until(browser, lambda d: all(count(d, cards.format(url) + ' [data-status="live"]') == 1
                                              for url in (box.http_url, second.http_url)), "boxes not live")
            wait_until(browser, lambda d: count(d, cards.format(dead) + ' [data-status="down"]') == 1,
                       "the dead box is not shown as unreachable")
            assert count(browser, cards.format(box.http_url) + ' tr[data-booster="udp-counter"]') == 1
            with Traffic(box.udp_port, rate=2000):
                wait_until(browser, lambda d: d.execute_script(
                    "const e = document.querySelector(arguments[0]); return e && e.textContent;",
                    cards.format(box.http_url) + ' [data-figure="pps"]') not in (None, "0", "–"),
                    "the busy box's rate did not move")
                screenshot(browser, "fleet.png")
            assert console_errors(browser) == []
        finally:
            fleet.terminate()
            assert await asyncio.wait_for(fleet.wait(), 15) == 0
