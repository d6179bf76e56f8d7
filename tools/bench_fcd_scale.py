"""``booster-loadgen fcd-scale``: the fcd store side when one machine is outgrown.

Server side as workers (``--workers 1,2,4``): for each number of workers, a fresh redis-server,
the front (``fcd-server --store``) and the workers (``fcd-server --worker``) start, each in its own
cgroup v1 CPU budget (workers ``--budget-worker``, the front ``--budget-front``, Redis
``--budget-redis``, fractions of one core), and the generators (outside the budgets) offer each rate
of ``--rates`` to the front as in ``booster-loadgen fcd`` (load mode, four district processes).  Loss
at a point = 1 - (probes and light changes the workers applied) / (sent), after the backlog drains;
the front's backlog is bounded (``--max-backlog`` datagrams in all, about what the single server's
socket buffer holds), so a side that cannot keep up loses data rather than queueing without end.
The knee is where loss first exceeds 1% (``booster-loadgen fcd``'s definition, bisected as there).
JSON: ``knee_pps`` {workers: pps}, ``knee_ratio_4_over_1``, ``worker_rows`` (one per point).

Route look-ups: the in-car routers (``fcd-route``) all read the server's predictions from the
tuplespace.  For 1..64 concurrent routers this measures look-ups per second against today's
tuplespace server (``fcd-tuplespace``, msgpack over TCP) and against the tuplespace on Redis
(``redis-server``), each store in its own cgroup v1 CPU budget (``--budget``, 0.1 of one core),
the routers (``--processes`` processes) in a group of their own with every core
(``--router-budget``), there to account their CPU.  A look-up is what a router asks of the store
before planning: every current traverse-time prediction (``rd_all(("fcd.traverse", int, int,
list))``, one round trip on either store) reduced to the newest per road
(``fcd.route.latest_times``); the shortest-path search after it is the car's own CPU and the
same for both stores, so it is left out.  The store holds ``--runs`` prediction runs of a
``--grid`` city, as fcd-server publishes them.

Which side bound a point: over the measured window each row has both groups' CPU seconds, CFS
periods and throttled periods (``store_*``, ``routers_*``, per look-up too) and ``bound``:
``store`` when only the store was throttled in at least half of its periods (the figure measures
the store), ``routers`` when only the routers were, ``machine`` when neither (the routers could
not get the CPU they were allowed: other load on the machine).

JSON: ``route_lookups`` {``redis``: {clients: per second}, ``tcp``: {...}}, ``rows`` (one per
point), ``ratio_at_max_clients``; a PNG plot with ``--plot``.
"""

from __future__ import annotations

import asyncio
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
from tools.bench_fcd import LOSS_KNEE, CpuBudgets, NoBudgets, default_trace, knee
from tools.output import write_result
from tools.stats import cpu_seconds

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


class _Accounts:
    """CPU used and CFS periods throttled by each cgroup of a measurement (store, routers),
    sampled at the start and the end of the measured window."""

    def __init__(self, groups: dict[str, tuple]) -> None:
        """``groups``: label -> (CpuBudgets, group name)."""
        self.groups = groups

    def sample(self) -> dict[str, tuple[float, int, int]]:
        return {label: (budgets.usage_s(name), *budgets.periods(name))
                for label, (budgets, name) in self.groups.items()}

    @staticmethod
    def delta(before: dict, after: dict) -> dict[str, dict]:
        return {name: {"cpu_s": round(after[name][0] - before[name][0], 3),
                       "periods": after[name][1] - before[name][1],
                       "throttled_periods": after[name][2] - before[name][2]} for name in before}


def _measure(address: str, clients: int, processes: int, limit: int, duration: float,
             routers: tuple | None = None, accounts: "_Accounts | None" = None):
    """Look-ups completed by ``clients`` routers spread over ``processes`` processes (in the
    cgroup ``routers`` = (CpuBudgets, group name) when given), and each accounted cgroup's use
    over the window."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    shares = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    start_at = time.time() + 1.0 + 0.02 * clients      # every router connected before the clock starts
    procs = [ctx.Process(target=_router_process, args=(address, share, limit, start_at, duration, out))
             for share in shares if share]
    for proc in procs:
        proc.start()
        if routers is not None:
            routers[0].add(routers[1], proc.pid)
    used: dict = {}
    if accounts is not None:         # the window is the routers' own clock (start_at .. + duration)
        time.sleep(max(0.0, start_at - time.time()))
        before = accounts.sample()
        time.sleep(max(0.0, start_at + duration - time.time()))
        used = accounts.delta(before, accounts.sample())
    results = [out.get(timeout=duration + 120) for _ in procs]
    for proc in procs:
        proc.join(30)
    errors = [text for status, text in results if status == "error"]
    if errors:
        raise RuntimeError(f"router process failed: {errors[0]}")
    return sum(count for _, count in results), used


SATURATED = 0.5      # a group throttled in at least this share of its periods was at its budget


def _bound(used: dict, lookups: int, args) -> dict:
    """A row's accounting: each side's CPU (per look-up too) and throttled share over the window,
    and which side was saturated (``bound``: store, routers, or neither when the machine itself
    was: nothing throttled yet neither used its budget)."""
    if not used:
        return {}
    out: dict = {}
    for side, figures in used.items():
        periods = figures["periods"]
        share = figures["throttled_periods"] / periods if periods else 0.0
        out[f"{side}_cpu_window_s"] = figures["cpu_s"]
        out[f"{side}_throttled_periods"] = figures["throttled_periods"]
        out[f"{side}_periods"] = periods
        out[f"{side}_throttled_share"] = round(share, 3)
        out[f"{side}_cpu_per_lookup_us"] = round(1e6 * figures["cpu_s"] / lookups, 1) if lookups else None
    saturated = [side for side in ("store", "routers") if out[f"{side}_throttled_share"] >= SATURATED]
    out["bound"] = saturated[0] if len(saturated) == 1 else ("both" if saturated else "machine")
    return out


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


# ---------------------------------------------------------------- server side as workers

class WorkerBudgets:
    """A CPU budget per role: workers, the front and Redis may have different ones."""

    def __init__(self, args) -> None:
        self.groups = {}
        if args.no_cgroups:
            self.make = lambda budget: NoBudgets()
        else:
            self.make = lambda budget: CpuBudgets(budget, args.period_us, prefix="bbscale")
        self.by_kind = {"worker": self.make(args.budget_worker), "front": self.make(args.budget_front),
                        "redis": self.make(args.budget_redis)}

    def add(self, kind: str, name: str, pid: int) -> None:
        self.by_kind[kind].add(name, pid)

    def cleanup(self) -> None:
        for budgets in self.by_kind.values():
            budgets.cleanup()


class WorkerRig:
    """Redis, the front and ``workers`` workers for one configuration."""

    def __init__(self, args, budgets: WorkerBudgets, trace: Path, workers: int, workdir: Path) -> None:
        from fcd.stack import Stack
        self.args, self.budgets, self.trace, self.workers = args, budgets, trace, workers
        self.workdir = workdir
        self.stack = Stack(workdir, log_level="warning")
        self.redis: RedisServer | None = None

    async def start(self) -> None:
        from fcd.stack import free_port
        import socket
        self.redis = RedisServer(self.workdir / "redis")
        await self.redis.start()
        self.budgets.add("redis", f"redis-w{self.workers}", self.redis.role.proc.pid)
        self.udp, self.http = free_port(socket.SOCK_DGRAM), free_port()
        partitions = self.args.partitions
        common = ["--store", self.redis.url, "--city", str(self.trace), "--lease", "3"]
        front = self.stack.start("front", "fcd.server", [
            *common, "--udp", f"127.0.0.1:{self.udp}", "--http", f"127.0.0.1:{self.http}",
            "--partitions", str(partitions), "--max-backlog", str(max(1, self.args.max_backlog // partitions)),
            "--model-interval", "2"])
        await self.stack.wait_ready(front, timeout=120)
        self.budgets.add("front", f"front-w{self.workers}", front.proc.pid)
        for i in range(self.workers):
            worker = self.stack.start(f"worker{i}", "fcd.server", [*common, "--worker", "--worker-name", f"w{i}"])
            await self.stack.wait_ready(worker, timeout=120)
            self.budgets.add("worker", f"worker{i}-w{self.workers}", worker.proc.pid)
        deadline = time.monotonic() + 60
        while True:       # polled: ownership settles in Redis, no event reaches the experiment
            owners = {p["owner"] for p in (await asyncio.to_thread(_status, self.http))["stream"]["partitions"]}
            if len(owners - {""}) == min(self.workers, partitions) and "" not in owners:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"partitions not shared by {self.workers} workers: owners {owners}")
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        await self.stack.stop_all()
        if self.redis is not None:
            await self.redis.stop()

    @staticmethod
    def _applied(status: dict) -> int:
        totals = status["stream"]["totals"]
        return totals.get("probes", 0) + totals.get("lights", 0)

    async def measure(self, rate: float) -> dict:
        from fcd.stack import run_gen_async
        args = self.args
        before = await asyncio.to_thread(_status, self.http)
        gen = await run_gen_async(self.trace, [("127.0.0.1", self.udp)],
                                  ["--processes", "4", "--rate", str(rate), "--duration", str(args.duration)])
        sent = gen["sent"]
        await asyncio.sleep(args.settle)
        after = await asyncio.to_thread(_status, self.http)
        for _ in range(40):           # drained when the applied count stops moving (no event across processes)
            await asyncio.sleep(0.3)
            again = await asyncio.to_thread(_status, self.http)
            if self._applied(again) == self._applied(after) and not again["stream"]["totals"].get("backlog"):
                break
            after = again
        applied = self._applied(after) - self._applied(before)

        def delta(key: str) -> int:
            return after["stream"]["totals"].get(key, 0) - before["stream"]["totals"].get(key, 0)

        row = {"workers": self.workers, "offered_pps": rate, "sent": sent,
               "front_received": after["udp"]["datagrams"] - before["udp"]["datagrams"],
               "applied": applied, "refused": delta("refused_items"),
               "applied_by": {w: n - before["stream"]["totals"]["applied_by"].get(w, 0)
                              for w, n in after["stream"]["totals"]["applied_by"].items()},
               "loss": round(max(0.0, 1 - applied / sent), 4) if sent else 0.0}
        print(f"  workers={self.workers} offered={rate:>8.0f} pps  sent={sent:>7}  applied={applied:>7}  "
              f"refused={row['refused']:>6}  loss={row['loss']:.3f}", flush=True)
        return row


async def _worker_sweep(rig: WorkerRig, args) -> list[dict]:
    """Rates upwards until loss passes ``--stop-after-loss``; bisect between the last clean rate and the first lossy one."""
    rows, last_ok = [], None
    for rate in args.rates:
        row = await rig.measure(rate)
        rows.append(row)
        if row["loss"] > LOSS_KNEE:
            if last_ok is not None:
                lo, hi = last_ok, float(rate)
                for _ in range(args.refine):
                    mid = round((lo + hi) / 2)
                    extra = await rig.measure(mid)
                    rows.append(extra)
                    lo, hi = (lo, mid) if extra["loss"] > LOSS_KNEE else (mid, hi)
            break
        last_ok = float(rate)
    return sorted(rows, key=lambda r: r["offered_pps"])


async def worker_knees(args, workdir: Path) -> dict:
    trace = args.trace or default_trace(workdir, args.cars)
    budgets = WorkerBudgets(args)
    out: dict = {"budget_worker": None if args.no_cgroups else args.budget_worker,
                 "budget_front": None if args.no_cgroups else args.budget_front,
                 "budget_redis": None if args.no_cgroups else args.budget_redis,
                 "partitions": args.partitions, "max_backlog": args.max_backlog,
                 "knee_pps": {}, "worker_rows": []}
    try:
        for workers in args.workers:
            rig = WorkerRig(args, budgets, trace, workers, workdir / f"workers{workers}")
            try:
                await rig.start()
                rows = await _worker_sweep(rig, args)
            finally:
                await rig.stop()
            out["worker_rows"] += rows
            k = knee(rows, "loss")
            out["knee_pps"][str(workers)] = None if k is None else round(k, 1)
    finally:
        budgets.cleanup()
    kn = out["knee_pps"]
    if kn.get("1") and kn.get("4"):
        out["knee_ratio_4_over_1"] = round(kn["4"] / kn["1"], 2)
    return out


def _status(port: int) -> dict:
    from tools.bench_fcd import _status as status
    return status(port)


def run(args) -> int:
    if shutil.which("redis-server") is None and ("redis" in args.backends or args.workers):
        raise ConfigError("redis-server is not installed (tools/bootstrap.sh installs it as root)")
    city = grid_city(args.grid[0], args.grid[1])
    limit = 10 * city.n_roads + 100
    budgets = NoBudgets() if args.no_cgroups else CpuBudgets(args.budget, args.period_us, prefix="bbscale")
    # the routers get a group of their own: a budget of --router-budget cores (all of a small
    # machine by default), there to account their CPU and throttling, so a row says which side bound it
    router_budgets = NoBudgets() if args.no_cgroups else CpuBudgets(args.router_budget, args.period_us,
                                                                                  prefix="bbscale-routers")
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bbscale")) if own_workdir else args.workdir
    results: dict = {"budget_cpu": None if args.no_cgroups else args.budget,
                     "router_budget_cpu": None if args.no_cgroups else args.router_budget,
                     "grid": list(args.grid),
                     "roads": city.n_roads, "runs": args.runs, "duration_s": args.duration,
                     "router_processes": args.processes, "route_lookups": {}, "rows": []}
    try:
        if args.workers:
            results.update(asyncio.run(worker_knees(args, workdir)))
        for kind in args.backends:
            group = ProcessGroup(workdir / kind)
            address, pid, redis_server = _start_store(kind, workdir / kind, group)
            try:
                budgets.add(kind, pid)
                routers = None if args.no_cgroups else (router_budgets, f"routers-{kind}")
                accounts = None if args.no_cgroups else _Accounts({"store": (budgets, kind), "routers": routers})
                stored = asyncio.run(_populate(address, city.n_roads, args.runs))
                per_second: dict[str, float] = {}
                for clients in args.clients:
                    cpu_before = cpu_seconds(pid)
                    done, used = _measure(address, clients, min(args.processes, clients), limit, args.duration,
                                          routers, accounts)
                    cpu = cpu_seconds(pid) - cpu_before
                    rate = done / args.duration
                    per_second[str(clients)] = round(rate, 1)
                    row = {"store": kind, "clients": clients, "lookups": done,
                           "lookups_per_s": round(rate, 1), "tuples": stored, "store_cpu_s": round(cpu, 3)}
                    row.update(_bound(used, done, args))
                    results["rows"].append(row)
                    log.info("%s: %d routers, %.0f look-ups/s (%s)", kind, clients, rate, row.get("bound", "-"))
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
        router_budgets.cleanup()
    write_result(results, args.json, args.plot, _plot)
    if own_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worker_rows = results.get("worker_rows") or []
    lookups = any(results["route_lookups"].values())
    panels = (1 if lookups else 0) + (1 if worker_rows else 0)
    fig, axes = plt.subplots(1, max(1, panels), figsize=(6.4 * max(1, panels), 4.2), squeeze=False)
    ax, ax_w = axes[0][0], axes[0][-1]
    if worker_rows:
        for workers in sorted({r["workers"] for r in worker_rows}):
            sel = [r for r in worker_rows if r["workers"] == workers]
            ax_w.plot([r["offered_pps"] for r in sel], [100 * r["loss"] for r in sel], marker="o",
                      label=f"{workers} worker{'s' if workers > 1 else ''}: knee {results['knee_pps'].get(str(workers))}")
        ax_w.axhline(100 * LOSS_KNEE, color="grey", linewidth=0.8, linestyle="--")
        ax_w.set_xlabel("packets sent (p/s)")
        ax_w.set_ylabel("loss (%)")
        ax_w.set_title(f"server side as workers, {results.get('budget_worker')} core each")
        ax_w.grid(True, alpha=0.3)
        ax_w.legend(fontsize=8)
    if lookups or not worker_rows:
        _plot_lookups(results, ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_lookups(results: dict, ax) -> None:
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
    if any(results["route_lookups"].values()):
        ax.legend()


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
    p.add_argument("--budget", type=float, default=0.1,
                   help="the store's CPU budget (fraction of one core): small enough that the routers, "
                        "outside it, are not what limits the figure on a small machine (see each row's bound)")
    p.add_argument("--router-budget", type=float, default=float(os.cpu_count() or 1),
                   help="the routers' CPU budget in cores (default: every core; a group of their own, "
                        "to account their CPU and throttling)")
    p.add_argument("--period-us", type=int, default=100_000, help="CFS period")
    p.add_argument("--no-cgroups", action="store_true", help="run without CPU budgets")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--plot", type=Path, help="write the plot here (PNG)")
    p.add_argument("--workdir", type=Path, default=None, help="keep logs here (default: a temporary directory)")
    g = p.add_argument_group("server side as workers")
    g.add_argument("--workers", type=int_list, default=[], help="numbers of workers to compare, e.g. 1,2,4 "
                                                                "(default: none, route look-ups only)")
    g.add_argument("--rates", type=int_list, default=[1000, 2000, 4000, 8000, 12000, 16000, 24000, 32000,
                                                      40000, 48000, 64000], help="offered packet rates (p/s)")
    g.add_argument("--partitions", type=positive_int, default=4, help="partitions (districts) of the city")
    g.add_argument("--max-backlog", type=positive_int, default=8192,
                   help="datagrams waiting in the streams (all partitions) before the front refuses more")
    g.add_argument("--budget-worker", type=float, default=0.05, help="CPU budget of each worker (fraction of a core)")
    g.add_argument("--budget-front", type=float, default=0.25, help="CPU budget of the front")
    g.add_argument("--budget-redis", type=float, default=0.25, help="CPU budget of the Redis node")
    g.add_argument("--settle", type=float, default=1.6, help="seconds to let counters settle after each point")
    g.add_argument("--refine", type=int, default=2, help="bisection steps towards each knee")
    g.add_argument("--cars", type=int, default=1000, help="cars in the generated city")
    g.add_argument("--trace", type=Path, default=None, help="use this trace instead of generating one")
    p.set_defaults(func=run)
