"""Fixtures for the dashboard tests: a real boxd with traffic, test boosters, headless Chromium.

Browser tests need Debian's ``chromium`` and ``chromium-driver`` (tools/bootstrap.sh installs them
as root) and the ``selenium`` package (the test extra): outside CI a missing piece skips with the
reason, in CI it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from boxcore.procs import free_port
from boxcore.testing import BoxdProcess
from cliruntime import in_ci

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "out" / "dashboard"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu",
                  "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                  "--disable-background-networking", "--disable-component-update")


def _browser_problem() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs the selenium package (pip install -e '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.exists(path) or shutil.which(os.path.basename(path))):
            return f"needs {path} (apt-get install chromium chromium-driver)"
    return None


def require_browser() -> None:
    """Skip (outside CI) or fail (in CI) when headless Chromium cannot be driven here."""
    problem = _browser_problem()
    if problem is not None:
        if in_ci():
            pytest.fail(f"browser test cannot run in CI: {problem}", pytrace=False)
        pytest.skip(problem)


@pytest.fixture
def browser():
    require_browser()
    os.environ["SE_OFFLINE"] = "true"          # selenium-manager must not fetch anything
    os.environ["SE_AVOID_STATS"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument("--window-size=1440,1000")
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]


def screenshot(driver, name: str, full_page: bool = True) -> Path:
    """Save a screenshot under out/dashboard/ (the whole page, through DevTools, when ``full_page``)."""
    import base64

    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    if not full_page:
        driver.save_screenshot(str(path))
        return path
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


class Traffic:
    """UDP datagrams to the box's listening port, from a thread, until stopped."""

    def __init__(self, port: int, rate: int = 2000) -> None:
        import threading

        self.port, self.rate = port, rate
        self.stopped = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        burst = max(1, self.rate // 20)
        while not self.stopped.is_set():
            for i in range(burst):
                sock.sendto(b"hello %d" % i, ("127.0.0.1", self.port))
                self.sent += 1
            self.stopped.wait(0.05)
        sock.close()

    def __enter__(self) -> "Traffic":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join(5)


HTTP_TOKEN = "dashboard-test-token-0123456789"


@pytest.fixture
async def box(tmp_path):
    """A real boxd (user engine, loopback) with the example booster counting UDP on its port."""
    async with _box_with_counter(tmp_path) as boxd:
        yield boxd


@pytest.fixture
async def token_box(tmp_path):
    """The same, with ``--http-token-file`` (``boxd.http_token``)."""
    path = tmp_path / "http.token"
    path.write_text(HTTP_TOKEN)
    path.chmod(0o600)
    async with _box_with_counter(tmp_path, ["--http-token-file", str(path)]) as boxd:
        boxd.http_token = HTTP_TOKEN
        yield boxd


@contextlib.asynccontextmanager
async def _box_with_counter(tmp_path: Path, extra: list[str] = ()):
    port, relay = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    async with BoxdProcess(tmp_path / "boxd", listens=[f"udp:127.0.0.1:{port}=127.0.0.1:{relay}"],
                           extra=list(extra)) as boxd:
        example = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "boxcore.examples.udp_counter", "--control", str(boxd.control),
            "--port", str(relay), "--drop-prefix", "SPAM", stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "example.log", "wb"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not await boxd.query("rules"):
            assert loop.time() < deadline, (tmp_path / "example.log").read_text()
            assert example.returncode is None, (tmp_path / "example.log").read_text()
            await asyncio.sleep(0.05)
        boxd.udp_port = port
        try:
            yield boxd
        finally:
            example.terminate()
            await example.wait()


class PanelBooster:
    """tests/dashboard/panel_booster.py as a real process on ``boxd``."""

    def __init__(self, boxd: BoxdProcess, name: str, kind: str, log: Path) -> None:
        self.boxd, self.name, self.kind, self.log = boxd, name, kind, log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> "PanelBooster":
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.dashboard.panel_booster", "--control", str(self.boxd.control),
            "--name", self.name, "--kind", self.kind, cwd=str(REPO), stdout=subprocess.PIPE,
            stderr=open(self.log, "wb"))
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        assert line.strip() == b"published", self.log.read_text()
        return self

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


@pytest.fixture
async def panel_boosters(tmp_path):
    started: list[PanelBooster] = []

    async def start(boxd: BoxdProcess, name: str, kind: str) -> PanelBooster:
        booster = await PanelBooster(boxd, name, kind, tmp_path / f"{name}.log").start()
        started.append(booster)
        return booster

    yield start
    for booster in started:
        await booster.stop()
