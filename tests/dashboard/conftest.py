"""Fixtures for the dashboard tests: a real boxd with traffic, test boosters, headless browsers.

Every browser test runs twice, in headless Chromium and in headless Firefox (the ``browser``
fixture is parametrized), through one small synchronous surface: ``get``, ``refresh``,
``current_url``, ``execute_script``, ``get_cookie``, ``console_errors()``, ``screenshot(path)``.

- Chromium: Debian's ``chromium`` and ``chromium-driver`` through Selenium (the test extra).
- Firefox: Debian's ``firefox-esr`` over WebDriver BiDi, spoken directly
  (:mod:`tests.dashboard.firefox_bidi`; geckodriver is not packaged).

tools/bootstrap.sh installs both browsers as root; outside CI a missing piece skips with the
reason, in CI it fails.
"""

from __future__ import annotations

import asyncio
import base64
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
from tests.polling import until_sync

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "out" / "dashboard"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FIREFOX = "/usr/bin/firefox-esr"
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu",
                  "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                  "--disable-background-networking", "--disable-component-update")
BROWSERS = ("chromium", "firefox")
WINDOW = (1440, 1000)
WAIT_TIMEOUT = 30
WAIT_POLL = 0.2


def _present(path: str) -> bool:
    return os.path.exists(path) or shutil.which(os.path.basename(path)) is not None


def _browser_problem(name: str = "chromium") -> str | None:
    if name == "firefox":
        if not _present(FIREFOX):
            return f"needs {FIREFOX} (apt-get install firefox-esr)"
        return None
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs the selenium package (pip install -e '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not _present(path):
            return f"needs {path} (apt-get install chromium chromium-driver)"
    return None


def require_browser(name: str = "chromium") -> None:
    """Skip (outside CI) or fail (in CI) when headless ``name`` cannot be driven here."""
    problem = _browser_problem(name)
    if problem is not None:
        if in_ci():
            pytest.fail(f"{name} browser test cannot run in CI: {problem}", pytrace=False)
        pytest.skip(problem)


class ChromiumBrowser:
    """Selenium's Chrome driver behind the surface the tests share with :class:`FirefoxBidi`."""

    name = "chromium"

    def __init__(self) -> None:
        os.environ["SE_OFFLINE"] = "true"          # selenium-manager must not fetch anything
        os.environ["SE_AVOID_STATS"] = "true"
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument("--window-size={},{}".format(*WINDOW))
        options.binary_location = CHROMIUM
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(30)
        self._log: list[dict] = []

    def get(self, url: str) -> None:
        self.driver.get(url)

    def refresh(self) -> None:
        self.driver.refresh()

    @property
    def current_url(self) -> str:
        return self.driver.current_url

    def execute_script(self, body: str, *args):
        return self.driver.execute_script(body, *args)

    def get_cookie(self, name: str) -> dict | None:
        return self.driver.get_cookie(name)

    def console_errors(self) -> list[dict]:
        """Console errors so far, as ``{"level", "message", "source"}`` (the log is read once by Selenium)."""
        self._log += self.driver.get_log("browser")
        return [{"level": "error", "message": entry["message"], "source": entry.get("source")}
                for entry in self._log if entry["level"] in ("SEVERE", "ERROR")]

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        if not full_page:
            self.driver.save_screenshot(str(path))
            return path
        size = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        self.driver.quit()


@pytest.fixture(params=BROWSERS)
def browser(request, tmp_path):
    """A headless browser: Chromium, then Firefox (same tests, same checks)."""
    require_browser(request.param)
    if request.param == "firefox":
        from tests.dashboard.firefox_bidi import FirefoxBidi

        driver = FirefoxBidi(FIREFOX, tmp_path / "firefox", width=WINDOW[0], height=WINDOW[1]).start()
    else:
        driver = ChromiumBrowser()
    try:
        yield driver
    finally:
        driver.close()


def console_errors(driver) -> list[dict]:
    return driver.console_errors()


def screenshot(driver, name: str, full_page: bool = True) -> Path:
    """Save a screenshot under out/dashboard/ (Chromium's as ``name``, Firefox's as ``firefox-name``)."""
    OUT.mkdir(parents=True, exist_ok=True)
    prefix = "" if driver.name == "chromium" else driver.name + "-"
    return driver.screenshot(OUT / (prefix + name), full_page)


def wait_until(driver, condition, message: str, timeout: float = WAIT_TIMEOUT):
    """Poll ``condition(driver)`` until it is true (a page's state has no event the test can await)."""
    return until_sync(lambda: condition(driver), f"{driver.name}: {message}", timeout, WAIT_POLL)


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
