"""``booster-loadgen fcd-scale``: the fcd store side when one machine is outgrown.

Route look-ups: the in-car routers (``fcd-route``) all read the server's predictions from the
tuplespace.  For 1..64 concurrent routers this measures look-ups per second against today's
tuplespace server (``fcd-tuplespace``, msgpack over TCP) and against the tuplespace on Redis
(``redis-server``), each store in its own cgroup v1 CPU budget (``--budget`` of one core), the
routers outside it.  A look-up is what a router asks of the store before planning: every current
traverse-time prediction (``rd_all(("fcd.traverse", int, int, list))``) reduced to the newest per
road (``fcd.route.latest_times``); the shortest-path search after it is the car's own CPU and the
same for both stores, so it is left out.  The store holds ``--runs`` prediction runs of a
``--grid`` city, as fcd-server publishes them.

JSON: ``route_lookups`` {``redis``: {clients: per second}, ``tcp``: {...}}, ``rows`` (one per
point, with the store's CPU seconds used), ``ratio_at_max_clients``; a PNG plot with ``--plot``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

from boxcore.procs import ProcessGroup, free_port, script
from boxcore.redisproc import RedisServer
from cliruntime import ConfigError, int_list, positive_int
from fcd.city import grid_city
from fcd.route import TRAVERSE_TEMPLATE, latest_times
from fcd.tuplespace import connect
from tools.bench_fcd import CpuBudgets, NoBudgets

log = logging.getLogger("booster-loadgen.fcd-scale")

BACKENDS = ("tcp", "redis")


async def _populate(address: str, n_roads: int, runs: int) -> int:
    space = await connect(address)
    try:
        for run in range(1, runs + 1):
            for road in range(n_roads):
                await space.out(("fcd.traverse", road, run, [12.5 + road % 7, 13.0, 14.5]))
        return len(await space.rd_all(TRAVERSE_TEMPLATE, limit=10 * n_roads + 100))
    finally:
        await space.close()


async def _routers(address: str, clients: int, limit: int, start_at: float, duration: float) -> int:
    spaces = [await connect(address) for _ in range(clients)]
    done = 0

    async def router(space) -> None:
        nonlocal done
        while time.time() < start_at:
            await asyncio.sleep(min(0.01, max(0.0, start_at - time.time())))
        end = start_at + duration
        while time.time() < end:
            times, _ = latest_times(await space.rd_all(TRAVERSE_TEMPLATE, limit=limit))
            if times:
                done += 1

    try:
        await asyncio.gather(*(router(s) for s in spaces))
    finally:
        for space in spaces:
            await space.close()
    return done


def _router_process(address: str, clients: int, limit: int, start_at: float, duration: float, out) -> None:
    try:
        out.put(("ok", asyncio.run(_routers(address, clients, limit, start_at, duration))))
    except Exception as exc:  # reported to the parent, which fails the run loudly
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def _measure(address: str, clients: int, processes: int, limit: int, duration: float) -> int:
    """Look-ups completed by ``clients`` routers spread over ``processes`` processes."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    shares = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    start_at = time.time() + 1.0 + 0.02 * clients      # every router connected before the clock starts
    procs = [ctx.Process(target=_router_process, args=(address, share, limit, start_at, duration, out))
             for share in shares if share]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=duration + 120) for _ in procs]
    for proc in procs:
        proc.join(30)
    errors = [text for status, text in results if status == "error"]
    if errors:
        raise RuntimeError(f"router process failed: {errors[0]}")
    return sum(count for _, count in results)


def _process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_store(kind: str, workdir: Path, group: ProcessGroup):
    if kind == "tcp":
        port = free_port()
        role = group.start("fcd-tuplespace", [script("fcd-tuplespace"), "--listen", f"127.0.0.1:{port}",
                                              "--max-tuples", "1000000"])
        asyncio.run(group.wait_for_log(role, "listening"))
        return f"127.0.0.1:{port}", role.proc.pid, None
    server = RedisServer(workdir / "redis")
    asyncio.run(server.start())
    assert server.role is not None
    return server.url, server.role.proc.pid, server


def run(args) -> int:
    if shutil.which("redis-server") is None and "redis" in args.backends:
        raise ConfigError("redis-server is not installed (tools/bootstrap.sh installs it as root)")
    city = grid_city(args.grid[0], args.grid[1])
    limit = 10 * city.n_roads + 100
    budgets = NoBudgets() if args.no_cgroups else CpuBudgets(args.budget, args.period_us)
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bbscale")) if own_workdir else args.workdir
    results: dict = {"budget_cpu": None if args.no_cgroups else args.budget, "grid": list(args.grid),
                     "roads": city.n_roads, "runs": args.runs, "duration_s": args.duration,
                     "router_processes": args.processes, "route_lookups": {}, "rows": []}
    try:
        for kind in args.backends:
            group = ProcessGroup(workdir / kind)
            address, pid, redis_server = _start_store(kind, workdir / kind, group)
            try:
                budgets.add(kind, pid)
                stored = asyncio.run(_populate(address, city.n_roads, args.runs))
                per_second: dict[str, float] = {}
                for clients in args.clients:
                    cpu_before = _process_cpu_s(pid)
                    done = _measure(address, clients, min(args.processes, clients), limit, args.duration)
                    cpu = _process_cpu_s(pid) - cpu_before
                    rate = done / args.duration
                    per_second[str(clients)] = round(rate, 1)
                    results["rows"].append({"store": kind, "clients": clients, "lookups": done,
                                            "lookups_per_s": round(rate, 1), "tuples": stored,
                                            "store_cpu_s": round(cpu, 3)})
                    log.info("%s: %d routers, %.0f look-ups/s", kind, clients, rate)
                results["route_lookups"][kind] = per_second
            finally:
                if redis_server is not None:
                    asyncio.run(redis_server.stop())
                asyncio.run(group.stop_all())
        if set(BACKENDS) <= set(results["route_lookups"]):
            top = str(max(args.clients))
            tcp = results["route_lookups"]["tcp"][top]
            results["ratio_at_max_clients"] = round(results["route_lookups"]["redis"][top] / tcp, 2) if tcp else None
    finally:
        budgets.cleanup()
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if args.plot:
        _plot(results, args.plot)
    if own_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, label in (("tcp", "tuplespace server (TCP)"), ("redis", "tuplespace on Redis")):
        points = results["route_lookups"].get(kind)
        if points:
            xs = [int(c) for c in points]
            ax.plot(xs, [points[c] for c in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent routers")
    ax.set_ylabel("route look-ups per second")
    budget = results.get("budget_cpu")
    ax.set_title(f"fcd route look-ups, store at {budget} core" if budget else "fcd route look-ups")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _grid(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--grid takes ROWSxCOLS, not {text!r}") from None
    return rows, cols


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fcd-scale", help="fcd stores beyond one machine: route look-ups on Redis vs the TCP tuplespace",
        description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
        epilog="examples:\n  booster-loadgen fcd-scale --json out/fcd-scale.json --plot out/fcd-scale.png\n"
               "  booster-loadgen fcd-scale --clients 1,8,64 --budget 0.5 --duration 3")
    p.add_argument("--clients", type=int_list, default=[1, 2, 4, 8, 16, 32, 64], help="concurrent routers")
    p.add_argument("--backends", type=lambda s: [b for b in s.split(",") if b], default=list(BACKENDS),
                   help="stores to measure (tcp, redis)")
    p.add_argument("--grid", type=_grid, default=(8, 8), help="city size ROWSxCOLS")
    p.add_argument("--runs", type=positive_int, default=3, help="prediction runs held in the store")
    p.add_argument("--processes", type=positive_int, default=2, help="router processes")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per point")
    p.add_argument("--budget", type=float, default=0.2,
                   help="the store's CPU budget (fraction of one core): small enough that the routers, "
                        "outside it, are not what limits the figure on a small machine")
    p.add_argument("--period-us", type=int, default=100_000, help="CFS period")
    p.add_argument("--no-cgroups", action="store_true", help="run without CPU budgets")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--plot", type=Path, help="write the plot here (PNG)")
    p.add_argument("--workdir", type=Path, default=None, help="keep logs here (default: a temporary directory)")
    p.set_defaults(func=run)
