"""``booster-demo``: the one-command tour of the suite.

Runs, one after the other, the end-to-end demo of the runtime and of each
vertical on the embedded default (the ``user`` engine, opaque mode, loopback
only, no privileges).  Each part is a real set of processes talking over real
sockets; each prints what happens and a few figures, and the tour ends with a
summary table.  Every part lives in its package as ``<package>/demo.py`` with
``async def run_demo(workdir, say) -> dict``.

While the tour runs, a box of its own serves the live dashboard (its address is printed first):
the example booster counting a trickle of UDP traffic, and a booster replaying a simulated city
into fcd's aggregator whose panel draws the city map.  It stays up ``--keep`` seconds after the
tour (``--keep`` alone: until Ctrl-C); ``--no-dashboard`` leaves it out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import math
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

from cliruntime import RunContext, make_parser, run_async
from cliruntime.supervisor import Supervisor, within

# (package, title) in the order of the paper: the runtime, then sections III-A, B, C.
PARTS = (
    ("boxcore", "the booster box runtime: boxd, a booster and traffic"),
    ("npdrv", "the network processor path: the same booster on the emulated NP4GS3 card"),
    ("fcd", "floating car data: city -> generators -> box -> server -> tuplespace -> route"),
    ("gnutella", "file sharing: a cluster's search answered inside it, a verified download"),
    ("mmpog", "multiplayer game: a session through the multicast reflector"),
)
# booster-demo --scale: the fcd server side on several hosts of a lab (root, redis-server)
SCALE_PART = ("fcd-scale", "fcd beyond one machine: boxes -> front -> Redis streams -> workers, one killed")
PART_MODULES = {"fcd-scale": "fcd.workers_demo"}


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "booster-demo",
        "Run the end-to-end demo of the runtime and of every vertical (user engine, loopback).",
        examples=[
            "booster-demo",
            "booster-demo --only fcd --only mmpog",
            "booster-demo --workdir out/demo --stats-json out/demo.json",
            "booster-demo --only boxcore --keep          # then look at the dashboard until Ctrl-C",
            "booster-demo --scale --no-dashboard         # fcd on Redis streams with workers, in a lab (root)",
        ],
    )
    parser.add_argument("--only", action="append", choices=[name for name, _ in PARTS],
                        help="run only this part (repeatable)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep logs and files here instead of a temporary directory")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds allowed for each part")
    parser.add_argument("--keep", type=float, nargs="?", const=math.inf, default=None, metavar="SECONDS",
                        help="keep the dashboard up this long after the tour (alone: until Ctrl-C; "
                             "default: 10 s on a terminal, 0 when the output is piped)")
    parser.add_argument("--no-dashboard", action="store_true", help="no dashboard box during the tour")
    parser.add_argument("--scale", action="store_true",
                        help="run the scaled fcd deployment instead: a lab (boxcore/topologies/fcd-scale.toml) "
                             "of boxes, an fcd-server front, Redis and two workers (needs root and redis-server)")
    return parser


class DashboardBox:
    """The tour's own box with the live dashboard: boxd, the example booster, a city replay, traffic."""

    def __init__(self, workdir: Path) -> None:
        from boxcore.procs import ProcessGroup, free_port

        self.group = ProcessGroup(workdir)
        self.port = free_port(socket.SOCK_DGRAM)
        self.relay = free_port(socket.SOCK_DGRAM)
        self.http = free_port(socket.SOCK_STREAM)
        self.control = workdir / "boxd.sock"
        self.url = f"http://127.0.0.1:{self.http}/"
        self.supervisor: Supervisor | None = None
        self._server: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        from boxcore.procs import python_module, script

        group = self.group
        boxd = group.start("boxd", [script("boxd"), "--engine", "user", "--control", str(self.control),
                                    "--state", str(group.workdir / "state"), "--http", f"127.0.0.1:{self.http}",
                                    "--listen", f"udp:127.0.0.1:{self.port}=127.0.0.1:{self.relay}"])
        await group.wait_for_log(boxd, "boxd ready")
        # the "server" the box relays passed packets to: it takes them and says nothing
        self._server, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=("127.0.0.1", self.relay))
        group.start("udp-counter", [script("booster-example"), "--control", str(self.control),
                                    "--port", str(self.relay), "--drop-prefix", "SPAM"])
        group.start("city", python_module("tools.demo_panels") + ["--control", str(self.control)])
        self.supervisor = Supervisor("demo-dashboard")
        self.supervisor.spawn(self._trickle(), name="traffic")

    async def _trickle(self, per_second: int = 200) -> None:
        """UDP datagrams to the box, one in ten starting with SPAM, so the counters move."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            n = 0
            while True:
                for _ in range(per_second // 10):
                    payload = b"SPAM %d" % n if n % 10 == 0 else b"demo %d" % n
                    with contextlib.suppress(OSError):
                        sock.sendto(payload, ("127.0.0.1", self.port))
                    n += 1
                await asyncio.sleep(0.1)
        finally:
            sock.close()

    async def stop(self) -> None:
        if self.supervisor is not None:
            await self.supervisor.aclose()
        await self.group.stop_all()
        if self._server is not None:
            self._server.close()


async def _run_part(name: str, workdir: Path, timeout: float) -> dict:
    module = importlib.import_module(PART_MODULES.get(name, f"{name}.demo"))
    part_dir = workdir / name
    part_dir.mkdir(parents=True, exist_ok=True)

    def say(line: str) -> None:
        print(f"  [{name}] {line}", flush=True)

    return await within(module.run_demo(part_dir, say), timeout)


async def amain(args: argparse.Namespace, ctx: RunContext) -> int:
    selected = [SCALE_PART] if args.scale else [(n, t) for n, t in PARTS if not args.only or n in args.only]
    results: dict[str, dict] = {}
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="booster-demo-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        dashboard = None if args.no_dashboard else DashboardBox(workdir / "dashboard")
        try:
            if dashboard is not None:
                await dashboard.start()
                print(f"== dashboard: {dashboard.url}  (live while the demo runs)", flush=True)
            await _run_parts(selected, workdir, args, ctx, results, failed)
            _print_summary(results)
            keep = args.keep if args.keep is not None else (10.0 if sys.stdout.isatty() else 0.0)
            if dashboard is not None and keep > 0 and not ctx.stop.is_set():
                how = "until Ctrl-C" if math.isinf(keep) else f"for {keep:g} s (booster-demo --keep: until Ctrl-C)"
                print(f"\n== dashboard stays up at {dashboard.url} {how}", flush=True)
                with contextlib.suppress(asyncio.TimeoutError):
                    await within(ctx.stop.wait(), None if math.isinf(keep) else keep)
        finally:
            if dashboard is not None:
                await dashboard.stop()
    ctx.stats.providers["parts"] = lambda: results
    return 1 if failed else 0


async def _run_parts(selected, workdir: Path, args: argparse.Namespace, ctx: RunContext,
                     results: dict[str, dict], failed: list[str]) -> None:
    for name, title in selected:
        if ctx.stop.is_set():
            break
        print(f"\n== {name}: {title}", flush=True)
        started = time.monotonic()
        try:
            summary = await _run_part(name, workdir, args.timeout)
        except Exception as exc:  # one broken part must not hide the others
            failed.append(name)
            print(f"  [{name}] FAILED: {exc!r}", file=sys.stderr, flush=True)
            traceback.print_exc()
            results[name] = {"ok": False, "error": repr(exc)}
            continue
        summary = dict(summary or {})
        summary["ok"] = True
        summary["seconds"] = round(time.monotonic() - started, 1)
        results[name] = summary


def _print_summary(results: dict[str, dict]) -> None:
    print("\n== summary")
    for name, summary in results.items():
        status = "ok" if summary.get("ok") else "FAILED"
        figures = {k: v for k, v in summary.items() if k not in ("ok",)}
        print(f"  {name:9s} {status:6s} {json.dumps(figures, default=str)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_async(build_parser(), amain, argv)


if __name__ == "__main__":
    sys.exit(main())
