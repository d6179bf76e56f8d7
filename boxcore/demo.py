"""The boxcore demo: boxd (user engine), the example booster and a traffic
generator as real processes on loopback; says what the booster saw.

``booster-demo`` calls :func:`run_demo`; ``python -m boxcore.demo generate``
is the traffic generator it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from pathlib import Path
from typing import Any, Callable

from cliruntime import host_port, make_parser, positive_int, run_sync
from boxcore.procs import ProcessGroup, python_module
from boxcore.procs import free_port
from boxcore.testing import BoxdProcess

SOURCES = 3
PACKETS = 300
SPAM_EVERY = 5


class _Sink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.payloads: list[bytes] = []

    def datagram_received(self, data: bytes, addr) -> None:
        self.payloads.append(data)


async def _wait(predicate: Callable, timeout: float, what: str) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise RuntimeError(f"demo: timed out waiting for {what}")


async def run_demo(workdir: Path, say: Callable[[str], None]) -> dict:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    box_port, server_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    loop = asyncio.get_running_loop()
    transport, sink = await loop.create_datagram_endpoint(_Sink, local_addr=("127.0.0.1", server_port))
    say(f"server listening on udp 127.0.0.1:{server_port}; the box answers on 127.0.0.1:{box_port}")
    group = ProcessGroup(workdir)     # the booster and the generator; boxd is BoxdProcess's
    try:
        async with BoxdProcess(workdir / "boxd",
                               listens=[f"udp:127.0.0.1:{box_port}=127.0.0.1:{server_port}"]) as boxd:
            say(f"boxd up (engine user, control {boxd.control}, http {boxd.http_url})")
            booster = group.start("booster", [
                *python_module("boxcore.examples.udp_counter"), "--control", str(boxd.control),
                "--port", str(server_port), "--drop-prefix", "SPAM", "--report-every", "0.3",
                "--log-level", "warning"])
            rules = await _wait(lambda: boxd.query("rules"), 20, "the booster's rule")
            rule = rules[0]
            say(f"booster 'udp-counter' holds rule {rule['cookie']}: {rule['action']} {rule['match_text']} "
                f"(delivery: {rule['delivery']})")
            started = time.monotonic()
            await group.run("generator", [
                *python_module("boxcore.demo"), "generate", "--to", f"127.0.0.1:{box_port}",
                "--count", str(PACKETS), "--sources", str(SOURCES), "--spam-every", str(SPAM_EVERY),
                "--log-level", "warning"])
            spam = PACKETS // SPAM_EVERY
            say(f"generator sent {PACKETS} packets from {SOURCES} sources ({spam} start with 'SPAM')")

            async def reported():
                directory = await boxd.query("directory")
                totals = directory.get("udp-counter", {}).get("totals")
                return totals if totals and totals["packets"] >= PACKETS else None

            totals = await _wait(reported, 15, "the booster's totals in the directory")
            await _wait(lambda: _ready(len(sink.payloads) >= PACKETS - spam), 5, "relayed packets")
            elapsed = time.monotonic() - started
            for source, (packets, nbytes) in sorted(totals["per_source"].items()):
                say(f"  booster saw {packets} packets / {nbytes} bytes from {source}")
            say(f"booster dropped {totals['dropped']} SPAM packets and passed {totals['passed']}; "
                f"the server received {len(sink.payloads)} (none of them SPAM: "
                f"{not any(p.startswith(b'SPAM') for p in sink.payloads)})")
            await group.stop(booster, grace=10)
            final = booster.read_stats().get("totals", totals)
            say("booster stopped; boxd removed its rule; totals stay in the directory for its next run")
        return {"packets_sent": PACKETS, "booster_seen": final["packets"], "dropped": final["dropped"],
                "passed": final["passed"], "server_received": len(sink.payloads),
                "sources": final["sources"], "seconds": round(elapsed, 3)}
    finally:
        transport.close()
        await group.stop_all()


async def _ready(value: bool) -> bool:
    return value


# ------------------------------------------------------------------ the traffic generator

def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("boxcore-demo", "Traffic generator for the boxcore demo.",
                         examples=["python -m boxcore.demo generate --to 127.0.0.1:9000 --count 300"])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="send UDP packets from several sources")
    gen.add_argument("--to", type=host_port, required=True, metavar="HOST:PORT")
    gen.add_argument("--count", type=positive_int, default=PACKETS)
    gen.add_argument("--sources", type=positive_int, default=SOURCES)
    gen.add_argument("--spam-every", type=positive_int, default=SPAM_EVERY,
                     help="every Nth packet starts with SPAM")
    gen.add_argument("--pace", type=float, default=0.001, help="seconds between packets")
    for action in parser._actions:  # common options also after the subcommand
        if action.dest in ("log_level", "stats_json"):
            gen._add_action(action)
    return parser


def generate(args: argparse.Namespace, stats) -> int:
    if args.to[0].split(".")[0] != "127":
        from cliruntime import ConfigError
        raise ConfigError("the demo generator only sends to loopback")
    socks = []
    for _ in range(args.sources):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        socks.append(sock)
    for i in range(args.count):
        spam = (i + 1) % args.spam_every == 0
        payload = (b"SPAM %d" if spam else b"reading %d") % i
        socks[i % len(socks)].sendto(payload, args.to)
        stats["sent"] += 1
        if args.pace:
            time.sleep(args.pace)
    for sock in socks:
        sock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_sync(build_parser(), generate, argv)


if __name__ == "__main__":
    raise SystemExit(main())
