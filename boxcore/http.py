"""Management HTTP API (aiohttp), read-only.

``GET /api/status``, ``/api/rules`` (per-rule packet and byte counters) and
``/metrics`` (Prometheus text) are open on loopback.  ``/api/boosters`` (pids,
uids), ``/api/boosters/departures`` (the last boosters that left, with boxd's
eviction reasons) and ``/api/directory`` (paginated:
``?booster=NAME&prefix=P&after=KEY&limit=N``) need the token of ``boxd
--http-token-file``; so does the dashboard's stream ``/api/events`` when boxd has
a token (it carries the same data).  Bound anywhere but loopback, every path needs
it (boxd refuses to start without one).

The token is presented as ``Authorization: Bearer TOKEN``, or - for a browser,
whose ``EventSource`` cannot send headers - as ``?token=TOKEN`` in the page's URL:
the page load then sets an HttpOnly, SameSite=Strict cookie holding a value derived
from the token (never the token itself) that the page's stream and static files
present.  Every form is compared in constant time; no form is logged (boxd keeps
no access log).  Requests are small and quick: header lines and counts are bounded,
a body beyond 16 KiB is refused, and a connection that does not complete a request
within ``HEADER_TIMEOUT`` seconds is closed; a response in progress (the stream)
is never cut by it.  See docs/security.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import math
from typing import Any

from aiohttp import web

from boxcore.dashboard import EVENTS_PATH    # the dashboard's stream: private whenever boxd has a token
from boxcore.directory import DirectoryUnavailable
from cliruntime import ConfigError

METRICS_CONTENT_TYPE = "text/plain"


def _json(data: Any) -> web.Response:
    return web.Response(text=json.dumps(data, default=_default, sort_keys=True),
                        content_type="application/json")


def _default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return {"hex": bytes(value).hex()}
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _metric_name(text: str) -> str:
    out = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in text)
    return out if not out[:1].isdigit() else "_" + out


def render_metrics(controller: Any) -> str:
    """The controller's state as Prometheus text (version 0.0.4)."""
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    status = controller.status()
    family("boxd_up", "gauge", "1 while boxd runs")
    lines.append(f'boxd_up{{engine="{_escape_label(status["engine"])}"}} 1')
    family("boxd_uptime_seconds", "gauge", "seconds since boxd started")
    lines.append(f"boxd_uptime_seconds {status['uptime_s']}")
    family("boxd_boosters", "gauge", "connected boosters")
    lines.append(f"boxd_boosters {status['boosters']}")
    family("boxd_rules", "gauge", "installed rules")
    lines.append(f"boxd_rules {status['rules']}")
    family("boxd_multicast_groups", "gauge", "multicast groups")
    lines.append(f"boxd_multicast_groups {status['groups']}")
    rules = controller.rules_view()
    family("boxd_rule_packets_total", "counter", "packets that matched a rule")
    for r in rules:
        lines.append(f'boxd_rule_packets_total{{cookie="{r["cookie"]}",owner="{_escape_label(r["owner"])}",'
                     f'action="{r["action"]}"}} {r["packets"]}')
    family("boxd_rule_bytes_total", "counter", "payload bytes that matched a rule")
    for r in rules:
        lines.append(f'boxd_rule_bytes_total{{cookie="{r["cookie"]}",owner="{_escape_label(r["owner"])}",'
                     f'action="{r["action"]}"}} {r["bytes"]}')
    family("boxd_events_total", "counter", "boxd event counters (evictions, conflicts, refusals...)")
    for key, value in sorted(status["counters"].items()):
        if isinstance(value, (int, float)) and math.isfinite(value):
            lines.append(f'boxd_events_total{{event="{_escape_label(str(key))}"}} {value}')
    engine_counters = status.get("engine_status", {}).get("counters", {})
    family("boxd_engine_events_total", "counter", "engine data-path counters")
    for key, value in sorted(engine_counters.items()):
        if isinstance(value, (int, float)):
            lines.append(f'boxd_engine_events_total{{event="{_escape_label(str(key))}"}} {value}')
    return "\n".join(lines) + "\n"


# per-booster data (pids, uids, directory contents) needs the token even on loopback
PRIVATE_PATHS = ("/api/boosters", "/api/directory")
TOKEN_COOKIE = "boxd_dashboard"
MAX_PAGE = 1000                 # directory items per page
PAGE_BYTES = 1 << 20            # and about this many bytes
HEADER_TIMEOUT = 10.0           # seconds a connection has to send a complete request
MAX_REQUEST_BYTES = 16 << 10    # the API is GET-only: no body needs more


class HttpSetupError(ValueError):
    """The API cannot be served as asked: not on that address, or not without a token there."""


# read_token_file and check_http_binding check command-line flags (--http-token-file, --http) for
# boxd's and booster-fleet's amain: they raise the CLI's ConfigError.  start_http, a library call,
# raises HttpSetupError.

def read_token_file(path: Any) -> str:
    try:
        token = open(path).read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read --http-token-file {path}: {exc.strerror or exc}") from None
    if len(token) < 16:
        raise ConfigError(f"--http-token-file {path}: the token must be at least 16 characters")
    return token


def cookie_for(token: str) -> str:
    """The dashboard cookie's value: derived from the token, so the cookie never holds it."""
    return hmac.new(token.encode(), b"boxd dashboard cookie", hashlib.sha256).hexdigest()


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def http_binding_problem(host: str, token: str | None) -> str | None:
    """Off loopback the whole API needs a token: why serving on ``host`` is refused, or None."""
    if not is_loopback(host) and token is None:
        return f"--http {host} is not a loopback address: give --http-token-file too"
    return None


def check_http_binding(host: str, token: str | None) -> None:
    problem = http_binding_problem(host, token)
    if problem:
        raise ConfigError(problem)


def build_app(controller: Any, *, token: str | None = None, open_reads: bool = True) -> web.Application:
    """The API.  ``open_reads``: status, rules and metrics need no token (loopback); the
    per-booster paths always need ``token`` (and are refused when there is none)."""
    routes = web.RouteTableDef()
    expected = None if token is None else token.encode()
    cookie_value = None if token is None else cookie_for(token)

    def presented(request: web.Request) -> tuple[bool, bool]:
        """(whether the request carries the token in some form, whether it came in the query)."""
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected):
            return True, False
        in_query = request.query.get("token")
        if in_query is not None and hmac.compare_digest(in_query.encode(), expected):
            return True, True
        cookie = request.cookies.get(TOKEN_COOKIE)
        return cookie is not None and hmac.compare_digest(cookie.encode(), cookie_value.encode()), False

    @web.middleware
    async def authorize(request: web.Request, handler: Any) -> web.StreamResponse:
        path = request.path
        needs = (not open_reads or path.startswith(PRIVATE_PATHS)
                 or (path == EVENTS_PATH and expected is not None))
        if expected is not None and (needs or "token" in request.query):
            ok, from_query = presented(request)
            if not ok and needs:
                controller.stats["http_unauthorized"] += 1
                raise web.HTTPUnauthorized(text="a token is needed (Authorization: Bearer ..., "
                                                "or ?token=... in the dashboard's URL)\n",
                                           headers={"WWW-Authenticate": "Bearer"})
            response = await handler(request)
            if ok and from_query and path == "/":
                # the page's stream and scripts present this instead of the token in their URLs
                response.set_cookie(TOKEN_COOKIE, cookie_value, httponly=True, samesite="Strict", path="/")
            return response
        if needs:
            raise web.HTTPForbidden(text="this path needs boxd --http-token-file\n")
        return await handler(request)

    @routes.get("/api/status")
    async def status(request: web.Request) -> web.Response:
        return _json(controller.status())

    @routes.get("/api/boosters")
    async def boosters(request: web.Request) -> web.Response:
        return _json(controller.boosters_view())

    @routes.get("/api/boosters/departures")
    async def departures(request: web.Request) -> web.Response:
        return _json(controller.departures_view())

    @routes.get("/api/rules")
    async def rules(request: web.Request) -> web.Response:
        return _json(controller.rules_view())

    @routes.get("/api/directory")
    async def directory(request: web.Request) -> web.Response:
        """Without ``booster``: the boosters with state (keys, bytes); with it, one page of its
        items: ``prefix``, ``after`` (the last key of the previous page), ``limit`` (<= 1000)."""
        store = controller.store
        if store is None:
            return _json({"boosters": {}, "items": [], "next": None})
        try:
            limit = min(int(request.query.get("limit", "100")), MAX_PAGE)
        except ValueError:
            raise web.HTTPBadRequest(text="limit must be an integer\n") from None
        if limit < 1:
            raise web.HTTPBadRequest(text="limit must be positive\n")
        booster = request.query.get("booster")
        after = request.query.get("after") or None
        if not booster:
            names = sorted(n for n in store.boosters() if after is None or n > after)
            page = names[:limit]
            sizes = store.boosters()
            return _json({"boosters": {n: sizes[n] for n in page},
                          "next": page[-1] if len(names) > limit else None})
        try:
            items, more = await store.page(booster, request.query.get("prefix", ""), after, limit, PAGE_BYTES)
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        except DirectoryUnavailable as exc:
            raise web.HTTPServiceUnavailable(text=f"{exc}\n") from None
        return _json({"booster": booster, "items": [[k, v] for k, v in items], "next": more})

    @routes.get("/metrics")
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=render_metrics(controller), content_type=METRICS_CONTENT_TYPE,
                            charset="utf-8", headers={"X-Prometheus-Format": "0.0.4"})

    app = web.Application(middlewares=[authorize], client_max_size=MAX_REQUEST_BYTES)
    app.add_routes(routes)
    from boxcore.dashboard import mount_dashboard   # the live page at / and its stream /api/events

    mount_dashboard(app, controller)
    return app


class HttpServer:
    """The API's runner and its one site."""

    def __init__(self, runner: web.AppRunner, site: web.TCPSite) -> None:
        self.runner = runner
        self.site = site

    @property
    def port(self) -> int:
        return self.site._server.sockets[0].getsockname()[1]

    async def cleanup(self) -> None:
        await self.runner.cleanup()


async def start_http(controller: Any, host: str, port: int, *, token: str | None = None,
                     header_timeout: float = HEADER_TIMEOUT) -> HttpServer:
    """Serve the API on ``host:port`` (see :func:`build_app` for who may read what).  A
    connection must send a complete request within ``header_timeout`` of opening or of its
    previous request (aiohttp's keep-alive deadline, armed from the first byte on)."""
    problem = http_binding_problem(host, token)
    if problem:
        raise HttpSetupError(problem)
    app = build_app(controller, token=token, open_reads=is_loopback(host))
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=header_timeout, max_line_size=4096,
                           max_field_size=4096, max_headers=64)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=128)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise HttpSetupError(f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}") from None
    return HttpServer(runner, site)


async def serve_http(controller: Any, host: str, port: int, *, token: str | None = None,
                     ready: "asyncio.Future | None" = None) -> None:
    """Serve the API until cancelled (a supervised task of boxd); ``ready`` gets None once
    listening, or the bind error."""
    try:
        server = await start_http(controller, host, port, token=token)
    except BaseException as exc:
        if ready is not None and not ready.done():
            # boxd's amain awaits ready: HttpSetupError is one of its config_errors (one line, exit 2)
            ready.set_exception(exc)
            return
        raise
    if ready is not None and not ready.done():
        ready.set_result(None)
    try:
        await asyncio.Event().wait()
    finally:
        await server.cleanup()
