"""Management HTTP API (aiohttp), read-only.

``GET /api/status``, ``/api/boosters``, ``/api/rules`` (per-rule packet and
byte counters), ``/api/directory`` (``?booster=NAME&prefix=P``), and
``/metrics`` in the Prometheus text exposition format.
"""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web

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


def build_app(controller: Any) -> web.Application:
    routes = web.RouteTableDef()

    @routes.get("/api/status")
    async def status(request: web.Request) -> web.Response:
        return _json(controller.status())

    @routes.get("/api/boosters")
    async def boosters(request: web.Request) -> web.Response:
        return _json(controller.boosters_view())

    @routes.get("/api/rules")
    async def rules(request: web.Request) -> web.Response:
        return _json(controller.rules_view())

    @routes.get("/api/directory")
    async def directory(request: web.Request) -> web.Response:
        booster = request.query.get("booster") or None
        prefix = request.query.get("prefix", "")
        return _json(controller.directory_view(booster, prefix))

    @routes.get("/metrics")
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=render_metrics(controller), content_type=METRICS_CONTENT_TYPE,
                            charset="utf-8", headers={"X-Prometheus-Format": "0.0.4"})

    app = web.Application()
    app.add_routes(routes)
    from boxcore.dashboard import mount_dashboard   # the live page at / and its stream /api/events

    mount_dashboard(app, controller)
    return app


async def start_http(controller: Any, host: str, port: int) -> web.AppRunner:
    """Serve the API on ``host:port``; returns the runner (``await runner.cleanup()``)."""
    runner = web.AppRunner(build_app(controller), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}") from None
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port actually bound (for ``--http 127.0.0.1:0``)."""
    for site in runner.sites:
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            return server.sockets[0].getsockname()[1]
    raise RuntimeError("HTTP site not started")
