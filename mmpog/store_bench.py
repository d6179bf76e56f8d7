"""What the Redis store costs the game server: /move requests per second and their latency, with
the in-memory store (one instance), the Redis store (one instance) and two instances on one Redis.

    python -m mmpog.store_bench --clients 16 --duration 5 --json out.json --plot out.png

Every role is a real process (``ProcessGroup``): one standalone reflector, a ``redis-server`` on a
Unix socket (``boxcore.redisproc``), the ``mmpog-server`` instances.  Each client is a logged-in
player that repeats ``/move`` to the cell it is in (the request every player makes most: session
check, move lock, presence, location map; no reflector call), clients spread round-robin over the
instances.  The three configurations run one after the other in the same run; on a shared machine
compare them within one run (ratios), not across runs.  Percentiles come from ``tools.stats``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import socket
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

from boxcore.procs import ProcessGroup, free_port, python_module
from boxcore.redisproc import RedisServer
from cliruntime import ConfigError, RunContext, make_parser, non_negative_float, positive_int, run_async
from tools.stats import summary

CONFIGS = "memory:1,redis:1,redis:2"


def parse_configs(text: str) -> list[tuple[str, int]]:
    """``memory:1,redis:2`` -> [("memory", 1), ("redis", 2)] (memory runs one instance only)."""
    configs = []
    for item in text.split(","):
        kind, _, count = item.partition(":")
        if kind not in ("memory", "redis") or not count.isdigit() or int(count) < 1 or (kind == "memory" and count != "1"):
            raise ConfigError(f"--configs wants memory:1 or redis:N items, got {item!r}")
        configs.append((kind, int(count)))
    return configs


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


async def _drive(bases: list[str], clients: int, duration: float, config: str) -> dict:
    """Register and log in ``clients`` players, place them, then /move for ``duration`` seconds."""
    latencies: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        sessions = []
        for n in range(clients):
            base = bases[n % len(bases)]
            name, password = f"p{n}", f"bench-player-{n}"
            async with http.post(base + "/register", json={"name": name, "password": password}) as resp:
                assert resp.status == 201, await resp.text()
            async with http.post(base + "/login", json={"name": name, "password": password}) as resp:
                sessions.append((base, (await resp.json())["session"]))
        for base, session in sessions:
            async with http.post(base + "/move", json={"x": 5, "y": 5},
                                 headers={"Authorization": f"Bearer {session}"}) as resp:
                assert resp.status == 200, await resp.text()
        end = time.monotonic() + duration

        async def player(base: str, session: str) -> None:
            nonlocal errors
            headers = {"Authorization": f"Bearer {session}"}
            while (start := time.monotonic()) < end:
                async with http.post(base + "/move", json={"x": 6, "y": 6}, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                        continue
                latencies.append(time.monotonic() - start)

        began = time.monotonic()
        await asyncio.gather(*(player(base, session) for base, session in sessions))
        elapsed = time.monotonic() - began
    return {"requests": len(latencies), "errors": errors, "requests_per_s": round(len(latencies) / elapsed, 1),
            "latency_ms": summary(latencies, (50, 99), scale=1000.0, with_max=True)}


async def run_bench(clients: int, duration: float, workdir: Path, configs: list[tuple[str, int]]) -> dict:
    group = ProcessGroup(workdir)
    redis = RedisServer(workdir / "redis")
    results = {}
    try:
        await redis.start()
        refl_http, refl_udp = free_port(), free_port(socket.SOCK_DGRAM)
        key = secrets.token_hex(16)
        reflector = group.start("reflector", [*python_module("mmpog.reflector"), "--mode", "standalone", "--listen",
                                              f"127.0.0.1:{refl_udp}", "--http", f"127.0.0.1:{refl_http}",
                                              "--api-key", key, "--log-level", "warning"], stats=False)
        await group.wait_until(reflector, lambda: _answers(f"http://127.0.0.1:{refl_http}/health"), what="no /health")
        for number, (kind, instances) in enumerate(configs):
            config = f"{kind}x{instances}" + (f" #{number}" if (kind, instances) in configs[:number] else "")
            roles, bases = [], []
            for index in range(instances):
                port = free_port()
                argv = [*python_module("mmpog.server"), "--http", f"127.0.0.1:{port}", "--world", "2x2", "--cell",
                        "10", "--reflector", f"http://127.0.0.1:{refl_http}=127.0.0.1:{refl_udp}",
                        "--api-key", key, "--log-level", "info"]
                if kind == "redis":
                    argv += ["--store", f"{redis.url}?game=bench{number}"]
                role = group.start(f"server-{config}-{index}", argv, stats=False)
                await group.wait_for_log(role, "game server on http")
                roles.append(role)
                bases.append(f"http://127.0.0.1:{port}")
            results[config] = await _drive(bases, clients, duration, config)
            await group.stop_many(roles)
    finally:
        await group.stop_all()
        await redis.stop()
    return results


def plot(results: dict, path: Path, clients: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar(names, [results[n]["requests_per_s"] for n in names], color="tab:blue")
    left.set_ylabel("/move per second")
    right.bar([f"{n}\np50" for n in names], [results[n]["latency_ms"]["p50"] for n in names], color="tab:green")
    right.bar([f"{n}\np99" for n in names], [results[n]["latency_ms"]["p99"] for n in names], color="tab:orange")
    right.set_ylabel("latency (ms)")
    right.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"mmpog-server store: {clients} concurrent players repeating /move")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("mmpog-store-bench", "The game server's /move throughput: memory store, Redis, 2 instances.",
                         examples=["python -m mmpog.store_bench --clients 16 --duration 5 --json out.json "
                                   "--plot out.png"])
    parser.add_argument("--clients", type=positive_int, default=16)
    parser.add_argument("--duration", type=non_negative_float, default=5.0)
    parser.add_argument("--configs", default=CONFIGS, help="store:instances, in the order run (repeat to interleave)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plot", type=Path, help="write a PNG here")
    return parser


async def amain(args: argparse.Namespace, ctx: RunContext) -> int:
    with tempfile.TemporaryDirectory(prefix="bbmmpogstore") as tmp:
        results = await run_bench(args.clients, args.duration, Path(tmp), parse_configs(args.configs))
    report = {"clients": args.clients, "duration": args.duration, "configs": results}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(results, args.plot, args.clients)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_async(build_parser(), amain, argv)


if __name__ == "__main__":
    raise SystemExit(main())
