"""``booster-loadgen fcd``: the paper's Fig. 7 - server load with and without booster boxes.

Each role is its own "machine": the server and every box (boxd + fcd-booster) run in their own
cgroup v1 CPU group with the same quota (``--budget`` of one core); the generators run outside
the budgets.  For each number of boxes the roles start once, then the generators offer each
rate in turn (load mode: the 1000-car trace in order at a fixed packet rate, four district
processes, district i to box i mod n; straight to the server without boxes).

Per point: packets sent, received and lost at the server (no boxes) or at the boxes (with boxes),
and the packets reaching the server (UDP datagrams + XML-RPC requests).  Loss is measured where
the paper measured it: at the server without boxes, at the boxes with them.  Also measured in
the same run: a plain socket sink's receive rate at the same budget, against the server's raw
ingest rate (``raw_ingest_ratio``, the median of ``--raw-reps`` back-to-back measurements), so
that no gain comes from a slow server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from cliruntime import ConfigError, int_list
from tools.output import write_result
from tools.stats import percentile

log = logging.getLogger("bench.fcd")

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
CGROUP_CPUACCT = Path("/sys/fs/cgroup/cpuacct")   # where v1 mounts cpuacct apart from cpu
LOSS_KNEE = 0.01        # the knee: offered load where loss first exceeds 1%
DEFAULT_RATES = [1000, 4000, 8000, 12000, 16000, 20000, 24000, 28000, 32000, 40000, 48000, 56000, 64000, 72000,
                 80000]


# ---------------------------------------------------------------- CPU budgets

class CpuBudgets:
    """cgroup v1 CPU groups, one per role, each with quota = budget x period, under one parent
    named ``prefix`` + a random suffix (so that each experiment's groups are told apart)."""

    def __init__(self, budget: float, period_us: int, prefix: str = "bbfcd") -> None:
        if not (CGROUP_CPU / "cgroup.procs").exists():
            raise ConfigError(f"no cgroup v1 cpu controller at {CGROUP_CPU}")
        if os.geteuid() != 0:
            raise ConfigError("CPU budgets need root (cgroup v1)")
        self.budget, self.period_us = budget, period_us
        self.quota_us = int(round(budget * period_us))
        if self.quota_us < 1000:
            raise ConfigError(f"quota {self.quota_us}us is below the kernel's 1000us minimum: raise --period-us")
        self.base = CGROUP_CPU / f"{prefix}-{secrets.token_hex(3)}"
        self.base.mkdir()
        self.groups: dict[str, Path] = {}
        # CPU used is read from cpuacct: the cpu group itself when both controllers share a
        # mount, else a twin group under the separate cpuacct mount holding the same processes
        self.acct_base = None
        if not (self.base / "cpuacct.usage").exists() and (CGROUP_CPUACCT / "cpuacct.usage").exists():
            self.acct_base = CGROUP_CPUACCT / self.base.name
            self.acct_base.mkdir()
        self.acct_groups: dict[str, Path] = {}

    def group(self, name: str) -> Path:
        if name not in self.groups:
            path = self.base / name
            path.mkdir()
            (path / "cpu.cfs_period_us").write_text(str(self.period_us))
            (path / "cpu.cfs_quota_us").write_text(str(self.quota_us))
            self.groups[name] = path
            if self.acct_base is not None:
                self.acct_groups[name] = self.acct_base / name
                self.acct_groups[name].mkdir()
        return self.groups[name]

    def add(self, name: str, pid: int) -> None:
        (self.group(name) / "cgroup.procs").write_text(str(pid))
        if name in self.acct_groups:
            (self.acct_groups[name] / "cgroup.procs").write_text(str(pid))

    def usage_s(self, name: str) -> float:
        """CPU seconds the group's processes have used (nan without a cpuacct controller)."""
        group = self.group(name)
        try:
            return int((self.acct_groups.get(name, group) / "cpuacct.usage").read_text()) / 1e9
        except OSError:
            return float("nan")

    def periods(self, name: str) -> tuple[int, int]:
        """(CFS periods elapsed, periods in which the group was throttled) so far."""
        stat = dict(line.split() for line in (self.group(name) / "cpu.stat").read_text().splitlines())
        return int(stat.get("nr_periods", 0)), int(stat.get("nr_throttled", 0))

    def throttled(self, name: str) -> int:
        for line in (self.group(name) / "cpu.stat").read_text().splitlines():
            k, v = line.split()
            if k == "nr_throttled":
                return int(v)
        return 0

    def cleanup(self) -> None:
        for root, groups, base in ((CGROUP_CPU, self.groups, self.base),
                                   (CGROUP_CPUACCT, self.acct_groups, self.acct_base)):
            for path in list(groups.values()):
                try:
                    pids = (path / "cgroup.procs").read_text().split()
                    for pid in pids:   # our own processes only; they should be gone already
                        (root / "cgroup.procs").write_text(pid)
                    path.rmdir()
                except OSError as exc:
                    log.warning("cannot remove cgroup %s: %s", path, exc)
            if base is None:
                continue
            try:
                base.rmdir()
            except OSError as exc:
                log.warning("cannot remove cgroup %s: %s", base, exc)


class NoBudgets:
    budget = None

    def add(self, name: str, pid: int) -> None:
        pass

    def usage_s(self, name: str) -> float:
        return float("nan")

    def cleanup(self) -> None:
        pass


# ---------------------------------------------------------------- helpers

SINK = r"""
import signal, socket, sys, json
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.setsockopt(socket.SOL_SOCKET, 33, 4 * 1024 * 1024)
except OSError:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
n = 0
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
s.settimeout(0.2)
recv = s.recv
while not stop:
    try:
        recv(2048)
        n += 1
    except (socket.timeout, InterruptedError):
        pass
print(n, flush=True)
"""


def _status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=20) as resp:
        return json.loads(resp.read())


def knee(rows: list[dict], key: str, threshold: float = LOSS_KNEE) -> float | None:
    """Offered load at which loss first exceeds ``threshold`` (linear interpolation between the
    last point at or below it and the first above)."""
    prev = None
    for row in rows:
        loss = row[key]
        if loss > threshold:
            if prev is None:
                return float(row["offered_pps"])
            lo, hi = prev, row
            frac = (threshold - lo[key]) / max(hi[key] - lo[key], 1e-12)
            return float(lo["offered_pps"] + frac * (hi["offered_pps"] - lo["offered_pps"]))
        prev = row
    return None


def cpu_by_stage(before: dict, after: dict, datagrams: int) -> dict:
    """The server's CPU microseconds per datagram received between two ``/status`` answers, per
    stage of its raw path (``cpu_s``: receive, ingest, reports, model) and in all (``process``);
    ``other``: the rest (the event loop, HTTP, garbage collection)."""
    per = {k: (after[k] - before[k]) / datagrams * 1e6 for k in after if k in before}
    per["other"] = per["process"] - sum(v for k, v in per.items() if k != "process")
    return {k: round(v, 3) for k, v in per.items()}


# ---------------------------------------------------------------- the experiment

async def calibrate_sink(budgets, trace: Path, rate: float, duration: float, settle: float,
                         workdir: Path) -> tuple[float, int, float]:
    """A plain socket sink in the "sink" budget under ``rate``: (datagrams per second of the
    load, datagrams received, CPU seconds the sink's group used meanwhile)."""
    from boxcore.procs import ProcessGroup
    from fcd.stack import run_gen_async
    group = ProcessGroup(workdir)
    sink = group.start("sink", [sys.executable, "-c", SINK], stats=False)
    try:
        await group.wait_for_log(sink, "\n")          # its first line is the port it bound
        port = int(sink.output().split()[0])
        budgets.add("sink", sink.proc.pid)
        cpu_before = budgets.usage_s("sink")
        gen = await run_gen_async(trace, [("127.0.0.1", port)],
                                  ["--processes", "4", "--rate", str(rate), "--duration", str(duration)])
        await asyncio.sleep(settle)
    finally:
        await group.stop(sink, grace=10)     # on SIGTERM it prints how many datagrams it received
    received = min(int(sink.output().split()[-1]), gen["sent"])
    return received / duration, received, budgets.usage_s("sink") - cpu_before


async def raw_ingest(rig: "Rig", budgets, trace: Path, args, workdir: Path) -> dict:
    """The server's raw ingest against a plain socket sink at the same budget under the same
    overload, ``--raw-reps`` times, interleaved (sink then server, then server then sink, ...) so
    that background load and drift hit both alike.

    Two ratios per repetition: by rate (datagrams received / duration; both also drain their
    socket buffers after the load stops, so this counts more than the window) and per CPU
    second (datagrams / CPU seconds the role's cgroup used: what the budget buys, independent of
    how much backlog each drained).  ``raw_ingest_ratio`` is the median of the per-CPU ratios
    where the cgroups account CPU (the by-rate ratios otherwise), with its spread."""
    calib_rate = args.calibration_rate or max(args.rates)
    reps = []
    for rep in range(args.raw_reps):
        measured: dict = {}
        for role in (("sink", "server") if rep % 2 == 0 else ("server", "sink")):
            if role == "sink":
                measured["sink"] = await calibrate_sink(budgets, trace, calib_rate, args.duration, args.settle,
                                                        workdir / "calibration")
            else:
                cpu_before = budgets.usage_s("server")
                row = await rig.measure(0, calib_rate)
                got = row["server_udp_received"]
                measured["server"] = (got / args.duration, got, budgets.usage_s("server") - cpu_before)
                measured["stages"] = row.get("server_cpu_us_per_datagram")
        (sink_pps, sink_n, sink_cpu), (server_pps, server_n, server_cpu) = measured["sink"], measured["server"]
        entry = {"first": "sink" if rep % 2 == 0 else "server", "sink_pps": round(sink_pps, 1),
                 "server_pps": round(server_pps, 1),
                 "ratio_by_rate": round(server_pps / sink_pps, 3) if sink_pps else None}
        if sink_cpu > 0 and server_cpu > 0 and math.isfinite(sink_cpu + server_cpu):
            entry.update(sink_cpu_s=round(sink_cpu, 3), server_cpu_s=round(server_cpu, 3),
                         sink_per_cpu_s=round(sink_n / sink_cpu, 1), server_per_cpu_s=round(server_n / server_cpu, 1),
                         ratio_per_cpu=round((server_n / server_cpu) / (sink_n / sink_cpu), 3) if sink_n else None)
        if measured.get("stages"):
            entry["server_cpu_us_per_datagram"] = measured["stages"]
        reps.append(entry)
        print(f"  raw ingest {rep + 1}/{args.raw_reps} ({entry['first']} first): plain sink {sink_pps:.0f} pps, "
              f"server {server_pps:.0f} pps (offered {calib_rate:.0f}); ratio by rate {entry['ratio_by_rate']}, "
              f"per CPU second {entry.get('ratio_per_cpu')}; server CPU us per datagram "
              f"{entry.get('server_cpu_us_per_datagram')}", flush=True)

    def summary(key: str) -> dict | None:
        values = [r[key] for r in reps if r.get(key) is not None]
        if not values:
            return None
        return {"median": round(percentile(values, 0.5), 3), "min": min(values), "max": max(values),
                "values": values}

    by_rate, per_cpu = summary("ratio_by_rate"), summary("ratio_per_cpu")
    staged = [r["server_cpu_us_per_datagram"] for r in reps if r.get("server_cpu_us_per_datagram")]
    stages = {k: round(percentile([s[k] for s in staged], 0.5), 3) for k in staged[0]} if staged else None
    primary = per_cpu or by_rate
    return {"calibration_pps": calib_rate, "raw_reps": reps,
            "sink_pps": round(percentile([r["sink_pps"] for r in reps], 0.5), 1) if reps else None,
            "server_raw_pps": round(percentile([r["server_pps"] for r in reps], 0.5), 1) if reps else None,
            "raw_ingest_ratio_by_rate": by_rate, "raw_ingest_ratio_per_cpu": per_cpu,
            "raw_ingest_ratio_kind": "per_cpu" if per_cpu else "by_rate",
            "raw_ingest_ratios": primary["values"] if primary else [],
            "raw_ingest_ratio": primary["median"] if primary else None,
            "raw_ingest_spread": [primary["min"], primary["max"]] if primary else None,
            "server_cpu_us_per_datagram": stages}


class Rig:
    """The server and the boxes, started once; each measurement sends to 0..n of the boxes."""

    def __init__(self, args, budgets, trace: Path, n_boxes: int, workdir: Path) -> None:
        from fcd.stack import Stack
        self.args, self.budgets, self.trace, self.n_boxes = args, budgets, trace, n_boxes
        self.stack = Stack(workdir, log_level=args.log_level if args.log_level != "info" else "warning")
        self.box_ports: list[int] = []

    async def start(self) -> None:
        from fcd.stack import free_port
        self.udp, self.http = free_port(2), free_port()
        server = self.stack.server(self.trace, self.udp, self.http, None, ["--model-interval", "2"])
        await self.stack.wait_ready(server, timeout=60)
        self.budgets.add("server", server.proc.pid)       # after start-up: imports are not charged
        for i in range(self.n_boxes):
            port = free_port(2)
            boxd, booster = await self.stack.box(
                f"box{i}", self.trace, port, self.udp, self.http,
                # no dashboard panel: at a box's tiny CPU budget its map would cost measurable time
                booster_extra=["--stats-interval", str(self.args.box_stats_interval), "--panel-interval", "0"])
            self.budgets.add(f"box{i}", boxd.proc.pid)
            self.budgets.add(f"box{i}", booster.proc.pid)
            self.box_ports.append(port)
        await asyncio.sleep(0.5)

    async def stop(self) -> None:
        await self.stack.stop_all()

    def _received(self, status: dict, n_boxes: int) -> int:
        if n_boxes == 0:
            return status["udp"]["received"]
        return sum(status["boxes"].get(f"box{i}", {}).get("received", 0) for i in range(n_boxes))

    def _stats_seq(self, status: dict, n_boxes: int) -> list[int]:
        return [status["boxes"].get(f"box{i}", {}).get("stats_seq", 0) for i in range(n_boxes)]

    async def _drained(self, before: dict, sent: int, n_boxes: int) -> dict:
        """Status once the receivers have processed their backlog (or sent was all received).

        The server answers live: drained when its count stops moving.  A box reports its
        counters on the data's time and once more when the data stops (``idle``): drained when
        every box's newest report is such a final one, newer than the point's start."""
        args = self.args
        await asyncio.sleep(args.settle)
        after = await asyncio.to_thread(_status, self.http)
        if n_boxes == 0:
            for _ in range(8):
                if self._received(after, 0) - self._received(before, 0) >= sent:
                    break
                await asyncio.sleep(0.3)
                again = await asyncio.to_thread(_status, self.http)
                if self._received(again, 0) == self._received(after, 0):
                    return again
                after = again
            return after
        seq0 = self._stats_seq(before, n_boxes)
        for _ in range(120):                 # polled: there is no event across processes
            boxes = [after["boxes"].get(f"box{i}", {}) for i in range(n_boxes)]
            if all(b.get("idle") and b.get("stats_seq", 0) > s0 for b, s0 in zip(boxes, seq0)):
                break
            await asyncio.sleep(0.25)
            after = await asyncio.to_thread(_status, self.http)
        return after

    async def measure(self, n_boxes: int, rate: float) -> dict:
        from fcd.stack import run_gen_async
        args = self.args
        targets = [("127.0.0.1", p) for p in self.box_ports[:n_boxes]] or [("127.0.0.1", self.udp)]
        before = await asyncio.to_thread(_status, self.http)
        gen = await run_gen_async(self.trace, targets, ["--processes", str(max(4, n_boxes)), "--rate", str(rate),
                                                        "--duration", str(args.duration)])
        sent = gen["sent"]
        after = await self._drained(before, sent, n_boxes)
        d_udp = after["udp"]["received"] - before["udp"]["received"]
        d_http = after["counters"].get("http_requests", 0) - before["counters"].get("http_requests", 0)
        box_received = self._received(after, n_boxes) - self._received(before, n_boxes) if n_boxes else 0
        def delta(key: str) -> int:
            return after["counters"].get(key, 0) - before["counters"].get(key, 0)

        # Every rate replays the same trace from its start, so a road report the server already
        # holds is counted as a duplicate: it still reached the server, and is counted here too.
        reports = delta("reports_box") + delta("reports_raw") + delta("duplicate_reports")
        row = {
            "boxes": n_boxes, "offered_pps": rate, "sent": sent, "achieved_pps": round(sent / args.duration, 1),
            "server_received_pps": round((d_udp + d_http) / args.duration, 1),
            "server_udp_received": d_udp, "server_http_requests": d_http,
            "server_loss": round(max(0.0, 1 - d_udp / sent), 4) if n_boxes == 0 and sent else 0.0,
            "box_received": box_received,
            "box_loss": round(max(0.0, 1 - box_received / sent), 4) if n_boxes and sent else None,
            "reports": reports,
        }
        row["loss"] = row["server_loss"] if n_boxes == 0 else row["box_loss"]
        if n_boxes == 0 and d_udp and "cpu_s" in before and "cpu_s" in after:
            row["server_cpu_us_per_datagram"] = cpu_by_stage(before["cpu_s"], after["cpu_s"], d_udp)
        print(f"  boxes={n_boxes} offered={rate:>8.0f} pps  sent={sent:>7}  "
              f"{'server' if n_boxes == 0 else 'boxes'} received={d_udp if n_boxes == 0 else box_received:>7}  "
              f"loss={row['loss']:.3f}  server received {row['server_received_pps']:.1f} pps", flush=True)
        return row


async def sweep(rig: Rig, args, configs: list[int], rates: list[int]) -> list[dict]:
    """Every rate for every configuration, interleaved (so background load hits all alike);
    after a configuration's first lossy rate, bisect towards its knee; stop it past
    ``--stop-after-loss``."""
    rows: list[dict] = []
    active = list(configs)
    last_ok: dict[int, float | None] = {b: None for b in configs}
    refined: set[int] = set()
    for rate in rates:
        for n_boxes in list(active):
            row = await rig.measure(n_boxes, rate)
            rows.append(row)
            if row["loss"] > LOSS_KNEE and n_boxes not in refined:
                refined.add(n_boxes)
                if last_ok[n_boxes] is not None:
                    lo, hi = last_ok[n_boxes], float(rate)
                    for _ in range(args.refine):
                        mid = round((lo + hi) / 2)
                        extra = await rig.measure(n_boxes, mid)
                        rows.append(extra)
                        if extra["loss"] > LOSS_KNEE:
                            hi = mid
                        else:
                            lo = mid
            elif row["loss"] <= LOSS_KNEE:
                last_ok[n_boxes] = float(rate)
            if row["loss"] > args.stop_after_loss:
                active.remove(n_boxes)
        if not active:
            break
    return sorted(rows, key=lambda r: (r["boxes"], r["offered_pps"]))


def default_trace(workdir: Path, cars: int) -> Path:
    """The experiments' city: an 8x8 grid in 4 districts, ``cars`` cars for 600 s (made once per workdir)."""
    from fcd.city import grid_city
    from fcd.sim import Simulator
    workdir.mkdir(parents=True, exist_ok=True)
    trace = workdir / f"city{cars}.npz"
    if not trace.exists():
        city = grid_city(8, 8, block=200.0, seed=1, districts=4)
        Simulator(city, cars=cars, seed=1).run(600.0).save(trace)
    return trace


async def experiment(args) -> dict:
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    trace = args.trace or default_trace(workdir, args.cars)
    period = args.period_us or max(10_000, int(math.ceil(1000 / max(args.budget, 1e-6))))
    budgets = NoBudgets() if args.no_cgroups else CpuBudgets(args.budget, period)
    started = time.monotonic()
    results: dict = {"budget_cpu": None if args.no_cgroups else args.budget,
                     "cfs_period_us": None if args.no_cgroups else period, "duration_s": args.duration,
                     "cars": args.cars, "rows": []}
    try:
        print(f"fcd bench: budget {results['budget_cpu']} core per role, {args.duration}s per point", flush=True)
        rig = Rig(args, budgets, trace, max(args.boxes), workdir / "roles")
        try:
            await rig.start()
            results["rows"] = await sweep(rig, args, sorted(args.boxes), args.rates)
            results.update(await raw_ingest(rig, budgets, trace, args, workdir))
        finally:
            await rig.stop()
    finally:
        budgets.cleanup()
    rows = results["rows"]
    results["knee_pps"] = {}
    for n_boxes in args.boxes:
        sel = [r for r in rows if r["boxes"] == n_boxes]
        k = knee(sel, "loss")
        results["knee_pps"][str(n_boxes)] = None if k is None else round(k, 1)
    # reduction factor: packets reaching the server without boxes / with boxes, at the lowest rate
    # (1000 p/s by default: the 1000-car city in real time), worst case over the box counts
    base = {r["offered_pps"]: r for r in rows if r["boxes"] == 0}
    factors = {}
    for n_boxes in [b for b in args.boxes if b]:
        for r in rows:
            if r["boxes"] == n_boxes and r["offered_pps"] in base and r["server_received_pps"] > 0:
                factors[str(n_boxes)] = round(base[r["offered_pps"]]["server_received_pps"] / r["server_received_pps"], 1)
                break
    results["reduction_factor_by_boxes"] = factors
    results["reduction_factor"] = min(factors.values()) if factors else None
    kn = results["knee_pps"]

    def ratio(a: str, b: str):
        if kn.get(a) is None or kn.get(b) in (None, 0):
            return None
        return round(kn[a] / kn[b], 2)

    results["knee_ratio_2_over_1"] = ratio("2", "1")
    results["knee_ratio_4_over_0"] = ratio("4", "0")
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    rows = results["rows"]
    for n_boxes in sorted({r["boxes"] for r in rows}):
        sel = [r for r in rows if r["boxes"] == n_boxes]
        x = [r["offered_pps"] for r in sel]
        if n_boxes == 0:
            recv = [r["server_udp_received"] / results["duration_s"] for r in sel]
            loss = [r["server_loss"] for r in sel]
            label = "no box (at the server)"
        else:
            recv = [r["box_received"] / results["duration_s"] for r in sel]
            loss = [r["box_loss"] for r in sel]
            label = f"{n_boxes} box{'es' if n_boxes > 1 else ''} (at the boxes)"
        line, = ax1.plot(x, recv, marker="o", label=label)
        ax2.plot(x, [100 * l for l in loss], marker="o", color=line.get_color(), label=label)
        ax3.plot(x, [r["server_received_pps"] for r in sel], marker="o", color=line.get_color(),
                 label=f"{n_boxes} box{'es' if n_boxes != 1 else ''}")
    top = max(r["offered_pps"] for r in rows)
    ax1.plot([0, top], [0, top], color="grey", linewidth=0.8, linestyle="--", label="received = sent")
    ax1.set_xlabel("packets sent (p/s)")
    ax1.set_ylabel("packets received (p/s)")
    ax1.set_title("received vs sent")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("packets sent (p/s)")
    ax2.set_ylabel("loss (%)")
    ax2.set_title(f"loss (budget {results['budget_cpu']} core per role)")
    ax2.legend(fontsize=7)
    ax3.set_yscale("log")
    ax3.set_xlabel("packets sent (p/s)")
    ax3.set_ylabel("packets reaching the server (p/s, log)")
    ax3.set_title("server load: datagrams + XML-RPC requests")
    ax3.legend(fontsize=7)
    fig.suptitle(f"FCD: booster boxes vs server load - reduction factor {results.get('reduction_factor')}, "
                 f"knees {results.get('knee_pps')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args) -> int:
    if not args.rates or any(r <= 0 for r in args.rates):
        raise ConfigError("--rates needs positive packet rates")
    if not args.boxes or any(b < 0 for b in args.boxes):
        raise ConfigError("--boxes needs non-negative box counts")
    if args.raw_reps < 1:
        raise ConfigError("--raw-reps needs at least one measurement")
    if not 0 < args.budget <= 1:
        raise ConfigError("--budget is a fraction of one core in (0, 1]")
    args.rates = sorted(args.rates)
    keep = args.workdir is not None
    if not keep:
        args.workdir = Path(tempfile.mkdtemp(prefix="bbfcd-bench-"))
    try:
        results = asyncio.run(experiment(args))
    except BaseException:
        print(f"booster-loadgen fcd: logs kept in {args.workdir}", file=sys.stderr)
        raise
    if not keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    write_result(results, args.json, args.plot, plot, echo=False)
    print(json.dumps({k: v for k, v in results.items() if k != "rows"}, indent=2))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fcd", help="FCD server load with and without booster boxes (paper Fig. 7)",
        description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
        epilog="examples:\n  booster-loadgen fcd --rates 1000,4000,8000,16000 --boxes 0,1,2,4 "
               "--json out/fcd.json --plot out/fcd.png\n"
               "  booster-loadgen fcd --budget 0.1 --boxes 0,2 --json out/fcd.json")
    p.add_argument("--rates", type=int_list, default=DEFAULT_RATES, help="offered packet rates (p/s)")
    p.add_argument("--boxes", type=int_list, default=[0, 1, 2, 4], help="numbers of boxes to compare")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--plot", type=Path, help="write the Fig. 7 plot here (PNG)")
    p.add_argument("--budget", type=float, default=0.05, help="CPU budget per role (fraction of one core)")
    p.add_argument("--period-us", type=int, default=None, help="CFS period (default: quota of 1 ms or more)")
    p.add_argument("--duration", type=float, default=2.0, help="seconds of load per point")
    p.add_argument("--box-stats-interval", type=float, default=1.0,
                   help="seconds between the boxes' counter reports (must be well below --settle)")
    p.add_argument("--refine", type=int, default=2,
                   help="bisection steps between the last clean rate and the first lossy one")
    p.add_argument("--settle", type=float, default=1.6, help="seconds to let counters settle after each point")
    p.add_argument("--stop-after-loss", type=float, default=0.25,
                   help="skip a configuration's higher rates once its loss exceeds this")
    p.add_argument("--calibration-rate", type=float, default=None,
                   help="overload rate for the sink/server raw calibration (default: the highest rate)")
    p.add_argument("--raw-reps", type=int, default=5,
                   help="interleaved sink/server raw ingest measurements; raw_ingest_ratio is their median")
    p.add_argument("--cars", type=int, default=1000, help="cars in the generated city")
    p.add_argument("--trace", type=Path, default=None, help="use this trace instead of generating one")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep logs and the trace here (default: a temporary directory, removed after a success)")
    p.add_argument("--no-cgroups", action="store_true", help="run without CPU budgets")
    p.set_defaults(func=run)
