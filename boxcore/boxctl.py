"""``boxctl``: look at a running boxd - as tables for people, or JSON.

Talks to boxd's control socket (a read-only ``query``) or to its management
HTTP API.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from typing import Any

from boxcore import wire
from cliruntime import ConfigError, Stats, make_parser, run_sync

COMMANDS = ("status", "boosters", "rules", "counters")
HTTP_PATHS = {"status": "/api/status", "boosters": "/api/boosters", "rules": "/api/rules"}


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("boxctl", "Show a running boxd's status, boosters, rules and counters.",
                         examples=["boxctl --control /tmp/boxd.sock status",
                                   "boxctl --http http://127.0.0.1:8700 rules",
                                   "boxctl --control /tmp/boxd.sock counters --json"])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--control", metavar="PATH",
                       default=os.environ.get("BOXD_CONTROL", "/run/boxd/control.sock"),
                       help="boxd's control socket")
    where.add_argument("--http", metavar="URL", default=None, help="boxd's management API base URL")
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for boxd")
    parser.add_argument("--http-token-file", metavar="FILE", default=None,
                        help="bearer token for the management API (boxd --http-token-file)")
    return parser


MAX_REPLY = 64 << 20   # boxd bounds its replies far below this


def query_control(path: str, what: str, timeout: float = 5.0) -> Any:
    """One query over the control socket: a read-only (observer) hello, then the query.
    Every failure is a :class:`ConfigError` of one line."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError as exc:
            raise ConfigError(f"cannot reach boxd at {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(wire.encode({"t": "hello", "id": 1, "name": "boxctl", "version": wire.PROTOCOL_VERSION,
                                      "observer": True})
                         + wire.encode({"t": "query", "id": 2, "what": what}))
            decoder = wire.FrameDecoder(MAX_REPLY)
            while True:
                data = sock.recv(1 << 20)
                if not data:
                    raise ConnectionResetError
                for msg in decoder.feed(data):
                    if isinstance(msg, wire.WireDecodeError):
                        raise ConfigError(f"boxd sent a bad frame: {msg}")
                    msg = wire.validate(msg)
                    if msg["t"] == "evicted":
                        raise ConfigError(f"boxd closed the session: {msg['reason']}")
                    if msg["t"] != "reply":
                        continue
                    if msg["status"] != "OK":
                        raise ConfigError(f"boxd refused ({msg['status']}): {msg.get('reason')}")
                    if msg["id"] == 2:
                        return msg.get("result")
        except socket.timeout:
            raise ConfigError(f"boxd did not answer within {timeout}s") from None
        except (BrokenPipeError, ConnectionResetError):
            raise ConfigError(f"boxd at {path} closed the connection (too many connections of this uid, "
                              "or boxd is stopping)") from None
        except (OSError, ValueError) as exc:   # ValueError: a broken stream (framing, validation)
            raise ConfigError(f"lost boxd at {path}: {exc}") from None
    finally:
        sock.close()


def read_token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        token = open(path).read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    if not token:
        raise ConfigError(f"token file {path} is empty")
    return token


def query_http(base: str, what: str, timeout: float = 5.0, token: str | None = None) -> Any:
    base = base.rstrip("/")
    if what == "counters":
        rules = query_http(base, "rules", timeout, token)
        status = query_http(base, "status", timeout, token)
        return {"rules": {str(r["cookie"]): [r["packets"], r["bytes"]] for r in rules},
                "events": status["counters"], "engine": status.get("engine_status", {}).get("counters", {})}
    request = urllib.request.Request(base + HTTP_PATHS[what])
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read(500).decode("utf-8", "replace").strip()
        raise ConfigError(f"boxd at {base} answered {exc.code}: {detail or exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigError(f"cannot reach boxd at {base}: {getattr(exc, 'reason', exc)}") from None
    except ValueError as exc:
        raise ConfigError(f"boxd at {base} sent something that is not JSON: {exc}") from None


def render(command: str, data: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if command == "status":
        table = Table(title="boxd", show_header=False)
        for key in ("engine", "uptime_s", "boosters", "rules", "groups", "control"):
            table.add_row(key, str(data.get(key)))
        console.print(table)
        events = Table(title="events")
        events.add_column("counter")
        events.add_column("value", justify="right")
        for key, value in sorted(data.get("counters", {}).items()):
            events.add_row(key, str(value))
        console.print(events)
    elif command == "boosters":
        table = Table(title="boosters")
        for col in ("sid", "name", "pid", "uid", "rules", "heartbeat age s", "handler errors"):
            table.add_column(col)
        for b in data:
            table.add_row(str(b["sid"]), b["name"], str(b["pid"]), str(b["uid"]),
                          ",".join(map(str, b["rules"])), str(b["last_heartbeat_s"]), str(b["handler_errors"]))
        console.print(table)
    elif command == "rules":
        table = Table(title="rules")
        for col in ("cookie", "owner", "action", "prio", "match", "delivery", "packets", "bytes"):
            table.add_column(col, justify="right" if col in ("packets", "bytes") else "left")
        for r in data:
            table.add_row(str(r["cookie"]), r["owner"], r["action"], str(r["priority"]), r["match_text"],
                          r["delivery"], str(r["packets"]), str(r["bytes"]))
        console.print(table)
    else:
        table = Table(title="rule counters")
        for col in ("cookie", "packets", "bytes"):
            table.add_column(col, justify="right")
        for cookie, (packets, nbytes) in data["rules"].items():
            table.add_row(cookie, str(packets), str(nbytes))
        console.print(table)
        for title in ("events", "engine"):
            table = Table(title=title)
            table.add_column("counter")
            table.add_column("value", justify="right")
            for key, value in sorted(data[title].items()):
                table.add_row(key, str(value))
            console.print(table)


def run(args: argparse.Namespace, stats: Stats) -> int:
    if args.http:
        data = query_http(args.http, args.command, args.timeout, read_token(args.http_token_file))
    else:
        data = query_control(args.control, args.command, args.timeout)
    if args.json:
        json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
        sys.stdout.write("\n")
    else:
        render(args.command, data)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_sync(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
