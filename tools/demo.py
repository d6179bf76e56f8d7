"""``booster-demo``: the one-command tour of the suite.

Runs, one after the other, the end-to-end demo of the runtime and of each
vertical on the embedded default (the ``user`` engine, opaque mode, loopback
only, no privileges).  Each part is a real set of processes talking over real
sockets; each prints what happens and a few figures, and the tour ends with a
summary table.  Every part lives in its package as ``<package>/demo.py`` with
``async def run_demo(workdir, say) -> dict``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

from cliruntime import RunContext, make_parser, run_async

# (package, title) in the order of the paper: the runtime, then sections III-A, B, C.
PARTS = (
    ("boxcore", "the booster box runtime: boxd, a booster and traffic"),
    ("npdrv", "the network processor path: the same booster on the emulated NP4GS3 card"),
    ("fcd", "floating car data: city -> generators -> box -> server -> tuplespace -> route"),
    ("gnutella", "file sharing: a cluster's search answered inside it, a verified download"),
    ("mmpog", "multiplayer game: a session through the multicast reflector"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "booster-demo",
        "Run the end-to-end demo of the runtime and of every vertical (user engine, loopback).",
        examples=[
            "booster-demo",
            "booster-demo --only fcd --only mmpog",
            "booster-demo --workdir out/demo --stats-json out/demo.json",
        ],
    )
    parser.add_argument("--only", action="append", choices=[name for name, _ in PARTS],
                        help="run only this part (repeatable)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep logs and files here instead of a temporary directory")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds allowed for each part")
    return parser


async def _run_part(name: str, workdir: Path, timeout: float) -> dict:
    module = importlib.import_module(f"{name}.demo")
    part_dir = workdir / name
    part_dir.mkdir(parents=True, exist_ok=True)

    def say(line: str) -> None:
        print(f"  [{name}] {line}", flush=True)

    return await asyncio.wait_for(module.run_demo(part_dir, say), timeout)


async def amain(args: argparse.Namespace, ctx: RunContext) -> int:
    selected = [(n, t) for n, t in PARTS if not args.only or n in args.only]
    results: dict[str, dict] = {}
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="booster-demo-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
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
    ctx.stats.providers["parts"] = lambda: results
    print("\n== summary")
    for name, summary in results.items():
        status = "ok" if summary.get("ok") else "FAILED"
        figures = {k: v for k, v in summary.items() if k not in ("ok",)}
        print(f"  {name:9s} {status:6s} {json.dumps(figures, default=str)}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    return run_async(build_parser(), amain, argv)


if __name__ == "__main__":
    sys.exit(main())
