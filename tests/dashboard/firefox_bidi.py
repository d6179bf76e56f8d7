"""Headless Firefox driven over WebDriver BiDi, without geckodriver.

Firefox (ESR 128 and later) speaks WebDriver BiDi itself when started with
``--remote-debugging-port``: it prints ``WebDriver BiDi listening on ws://HOST:PORT`` and a client
opens ``ws://HOST:PORT/session`` and sends ``session.new``.  geckodriver is not packaged for
Debian and Selenium would download it, so the tests speak the protocol directly (aiohttp's
WebSocket client) with the few commands they need: ``browsingContext.navigate/reload/
getTree/setViewport/captureScreenshot``, ``script.callFunction``, ``storage.getCookies`` and the
``log.entryAdded`` event for console errors.

:class:`FirefoxBidi` has the synchronous surface the dashboard tests use of a Selenium driver
(``get``, ``refresh``, ``current_url``, ``execute_script``, ``get_cookie``) plus
``console_errors()`` and ``screenshot(path)``.  The WebSocket lives on an event loop of its own
in a thread, so a test's own loop (which runs boxd's fixtures) is never blocked by it.

The profile (``user.js``) keeps the browser off every network but loopback: every proxy points at
a closed loopback port (loopback itself bypasses proxies), every host name resolves to 127.0.0.1
without a DNS query (Firefox's own services ignore the proxy), DNS prefetch, speculative connections,
captive-portal and connectivity checks, DNS over HTTPS, updates, telemetry, remote settings,
safe browsing and add-on updates are off.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import itertools
import json
import re
import threading
from pathlib import Path
from typing import Any

import aiohttp

from boxcore.procs import ProcessGroup
from cliruntime.supervisor import Supervisor

LISTENING = re.compile(r"WebDriver BiDi listening on (ws://[\w.:\[\]-]+)")
START_TIMEOUT = 60.0
COMMAND_TIMEOUT = 60.0
MAX_MESSAGE = 64 << 20          # a full-page screenshot of a tall page, base64
MAX_LOG_ENTRIES = 1000
DEAD_PROXY = ("127.0.0.1", 1)   # nothing listens on port 1: any non-loopback request fails here

PREFS: dict[str, Any] = {
    # nothing leaves the machine: loopback goes direct, everything else to a closed port
    "network.proxy.type": 1,
    **{f"network.proxy.{kind}": DEAD_PROXY[0] for kind in ("http", "ssl", "socks")},
    **{f"network.proxy.{kind}_port": DEAD_PROXY[1] for kind in ("http", "ssl", "socks")},
    "network.proxy.socks_remote_dns": True,
    "network.proxy.no_proxies_on": "",
    "network.proxy.allow_hijacking_localhost": False,
    # Firefox's own services (remote settings) resolve names even with a proxy set: every name is
    # 127.0.0.1, so what ignores the proxy stays on loopback too (checked with strace: no DNS query)
    "network.dns.forceResolve": "127.0.0.1",
    "network.dns.disableIPv6": True,
    "network.dns.disablePrefetch": True,
    "network.prefetch-next": False,
    "network.predictor.enabled": False,
    "network.http.speculative-parallel-limit": 0,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "network.trr.mode": 5,
    "app.update.enabled": False,
    "app.update.auto": False,
    "app.update.disabledForTesting": True,
    "app.normandy.enabled": False,
    "messaging-system.rsexperimentloader.enabled": False,
    "services.settings.server": "data:,#remote-settings-off",
    "datareporting.policy.dataSubmissionEnabled": False,
    "datareporting.healthreport.uploadEnabled": False,
    "toolkit.telemetry.enabled": False,
    "toolkit.telemetry.unified": False,
    "toolkit.telemetry.archive.enabled": False,
    "toolkit.telemetry.server": "",
    "browser.ping-centre.telemetry": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
    "browser.safebrowsing.provider.mozilla.updateURL": "",
    "extensions.update.enabled": False,
    "extensions.getAddons.cache.enabled": False,
    "extensions.blocklist.enabled": False,
    "browser.region.update.enabled": False,
    "browser.region.network.url": "",
    "browser.search.update": False,
    "geo.provider.network.url": "",
    "media.gmp-manager.url": "",
    "browser.newtabpage.enabled": False,
    "browser.startup.homepage": "about:blank",
    "browser.startup.page": 0,
    "browser.shell.checkDefaultBrowser": False,
}


class BidiError(RuntimeError):
    """A BiDi command failed, the page threw, or the browser went away."""


def user_js(prefs: dict[str, Any]) -> str:
    return "".join(f"user_pref({json.dumps(name)}, {json.dumps(value)});\n" for name, value in prefs.items())


def to_local_value(value: Any) -> dict:
    """A Python value as a BiDi ``script.LocalValue`` (an argument of ``script.callFunction``)."""
    if value is None:
        return {"type": "null"}
    if isinstance(value, bool):
        return {"type": "boolean", "value": value}
    if isinstance(value, (int, float)):
        return {"type": "number", "value": value}
    if isinstance(value, str):
        return {"type": "string", "value": value}
    if isinstance(value, (list, tuple)):
        return {"type": "array", "value": [to_local_value(v) for v in value]}
    if isinstance(value, dict):
        return {"type": "object", "value": [[str(k), to_local_value(v)] for k, v in value.items()]}
    raise TypeError(f"cannot pass a {type(value).__name__} to the page")


SPECIAL_NUMBERS = {"NaN": float("nan"), "-0": -0.0, "Infinity": float("inf"), "-Infinity": float("-inf")}


def from_remote_value(remote: dict) -> Any:
    """A BiDi ``script.RemoteValue`` as a Python value (what Selenium's execute_script returns)."""
    kind, value = remote.get("type"), remote.get("value")
    if kind in ("undefined", "null"):
        return None
    if kind in ("string", "boolean"):
        return value
    if kind == "number":
        return SPECIAL_NUMBERS.get(value, value) if isinstance(value, str) else value
    if kind == "bigint":
        return int(value)
    if kind in ("array", "set", "nodelist", "htmlcollection"):
        return [from_remote_value(v) for v in value or []]
    if kind in ("object", "map"):
        return {(k if isinstance(k, str) else json.dumps(from_remote_value(k))): from_remote_value(v)
                for k, v in value or []}
    return remote          # nodes, windows, functions: the handle as the protocol gave it


class FirefoxBidi:
    """One headless Firefox and one browsing context, driven synchronously."""

    name = "firefox"

    def __init__(self, binary: str, workdir: Path, *, width: int = 1440, height: int = 1000) -> None:
        self.binary, self.workdir = binary, workdir
        self.width, self.height = width, height
        self.group = ProcessGroup(workdir)
        self.log_entries: collections.deque[dict] = collections.deque(maxlen=MAX_LOG_ENTRIES)
        self.context: str | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="firefox-bidi", daemon=True)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._supervisor: Supervisor | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FirefoxBidi":
        profile = self.workdir / "profile"
        profile.mkdir(parents=True, exist_ok=True)
        (profile / "user.js").write_text(user_js(PREFS))
        role = self.group.start("firefox", [self.binary, "--headless", "--no-remote", "--remote-debugging-port", "0",
                                            "--profile", str(profile), "about:blank"], stats=False)
        try:
            self.group.wait_until_sync(role, lambda: LISTENING.search(role.output()) is not None,
                                       START_TIMEOUT, "no WebDriver BiDi endpoint announced")
            endpoint = LISTENING.search(role.output()).group(1)
            self._thread.start()
            self._run(self._connect(endpoint + "/session"))
        except BaseException:
            self.close()            # no browser left behind by a start that failed
            raise
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                self._run(self._disconnect(), timeout=15)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()
        self.group.stop_all_sync(grace=10)

    def __enter__(self) -> "FirefoxBidi":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run(self, coro, timeout: float = COMMAND_TIMEOUT + 5) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ------------------------------------------------------------------ protocol (on the thread's loop)
    async def _connect(self, url: str) -> None:
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(url, max_msg_size=MAX_MESSAGE, autoping=True)
        self._supervisor = Supervisor("firefox-bidi")
        self._supervisor.spawn(self._read(), name="reader")
        await self._command("session.new", {"capabilities": {"alwaysMatch": {"acceptInsecureCerts": False}}})
        await self._command("session.subscribe", {"events": ["log.entryAdded"]})
        tree = await self._command("browsingContext.getTree", {"maxDepth": 0})
        self.context = tree["contexts"][0]["context"]
        await self._command("browsingContext.setViewport",
                            {"context": self.context, "viewport": {"width": self.width, "height": self.height}})

    async def _disconnect(self) -> None:
        if self._ws is not None and not self._ws.closed:
            try:
                await asyncio.wait_for(self._command("browser.close", {}), 10)
            except (BidiError, asyncio.TimeoutError):
                pass                 # the process is stopped below in any case
            await self._ws.close()
        if self._supervisor is not None:
            await self._supervisor.aclose()
        if self._session is not None:
            await self._session.close()

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for message in self._ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(message.data)
                if data.get("type") == "event":
                    if data.get("method") == "log.entryAdded":
                        self.log_entries.append(data["params"])
                    continue
                future = self._pending.pop(data.get("id"), None)
                if future is None or future.done():
                    continue
                if data.get("type") == "error":
                    future.set_exception(BidiError(f"{data.get('error')}: {data.get('message')}"))
                else:
                    future.set_result(data.get("result", {}))
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(BidiError("the browser closed its WebDriver BiDi connection"))
            self._pending.clear()

    async def _command(self, method: str, params: dict) -> dict:
        if self._ws is None or self._ws.closed:
            raise BidiError(f"{method}: not connected")
        command_id = next(self._ids)
        future = self._loop.create_future()
        self._pending[command_id] = future
        await self._ws.send_str(json.dumps({"id": command_id, "method": method, "params": params}))
        try:
            return await asyncio.wait_for(future, COMMAND_TIMEOUT)
        except asyncio.TimeoutError:
            self._pending.pop(command_id, None)
            raise BidiError(f"{method}: no answer in {COMMAND_TIMEOUT:g} s") from None

    def command(self, method: str, params: dict) -> dict:
        """One BiDi command, synchronously; its result."""
        return self._run(self._command(method, params))

    # ------------------------------------------------------------------ what the tests use
    def get(self, url: str) -> None:
        self.command("browsingContext.navigate", {"context": self.context, "url": url, "wait": "complete"})

    def refresh(self) -> None:
        self.command("browsingContext.reload", {"context": self.context, "wait": "complete"})

    @property
    def current_url(self) -> str:
        tree = self.command("browsingContext.getTree", {"root": self.context, "maxDepth": 0})
        return tree["contexts"][0]["url"]

    def execute_script(self, body: str, *args: Any) -> Any:
        """Run ``body`` as a function's body (``arguments`` are ``args``), as Selenium does."""
        result = self.command("script.callFunction", {
            "functionDeclaration": f"function() {{\n{body}\n}}", "arguments": [to_local_value(a) for a in args],
            "awaitPromise": True, "target": {"context": self.context}, "resultOwnership": "none"})
        if result.get("type") == "exception":
            details = result.get("exceptionDetails", {})
            raise BidiError(f"the page threw: {details.get('text')}")
        return from_remote_value(result["result"])

    def get_cookie(self, name: str) -> dict | None:
        """The cookie ``name`` of the page's partition, shaped like Selenium's (value a string)."""
        found = self.command("storage.getCookies", {"filter": {"name": name},
                                                    "partition": {"type": "context", "context": self.context}})
        for cookie in found.get("cookies", []):
            value = cookie.get("value", {})
            decoded = base64.b64decode(value["value"]).decode() if value.get("type") == "base64" else value.get("value")
            return {**cookie, "value": decoded}
        return None

    def console_errors(self) -> list[dict]:
        """Console errors and uncaught exceptions so far, as ``{"level", "message", "source"}``."""
        entries = self._run(self._log_copy())      # copied on the loop that appends to it
        return [{"level": entry.get("level"), "message": entry.get("text") or "", "source": entry.get("type")}
                for entry in entries if entry.get("level") == "error"]

    async def _log_copy(self) -> list[dict]:
        return list(self.log_entries)

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        shot = self.command("browsingContext.captureScreenshot",
                            {"context": self.context, "origin": "document" if full_page else "viewport"})
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
