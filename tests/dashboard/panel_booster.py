"""A test booster that publishes a vertical's panel on a running boxd until SIGTERM.

``python -m tests.dashboard.panel_booster --control SOCK --name NAME --kind fcd|gnutella|mmpog|invalid``
Prints ``published`` on stdout once the first panel is in boxd's directory.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from boxcore.booster import Booster
from boxcore.panels import PANEL_KEY, publish_panel, publish_panel_every

from tools import demo_panels as verticals


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--control", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--kind", choices=["fcd", "gnutella", "mmpog", "invalid"], required=True)
    args = parser.parse_args(argv)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # the vertical's objects (a simulated city replayed, ...) are built before connecting: on a busy
    # machine that takes seconds of CPU, and a booster that blocks its loop that long misses its
    # heartbeats and is evicted
    builder = None if args.kind == "invalid" else getattr(verticals, f"{args.kind}_builder")()[0]
    async with Booster(args.name, control=args.control) as booster:
        if builder is None:
            # written around the publisher, as a buggy booster might: the dashboard must refuse it
            await booster.directory.put(PANEL_KEY, {"title": "bad", "parts": [{"kind": "map", "lines": [[1, 2, 3]]}]})
        else:
            await publish_panel(booster, builder.build())
            publish_panel_every(booster, builder.build, 1.0)
        print("published", flush=True)
        await booster.run_until_stopped(stop)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
