"""``npctl``: talk to the card's control point over the control interface."""

from __future__ import annotations

import argparse
import json
import sys
import time

from cliruntime import ConfigError, RunContext, make_parser, non_negative_float, run_async
from npdrv import netns, wire
from npdrv.driver import NpDriver, NpError
from npdrv.wire import Scope, Table

TABLES = {"rules": Table.RULES, "fwd": Table.FORWARDING, "mcast": Table.MULTICAST, "ports": Table.PORTS}


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "npctl", "Query and configure the NP4GS3 control point (real or np4gs3-emu).",
        examples=[
            "npctl --iface npc echo hello",
            "npctl --netns bbbox --iface npc tables fwd",
            "npctl --iface npc rules",
            "npctl --iface npc counters --port 0",
            "npctl --iface npc fwd add 10.2.0.0/24 1 02:00:00:00:00:02",
            "npctl --iface npc code booster",
        ])
    parser.add_argument("--iface", required=True, help="the host end of the control interface (e.g. npc)")
    parser.add_argument("--netns", help="enter this network namespace first")
    parser.add_argument("--timeout", type=non_negative_float, default=0.5, help="seconds per attempt")
    parser.add_argument("--retries", type=int, default=3, help="resends of idempotent requests")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sub = parser.add_subparsers(dest="command", required=True)
    echo = sub.add_parser("echo", help="round trip to the control point")
    echo.add_argument("text", nargs="?", default="ping")
    tables = sub.add_parser("tables", help="dump a table")
    tables.add_argument("table", choices=sorted(TABLES), nargs="?", default="ports")
    sub.add_parser("rules", help="the multi-field rule table with counters")
    counters = sub.add_parser("counters", help="read (or --clear) counters")
    target = counters.add_mutually_exclusive_group()
    target.add_argument("--rule", type=int, help="one rule's counters")
    target.add_argument("--port", type=int, help="one port's counters")
    counters.add_argument("--clear", action="store_true", help="clear instead of read (all if no target)")
    fwd = sub.add_parser("fwd", help="forwarding entries")
    fwd_sub = fwd.add_subparsers(dest="fwd_command", required=True)
    fwd_sub.add_parser("show")
    add = fwd_sub.add_parser("add")
    add.add_argument("prefix")
    add.add_argument("port", help="0, 1 or host")
    add.add_argument("next_hop", nargs="?", default="00:00:00:00:00:00")
    delete = fwd_sub.add_parser("del")
    delete.add_argument("prefix")
    code = sub.add_parser("code", help="load a named action set (forward, filter, booster)")
    code.add_argument("name")
    return parser


def _rule_row(record: wire.RuleRecord) -> dict:
    r = record.rule

    def field(value: int, mask: int, bits: int) -> str:
        if not mask:
            return "*"
        if bits == 32:
            plen = bin(mask).count("1")
            if mask == wire.prefix_mask(plen):
                return f"{wire.ip_text(value)}/{plen}"
            return f"{wire.ip_text(value)}&{wire.ip_text(mask)}"
        return str(value) if mask == 0xFF else f"{value}&{mask:#x}"

    def ports(lo: int, hi: int) -> str:
        return "*" if (lo, hi) == (0, 0xFFFF) else str(lo) if lo == hi else f"{lo}-{hi}"

    return {"id": r.rule_id, "prio": r.priority, "action": r.action.name + (f"({r.group})" if r.group else ""),
            "proto": field(r.proto, r.proto_mask, 8), "src": field(r.src, r.src_mask, 32),
            "dst": field(r.dst, r.dst_mask, 32), "sport": ports(*r.sport), "dport": ports(*r.dport),
            "payload": len(r.patterns), "packets": record.packets, "bytes": record.bytes}


def _row(record: wire.Body) -> dict:
    if isinstance(record, wire.RuleRecord):
        return _rule_row(record)
    if isinstance(record, wire.FwdAdd):
        return {"prefix": record.network, "port": "host" if record.port == wire.PORT_HOST else record.port,
                "next_hop": wire.mac_text(record.next_hop)}
    if isinstance(record, wire.McastSet):
        return {"group": record.group, "members": " ".join(f"{ip}:{port}" for ip, port in record.members)}
    if isinstance(record, wire.PortRecord):
        c = record.config
        return {"port": c.port, "enabled": c.enabled, "mtu": c.mtu, "mac": wire.mac_text(c.mac),
                "rx_packets": record.rx_packets, "tx_packets": record.tx_packets, "drops": record.drops}
    if isinstance(record, wire.Counters):
        return {"scope": record.scope.name, "id": record.ident, "packets": record.packets, "bytes": record.bytes}
    raise TypeError(type(record))


def _print(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("(empty)")
        return
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for row in rows:
        print("  ".join(str(row[k]).ljust(widths[k]) for k in keys))


async def amain(args: argparse.Namespace, ctx: RunContext) -> int:
    if args.netns:
        netns.enter(args.netns)
    try:
        driver = await NpDriver(args.iface, timeout=args.timeout or 0.5, retries=args.retries).open()
    except OSError as exc:
        raise ConfigError(str(exc)) from None
    try:
        return await _run(args, driver)
    except NpError as exc:
        print(f"npctl: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    finally:
        ctx.stats.update(driver.stats)
        await driver.close()


async def _run(args: argparse.Namespace, np: NpDriver) -> int:
    if args.command == "echo":
        started = time.perf_counter()
        data = await np.echo(args.text.encode())
        rtt = (time.perf_counter() - started) * 1e6
        print(json.dumps({"echo": data.decode(errors="replace"), "rtt_us": round(rtt, 1)}) if args.json
              else f"{data.decode(errors='replace')}  ({rtt:.0f} us)")
    elif args.command in ("tables", "rules"):
        table = TABLES["rules" if args.command == "rules" else args.table]
        _print([_row(r) for r in await np.dump(table)], args.json)
    elif args.command == "counters":
        if args.clear:
            if args.rule is not None:
                await np.counters_clear(Scope.RULE, args.rule)
            else:
                if args.port is None:
                    await np.counters_clear(Scope.RULE)
                await np.counters_clear(Scope.PORT_RX, wire.ALL if args.port is None else args.port)
            print("cleared")
        elif args.rule is not None:
            _print([_row(await np.counters(Scope.RULE, args.rule))], args.json)
        else:
            ports = [args.port] if args.port is not None else [0, 1]
            rows = [_row(await np.counters(scope, port)) for port in ports
                    for scope in (Scope.PORT_RX, Scope.PORT_TX, Scope.PORT_DROP, Scope.PORT_TO_HOST)]
            _print(rows, args.json)
    elif args.command == "fwd":
        if args.fwd_command == "show":
            _print([_row(r) for r in await np.dump(Table.FORWARDING)], args.json)
        elif args.fwd_command == "add":
            port = wire.PORT_HOST if args.port == "host" else int(args.port)
            await np.fwd_add(args.prefix, port=port, next_hop=args.next_hop)
            print("ok")
        else:
            await np.fwd_delete(args.prefix)
            print("ok")
    elif args.command == "code":
        await np.code_load(args.name)
        print("ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_async(build_parser(), amain, argv, config_errors=(netns.NetnsError,))


if __name__ == "__main__":
    sys.exit(main())
