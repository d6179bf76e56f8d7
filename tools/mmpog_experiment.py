"""The ``mmpog-bots`` experiment: start what a game session needs, run the bots, measure.

The bots themselves (their behaviour, the worker process) live in :mod:`mmpog.bots`; this
module is the experiment around them: the processes (a reflector - standalone, or a booster
on a boxd it starts - and the impairing relay) through :class:`boxcore.procs.ProcessGroup`,
the game server in this process, the bots here or in worker processes started together at
one monotonic time, the analysis (percentiles from :mod:`tools.stats`), and with
``--loss-mode iptables`` the whole session re-run inside a fresh namespace from
:mod:`boxcore.lab` whose iptables drop ``--loss`` of the datagrams each way.

A (packet, receiver) pair is *expected* when the receiver stayed in the sender's location
from ``GUARD`` seconds before the send until the packet's deadline after it.  JSON:
``reliable``/``unreliable`` {``sent``, ``expected``, ``delivered_ratio``,
``delivered_within_deadline_ratio``, ``latency_ms`` {``p50``, ``p90``, ``p99``, ``max``},
``first_second_latency_ms``, ``arrival_latency_ms`` (the same deliveries timed by the kernel's
arrival stamp at the bot's socket), ``per_second`` and ``first_second_per_tenth`` (each second of
play, and each tenth of the first, on its own: p99 at the game and at the socket, the senders' RTO
at send), ``at_start_ms`` (what the join left the estimators with)}, ``duplicates_delivered``,
``retransmissions``, ``reflector_pps``, ``reflector_updates_per_s``, ``cpu_share`` (CPU seconds per
second of play, per process), ``cpu_budget`` (``--budget``: each role in its own cgroup v1 CPU
group), ``bots_gc`` / ``reflector_gc`` (garbage collections during play), and details.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import aiohttp
from aiohttp import web

from boxcore.procs import ProcessGroup, free_port, python_module
from cliruntime import ConfigError, RunContext, make_parser, non_negative_float, positive_int, probability, run_async
from cliruntime.supervisor import Supervisor
from mmpog.bots import CELL, GUARD, Bot, Params, load_bots, run_bots
from mmpog.reliability import ClientConfig
from mmpog.server import GameServer, ReflectorInfo, World
from tools.stats import cpu_seconds, sleeps
from tools.stats import summary

log = logging.getLogger("mmpog.bots")


async def _wait_http(url: str, role, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
        while True:
            if role is not None and role.proc.poll() is not None:
                raise RuntimeError(f"{role.name} exited with status {role.proc.returncode}: {role.tail()}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up within {timeout} s")
            await asyncio.sleep(0.05)


async def _reflector_stats(http: aiohttp.ClientSession, url: str, api_key: str) -> dict:
    async with http.get(url + "/stats", headers={"Authorization": f"Bearer {api_key}"}) as resp:
        resp.raise_for_status()
        return await resp.json()


# ====================================================================== CPU budgets

# set by our own code for a child it starts with `ip netns exec` (a private mount namespace)
PRIVATE_MOUNTS = "MMPOG_PRIVATE_MOUNTS"


def cpu_budgets(budget: float, period_us: int):
    """One cgroup v1 CPU group per role, each ``budget`` cores (``tools.bench_fcd.CpuBudgets``, as
    ``booster-loadgen fcd`` does), or None when ``budget`` is 0.

    Inside ``ip netns exec`` (every session with iptables loss runs there) /sys is a fresh sysfs
    without the cgroup mounts: the cpu hierarchy is mounted again, in the private mount namespace
    ``ip netns exec`` gave this process (nothing shows outside it; the groups are the host's own).
    """
    if not budget:
        return None
    from tools.bench_fcd import CGROUP_CPU, CpuBudgets

    if not (CGROUP_CPU / "cgroup.procs").exists() and os.environ.get(PRIVATE_MOUNTS) == "1":
        subprocess.run(["mount", "-t", "tmpfs", "bbcgroup", str(CGROUP_CPU.parent)], check=True)
        CGROUP_CPU.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "cgroup", "-o", "cpu", "cgroup", str(CGROUP_CPU)], check=True)
    return CpuBudgets(budget, period_us, prefix="bbmmpog")


def _throttled(budgets, names) -> dict:
    """How many CFS periods so far each role hit its budget in."""
    return {name: budgets.throttled(name) for name in names} if budgets is not None else {}


# ====================================================================== analysis

def _percentiles(values: list[float]) -> dict:
    return summary(values, (50, 90, 99), scale=1000, digits=3, with_max=True)


def _per_second(seconds: dict[int, dict], p99_ms: float | None, label: str = "second") -> list[dict]:
    """Each second of play on its own: its p99 at the game and at the socket, the senders' RTO when they
    sent (reliable), and of its deliveries above the whole run's p99 how many carried an update its
    sender had to resend (a lost way up: every member late by the sender's RTO) - where a first second
    out of line comes from."""
    out = []
    for number in sorted(seconds):
        second = seconds[number]
        late = [resent for latency, resent in zip(second["latencies"], second["resent"])
                if p99_ms is not None and latency * 1000 > p99_ms]
        rto = second["rto"]
        out.append({label: number, "sent": second["sent"], "delivered": len(second["latencies"]),
                    "p99_ms": _percentiles(second["latencies"])["p99"],
                    "arrival_p99_ms": _percentiles(second["arrivals"])["p99"],
                    "rto_at_send_ms": summary(rto, (50, 90), scale=1000, digits=3) if rto else None,
                    "above_run_p99": len(late), "above_run_p99_sender_resent": sum(late)})
    return out


def analyse(bots: list[Bot], deadline: float) -> dict:
    """Expected (packet, receiver) pairs vs what arrived; latency percentiles per class."""
    by_location: dict[int, list[tuple[float, float, int, bool]]] = {}
    for bot in bots:
        for number, (location, start, end) in enumerate(bot.intervals):
            final = number == len(bot.intervals) - 1      # still there when the run ended
            by_location.setdefault(location, []).append((start, end, bot.index, final))
    out = {}
    t_first = min((sent_at for bot in bots for _, sent_at, _, _ in bot.sent), default=0.0)
    for reliable, name in ((True, "reliable"), (False, "unreliable")):
        sent = expected = got = in_time = 0
        expired = reported = sender_left = receiver_left = pending = unaccounted = 0
        latencies, first_second, arrivals = [], [], []
        seconds: dict[int, dict] = {}        # second of play -> what its updates met (the cold start beside the rest)
        tenths: dict[int, dict] = {}
        for bot in bots:
            for number, sent_at, location, is_reliable in bot.sent:
                if is_reliable != reliable:
                    continue
                sent += 1
                since = sent_at - t_first
                if since < 1.0:      # the first second in tenths: when in it is the cold start?
                    tenth = tenths.setdefault(int(since * 10), {"latencies": [], "arrivals": [], "rto": [],
                                                                "resent": [], "sent": 0})
                    tenth["sent"] += 1
                second = seconds.setdefault(int(since), {"latencies": [], "arrivals": [], "rto": [],
                                                                     "resent": [], "sent": 0})
                second["sent"] += 1
                resent = number in bot.resent
                if reliable:
                    rto = bot.rto_at_send.get(number)
                    if rto is not None:
                        second["rto"].append(rto)
                        if since < 1.0:
                            tenth["rto"].append(rto)
                for start, end, index, final in by_location.get(location, ()):
                    if index == bot.index or start > sent_at - GUARD or end < sent_at + deadline:
                        continue
                    expected += 1
                    latency = bots[index].got.get((bot.index, number))
                    if latency is not None:
                        got += 1
                        latencies.append(latency)
                        second["latencies"].append(latency)
                        second["resent"].append(resent)
                        if since < 1.0:
                            tenth["latencies"].append(latency)
                            tenth["resent"].append(resent)
                        arrival = bots[index].arrived.get((bot.index, number))
                        if arrival is not None:
                            arrivals.append(arrival)
                            second["arrivals"].append(arrival)
                            if since < 1.0:
                                tenth["arrivals"].append(arrival)
                        if sent_at < t_first + 1.0:
                            first_second.append(latency)
                        if latency <= deadline:
                            in_time += 1
                    elif reliable:
                        # the protocol's promise: not received means reported, at one end or the other
                        # (or not yet: still being recovered, or an end left the location first)
                        seq = bot.echo_seq.get(number)
                        if number in bot.expired_numbers:
                            expired += 1
                        elif seq is None:
                            sender_left += 1          # no echo and no expiry: the sender never finished
                        elif (location, seq) in bots[index].lost:
                            reported += 1
                        elif not final:
                            receiver_left += 1
                        elif (location, seq) in bots[index].missing_at_end:
                            pending += 1
                        else:
                            unaccounted += 1
        out[name] = {
            "sent": sent, "expected": expected,
            "delivered_ratio": round(got / expected, 6) if expected else None,
            "delivered_within_deadline_ratio": round(in_time / expected, 6) if expected else None,
            "latency_ms": _percentiles(latencies),
            "first_second_latency_ms": _percentiles(first_second),    # cold start, measured on its own
            # the same deliveries timed at the receiving bot's socket (the kernel's arrival stamp of the
            # datagram that carried them): latency_ms minus this is the bot process's own queueing
            "arrival_latency_ms": _percentiles(arrivals),
        }
        out[name]["per_second"] = _per_second(seconds, out[name]["latency_ms"]["p99"])
        out[name]["first_second_per_tenth"] = _per_second(tenths, out[name]["latency_ms"]["p99"], "tenth")
        if reliable:
            # what the join left each sender's estimator with when play began (the first sends' RTO)
            started = [bot.rtt_at_start for bot in bots if bot.rtt_at_start and bot.rtt_at_start[0] is not None]
            out[name]["at_start_ms"] = {"srtt": summary([srtt for srtt, _ in started], (50, 90), scale=1000, digits=3,
                                                        with_max=True),
                                        "rto": summary([rto for _, rto in started], (50, 90), scale=1000, digits=3,
                                                       with_max=True)}
            out[name]["missed"] = {"expired_at_sender": expired, "reported_unrecoverable": reported,
                                   "sender_left": sender_left, "receiver_left": receiver_left,
                                   "still_recovering": pending, "unaccounted": unaccounted}
    return out



async def run_experiment(params: Params, say: Callable[[str], None] | None = None,
                         stop: asyncio.Event | None = None, bots_out: list | None = None) -> dict:
    """Run one bots session on loopback; returns the JSON-able figures (and extends ``bots_out``, when
    given, with every :class:`Bot`: per-update data for ``tools.mmpog_hops``)."""
    params.validate()
    say = say or (lambda line: None)
    stop = stop or asyncio.Event()
    boxd = None
    runner: web.AppRunner | None = None
    with tempfile.TemporaryDirectory(prefix="mmpog-bots-") as scratch_dir:
        scratch = Path(scratch_dir)
        group = ProcessGroup(scratch / "procs")
        supervisor = Supervisor("mmpog-bots", logger=log)
        budgets = cpu_budgets(params.budget, params.budget_period_us)
        if budgets is not None:
            group.on_start = lambda role: budgets.add(role.name, role.proc.pid)
        try:
            # ---------------------------------------------------------- reflector
            refl_http_port = free_port(socket.SOCK_STREAM)
            refl_http = f"http://127.0.0.1:{refl_http_port}"
            api_key = secrets.token_hex(8)
            group.env = dict(os.environ, MMPOG_API_KEY=api_key)
            common = ["--http", f"127.0.0.1:{refl_http_port}", "--log-level", "warning",
                      *([] if params.redundancy else ["--no-redundancy"])]
            if params.reflector_mode == "booster":
                if params.control is None:
                    from boxcore.testing import BoxdProcess
                    listen_port = params.reflector_port or free_port(socket.SOCK_DGRAM)
                    relay_port = free_port(socket.SOCK_DGRAM)
                    workdir = Path(params.workdir) if params.workdir else scratch / "boxd"
                    boxd = BoxdProcess(workdir, listens=[f"udp:127.0.0.1:{listen_port}=127.0.0.1:{relay_port}"],
                                       http=False, log_level="warning")
                    await boxd.start()
                    control, reflector_udp, port = str(boxd.control), ("127.0.0.1", listen_port), relay_port
                    say(f"boxd (user engine) listening on udp 127.0.0.1:{listen_port}")
                else:
                    host, _, box_port = params.box.rpartition(":")
                    control, reflector_udp = params.control, (host, int(box_port))
                    port = params.reflector_port or reflector_udp[1]
                argv = [*python_module("mmpog.reflector"), "--mode", "booster", "--control", control, "--port",
                        str(port), "--src-port", str(reflector_udp[1]), "--fanout", params.fanout, *common]
            else:
                port = params.reflector_port or free_port(socket.SOCK_DGRAM)
                argv = [*python_module("mmpog.reflector"), "--mode", "standalone", "--listen", f"127.0.0.1:{port}",
                        *common]
                reflector_udp = ("127.0.0.1", port)
            reflector = group.start("reflector", argv, stats=False)
            await _wait_http(refl_http + "/health", reflector)
            say(f"reflector ({params.reflector_mode}) on udp {reflector_udp[0]}:{reflector_udp[1]}")

            # ---------------------------------------------------------- impairing relay
            relay_addr = None
            if params.loss_mode == "relay" and (params.loss or params.delay or params.jitter or params.duplicate):
                relay_port = free_port(socket.SOCK_DGRAM)
                relay_role = group.start("impair", [
                    *python_module("mmpog.impair"), "--listen", f"127.0.0.1:{relay_port}", "--upstream",
                    f"{reflector_udp[0]}:{reflector_udp[1]}", "--loss", str(params.loss), "--delay", str(params.delay),
                    "--jitter", str(params.jitter), "--duplicate", str(params.duplicate), "--seed", str(params.seed),
                    "--log-level", "info"], stats=False)
                await group.wait_for_log(relay_role, "impairing relay")
                relay_addr = ("127.0.0.1", relay_port)
                say(f"impairing relay: {params.loss:.0%} loss each way, delay {params.delay * 1000:.0f} ms, "
                    f"jitter {params.jitter * 1000:.0f} ms, duplication {params.duplicate:.0%}")
            reflector_map = (lambda addr: relay_addr) if relay_addr else None   # every reflector behind the relay

            # ---------------------------------------------------------- game server (in process)
            server = GameServer(World(params.locations, 1, CELL), [ReflectorInfo(refl_http, reflector_udp)],
                                api_key=api_key)
            runner = web.AppRunner(server.app(), access_log=None)
            await runner.setup()
            server_port = free_port(socket.SOCK_STREAM)
            await web.TCPSite(runner, "127.0.0.1", server_port).start()
            server_url = f"http://127.0.0.1:{server_port}"

            # ---------------------------------------------------------- bots (here, or in worker processes)
            groups = [list(range(w, params.players, params.workers)) for w in range(params.workers)]
            go = asyncio.Event()
            joined = asyncio.Event()
            t_start_box: list[float] = []

            async def start_at() -> float:      # the local group joined: wait for the common start time
                joined.set()
                await go.wait()
                return t_start_box[0]

            workers = []
            if params.workers == 1 and budgets is None and params.bots_in_process:
                local = supervisor.spawn(run_bots(groups[0], params, server_url, reflector_map, start_at, stop),
                                         name="bots")
                join_waits = [supervisor.spawn(joined.wait(), name="joined", critical=False)]
            else:
                local = None
                for number, indices in enumerate(groups):
                    spec = scratch / f"worker{number}.json"
                    spec.write_text(json.dumps({
                        "indices": indices, "params": asdict(params), "server": server_url,
                        "relay": list(relay_addr) if relay_addr else None, "out": str(scratch / f"worker{number}.msgpack"),
                        "ready": str(scratch / f"worker{number}.ready"), "start": str(scratch / "start")}))
                    workers.append((group.start(f"worker{number}", [*python_module("mmpog.bots"), "--worker", str(spec)],
                                                stats=False), spec))
                join_waits = [supervisor.spawn(group.wait_path(role, scratch / f"worker{n}.ready", timeout=120),
                                               name=f"worker{n} joined", critical=False)
                              for n, (role, _) in enumerate(workers)]
            failed = asyncio.ensure_future(supervisor.wait_failed())
            pending = set(join_waits)
            deadline = time.monotonic() + 120
            try:
                while pending:
                    done, _ = await asyncio.wait([*pending, failed], timeout=max(0.0, deadline - time.monotonic()),
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if failed.done():
                        raise RuntimeError(f"the bots failed before the start: {failed.result()}")
                    if not done:
                        raise RuntimeError("the bots did not join in time")
                    for task in done:
                        if task.exception() is not None:
                            raise task.exception()
                    pending -= done
            finally:
                failed.cancel()
            say(f"{params.players} bots joined {params.locations} location(s)"
                + (f" ({params.workers} worker processes)" if params.workers > 1 else ""))

            # ---------------------------------------------------------- play
            t_start = time.monotonic() + 0.2
            t_start_box.append(t_start)
            go.set()
            (scratch / "start").write_text(repr(t_start))
            for role, _ in workers:
                role.proc.send_signal(signal.SIGUSR1)
            say(f"playing for {params.duration:g} s at {params.rate:g} updates/s per bot "
                f"({params.reliable_fraction:.0%} reliable, deadline {params.deadline:g} s)")
            # each role's CPU over the play window: is a figure the protocol's, or a starved process's?
            pids = {"reflector": reflector.proc.pid}
            if relay_addr is not None:
                pids["impair"] = relay_role.proc.pid
            if boxd is not None and boxd.proc is not None:
                pids["boxd"] = boxd.proc.pid
            if workers:
                pids.update({role.name: role.proc.pid for role, _ in workers})
            else:
                pids["bots (with the game server)"] = os.getpid()
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
                await asyncio.sleep(max(0.0, t_start - time.monotonic()))
                before = await _reflector_stats(http, refl_http, api_key)
                cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                sleeps_before = {name: sleeps(pid) for name, pid in pids.items()}
                throttled_before = _throttled(budgets, [name for name in pids if name != "boxd"])
                await asyncio.sleep(max(0.0, t_start + params.duration - time.monotonic()))
                after = await _reflector_stats(http, refl_http, api_key)
                elapsed = time.monotonic() - t_start
                cpu_share = {name: round((cpu_seconds(pid) - cpu_before[name]) / elapsed, 3)
                             for name, pid in pids.items()}
                wakeups = {name: round((sleeps(pid) - sleeps_before[name]) / elapsed) for name, pid in pids.items()}
                throttled = {name: count - throttled_before[name]
                             for name, count in _throttled(budgets, list(throttled_before)).items()}
                if local is not None:
                    bots, client_stats, process = await local
                    processes = {"bots (with the game server)": process}
                else:
                    bots, client_stats, processes = [], [], {}
                    for role, spec in workers:
                        if await asyncio.to_thread(role.proc.wait) != 0:
                            raise RuntimeError(f"{role.name} failed with status {role.proc.returncode}: {role.tail()}")
                        worker_bots, worker_stats, processes[role.name] = load_bots(
                            Path(json.loads(spec.read_text())["out"]))
                        bots += worker_bots
                        client_stats += worker_stats
                    bots.sort(key=lambda bot: bot.index)
                final = await _reflector_stats(http, refl_http, api_key)
                if params.rtt_trace:
                    Path(params.rtt_trace).write_text(json.dumps({bot.index: bot.rtt_trace for bot in bots}))
        finally:
            await supervisor.aclose()
            if runner is not None:
                await runner.cleanup()
            await group.stop_all()
            if boxd is not None:
                await boxd.stop()
            if budgets is not None:
                budgets.cleanup()

    result = {
        "players": params.players, "locations": params.locations, "duration": params.duration,
        "loss": params.loss, "loss_mode": params.loss_mode, "delay": params.delay, "jitter": params.jitter,
        "duplicate": params.duplicate, "rate": params.rate, "reliable_fraction": params.reliable_fraction,
        "deadline": params.deadline, "reflector_mode": params.reflector_mode,
    }
    result.update(analyse(bots, params.deadline))
    if bots_out is not None:
        bots_out.extend(bots)
    io_delta = {name: after["io"].get(name, 0) - before["io"].get(name, 0)
                for name in ("datagrams_out", "datagrams_in", "updates_out", "redundant_copies_out")}
    totals = final["totals"]
    reflector_retx = totals["retransmitted"]
    client_retx = sum(s.get("retransmitted", 0) for s in client_stats)
    result.update({
        "duplicates_delivered": sum(bot.duplicates for bot in bots),
        "retransmissions": client_retx + reflector_retx,
        "retransmissions_detail": {"by_senders": client_retx, "by_reflector": reflector_retx},
        "reflector_pps": round(io_delta["datagrams_out"] / elapsed, 1),
        "reflector_updates_per_s": round(io_delta["updates_out"] / elapsed, 1),
        "reflector_in_pps": round(io_delta["datagrams_in"] / elapsed, 1),
        "reflector_copies_per_s": round(io_delta["redundant_copies_out"] / elapsed, 1),
        "reflector": {"transport": final.get("transport", {}), "send_dropped": final["io"]["send_dropped"],
                      **{name: totals[name] for name in ("nacks", "nack_rate_limited", "nack_unavailable",
                                                         "heartbeats", "not_member", "hello_rejected",
                                                         "buffer_evicted_count", "buffer_evicted_age",
                                                         "resends_recognised", "redundant_copies_sent",
                                                         "redundant_copies_received")}},
        "expired": sum(bot.expired for bot in bots),
        "unrecoverable": sum(bot.unrecoverable for bot in bots),
        "nacks_sent": sum(s.get("nacks_sent", 0) for s in client_stats),
        "moves": sum(bot.moves for bot in bots),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        # CPU seconds per second of play (1.0 = one core busy the whole time), per process
        "cpu_share": cpu_share,
        "wakeups_per_s": wakeups,          # each process's sleeps per second of play (voluntary switches)
        "cpu_budget": {"cores_per_role": params.budget or None, "period_us": params.budget_period_us,
                       "throttled_periods": throttled},      # during play (0: the budget never bound)
        # each bots process's full (generation 2) and generation-1 collections during play: a full one
        # stops all of that process's bots at once (frozen heap: --no-gc-freeze to compare)
        "bots_gc": {"heap_frozen_before_play": params.gc_freeze, "processes": {
            name: {"gen2": [[at, ms] for at, generation, ms in process["gc_pauses"] if generation == 2],
                   "gen1_count": sum(1 for _, generation, _ in process["gc_pauses"] if generation == 1),
                   "gen1_max_ms": max((ms for _, generation, ms in process["gc_pauses"] if generation == 1),
                                      default=None)}
            for name, process in processes.items()}},
        # the reflector's collections during play (full ones stop its whole fan-out)
        "reflector_gc": ({name: after["gc"][name] - before["gc"].get(name, 0)
                          for name in ("gen1_collections", "gen2_collections")} | {"gen2_max_ms_ever": after["gc"]["gen2_max_ms"]}
                         if "gc" in after else None),
        "srtt_ms_median": _median([s["srtt_ms"] for s in client_stats if s.get("srtt_ms") is not None]),
        "rto_ms_median": _median([s["rto_ms"] for s in client_stats if s.get("rto_ms") is not None]),
        "client_counters": {name: sum(s.get(name, 0) for s in client_stats) for name in (
            "timeouts", "nacks_sent", "nack_retries", "gaps_from_unreliable", "duplicates", "bundles",
            "recv_batches", "recv_datagrams", "recv_syscalls", "send_errors", "redundant_copies_sent")},
    })
    return result


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


# ====================================================================== kernel loss in a namespace

def lossy_namespace(name: str, loss: float, port: int):
    """A one-node lab (boxcore.lab) whose iptables drop ``loss`` of the UDP datagrams to and from ``port``.

    Port-specific on purpose: the game server's HTTP and the processes' control traffic stay intact.
    Use as a context manager; run commands with ``lab.popen("game", argv)``.
    """
    from boxcore.lab import Lab

    lab = Lab.up({"name": name, "nodes": {"game": {"kind": "host"}}, "links": []})
    try:
        if loss > 0:
            for direction in ("--dport", "--sport"):
                lab.run("game", ["iptables", "-w", "-A", "INPUT", "-p", "udp", direction, str(port), "-m", "statistic",
                                 "--mode", "random", "--probability", f"{loss:.6f}", "-j", "DROP"])
    except BaseException:
        lab.down()
        raise
    return lab


def run_in_netns(argv_tail: list[str], loss: float, port: int) -> str:
    """Re-run this experiment inside a fresh namespace where iptables drops ``loss`` each way."""
    with lossy_namespace("mmpogbots", loss, port) as lab:
        proc = lab.popen("game", [*python_module("tools.mmpog_experiment"), *argv_tail],
                         env=dict(os.environ, **{PRIVATE_MOUNTS: "1"}))
        if proc.wait() != 0:
            raise RuntimeError(f"the session in namespace {lab.ns('game')} failed (status {proc.returncode})")
        return lab.ns("game")


# ====================================================================== CLI

def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "mmpog-bots",
        "Run bots through a game session and measure delivery, latency and the reflector's rate.",
        examples=[
            "mmpog-bots --players 16 --locations 2 --duration 10 --loss 0.05 --json out/mmpog.json",
            "mmpog-bots --players 8 --locations 1 --duration 5 --loss 0.05 --loss-mode iptables --json out/kernel.json",
            "mmpog-bots --players 8 --reflector-mode booster --json out/b.json      # starts its own boxd",
            "mmpog-bots --players 8 --reflector-mode booster --control /tmp/boxd.sock --box 127.0.0.1:7400 "
            "--reflector-port 7409",
        ],
    )
    parser.add_argument("--players", type=positive_int, default=8)
    parser.add_argument("--locations", type=positive_int, default=1)
    parser.add_argument("--duration", type=non_negative_float, default=5.0, help="seconds of play")
    parser.add_argument("--loss", type=probability, default=0.0, help="random loss in each direction")
    parser.add_argument("--loss-mode", choices=["relay", "iptables"], default="relay",
                        help="user-space impairing relay, or iptables statistic in a namespace (root)")
    parser.add_argument("--delay", type=non_negative_float, default=0.0, help="relay one-way delay (s)")
    parser.add_argument("--jitter", type=non_negative_float, default=0.0, help="relay jitter (s): reordering")
    parser.add_argument("--duplicate", type=probability, default=0.0, help="relay duplication probability")
    parser.add_argument("--rate", type=non_negative_float, default=10.0, help="updates per second per bot")
    parser.add_argument("--reliable-fraction", type=probability, default=0.25)
    parser.add_argument("--deadline", type=non_negative_float, default=1.0, help="retry bound of reliable updates (s)")
    parser.add_argument("--payload", type=positive_int, default=64, help="update size (bytes)")
    parser.add_argument("--move-interval", type=non_negative_float, default=3.0, help="mean seconds between moves")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--reflector-mode", choices=["standalone", "booster"], default="standalone")
    parser.add_argument("--control", default=None,
                        help="booster mode: a running boxd's control socket (default: start one, user engine)")
    parser.add_argument("--fanout", choices=["auto", "direct", "engine"], default="auto",
                        help="booster mode: the reflector's fan-out (see mmpog-reflector --fanout)")
    parser.add_argument("--box", default=None, help="booster mode with --control: HOST:PORT of boxd's udp listener")
    parser.add_argument("--reflector-port", type=int, default=0,
                        help="the UDP port clients send to (0: any free one); booster mode with --control: "
                             "the redirected relay-destination port")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here (also printed)")
    parser.add_argument("--min-rto", type=non_negative_float, default=ClientConfig().min_rto,
                        help="the clients' RTO sanity bound (s); the RTO is SRTT + max(2 ms, 4 RTTVAR) above it")
    parser.add_argument("--workers", type=positive_int, default=1, help="bot processes (spread the bots' CPU)")
    parser.add_argument("--budget", type=non_negative_float, default=0.0,
                        help="CPU cores per role (reflector, each bots worker, the impairing relay), each in its "
                             "own cgroup v1 CPU group as booster-loadgen fcd does (root); 0: no budgets")
    parser.add_argument("--budget-period-us", type=positive_int, default=10_000,
                        help="the CFS period of the budgets (a throttled role stalls for up to one period)")
    parser.add_argument("--no-recvmmsg", action="store_true",
                        help="the bots read one datagram per recvmsg call (default: recvmmsg batches)")
    parser.add_argument("--no-redundancy", action="store_true",
                        help="no redundant copies of reliable updates, at the clients nor at the reflector")
    parser.add_argument("--no-gc-freeze", action="store_true",
                        help="leave the bots' heap as joining left it (the first full collection then stops them in play)")
    parser.add_argument("--rtt-trace", type=Path, default=None,
                        help="write each bot's RTT samples during play (and its estimator at the start) here, JSON")
    parser.add_argument("--netns-child", action="store_true", help=argparse.SUPPRESS)
    return parser


def params_from_args(args: argparse.Namespace) -> Params:
    loss_mode = args.loss_mode
    if args.netns_child:
        loss_mode = "none"          # the namespace's iptables already drop
    return Params(
        players=args.players, locations=args.locations, duration=args.duration, loss=args.loss, loss_mode=loss_mode,
        delay=args.delay, jitter=args.jitter, duplicate=args.duplicate, rate=args.rate,
        reliable_fraction=args.reliable_fraction, deadline=args.deadline, payload=args.payload,
        move_interval=args.move_interval, seed=args.seed, reflector_mode=args.reflector_mode, control=args.control,
        box=args.box, reflector_port=args.reflector_port, fanout=args.fanout, workers=args.workers,
        min_rto=args.min_rto, budget=args.budget, budget_period_us=args.budget_period_us,
        recvmmsg=not args.no_recvmmsg, gc_freeze=not args.no_gc_freeze, redundancy=not args.no_redundancy, rtt_trace=str(args.rtt_trace.resolve()) if args.rtt_trace else None,
    )


def _write(result: dict, path: Path | None, echo: bool = True) -> None:
    text = json.dumps(result, indent=2)
    if echo:
        print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


async def amain(args: argparse.Namespace, ctx: RunContext) -> int:
    params = params_from_args(args)
    params.validate()
    if args.loss_mode == "iptables" and not args.netns_child:
        if args.control:
            raise ConfigError("--loss-mode iptables runs its own reflector (and boxd) inside a new namespace")
        port = args.reflector_port or 7400
        tail = _child_argv(args, port)
        ns = await asyncio.to_thread(run_in_netns, tail, args.loss, port)
        if args.json is not None:
            result = json.loads(args.json.read_text())
            result["loss_mode"] = "iptables"
            result["netns"] = ns            # created for this run, and deleted
            _write(result, args.json)
        return 0
    result = await run_experiment(params, say=lambda line: log.info("%s", line), stop=ctx.stop)
    if args.netns_child:
        result["loss_mode"] = "iptables"
    ctx.stats.providers["result"] = lambda: result
    _write(result, args.json, echo=not (args.netns_child and args.json is not None))
    return 0


def _child_argv(args: argparse.Namespace, port: int) -> list[str]:
    argv = ["--netns-child", "--reflector-port", str(port), "--log-level", args.log_level,
            "--reflector-mode", args.reflector_mode, "--fanout", args.fanout]
    for name in ("players", "locations", "duration", "loss", "rate", "reliable_fraction", "deadline", "payload",
                 "move_interval", "seed", "workers", "min_rto", "budget", "budget_period_us"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.no_recvmmsg:
        argv.append("--no-recvmmsg")
    if args.no_gc_freeze:
        argv.append("--no-gc-freeze")
    if args.no_redundancy:
        argv.append("--no-redundancy")
    if args.rtt_trace is not None:
        argv += ["--rtt-trace", str(args.rtt_trace.resolve())]
    if args.json is not None:
        argv += ["--json", str(args.json.resolve())]
    return argv


def main(argv: list[str] | None = None) -> int:
    return run_async(build_parser(), amain, argv)


if __name__ == "__main__":
    raise SystemExit(main())
