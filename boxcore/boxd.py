"""``boxd``: the booster box controller daemon.

Runs one engine (``user`` - no privileges, opaque mode; ``linux``; ``np``),
the control socket boosters connect to, the directory (SQLite under
``--state``) and the management HTTP API.  SIGINT/SIGTERM remove every rule.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
from pathlib import Path

from boxcore.controller import Controller, ControllerConfig
from boxcore.engines import ENGINE_NAMES, EngineUnavailable, Route, available_engines, get_engine
from cliruntime import (ConfigError, RunContext, host_port, make_parser, non_negative_float,
                             positive_int, run_async)
from cliruntime.supervisor import TaskFailed, first_of

log = logging.getLogger("boxcore.boxd")


def route_spec(text: str) -> Route:
    """argparse type: ``PREFIX[,via=ADDR][,dev=IFACE][,metric=N]``."""
    prefix, *options = text.split(",")
    fields: dict = {"prefix": prefix.strip()}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in ("via", "dev", "metric"):
            raise argparse.ArgumentTypeError(f"bad route option {option!r} in {text!r}")
        fields[key] = value
    try:
        fields["prefix"] = str(ipaddress.ip_network(fields["prefix"]))
        if "via" in fields:
            fields["via"] = str(ipaddress.ip_address(fields["via"]))
        return Route.from_dict(fields)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad route {text!r}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "boxd", "The booster box controller: boosters connect to --control; rules go to the engine.",
        examples=[
            "boxd --engine user --control /tmp/boxd.sock --http 127.0.0.1:8700 --state /tmp/boxd-state "
            "--listen udp:127.0.0.1:9000=127.0.0.1:9001",
            "boxd --engine user --control /tmp/boxd.sock --state /tmp/st --policy boxcore/policy.example.toml "
            "--listen udp:127.0.0.1:7000=127.0.0.1:7001 --listen tcp:127.0.0.1:6346=127.0.0.1:6347",
            "boxd --engine linux --control /run/boxd/control.sock --http 127.0.0.1:8700 --state /var/lib/boxd",
        ])
    parser.add_argument("--engine", default="user", choices=sorted(ENGINE_NAMES),
                        help="forwarding engine")
    parser.add_argument("--control", type=Path, default=Path("/run/boxd/control.sock"),
                        help="Unix socket boosters connect to")
    parser.add_argument("--http", type=host_port, default=None, metavar="HOST:PORT",
                        help="management HTTP API address (none: no HTTP API)")
    parser.add_argument("--state", type=Path, required=True, metavar="DIR",
                        help="state directory (the directory service's SQLite database)")
    parser.add_argument("--policy", type=Path, default=None, metavar="FILE",
                        help="policy TOML saying which boosters may claim what (default: allow all)")
    parser.add_argument("--route", type=route_spec, action="append", default=[],
                        metavar="PREFIX[,via=ADDR][,dev=IF][,metric=N]",
                        help="forwarding table entry handed to the engine (repeatable)")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--heartbeat", type=non_negative_float, default=1.0,
                        help="heartbeat period in seconds")
    limits.add_argument("--heartbeat-misses", type=positive_int, default=3,
                        help="missed heartbeats before a booster is evicted")
    limits.add_argument("--max-boosters", type=positive_int, default=64)
    limits.add_argument("--max-rules-per-booster", type=positive_int, default=256)
    limits.add_argument("--max-pending-ops", type=positive_int, default=1024,
                        help="rule operations waiting for their turn")
    limits.add_argument("--max-directory-keys", type=positive_int, default=10000,
                        help="directory keys per booster")
    for name, cls in available_engines().items():
        group = parser.add_argument_group(f"{name} engine")
        try:
            cls.add_options(group)
        except argparse.ArgumentError as exc:
            log.debug("engine %s options clash: %s", name, exc)
    return parser


def _load_policy(path: Path | None):
    from boxcore.policy import Policy

    if path is None:
        return Policy.allow_all()
    if not path.is_file():
        raise ConfigError(f"policy file {path} not found")
    return Policy.load(path)


def _open_directory(state: Path, max_keys: int):
    from boxcore.directory import Directory

    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create state directory {state}: {exc.strerror}") from None
    try:
        return Directory(state / "directory.sqlite3", max_keys_per_booster=max_keys)
    except Exception as exc:
        raise ConfigError(f"cannot open the directory under {state}: {exc}") from None


async def amain(args: argparse.Namespace, ctx: RunContext) -> int:
    if args.heartbeat <= 0:
        raise ConfigError("--heartbeat must be positive")
    try:
        engine_cls = get_engine(args.engine)
    except EngineUnavailable as exc:
        raise ConfigError(str(exc)) from None
    engine = engine_cls.from_args(args)
    policy = _load_policy(args.policy)
    directory = _open_directory(args.state, args.max_directory_keys)
    config = ControllerConfig(control_path=args.control, heartbeat_interval=args.heartbeat,
                              heartbeat_misses=args.heartbeat_misses, max_boosters=args.max_boosters,
                              max_rules_per_booster=args.max_rules_per_booster,
                              max_pending_ops=args.max_pending_ops)
    controller = Controller(engine, config, policy=policy, directory=directory, stats=ctx.stats)
    controller.routes = list(args.route)
    ctx.stats.providers["rules"] = controller.rules_view
    ctx.stats.providers["boosters"] = controller.boosters_view
    ctx.stats.providers["engine"] = engine.status
    try:
        await controller.start()
        if args.http is not None:
            from boxcore.http import serve_http

            http_ready = asyncio.get_running_loop().create_future()
            controller.tasks.spawn(serve_http(controller, *args.http, ready=http_ready),
                                   name="http", critical=True)
            await http_ready  # a bind error is a ConfigError here, before "ready"
        log.info("boxd ready (engine %s, control %s%s)", engine.name, args.control,
                 f", http {args.http[0]}:{args.http[1]}" if args.http else "")
        outcome = await first_of(ctx.stop.wait(), controller.wait_failed())
        if isinstance(outcome, TaskFailed):
            # a critical task (watchdog, teardown, HTTP) died: its traceback is logged above
            log.critical("boxd stops, every rule removed: %s", outcome)
            return 1
    finally:
        await controller.stop()
        close = getattr(directory, "close", None)
        if close is not None:
            close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_async(build_parser(), amain, argv)


if __name__ == "__main__":
    raise SystemExit(main())
