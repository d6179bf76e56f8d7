"""booster-demo prints its dashboard's address, the page is live during the tour, --keep keeps it up."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path

from tests.dashboard.conftest import console_errors, screenshot, wait_until
from tests.dashboard.test_browser import count, panel, rule_packets

BIN = Path(sys.executable).parent


async def _line(proc, pattern: str, timeout: float = 120) -> re.Match:
    async def read() -> re.Match:
        while True:
            line = (await proc.stdout.readline()).decode()
            assert line, "booster-demo ended early"
            if match := re.search(pattern, line):
                return match
    return await asyncio.wait_for(read(), timeout)


async def test_demo_dashboard_is_live_during_the_tour_and_kept_after(browser, tmp_path):
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "booster-demo"), "--only", "boxcore", "--keep", "--workdir", str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=open(tmp_path / "demo.err", "wb"), start_new_session=True)
    try:
        url = (await _line(proc, r"== dashboard: (http://\S+)")).group(1)
        browser.get(url)
        wait_until(browser, lambda d: count(d, '#boosters tbody tr[data-booster="udp-counter"]') == 1,
                   "the example booster is not on the page")
        wait_until(browser, lambda d: panel(d, "fcd-demo-city"), "the city panel did not appear", timeout=60)
        first = rule_packets(browser)
        wait_until(browser, lambda d: rule_packets(d) > first, "the demo's traffic does not move the counters")
        await _line(proc, r"== dashboard stays up at .* until Ctrl-C")
        assert proc.returncode is None                     # --keep: still serving after the tour
        later = rule_packets(browser)
        wait_until(browser, lambda d: rule_packets(d) > later, "the kept dashboard is not live")
        screenshot(browser, "dashboard-demo.png")
        assert console_errors(browser) == []
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        # a failed check must not leave the demo's boxd and boosters running: stop the demo,
        # then whatever of its process group is left
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.returncode is None:
            await proc.wait()
