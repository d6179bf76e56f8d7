"""``booster-fleet``: several boxd dashboards side by side, in one page.

It subscribes to each box's event stream (``BOX/api/events``, the same Server-Sent Events the box
page uses), keeps each box's latest summary and a few minutes of its traffic, and serves a page
at ``/`` that receives them over its own stream (``/api/fleet/events``).  The browser talks only
to this process: no box has to allow cross-origin requests, and a box's management API is
reached only from where ``booster-fleet`` runs.  A box that does not answer is shown as such and
retried with a growing delay.

The boxes are given on the command line, never by the page: the fleet process makes no request
a browser asked for.  Boxes that need a token (``boxd --http-token-file``) get the one in
``--token-file`` as ``Authorization: Bearer``; the fleet page then shows what those boxes keep for
token holders (booster names and pids), so with a token it is served on loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import sys
import time
import urllib.parse

import aiohttp
from aiohttp import web

from boxcore.dashboard import SseHub, mount_page, sse_message
from cliruntime import ConfigError, RunContext, host_port, make_parser, run_async
from cliruntime.supervisor import Supervisor

log = logging.getLogger("boxcore.fleet")

MAX_EVENT_BYTES = 8 << 20       # a box's snapshot carries its panels: bounded, larger ones are skipped
HISTORY_POINTS = 300
RETRY_MIN, RETRY_MAX = 1.0, 10.0
FLEET_EVENTS_PATH = "/api/fleet/events"


def box_url(text: str) -> str:
    """argparse type: ``http://HOST:PORT`` (a boxd's --http address)."""
    parsed = urllib.parse.urlsplit(text.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.path not in ("", "/") \
            or parsed.query or parsed.fragment:
        raise argparse.ArgumentTypeError(f"expected http://HOST:PORT of a boxd --http address, got {text!r}")
    return f"{parsed.scheme}://{parsed.netloc}"


def summarise(tick: dict) -> dict:
    """What the fleet page shows of one box's tick."""
    return {
        "engine": tick.get("engine"), "uptime_s": tick.get("uptime_s"), "health": tick.get("health"),
        "counts": tick.get("counts"), "traffic": tick.get("traffic"),
        "failopen": {k: tick.get("failopen", {}).get(k) for k in ("state", "pps")},
        "boosters": [{"name": b.get("name"), "pid": b.get("pid"), "heartbeat": b.get("heartbeat"),
                      "rules": b.get("rules")} for b in tick.get("boosters", [])][:64],
    }


class BoxFeed:
    """One box's stream: its status, latest summary, traffic history and panel titles."""

    def __init__(self, index: int, url: str) -> None:
        self.index, self.url = index, url
        self.status = "connecting"
        self.summary: dict | None = None
        self.history: collections.deque[list] = collections.deque(maxlen=HISTORY_POINTS)
        self.panels: dict[str, str] = {}
        self.last_event = 0.0

    def view(self) -> dict:
        return {"index": self.index, "url": self.url, "status": self.status, "summary": self.summary,
                "history": list(self.history), "panels": sorted(self.panels.items())}

    def apply(self, event: str, data: dict) -> str | None:
        """Take one event of the box's stream; what the page must be told: "full", "tick" or None."""
        self.last_event = time.time()
        if event == "snapshot":
            self.history.clear()
            self.history.extend(point for point in data.get("history", []) if point)
            self.panels = {p["booster"]: _panel_title(p) for p in data.get("panels", [])}
            if data.get("tick"):
                self.summary = summarise(data["tick"])
            return "full"
        if event == "tick":
            if data.get("point"):
                self.history.append(data["point"])
            self.summary = summarise(data)
            return "tick"
        if event == "panel":
            self.panels[data["booster"]] = _panel_title(data)
        elif event == "panel_removed":
            self.panels.pop(data["booster"], None)
        return None


def _panel_title(entry: dict) -> str:
    return entry["panel"]["title"] if entry.get("panel") else f"refused: {entry.get('error', '?')}"


class FleetHub(SseHub):
    """Follows every box and fans their summaries out to the fleet page's streams."""

    def __init__(self, urls: list[str], *, max_clients: int = 32, client_queue: int = 256,
                 token: str | None = None) -> None:
        super().__init__(max_clients=max_clients, client_queue=client_queue)
        self.feeds = [BoxFeed(i, url) for i, url in enumerate(urls)]
        self.headers = {"Accept": "text/event-stream"}
        if token is not None:
            self.headers["Authorization"] = f"Bearer {token}"
        self.supervisor: Supervisor | None = None
        self.session: aiohttp.ClientSession | None = None

    def snapshot(self) -> dict:
        return {"boxes": [feed.view() for feed in self.feeds]}

    def publish(self, feed: BoxFeed, full: bool = True) -> None:
        """Tell the pages: the whole view, or (each tick) the view with only the newest point."""
        view = feed.view()
        if not full:
            view["history"] = view["history"][-1:]
        self.send(sse_message("box", {**view, "incremental": not full}))

    # lifecycle
    async def start(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5,
                                                                           sock_read=15))
        self.supervisor = Supervisor("fleet", logger=log)
        for feed in self.feeds:
            self.supervisor.spawn_restarting(lambda feed=feed: self.follow(feed), name=f"box{feed.index}")

    async def stop(self) -> None:
        self.close_clients()
        if self.supervisor is not None:
            await self.supervisor.aclose()
        if self.session is not None:
            await self.session.close()

    async def follow(self, feed: BoxFeed) -> None:
        delay = RETRY_MIN
        while True:
            try:
                async with self.session.get(feed.url + "/api/events", headers=self.headers) as response:
                    if response.status != 200:
                        raise ConnectionError(f"HTTP {response.status}")
                    delay = RETRY_MIN
                    async for event, data in read_events(response.content, self.stats):
                        became_live = feed.status != "live"
                        feed.status = "live"
                        change = feed.apply(event, data)
                        if change or became_live:
                            self.publish(feed, full=became_live or change == "full")
                    raise ConnectionError("the box closed its stream")
            except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError, OSError) as exc:
                feed.status = f"unreachable: {exc or type(exc).__name__}"
                self.stats["box_disconnects"] += 1
                self.publish(feed)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)


async def read_events(stream: aiohttp.StreamReader, stats: collections.Counter):
    """(event, JSON data) pairs of a Server-Sent Events stream; oversized or bad events are skipped."""
    buffer = b""
    async for chunk in stream.iter_any():
        buffer += chunk
        while b"\n\n" in buffer:
            raw, buffer = buffer.split(b"\n\n", 1)
            event, data = "message", []
            for line in raw.decode("utf-8", "replace").split("\n"):
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())
            if not data:
                continue
            try:
                yield event, json.loads("\n".join(data))
            except ValueError:
                stats["box_events_malformed"] += 1
        if len(buffer) > MAX_EVENT_BYTES:
            stats["box_events_too_large"] += 1
            # drop up to the next event boundary
            buffer = b""
            async for chunk in stream.iter_any():
                if b"\n\n" in chunk:
                    buffer = chunk.split(b"\n\n", 1)[1]
                    break


def build_app(hub: FleetHub) -> web.Application:
    app = web.Application()
    mount_page(app, hub, page="fleet.html", events_path=FLEET_EVENTS_PATH)
    return app


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "booster-fleet", "Show several boxd dashboards side by side in one page.",
        examples=["booster-fleet --listen 127.0.0.1:9200 --box http://127.0.0.1:9100 --box http://127.0.0.1:9101",
                  "booster-fleet --box http://10.0.0.1:8700 --box http://10.0.0.2:8700   # then open http://127.0.0.1:9200/"])
    parser.add_argument("--box", type=box_url, action="append", required=True, metavar="URL",
                        help="a boxd management address, http://HOST:PORT (repeatable)")
    parser.add_argument("--listen", type=host_port, default=("127.0.0.1", 9200), metavar="HOST:PORT",
                        help="where to serve the fleet page (default 127.0.0.1:9200)")
    parser.add_argument("--token-file", default=None, metavar="FILE",
                        help="the token of boxes started with --http-token-file (sent to every box)")
    parser.add_argument("--ready-file", default=None, help="write the page's URL here once it is served")
    return parser


async def amain(args: argparse.Namespace, ctx: RunContext) -> int:
    if len(set(args.box)) != len(args.box):
        raise ConfigError("each --box may be given once")
    token = None
    if args.token_file:
        from boxcore.http import is_loopback, read_token_file

        token = read_token_file(args.token_file)
        if not is_loopback(args.listen[0]):
            raise ConfigError("with --token-file the fleet page shows what the boxes keep for token holders: "
                              "--listen must be a loopback address")
    hub = FleetHub(args.box, token=token)
    ctx.stats.providers["fleet"] = lambda: {"stats": dict(hub.stats), "boxes": [
        {"url": f.url, "status": f.status} for f in hub.feeds]}
    runner = web.AppRunner(build_app(hub), access_log=None)
    await runner.setup()
    host, port = args.listen
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    bound = site._server.sockets[0].getsockname()[1]
    url = f"http://{host}:{bound}/"
    print(f"booster-fleet: {len(args.box)} boxes at {url}", flush=True)
    if args.ready_file:
        with open(args.ready_file, "w") as fh:
            fh.write(url)
    try:
        await ctx.stop.wait()
    finally:
        await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_async(build_parser(), amain, argv)


if __name__ == "__main__":
    sys.exit(main())
