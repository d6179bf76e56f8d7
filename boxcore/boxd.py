"""``boxd``: the booster box controller daemon.

Runs one engine (``user`` - no privileges, opaque mode; ``linux``; ``np``),
the control socket boosters connect to, the directory (SQLite under
``--state``, or a fleet's shared Redis with ``--directory redis://...``) and the
management HTTP API.  SIGINT/SIGTERM remove every rule.
"""

from __future__ import annotations

import argparse
import asyncio
import grp
import ipaddress
import logging
import os
from pathlib import Path

from boxcore.controller import ControlSocketError, Controller, ControllerConfig
from boxcore.directory import DirectoryOpenError
from boxcore.engines import ENGINE_NAMES, EngineSetupError, EngineUnavailable, Route, available_engines, get_engine
from boxcore.http import HttpSetupError, serve_http
from boxcore.policy import PolicyError
from cliruntime import (ConfigError, RunContext, host_port, make_parser, non_negative_float,
                             positive_int, run_async)
from cliruntime.supervisor import TaskFailed, first_of

log = logging.getLogger("boxcore.boxd")

# What the domain modules raise for bad configuration: one line, exit status 2.
CONFIG_ERRORS: tuple[type[Exception], ...] = (PolicyError, DirectoryOpenError, EngineUnavailable, EngineSetupError,
                                                ControlSocketError, HttpSetupError)


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
    parser.add_argument("--control-group", type=group_id, default=None, metavar="GROUP",
                        help="group owning the control socket: its members may connect "
                             "(default: boxd's own group; see docs/security.md)")
    parser.add_argument("--control-mode", type=file_mode, default=0o660, metavar="MODE",
                        help="permissions of the control socket, octal (default 0660; "
                             "never world-writable)")
    parser.add_argument("--http", type=host_port, default=None, metavar="HOST:PORT",
                        help="management HTTP API address (none: no HTTP API); anything but "
                             "loopback needs --http-token-file")
    parser.add_argument("--http-token-file", type=Path, default=None, metavar="FILE",
                        help="bearer token for the management API: needed for the directory and "
                             "per-booster data, and for everything off loopback")
    parser.add_argument("--state", type=Path, required=True, metavar="DIR",
                        help="state directory (the directory service's SQLite database)")
    parser.add_argument("--directory", default=None, metavar="URL",
                        help="a fleet directory shared by several boxes on Redis: redis://[USER:PASS@]HOST:PORT/N, "
                             "rediss://... (TLS), unix:///path/redis.sock?db=N, ?cluster=1, ?fleet=NAME "
                             "(default: SQLite under --state; see docs/security.md)")
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
    limits.add_argument("--max-directory-bytes", type=positive_int, default=256 << 20,
                        help="bytes of directory values, all boosters together (of the whole fleet "
                             "with --directory)")
    limits.add_argument("--max-directory-bytes-per-uid", type=positive_int, default=16 << 20)
    limits.add_argument("--max-sessions-per-uid", type=positive_int, default=64,
                        help="control connections of one uid (boosters, boxctl, pending hellos)")
    limits.add_argument("--max-rules-per-uid", type=positive_int, default=1024)
    limits.add_argument("--max-groups-per-uid", type=positive_int, default=64)
    limits.add_argument("--max-group-members-per-uid", type=positive_int, default=4096)
    limits.add_argument("--hello-timeout", type=non_negative_float, default=5.0,
                        help="seconds a connection may wait before saying hello")
    for name, cls in available_engines().items():
        group = parser.add_argument_group(f"{name} engine")
        try:
            cls.add_options(group)
        except argparse.ArgumentError as exc:
            log.debug("engine %s options clash: %s", name, exc)
    return parser


def group_id(text: str) -> int:
    """argparse type: a group name or number."""
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such group {text!r}") from None


def file_mode(text: str) -> int:
    """argparse type: permissions in octal, never world-writable (any local user could connect)."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 0660") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"mode {text} out of range")
    if mode & 0o002:
        raise argparse.ArgumentTypeError(f"mode {text} lets every local user connect: use --control-group")
    return mode


def _load_policy(path: Path | None):
    from boxcore.policy import Policy

    if path is None:
        return Policy.allow_all()
    if not path.is_file():
        raise ConfigError(f"policy file {path} not found")
    return Policy.load(path)


async def _open_directory(state: Path, url: str | None, max_keys: int, max_bytes: int):
    from boxcore.directory import Directory

    if url is not None:
        from boxcore.directory_redis import RedisDirectory
        from boxcore.redisconn import is_redis_url

        if not is_redis_url(url):
            raise ConfigError(f"--directory {url!r} is not a Redis URL (redis://HOST:PORT/N, rediss://, unix:///path)")
        return await RedisDirectory.open(url, max_keys_per_booster=max_keys, max_total_bytes=max_bytes)

    try:
        state.mkdir(mode=0o750, parents=True, exist_ok=True)
        os.chmod(state, 0o750)   # the directory holds every booster's state: boxd's (and its group's) only
    except OSError as exc:
        raise ConfigError(f"cannot create state directory {state}: {exc.strerror}") from None
    try:
        return Directory(state / "directory.sqlite3", max_keys_per_booster=max_keys, max_total_bytes=max_bytes)
    except Exception as exc:
        raise ConfigError(f"cannot open the directory under {state}: {exc}") from None


async def amain(args: argparse.Namespace, ctx: RunContext) -> int:
    if args.heartbeat <= 0:
        raise ConfigError("--heartbeat must be positive")
    engine = get_engine(args.engine).from_args(args)
    policy = _load_policy(args.policy)
    token = None
    if args.http is not None:
        from boxcore.http import check_http_binding, read_token_file

        token = read_token_file(args.http_token_file) if args.http_token_file else None
        check_http_binding(args.http[0], token)
    directory = await _open_directory(args.state, args.directory, args.max_directory_keys, args.max_directory_bytes)
    config = ControllerConfig(control_path=args.control, heartbeat_interval=args.heartbeat,
                              heartbeat_misses=args.heartbeat_misses, max_boosters=args.max_boosters,
                              max_rules_per_booster=args.max_rules_per_booster,
                              max_pending_ops=args.max_pending_ops,
                              socket_mode=args.control_mode, socket_group=args.control_group,
                              hello_timeout=args.hello_timeout, max_sessions_per_uid=args.max_sessions_per_uid,
                              max_rules_per_uid=args.max_rules_per_uid, max_groups_per_uid=args.max_groups_per_uid,
                              max_group_members_per_uid=args.max_group_members_per_uid,
                              max_directory_bytes_per_uid=args.max_directory_bytes_per_uid)
    controller = Controller(engine, config, policy=policy, directory=directory, stats=ctx.stats)
    controller.routes = list(args.route)
    ctx.stats.providers["rules"] = controller.rules_view
    ctx.stats.providers["boosters"] = controller.boosters_view
    ctx.stats.providers["engine"] = engine.status
    try:
        await controller.start()
        if args.http is not None:
            http_ready = asyncio.get_running_loop().create_future()
            controller.tasks.spawn(serve_http(controller, *args.http, token=token, ready=http_ready),
                                   name="http", critical=True)
            await http_ready  # a bind error is an HttpSetupError here (one line, exit 2), before "ready"
        log.info("boxd ready (engine %s, control %s%s)", engine.name, args.control,
                 f", http {args.http[0]}:{args.http[1]}" if args.http else "")
        outcome = await first_of(ctx.stop.wait(), controller.wait_failed())
        if isinstance(outcome, TaskFailed):
            # a critical task (watchdog, teardown, HTTP) died: its traceback is logged above
            log.critical("boxd stops, every rule removed: %s", outcome)
            return 1
    finally:
        await controller.stop()
        await controller.store.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_async(build_parser(), amain, argv, config_errors=CONFIG_ERRORS)


if __name__ == "__main__":
    raise SystemExit(main())
