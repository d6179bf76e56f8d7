"""``mmpog-bots``: a game session of bots, measured (delivery ratio, latency, retransmissions, reflector rate).

The run starts what it needs on loopback - a reflector (standalone, or a
booster on a running boxd with ``--reflector-mode booster``), the game server
(in this process), and, with ``--loss-mode relay``, the seeded impairing relay
between the bots and the reflector - then N bots log in, walk between M
locations and send a mix of reliable and unreliable updates at ``--rate``.
``--loss-mode iptables`` (root) instead runs the whole session in a fresh
network namespace whose iptables drop ``--loss`` of the datagrams to and from
the reflector with ``-m statistic --mode random``.

Every update carries (bot, number, send time); each receiver records what it
got.  A (packet, receiver) pair is *expected* when the receiver stayed in the
sender's location from ``GUARD`` seconds before the send until the packet's
deadline after it.  JSON: ``reliable``/``unreliable`` {``sent``, ``expected``,
``delivered_ratio``, ``delivered_within_deadline_ratio``, ``latency_ms``
{``p50``, ``p90``, ``p99``, ``max``}}, ``duplicates_delivered``,
``retransmissions``, ``reflector_pps``, and details.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import aiohttp
import msgpack
import numpy as np
from aiohttp import web

from boxcore.procs import free_port
from tools.stats import summary
from cliruntime import ConfigError, RunContext, make_parser, non_negative_float, positive_int, probability, run_async

from .client import GameClient
from .reliability import ClientConfig, Delivered, Event, Expired, Received, Unrecoverable
from .server import GameServer, ReflectorInfo, World

log = logging.getLogger("mmpog.bots")

UPDATE = struct.Struct("!HId")   # bot index, update number, send time (time.monotonic(): one clock per host)
GUARD = 0.3
CELL = 100.0


@dataclass
class Params:
    players: int = 8
    locations: int = 1
    duration: float = 5.0
    loss: float = 0.0
    loss_mode: str = "relay"          # relay | iptables | none
    delay: float = 0.0
    jitter: float = 0.0
    duplicate: float = 0.0
    rate: float = 10.0                # updates per second per bot
    reliable_fraction: float = 0.25
    deadline: float = 1.0
    payload: int = 64
    move_interval: float = 3.0
    seed: int = 1
    reflector_mode: str = "standalone"   # standalone | booster
    control: str | None = None        # boxd control socket (booster mode); None: start a boxd (user engine)
    box: str | None = None            # HOST:PORT clients send to: the boxd listener (booster mode, with control)
    reflector_port: int = 0           # the UDP port clients send to (0: any free one); booster mode with
                                      # --control/--box: the redirected (relay destination) port
    workdir: str | None = None        # where an auto-started boxd keeps its files
    fanout: str = "auto"              # booster mode: auto | direct | engine (see mmpog-reflector --fanout)
    drain: float = 1.5
    min_rto: float = ClientConfig().min_rto   # the clients' RTO sanity bound (the RTO itself follows the path)
    workers: int = 1                  # bot processes (the bots' receive path is the experiment's heaviest part)

    def validate(self) -> None:
        if self.players < 2:
            raise ConfigError("--players must be at least 2 (someone has to listen)")
        if self.players > 60000:
            raise ConfigError("--players must be at most 60000")
        if self.locations < 1 or self.duration <= 0 or self.rate <= 0:
            raise ConfigError("--locations, --duration and --rate must be positive")
        if self.payload < UPDATE.size or self.payload > 1400:
            raise ConfigError(f"--payload must be {UPDATE.size}..1400 bytes")
        if not 1 <= self.workers <= 64 or self.workers > self.players:
            raise ConfigError("--workers must be 1..64 and at most --players")
        if not 0 < self.min_rto <= 1.0:
            raise ConfigError("--min-rto must be in (0, 1] seconds")
        if self.loss_mode not in ("relay", "iptables", "none"):
            raise ConfigError("--loss-mode must be relay, iptables or none")
        if self.reflector_mode == "booster" and bool(self.control) != bool(self.box):
            raise ConfigError("--reflector-mode booster takes both --control and --box (a running boxd) or neither "
                              "(a boxd with the user engine is started)")


@dataclass
class Bot:
    index: int
    client: GameClient
    rng: random.Random
    intervals: list = field(default_factory=list)       # [location, start, end]
    sent: list = field(default_factory=list)            # (n, t, location, reliable)
    got: dict = field(default_factory=dict)             # (sender, n) -> latency
    duplicates: int = 0
    delivered: int = 0
    expired: int = 0
    unrecoverable: int = 0
    moves: int = 0
    pid_number: dict = field(default_factory=dict)      # packet id -> update number (reliable sends)
    echo_seq: dict = field(default_factory=dict)        # update number -> seq of the echo that acknowledged it
    expired_numbers: set = field(default_factory=set)
    lost: set = field(default_factory=set)              # (location, seq) reported unrecoverable
    missing_at_end: set = field(default_factory=set)    # (location, seq) still being recovered when the run ended

    def on_event(self, event: Event) -> None:
        if type(event) is Received:
            sender, number, sent_at = UPDATE.unpack_from(event.payload)
            key = (sender, number)
            if key in self.got:
                self.duplicates += 1     # would be a protocol bug: the library filters duplicates
            else:
                self.got[key] = event.now - sent_at
        elif type(event) is Delivered:
            self.delivered += 1
            number = self.pid_number.pop(event.packet_id, None)
            if number is not None:
                self.echo_seq[number] = event.seq
        elif type(event) is Expired:
            self.expired += 1
            number = self.pid_number.pop(event.packet_id, None)
            if number is not None:
                self.expired_numbers.add(number)
        elif type(event) is Unrecoverable:
            self.unrecoverable += event.count
            self.lost.update((event.location, seq) for seq in range(event.first, event.first + event.count))


async def _wait_http(url: str, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{proc.args[2:4]} exited with status {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up within {timeout} s")
            await asyncio.sleep(0.05)


def _module_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _reflector_stats(http: aiohttp.ClientSession, url: str, api_key: str) -> dict:
    async with http.get(url + "/stats", headers={"Authorization": f"Bearer {api_key}"}) as resp:
        resp.raise_for_status()
        return await resp.json()


def _percentiles(values: list[float]) -> dict:
    return summary(values, (50, 90, 99), scale=1000, digits=3, with_max=True)


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
        latencies, first_second = [], []
        for bot in bots:
            for number, sent_at, location, is_reliable in bot.sent:
                if is_reliable != reliable:
                    continue
                sent += 1
                for start, end, index, final in by_location.get(location, ()):
                    if index == bot.index or start > sent_at - GUARD or end < sent_at + deadline:
                        continue
                    expected += 1
                    latency = bots[index].got.get((bot.index, number))
                    if latency is not None:
                        got += 1
                        latencies.append(latency)
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
        }
        if reliable:
            out[name]["missed"] = {"expired_at_sender": expired, "reported_unrecoverable": reported,
                                   "sender_left": sender_left, "receiver_left": receiver_left,
                                   "still_recovering": pending, "unaccounted": unaccounted}
    return out


async def run_bots(indices: list[int], params: Params, server_url: str,
                   reflector_map: Callable[[tuple[str, int]], tuple[str, int]] | None,
                   start_at: Callable[[], "asyncio.Future[float]"], stop: asyncio.Event) -> tuple[list[Bot], list[dict]]:
    """Bots ``indices`` join, wait for ``start_at()``, play ``params.duration``, drain; returns them and their stats."""
    bots: list[Bot] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        config = ClientConfig(default_deadline=params.deadline, min_rto=params.min_rto,
                              initial_rto=max(params.min_rto, ClientConfig().initial_rto))
        for index in indices:
            bot_rng = random.Random(params.seed * 1_000_003 + index)
            client = GameClient(server_url, f"bot{index}", f"bot-{index}-{params.seed}-plays", http=http, config=config,
                                reflector_map=reflector_map, rng=bot_rng, join_timeout=10.0)
            bot = Bot(index, client, bot_rng)
            client.on_event = bot.on_event
            bots.append(bot)

        async def enter(bot: Bot) -> None:
            await bot.client.start()
            await bot.client.register()
            await bot.client.login()
            location = bot.rng.randrange(params.locations)
            await bot.client.move(*_position(bot.rng, location))
            bot.intervals.append([location, time.monotonic(), float("inf")])

        await asyncio.gather(*(enter(bot) for bot in bots))
        t_start = await start_at()
        t_end = t_start + params.duration
        payload_pad = bytes(params.payload - UPDATE.size)

        async def play(bot: Bot) -> None:
            interval = 1.0 / params.rate
            next_send = t_start + bot.rng.random() * interval
            next_move = t_start + bot.rng.uniform(0.5, 1.5) * params.move_interval
            number = 0
            client = bot.client
            while not stop.is_set():
                now = time.monotonic()
                if now >= t_end:
                    return
                if params.locations > 1 and now >= next_move:
                    target = bot.rng.randrange(params.locations)
                    if target != client.location:
                        # the server drops the old membership while answering: we leave when we ask,
                        # and arrive when the new location's reflector welcomes us
                        bot.intervals[-1][2] = time.monotonic()
                        await client.move(*_position(bot.rng, target))
                        bot.intervals.append([target, time.monotonic(), float("inf")])
                        bot.moves += 1
                    next_move = time.monotonic() + bot.rng.uniform(0.5, 1.5) * params.move_interval
                    continue
                if now < next_send:
                    await asyncio.sleep(next_send - now)
                    continue
                next_send += interval
                reliable = bot.rng.random() < params.reliable_fraction
                sent_at = time.monotonic()
                data = UPDATE.pack(bot.index, number, sent_at) + payload_pad
                try:
                    packet_id = client.send(data, reliable=reliable, deadline=params.deadline)
                except Exception as exc:     # BufferFull under extreme loss: count as not sent
                    log.debug("bot %d send refused: %s", bot.index, exc)
                    continue
                if reliable:
                    bot.pid_number[packet_id] = number
                bot.sent.append((number, sent_at, client.location, reliable))
                number += 1

        await asyncio.sleep(max(0.0, t_start - time.monotonic()))
        await asyncio.gather(*(play(bot) for bot in bots))
        await asyncio.sleep(params.drain)      # let retransmissions finish
        for bot in bots:
            if bot.intervals:
                bot.intervals[-1][2] = time.monotonic()
        client_stats = [bot.client.snapshot() for bot in bots]
        for bot in bots:
            endpoint = bot.client.endpoint
            if endpoint is not None:
                bot.missing_at_end = {(endpoint.location, seq) for seq in endpoint.missing_seqs}
            with contextlib.suppress(Exception):
                await bot.client.close()
    return bots, client_stats


async def _expect_line(proc: asyncio.subprocess.Process, word: bytes) -> None:
    line = await proc.stdout.readline()
    if not line.startswith(word):
        raise RuntimeError(f"a bots worker said {line[:80]!r} instead of {word!r}")


def _dump_bots(bots: list[Bot], client_stats: list[dict], path: Path) -> None:
    records = [{"index": b.index, "intervals": b.intervals, "sent": b.sent,
                "got": [[s, n, lat] for (s, n), lat in b.got.items()], "duplicates": b.duplicates,
                "delivered": b.delivered, "expired": b.expired, "unrecoverable": b.unrecoverable, "moves": b.moves,
                "echo_seq": [[n, seq] for n, seq in b.echo_seq.items()], "expired_numbers": sorted(b.expired_numbers),
                "lost": [list(item) for item in b.lost], "missing_at_end": [list(item) for item in b.missing_at_end]}
               for b in bots]
    path.write_bytes(msgpack.packb({"bots": records, "stats": client_stats}))


def _load_bots(path: Path) -> tuple[list[Bot], list[dict]]:
    data = msgpack.unpackb(path.read_bytes(), strict_map_key=False)
    bots = []
    for rec in data["bots"]:
        bot = Bot(rec["index"], None, random.Random(0), intervals=[list(i) for i in rec["intervals"]],
                  sent=[tuple(x) for x in rec["sent"]], got={(s, n): lat for s, n, lat in rec["got"]},
                  duplicates=rec["duplicates"], delivered=rec["delivered"], expired=rec["expired"],
                  unrecoverable=rec["unrecoverable"], moves=rec["moves"],
                  echo_seq={n: seq for n, seq in rec["echo_seq"]}, expired_numbers=set(rec["expired_numbers"]),
                  lost={tuple(item) for item in rec["lost"]},
                  missing_at_end={tuple(item) for item in rec["missing_at_end"]})
        bots.append(bot)
    return bots, data["stats"]


async def run_worker(spec_path: Path) -> int:
    """A bots worker process: join, say "ready", read "start T", play, write the results."""
    spec = json.loads(spec_path.read_text())
    params = Params(**spec["params"])
    relay = tuple(spec["relay"]) if spec["relay"] else None
    reflector_map = (lambda addr: relay) if relay else None
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def start_at() -> float:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        line = (await reader.readline()).decode().split()
        if len(line) != 2 or line[0] != "start":
            raise RuntimeError(f"expected 'start T', got {line!r}")
        return float(line[1])

    bots, stats = await run_bots(spec["indices"], params, spec["server"], reflector_map, start_at, asyncio.Event())
    _dump_bots(bots, stats, Path(spec["out"]))
    return 0


async def run_experiment(params: Params, say: Callable[[str], None] | None = None,
                         stop: asyncio.Event | None = None) -> dict:
    """Run one bots session on loopback; returns the JSON-able figures."""
    params.validate()
    say = say or (lambda line: None)
    stop = stop or asyncio.Event()
    procs: list[subprocess.Popen] = []
    boxd_holder: list = []
    runner: web.AppRunner | None = None
    relay_addr = None
    workers: list[asyncio.subprocess.Process] = []
    local: asyncio.Future | None = None
    scratch: list[Path] = []            # temporary directories this run made (removed at the end)
    try:
        # ---------------------------------------------------------- reflector
        refl_http_port = free_port(socket.SOCK_STREAM)
        refl_http = f"http://127.0.0.1:{refl_http_port}"
        api_key = secrets.token_hex(8)
        env = dict(os.environ, MMPOG_API_KEY=api_key)
        if params.reflector_mode == "booster":
            if params.control is None:
                from boxcore.testing import BoxdProcess
                listen_port = params.reflector_port or free_port(socket.SOCK_DGRAM)
                relay_port = free_port(socket.SOCK_DGRAM)
                if params.workdir:
                    workdir = Path(params.workdir)
                else:
                    workdir = Path(tempfile.mkdtemp(prefix="mmpog-boxd-"))
                    scratch.append(workdir)
                boxd = BoxdProcess(workdir, listens=[f"udp:127.0.0.1:{listen_port}=127.0.0.1:{relay_port}"],
                                   http=False, log_level="warning")
                await boxd.start()
                boxd_holder.append(boxd)
                control, reflector_udp, port = str(boxd.control), ("127.0.0.1", listen_port), relay_port
                say(f"boxd (user engine) listening on udp 127.0.0.1:{listen_port}")
            else:
                host, _, box_port = params.box.rpartition(":")
                control, reflector_udp = params.control, (host, int(box_port))
                port = params.reflector_port or reflector_udp[1]
            argv = _module_argv("mmpog.reflector", "--mode", "booster", "--control", control,
                                "--port", str(port), "--src-port", str(reflector_udp[1]), "--fanout", params.fanout,
                                "--http", f"127.0.0.1:{refl_http_port}", "--log-level", "warning")
        else:
            port = params.reflector_port or free_port(socket.SOCK_DGRAM)
            argv = _module_argv("mmpog.reflector", "--mode", "standalone", "--listen", f"127.0.0.1:{port}",
                                "--http", f"127.0.0.1:{refl_http_port}", "--log-level", "warning")
            reflector_udp = ("127.0.0.1", port)
        procs.append(subprocess.Popen(argv, env=env))
        await _wait_http(refl_http + "/health", proc=procs[-1])
        say(f"reflector ({params.reflector_mode}) on udp {reflector_udp[0]}:{reflector_udp[1]}")

        # ---------------------------------------------------------- impairing relay
        reflector_map = None
        if params.loss_mode == "relay" and (params.loss or params.delay or params.jitter or params.duplicate):
            relay_port = free_port(socket.SOCK_DGRAM)
            argv = _module_argv("mmpog.impair", "--listen", f"127.0.0.1:{relay_port}", "--upstream",
                                f"{reflector_udp[0]}:{reflector_udp[1]}", "--loss", str(params.loss),
                                "--delay", str(params.delay), "--jitter", str(params.jitter),
                                "--duplicate", str(params.duplicate), "--seed", str(params.seed),
                                "--log-level", "warning")
            procs.append(subprocess.Popen(argv))
            relay_addr = ("127.0.0.1", relay_port)
            reflector_map = lambda addr: relay_addr  # noqa: E731 - every reflector is behind the one relay
            await asyncio.sleep(0.3)
            if procs[-1].poll() is not None:
                raise RuntimeError("the impairing relay did not start")
            say(f"impairing relay: {params.loss:.0%} loss each way, delay {params.delay * 1000:.0f} ms, "
                f"jitter {params.jitter * 1000:.0f} ms, duplication {params.duplicate:.0%}")

        # ---------------------------------------------------------- game server (in process)
        world = World(params.locations, 1, CELL)
        server = GameServer(world, [ReflectorInfo(refl_http, reflector_udp)], api_key=api_key)
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

        worker_files: list[Path] = []
        if params.workers == 1:
            local = asyncio.ensure_future(run_bots(groups[0], params, server_url, reflector_map, start_at, stop))
            waiting = [asyncio.ensure_future(joined.wait())]
        else:
            local = None
            tmp = Path(tempfile.mkdtemp(prefix="mmpog-bots-"))
            scratch.append(tmp)
            for number, indices in enumerate(groups):
                spec = tmp / f"worker{number}.json"
                out = tmp / f"worker{number}.msgpack"
                spec.write_text(json.dumps({"indices": indices, "params": asdict(params), "server": server_url,
                                            "relay": list(relay_addr) if reflector_map else None,
                                            "out": str(out)}))
                worker_files.append(out)
                workers.append(await asyncio.create_subprocess_exec(
                    *_module_argv("mmpog.bots", "--worker", str(spec), "--log-level", "warning"),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE))
            waiting = [asyncio.ensure_future(_expect_line(proc, b"ready")) for proc in workers]
        unjoined = set(waiting)
        watched = unjoined | ({local} if local is not None else set())
        join_deadline = time.monotonic() + 120
        try:
            while unjoined:
                done, _ = await asyncio.wait(watched, timeout=max(0.0, join_deadline - time.monotonic()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    raise RuntimeError("the bots did not join in time")
                for task in done:
                    if task.exception() is not None:
                        raise task.exception()
                    if task is local:
                        raise RuntimeError("the bots ended before the start")
                unjoined -= done
                watched -= done
        finally:
            for task in waiting:
                task.cancel()
        say(f"{params.players} bots joined {params.locations} location(s)"
            + (f" ({params.workers} worker processes)" if params.workers > 1 else ""))

        # ---------------------------------------------------------- play
        t_start = time.monotonic() + 0.2
        t_start_box.append(t_start)
        go.set()
        for proc in workers:
            proc.stdin.write(f"start {t_start!r}\n".encode())
            await proc.stdin.drain()
        say(f"playing for {params.duration:g} s at {params.rate:g} updates/s per bot "
            f"({params.reliable_fraction:.0%} reliable, deadline {params.deadline:g} s)")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            await asyncio.sleep(max(0.0, t_start - time.monotonic()))
            before = await _reflector_stats(http, refl_http, api_key)
            await asyncio.sleep(max(0.0, t_start + params.duration - time.monotonic()))
            after = await _reflector_stats(http, refl_http, api_key)
            elapsed = time.monotonic() - t_start
            if local is not None:
                bots, client_stats = await local
            else:
                bots, client_stats = [], []
                for proc, out in zip(workers, worker_files):
                    if await proc.wait() != 0:
                        raise RuntimeError(f"a bots worker failed with status {proc.returncode}")
                    worker_bots, worker_stats = _load_bots(out)
                    bots += worker_bots
                    client_stats += worker_stats
                bots.sort(key=lambda bot: bot.index)
            final = await _reflector_stats(http, refl_http, api_key)

        result = {
            "players": params.players, "locations": params.locations, "duration": params.duration,
            "loss": params.loss, "loss_mode": params.loss_mode, "delay": params.delay, "jitter": params.jitter,
            "duplicate": params.duplicate, "rate": params.rate, "reliable_fraction": params.reliable_fraction,
            "deadline": params.deadline, "reflector_mode": params.reflector_mode,
        }
        result.update(analyse(bots, params.deadline))
        out_delta = after["io"]["datagrams_out"] - before["io"]["datagrams_out"]
        updates_delta = after["io"].get("updates_out", 0) - before["io"].get("updates_out", 0)
        in_delta = after["io"]["datagrams_in"] - before["io"]["datagrams_in"]
        totals = final["totals"]
        reflector_retx = totals["retransmitted"]
        client_retx = sum(s.get("retransmitted", 0) for s in client_stats)
        result.update({
            "duplicates_delivered": sum(bot.duplicates for bot in bots),
            "retransmissions": client_retx + reflector_retx,
            "retransmissions_detail": {"by_senders": client_retx, "by_reflector": reflector_retx},
            "reflector_pps": round(out_delta / elapsed, 1),
            "reflector_updates_per_s": round(updates_delta / elapsed, 1),
            "reflector_in_pps": round(in_delta / elapsed, 1),
            "reflector": {"transport": final.get("transport", {}), "send_dropped": final["io"]["send_dropped"],
                          **{name: totals[name] for name in ("nacks", "nack_rate_limited", "nack_unavailable",
                                                             "heartbeats", "not_member", "hello_rejected",
                                                             "buffer_evicted_count", "buffer_evicted_age")}},
            "expired": sum(bot.expired for bot in bots),
            "unrecoverable": sum(bot.unrecoverable for bot in bots),
            "nacks_sent": sum(s.get("nacks_sent", 0) for s in client_stats),
            "moves": sum(bot.moves for bot in bots),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "srtt_ms_median": _median([s["srtt_ms"] for s in client_stats if s.get("srtt_ms") is not None]),
            "rto_ms_median": _median([s["rto_ms"] for s in client_stats if s.get("rto_ms") is not None]),
            "client_counters": {name: sum(s.get(name, 0) for s in client_stats) for name in (
                "timeouts", "nacks_sent", "nack_retries", "gaps_from_unreliable", "duplicates", "bundles")},
        })
        return result
    finally:
        if local is not None and not local.done():
            local.cancel()
            with contextlib.suppress(BaseException):
                await local
        for proc in workers:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if runner is not None:
            await runner.cleanup()
        for proc in reversed(procs):
            _stop_process(proc)
        for boxd in boxd_holder:
            await boxd.stop()
        for path in scratch:
            shutil.rmtree(path, ignore_errors=True)


def _median(values: list[float]) -> float | None:
    return round(float(np.median(values)), 3) if values else None


def _position(rng: random.Random, location: int) -> tuple[float, float]:
    return location * CELL + rng.uniform(1, CELL - 1), rng.uniform(1, CELL - 1)


# ====================================================================== kernel loss in a namespace

def run_in_netns(argv_tail: list[str], loss: float, port: int) -> str:
    """Re-run this experiment inside a fresh namespace where iptables drops ``loss`` each way."""
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            raise ConfigError(f"--loss-mode iptables needs {tool}")
    if os.geteuid() != 0:
        raise ConfigError("--loss-mode iptables needs root (network namespace + iptables)")
    ns = f"bbmmpog{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        if loss > 0:
            for direction in ("--dport", "--sport"):
                subprocess.run(["ip", "netns", "exec", ns, "iptables", "-w", "-A", "INPUT", "-p", "udp", direction,
                                str(port), "-m", "statistic", "--mode", "random", "--probability", str(loss),
                                "-j", "DROP"], check=True)
        subprocess.run(["ip", "netns", "exec", ns, *_module_argv("mmpog.bots", *argv_tail)], check=True)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    return ns


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
    parser.add_argument("--netns-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
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
        min_rto=args.min_rto,
    )


def _write(result: dict, path: Path | None, echo: bool = True) -> None:
    text = json.dumps(result, indent=2)
    if echo:
        print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


async def amain(args: argparse.Namespace, ctx: RunContext) -> int:
    if args.worker is not None:
        return await run_worker(args.worker)
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
                 "move_interval", "seed", "workers", "min_rto"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.json is not None:
        argv += ["--json", str(args.json.resolve())]
    return argv


def main(argv: list[str] | None = None) -> int:
    return run_async(build_parser(), amain, argv)


if __name__ == "__main__":
    raise SystemExit(main())
