"""``booster-example``: a complete small booster - a UDP counter and filter.

It redirects every UDP packet headed for ``--port``, counts packets and bytes
per source, drops (consumes) those whose payload starts with ``--drop-prefix``
and passes the rest on unchanged.  Every ``--report-every`` seconds it stores
its totals in the box's directory, so a restarted booster (or boxd) carries on
counting where it left off; ``boxctl``/``GET /api/directory`` show them.

    boxd --engine user --control /tmp/boxd.sock --state /tmp/st \\
         --listen udp:127.0.0.1:9000=127.0.0.1:9001 &
    booster-example --control /tmp/boxd.sock --port 9001 --drop-prefix SPAM
"""

from __future__ import annotations

import argparse
import contextlib
import logging

from boxcore.booster import Booster, Verdict, add_booster_options, run_booster
from boxcore.packet import Packet
from boxcore.rules import Match
from cliruntime import RunContext, make_parser, non_negative_float, positive_int, run_async

log = logging.getLogger("booster-example")

TOTALS_KEY = "totals"


class UdpCounter:
    """The booster's logic, independent of how packets arrive (testable with MemoryBox)."""

    def __init__(self, drop_prefix: bytes, max_sources: int = 10_000) -> None:
        self.drop_prefix = drop_prefix
        self.max_sources = max_sources
        self.per_source: dict[str, list[int]] = {}   # "ip:port" -> [packets, bytes]
        self.packets = 0
        self.bytes = 0
        self.dropped = 0
        self.passed = 0
        self.sources_refused = 0

    def on_packet(self, pkt: Packet) -> Verdict:
        self.packets += 1
        self.bytes += len(pkt.payload)
        source = f"{pkt.src}:{pkt.sport}"
        entry = self.per_source.get(source)
        if entry is None:
            if len(self.per_source) >= self.max_sources:
                self.sources_refused += 1   # counted in the totals, not per source
            else:
                entry = self.per_source[source] = [0, 0]
        if entry is not None:
            entry[0] += 1
            entry[1] += len(pkt.payload)
        if self.drop_prefix and pkt.payload.startswith(self.drop_prefix):
            self.dropped += 1
            return Verdict.CONSUME
        self.passed += 1
        return Verdict.PASS

    def totals(self) -> dict:
        return {"packets": self.packets, "bytes": self.bytes, "dropped": self.dropped,
                "passed": self.passed, "sources": len(self.per_source),
                "sources_refused": self.sources_refused,
                "per_source": {k: list(v) for k, v in self.per_source.items()}}

    def restore(self, saved: dict | None) -> None:
        """Carry on from totals stored by an earlier run."""
        if not isinstance(saved, dict):
            return
        for key in ("packets", "bytes", "dropped", "passed", "sources_refused"):
            if isinstance(saved.get(key), int):
                setattr(self, key, saved[key])
        for source, counts in (saved.get("per_source") or {}).items():
            if isinstance(counts, list) and len(counts) == 2 and len(self.per_source) < self.max_sources:
                self.per_source[str(source)] = [int(counts[0]), int(counts[1])]


async def attach(booster: Booster, counter: UdpCounter, port: int, report_every: float):
    """Install the booster's rule and timer (shared by the CLI and the tests)."""
    counter.restore(await booster.directory.get(TOTALS_KEY))
    sub = await booster.redirect(Match(proto="udp", dst_port=port), counter.on_packet)

    async def report() -> None:
        await booster.directory.put(TOTALS_KEY, counter.totals())
        log.info("seen %d packets (%d bytes) from %d sources; dropped %d, passed %d",
                 counter.packets, counter.bytes, len(counter.per_source), counter.dropped, counter.passed)

    timer = booster.call_every(report_every, report) if report_every > 0 else None
    return sub, timer, report


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("booster-example", "A UDP counter/filter booster (the booster library's example).",
                         examples=["booster-example --control /tmp/boxd.sock --port 9001 --drop-prefix SPAM",
                                   "booster-example --port 9001 --report-every 0.5 --stats-json /tmp/seen.json"])
    add_booster_options(parser)
    parser.add_argument("--name", default="udp-counter", help="booster name (the directory is per name)")
    parser.add_argument("--port", type=positive_int, required=True, help="UDP destination port to watch")
    parser.add_argument("--drop-prefix", default="", help="drop packets whose payload starts with this")
    parser.add_argument("--report-every", type=non_negative_float, default=1.0,
                        help="seconds between totals stored in the directory (0: only at exit)")
    parser.add_argument("--max-sources", type=positive_int, default=10_000,
                        help="sources counted individually")
    return parser


async def amain(args: argparse.Namespace, ctx: RunContext) -> int:
    counter = UdpCounter(args.drop_prefix.encode(), args.max_sources)
    ctx.stats.providers["totals"] = counter.totals

    @contextlib.asynccontextmanager
    async def serve(booster: Booster):
        ctx.stats.providers["booster"] = lambda: dict(booster.stats)
        sub, timer, report = await attach(booster, counter, args.port, args.report_every)
        log.info("counting udp port %d (delivery %s)", args.port, sub.delivery.kind)
        yield
        if timer is not None:
            timer.cancel()
        if not booster.closed:
            await report()          # the last totals, so a restart carries on from them

    return await run_booster(args.name, serve, control=args.control, stop=ctx.stop)


def main(argv: list[str] | None = None) -> int:
    return run_async(build_parser(), amain, argv)


if __name__ == "__main__":
    raise SystemExit(main())
