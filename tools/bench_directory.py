"""Directory operation latency: SQLite (boxd's default) against the fleet directory on Redis.

Times ``get`` and ``put`` through the async interface boxd's controller uses, one operation at a
time, on a SQLite file and on a throwaway ``redis-server`` over a Unix socket (same machine), and
writes p50/p99 in microseconds as JSON::

    python -m tools.bench_directory --ops 5000 --json out/directory-latency.json

The ratio Redis/SQLite within one run is the figure to read; absolute numbers move with load.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from boxcore.directory import AsyncDirectory, Directory
from boxcore.directory_redis import RedisDirectory
from boxcore.redisproc import RedisServer
from tools.output import write_result
from tools.stats import summary


async def _measure(directory, ops: int) -> dict[str, dict]:
    value = {"queue": 3, "density": 0.25, "cars": list(range(20))}
    timings: dict[str, list[float]] = {"put": [], "get": []}
    for i in range(ops):
        key = f"road/{i % 500}"
        start = time.perf_counter()
        await directory.put("bench", key, value, uid=0, max_uid_bytes=1 << 30)
        timings["put"].append(time.perf_counter() - start)
        start = time.perf_counter()
        await directory.get("bench", key)
        timings["get"].append(time.perf_counter() - start)
    return {op: summary(samples, (50, 99), scale=1e6, digits=1) for op, samples in timings.items()}


async def run(ops: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bbdirbench") as tmp:
        sqlite = AsyncDirectory(Directory(Path(tmp) / "state"))
        await sqlite.bind_name("bench", 0)
        result = {"ops": ops, "sqlite_us": await _measure(sqlite, ops)}
        await sqlite.aclose()
        async with RedisServer(Path(tmp) / "redis") as server:
            redis_dir = await RedisDirectory.open(server.url)
            await redis_dir.bind_name("bench", 0)
            result["redis_unix_us"] = await _measure(redis_dir, ops)
            await redis_dir.aclose()
    result["ratio_p50"] = {op: round(result["redis_unix_us"][op]["p50"] / result["sqlite_us"][op]["p50"], 2)
                           for op in ("get", "put")}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=5000, help="puts and gets per backend")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.ops))
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
