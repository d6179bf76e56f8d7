"""boxd's live dashboard: a page at ``/`` fed by Server-Sent Events at ``/api/events``.

One :class:`DashboardHub` per boxd samples the controller's management views once a second
(status, boosters, rules with their counters, the directory's key counts), turns counters into
rates, keeps a few minutes of traffic history, and watches the reserved :data:`PANEL_KEY` of
every connected booster's directory (:mod:`boxcore.panels`).  Each sample is one ``tick`` event;
panel changes are ``panel`` / ``panel_removed`` events; a new client first gets a ``snapshot``
(the last tick, the history and every panel).  Every message is encoded once and queued to each
client; a client whose queue is full (it does not read) is disconnected and counted, and at most
``max_clients`` streams are served at once, so no browser can hold memory or starve another.

The page itself (``boxcore/dashboard_static/``: HTML, CSS, hand-written JS, no external fetch)
uses one ``EventSource`` and never polls.  The data is what the JSON API already serves
(``/api/status``, ``/api/boosters``, ``/api/rules``, ``/api/directory``): key names and panels,
never other directory values.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from boxcore.panels import PANEL_KEY, PanelError, validate_panel
from cliruntime.supervisor import Supervisor, within

log = logging.getLogger("boxcore.dashboard")

STATIC_DIR = Path(str(resources.files("boxcore") / "dashboard_static"))
EVENTS_PATH = "/api/events"
STATIC_PREFIX = "/dashboard/static"
# A browser gets at most this many seconds of history in its snapshot (one point per interval).
HISTORY_SECONDS = 300
MAX_RULES_SHOWN = 500
MAX_KEYS_SHOWN = 50
MAX_DIRECTORY_ROWS = 100
MAX_EVENTS = 50
WRITE_TIMEOUT = 10.0
# Engine counters that count packets passed on without a booster's verdict (the box failing open).
FAILOPEN_COUNTERS = {
    "user": ("verdict_timeouts", "verdict_queue_full_passed", "channel_full_passed", "verdicts_abandoned"),
    "memory": ("verdict_timeouts",),
    "linux": ("stalls",),
    "np": ("stalls",),
}
ALL_FAILOPEN_COUNTERS = tuple(dict.fromkeys(c for names in FAILOPEN_COUNTERS.values() for c in names))
FAILOPEN_MODES = {
    "user": "a packet whose verdict does not come within --user-verdict-timeout passes; "
            "a booster that cannot take packets (channel full) lets them pass",
    "linux": "NFQUEUE --queue-bypass: no listener or a full queue lets packets pass; "
             "a stalled booster is evicted and its rules removed",
    "np": "as linux on the host; the card forwards what no rule redirects",
    "memory": "in-process test engine: verdict timeout passes",
}
# Counter names that, when they rise, mean something is going wrong in the engine or boxd.
HEALTH_WORDS = ("error", "failure", "stall", "malformed")
HEALTH_WINDOW = 60.0
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def sse_message(event: str, data: Any) -> bytes:
    """One Server-Sent Events message (JSON data on one line)."""
    text = json.dumps(data, separators=(",", ":"), default=str)
    return f"event: {event}\ndata: {text}\n\n".encode()


def _numeric(counters: dict) -> dict[str, float]:
    return {str(k): v for k, v in counters.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class SseClient:
    """One browser's queue of encoded messages (bounded; overflow closes it)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buffer: collections.deque[bytes] = collections.deque()
        self.wakeup = asyncio.Event()
        self.closed = False
        self.overflowed = False

    def offer(self, message: bytes) -> bool:
        if self.closed:
            return False
        if len(self.buffer) >= self.limit:
            self.overflowed = True
            self.close()
            return False
        self.buffer.append(message)
        self.wakeup.set()
        return True

    def close(self) -> None:
        self.closed = True
        self.wakeup.set()

    async def next(self) -> bytes | None:
        while not self.buffer:
            if self.closed:
                return None
            self.wakeup.clear()
            await self.wakeup.wait()
        if self.overflowed:
            return None
        return self.buffer.popleft()


class SseHub:
    """The browsers of one Server-Sent Events stream: at most ``max_clients`` at once, each with a
    bounded queue (a client that does not read is dropped and counted).  Subclasses say what a new
    client gets first (:meth:`snapshot`) and how they start and stop their own work."""

    def __init__(self, *, max_clients: int, client_queue: int) -> None:
        self.max_clients = max_clients
        self.client_queue = client_queue
        self.clients: set[SseClient] = set()
        self.stats: collections.Counter[str] = collections.Counter()

    def subscribe(self) -> SseClient | None:
        if len(self.clients) >= self.max_clients:
            self.stats["sse_refused"] += 1
            return None
        client = SseClient(self.client_queue)
        self.clients.add(client)
        self.stats["sse_connections"] += 1
        return client

    def unsubscribe(self, client: SseClient) -> None:
        self.clients.discard(client)
        if client.overflowed:
            self.stats["sse_slow_clients_dropped"] += 1

    def send(self, message: bytes) -> None:
        """Queue one encoded message to every client."""
        for client in list(self.clients):
            client.offer(message)

    def close_clients(self) -> None:
        for client in list(self.clients):
            client.close()

    def snapshot(self) -> dict:
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError


class DashboardHub(SseHub):
    """Samples a controller once per ``interval`` and fans the result out to SSE clients."""

    def __init__(self, controller: Any, *, interval: float = 1.0, history_seconds: float = HISTORY_SECONDS,
                 max_clients: int = 32, client_queue: int = 64) -> None:
        super().__init__(max_clients=max_clients, client_queue=client_queue)
        self.controller = controller
        self.interval = interval
        self.history: collections.deque[list] = collections.deque(maxlen=max(2, int(history_seconds / interval)))
        self.panels: dict[str, dict] = {}
        self.last_tick: dict | None = None
        self.events: collections.deque[dict] = collections.deque(maxlen=MAX_EVENTS)
        self._watches: dict[str, Any] = {}
        self._last_counters: dict[int, tuple[int, int]] = {}
        self._last_failopen: dict[str, float] = {}
        self._last_health: dict[str, float] = {}
        self._health_rising: dict[str, float] = {}     # counter -> when it last rose
        self._last_time: float | None = None
        self._known: dict[int, dict] = {}              # sid -> booster row, to see who joined
        self._departures_seen: set[int] = set()        # sids of boxd's departures already told
        self._sampled = False
        self._key_names: dict[str, tuple[tuple[int, int], list[str]]] = {}
        self.supervisor: Supervisor | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.supervisor = Supervisor("dashboard", logger=log)
        self.supervisor.spawn_restarting(self.run, name="sampler")

    async def run(self) -> None:
        while True:
            self.broadcast(await self.sample())
            await asyncio.sleep(self.interval)

    async def _refresh_key_names(self) -> None:
        """Re-read the key names of boosters whose directory changed (keys, bytes) since the last
        look: through the directory's async interface, so a fleet directory on Redis works too."""
        store = getattr(self.controller, "store", None)
        if store is None:
            return
        summaries = store.boosters()
        for name in self._directory_names(summaries):
            summary = summaries[name]
            fingerprint = (summary.get("keys", 0), summary.get("bytes", 0))
            cached = self._key_names.get(name)
            if cached is None or cached[0] != fingerprint:
                self._key_names[name] = (fingerprint, await store.keys(name, limit=MAX_KEYS_SHOWN))

    def _directory_names(self, summaries: dict) -> list[str]:
        """Connected boosters first, then the others by name; at most MAX_DIRECTORY_ROWS."""
        connected = {row["name"] for row in self._known.values()}
        return sorted(summaries, key=lambda n: (n not in connected, n))[:MAX_DIRECTORY_ROWS]

    async def stop(self) -> None:
        self.close_clients()
        if self.supervisor is not None:
            await self.supervisor.aclose()
        for watch in self._watches.values():
            watch.close()
        self._watches.clear()

    # ------------------------------------------------------------------ clients
    def broadcast(self, events: list[tuple[str, Any]]) -> None:
        for event, data in events:
            self.send(sse_message(event, data))

    def snapshot(self) -> dict:
        return {"tick": self.last_tick, "history": list(self.history), "panels": list(self.panels.values()),
                "interval": self.interval}

    # ------------------------------------------------------------------ sampling
    async def sample(self) -> list[tuple[str, Any]]:
        """Read the controller's views once; the events to send (a tick, panel changes)."""
        await self._refresh_key_names()
        now = time.monotonic()
        dt = None if self._last_time is None else max(1e-6, now - self._last_time)
        self._last_time = now
        controller = self.controller
        status = controller.status()
        boosters = controller.boosters_view()
        rules = controller.rules_view()

        rule_rows, total_pps, total_bps = self._rules(rules, dt)
        engine_status = status.get("engine_status") or {}
        engine_counters = _numeric(engine_status.get("counters") or {})
        # the linux and np engines keep their counters at the top level of their status
        for key, value in _numeric(engine_status).items():
            engine_counters.setdefault(key, value)
        boxd_counters = _numeric(status.get("counters") or {})
        failopen = self._failopen(status.get("engine", ""), engine_counters, dt)
        health = self._health(now, {**{f"engine.{k}": v for k, v in engine_counters.items()},
                                    **{f"boxd.{k}": v for k, v in boxd_counters.items()}})
        booster_rows = self._boosters(boosters)
        point = [round(time.time(), 3), total_pps, total_bps, failopen["pps"]]
        if dt is not None:
            self.history.append(point)
        tick = {
            "t": point[0], "interval": self.interval,
            "engine": status.get("engine"), "uptime_s": status.get("uptime_s"), "control": status.get("control"),
            "health": health, "failopen": failopen,
            "counts": {"boosters": status.get("boosters"), "rules": status.get("rules"), "groups": status.get("groups"),
                       "evictions": boxd_counters.get("boosters_evicted", 0),
                       "boosters_left": boxd_counters.get("boosters_left", 0)},
            "traffic": {"pps": total_pps, "bps": total_bps},
            "point": point if dt is not None else None,
            "boosters": booster_rows, "events": sorted(self.events, key=lambda e: e["t"]),
            "rules": rule_rows[:MAX_RULES_SHOWN], "rules_not_shown": max(0, len(rule_rows) - MAX_RULES_SHOWN),
            "directory": self._directory({row["name"] for row in booster_rows}),
            "engine_counters": engine_counters, "boxd_counters": boxd_counters,
            "dashboard": {"clients": len(self.clients), **self.stats},
        }
        self.last_tick = tick
        events: list[tuple[str, Any]] = [("tick", tick)]
        events += self._panels({row["name"] for row in booster_rows})
        return events

    def _rules(self, rules: list[dict], dt: float | None) -> tuple[list[dict], float, float]:
        rows, total_pps, total_bps = [], 0.0, 0.0
        counters = {}
        for rule in rules:
            cookie, packets, nbytes = rule["cookie"], rule.get("packets", 0), rule.get("bytes", 0)
            counters[cookie] = (packets, nbytes)
            before = self._last_counters.get(cookie)
            pps = bps = None
            if dt is not None and before is not None and packets >= before[0]:
                pps = round((packets - before[0]) / dt, 1)
                bps = round((nbytes - before[1]) / dt, 1)
                total_pps += pps
                total_bps += bps
            rows.append({"cookie": cookie, "owner": rule.get("owner"), "action": rule.get("action"),
                         "priority": rule.get("priority"), "match": rule.get("match_text"),
                         "delivery": rule.get("delivery"), "group": rule.get("group"),
                         "packets": packets, "bytes": nbytes, "pps": pps, "bps": bps})
        self._last_counters = counters
        rows.sort(key=lambda r: (-(r["pps"] or 0), r["cookie"]))
        return rows, round(total_pps, 1), round(total_bps, 1)

    def _failopen(self, engine: str, counters: dict[str, float], dt: float | None) -> dict:
        names = FAILOPEN_COUNTERS.get(engine, ALL_FAILOPEN_COUNTERS)
        totals = {k: counters.get(k, 0) for k in names}
        rates = {}
        for key, value in totals.items():
            before = self._last_failopen.get(key)
            if dt is not None and before is not None and value >= before:
                rates[key] = round((value - before) / dt, 1)
        self._last_failopen = dict(totals)
        pps = round(sum(rates.values()), 1)
        return {"mode": FAILOPEN_MODES.get(engine, "engine-specific"), "counters": totals, "rates": rates,
                "pps": pps, "state": "passing packets without a verdict" if pps > 0 else "armed (nothing passing)"}

    def _health(self, now: float, counters: dict[str, float]) -> dict:
        for key, value in counters.items():
            if not any(word in key for word in HEALTH_WORDS):
                continue
            before = self._last_health.get(key)
            if before is not None and value > before:
                self._health_rising[key] = now
            self._last_health[key] = value
        rising = sorted(k for k, when in self._health_rising.items() if now - when <= HEALTH_WINDOW)
        return {"state": "degraded" if rising else "ok", "rising": rising, "window_s": HEALTH_WINDOW}

    def _boosters(self, boosters: list[dict]) -> list[dict]:
        config = getattr(self.controller, "config", None)
        interval = getattr(config, "heartbeat_interval", 1.0)
        deadline = interval * getattr(config, "heartbeat_misses", 3)
        rows = []
        for b in boosters:
            age = b.get("last_heartbeat_s", 0.0)
            state = "ok" if age <= 1.5 * interval else ("late" if age <= deadline else "missing")
            rows.append({"sid": b.get("sid"), "name": b.get("name"), "pid": b.get("pid"), "uid": b.get("uid"),
                         "rules": len(b.get("rules", ())), "cookies": list(b.get("rules", ()))[:32],
                         "groups": len(b.get("groups", ())), "connected_s": b.get("connected_s"),
                         "heartbeat_age_s": age, "heartbeat": state, "handler_errors": b.get("handler_errors", 0),
                         "channel_sent": b.get("channel_sent", 0), "channel_dropped": b.get("channel_dropped", 0),
                         "evictions": b.get("evictions", 0)})
        self._note_departures(rows)
        rows.sort(key=lambda r: (r["name"] or "", r["sid"] or 0))
        return rows

    def _note_departures(self, rows: list[dict]) -> None:
        """Joins as this hub sees them; departures as boxd recorded them (with its reason, and
        whether it evicted the booster)."""
        now = round(time.time(), 3)
        current = {row["sid"]: row for row in rows}
        first, self._sampled = not self._sampled, True
        if not first:
            for sid, row in current.items():
                if sid not in self._known:
                    self.events.append({"t": now, "booster": row["name"], "pid": row["pid"], "what": "joined"})
        self._known = current
        departures = getattr(self.controller, "departures_view", lambda: [])()
        for d in departures:
            if d["sid"] not in self._departures_seen:
                self.events.append({"t": d["time"], "booster": d["name"], "pid": d["pid"],
                                    "what": "evicted" if d["evicted"] else "left", "reason": d["reason"]})
        self._departures_seen = {d["sid"] for d in departures}   # bounded like boxd's list

    def _directory(self, connected: set[str]) -> list[dict]:
        store = getattr(self.controller, "store", None)
        if store is None:
            return []
        out = []
        summaries = store.boosters()
        names = sorted(summaries, key=lambda n: (n not in connected, n))[:MAX_DIRECTORY_ROWS]
        for name in names:
            summary = summaries[name]
            cached = self._key_names.get(name)     # refreshed before each sample (_refresh_key_names)
            out.append({"booster": name, "keys": summary.get("keys", 0), "bytes": summary.get("bytes", 0),
                        "names": cached[1] if cached else [], "connected": name in connected})
        for gone in set(self._key_names) - set(names):
            del self._key_names[gone]
        return out

    def _panels(self, connected: set[str]) -> list[tuple[str, Any]]:
        directory = getattr(self.controller, "directory", None)
        if directory is None:
            return []
        events: list[tuple[str, Any]] = []
        for name in sorted(set(self._watches) - connected):
            self._watches.pop(name).close()
            if self.panels.pop(name, None) is not None:
                events.append(("panel_removed", {"booster": name}))
        for name in sorted(connected - set(self._watches)):
            try:
                self._watches[name] = directory.watch(name, PANEL_KEY, initial=True)
            except ValueError as exc:       # DirectoryError: the directory's watcher limit
                self.stats["panel_watch_refused"] += 1
                log.warning("cannot watch the panel of %s: %s", name, exc)
        for name, watch in self._watches.items():
            for key, value in watch.pending():
                if key != PANEL_KEY:
                    continue            # a key that merely starts with "panel"
                if value is None:
                    if self.panels.pop(name, None) is not None:
                        events.append(("panel_removed", {"booster": name}))
                    continue
                try:
                    entry = {"booster": name, "panel": validate_panel(value)}
                    self.stats["panel_updates"] += 1
                except PanelError as exc:
                    entry = {"booster": name, "error": str(exc)}
                    self.stats["panel_invalid"] += 1
                self.panels[name] = entry
                events.append(("panel", entry))
        return events


# ---------------------------------------------------------------------- HTTP

DASHBOARD_HUB = web.AppKey("dashboard_hub", DashboardHub)

def static_response(name: str) -> web.FileResponse:
    response = web.FileResponse(STATIC_DIR / name)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


STATIC_FILES = {"dashboard.css": "text/css", "dashboard.js": "text/javascript", "panels.js": "text/javascript",
                "fleet.js": "text/javascript"}


async def static_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise web.HTTPNotFound()
    response = static_response(name)
    response.content_type = STATIC_FILES[name]
    return response


async def stream_events(request: web.Request, hub: SseHub) -> web.StreamResponse:
    """Serve one SSE stream from ``hub``: its snapshot first, then what it sends."""
    client = hub.subscribe()
    if client is None:
        raise web.HTTPServiceUnavailable(text=f"at most {hub.max_clients} dashboard streams at once\n")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    try:
        await response.prepare(request)
        await response.write(b"retry: 3000\n\n" + sse_message("snapshot", hub.snapshot()))
        while (message := await client.next()) is not None:
            await within(response.write(message), WRITE_TIMEOUT)
    except (ConnectionError, asyncio.TimeoutError):
        hub.stats["sse_write_failed"] += 1
    finally:
        hub.unsubscribe(client)
    return response


def mount_page(app: web.Application, hub: SseHub, *, page: str, events_path: str) -> None:
    """Serve the static ``page`` at ``/``, the shared static files, and ``hub``'s stream at
    ``events_path``; the hub starts with ``app`` and stops with it (its streams end first, so
    aiohttp does not wait for open pages on shutdown).  The box's page and the fleet's use it."""

    async def index(request: web.Request) -> web.StreamResponse:
        response = static_response(page)
        response.content_type = "text/html"
        return response

    async def events(request: web.Request) -> web.StreamResponse:
        return await stream_events(request, hub)

    async def on_startup(app: web.Application) -> None:
        await hub.start()

    async def on_shutdown(app: web.Application) -> None:
        hub.close_clients()

    async def on_cleanup(app: web.Application) -> None:
        await hub.stop()

    app.router.add_get("/", index)
    app.router.add_get(STATIC_PREFIX + "/{name}", static_file)
    app.router.add_get(events_path, events)
    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)


def mount_dashboard(app: web.Application, controller: Any, **hub_options: Any) -> DashboardHub:
    """Add the dashboard to boxd's management app: ``/``, its static files and ``/api/events``."""
    hub = DashboardHub(controller, **hub_options)
    mount_page(app, hub, page="index.html", events_path=EVENTS_PATH)
    app[DASHBOARD_HUB] = hub
    return hub
