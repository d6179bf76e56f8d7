"""The bots of ``mmpog-bots``: what a measured player does, and the worker process that runs a group of them.

A bot logs in, walks between locations every ``move_interval`` seconds on average, and sends
``rate`` updates/s (``reliable_fraction`` reliable); each update carries (bot, number, send
time) and every receiver records what it got and when.  The experiment around the bots (the
processes, the game server, the namespace, the analysis) is :mod:`tools.mmpog_experiment`;
``mmpog-bots`` is its command line.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import math
import random
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import aiohttp
import msgpack

from boxcore import udpbatch
from cliruntime import ConfigError, make_parser, run_async

from .client import GameClient
from .gcwatch import GcWatch, freeze_startup_heap
from .reliability import ClientConfig, Delivered, Event, Expired, Received, Unrecoverable

log = logging.getLogger("mmpog.bots")

UPDATE = struct.Struct("!HId")   # bot index, update number, send time (time.monotonic(): one clock per host)
_unpack_update = UPDATE.unpack_from
GUARD = 0.3
CELL = 100.0
NO_STAMP = math.nan       # DeliveryLog: a delivery whose datagram had no kernel arrival stamp

RECV_BATCH = 64           # datagrams per recvmmsg call; a wake-up reads up to RECV_CALLS of them
RECV_CALLS = 4            # before the protocol's output and timers are serviced
RECV_SLOT = 2048          # bytes per datagram slot: above any path MTU a reflector packs to
RECV_LATE = 0.001         # s: a first datagram that waited longer than this before its read is followed
                          # by recvmmsg calls for the rest; a fresher one is handed over alone, and the
                          # event loop calls the reader again if more came.  A recvmmsg that finds nothing
                          # costs ~4 us; a datagram left to the loop's next pass ~6 us more than one taken
                          # by it (its own recvmsg, dispatch and protocol service).  At 630 datagrams/s per
                          # bot (64x1), ~0.6 datagrams queue behind one that waited 1 ms: about break-even


class _BotTransport:
    """The bot's own non-blocking UDP socket, in the shape GameClient sends through."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.send_errors = 0

    def sendto(self, data: bytes, addr) -> None:
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.send_errors += 1           # a full socket buffer is loss, which the protocol repairs

    def get_extra_info(self, name: str, default=None):
        return self.sock.getsockname() if name == "sockname" else default

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


class BotClient(GameClient):
    """A GameClient whose receive path is the bots' own: every readable wake-up reads its first datagram
    with ``recvmsg`` and, when that one came late, up to ``RECV_CALLS`` x ``RECV_BATCH`` more with
    ``recvmmsg`` (:class:`boxcore.udpbatch.BatchReceiver`: one system call for many datagrams, each with
    its ancillary data), hands each to its endpoint,
    and services output, events and timers once for the batch (not once per datagram as the asyncio
    protocol does), and keeps the kernel's arrival time of each datagram (``SO_TIMESTAMPNS``) so the
    measurement can tell the network and reflector's part of a latency from the bot process's own
    queueing.

    ``arrival_of(event.now)`` is the kernel arrival time (``time.monotonic()`` clock) of the datagram
    that carried an event handed out by the current batch.
    """

    def __init__(self, *args, recvmmsg: bool = True, read_one_first: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.recvmmsg = recvmmsg                # False: one recvmsg per datagram (recv_bench compares them)
        # True: a wake-up's first datagram is read with the stdlib's recvmsg (no ctypes), recvmmsg only
        # when it came late (RECV_LATE); False: recvmmsg from the first (recv_bench compares them)
        self.read_one_first = read_one_first and recvmmsg
        self._arrivals: dict[float, float] = {}
        self.arrival_of = self._arrivals.get     # the same lookup without a Python frame (_drain clears, never rebinds)
        self.transport: _BotTransport | None = None
        self.batch_receiver: udpbatch.BatchReceiver | None = None
        self._receive_one = None
        self.batches = 0
        self.datagrams = 0

    async def open_transport(self, loop: asyncio.AbstractEventLoop) -> _BotTransport:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udpbatch.enable_timestamps(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.setblocking(False)
        sock.bind(self.local)
        self.transport = _BotTransport(sock)
        self.batch_receiver = udpbatch.BatchReceiver(sock, batch=RECV_BATCH, slot=RECV_SLOT, control=udpbatch.STAMP_CONTROL,
                                                 use_recvmmsg=self.recvmmsg)
        self._receive_one = self.batch_receiver.receive_one_stamped
        loop.add_reader(sock.fileno(), self._drain)
        return self.transport

    def arrival_of(self, now: float) -> float | None:
        return self._arrivals.get(now)      # (replaced per instance by the dict's own get: one call per update)

    def _drain(self) -> None:
        """Read what the socket holds, each datagram with its kernel stamp, then hand the batch to the
        protocol.  Each datagram gets its own ``now`` (taken as it is handed over, strictly increasing),
        the key under which its arrival time is found by ``arrival_of``.

        At one datagram per wake-up (a quiet 64x1 run) the read is a third of the wake-up's CPU, so the
        first datagram is read alone with the stdlib's ``recvmsg``; only if it waited more than
        ``RECV_LATE`` in the socket (the reader was late, so more have likely queued) do ``recvmmsg``
        calls take the rest.  Otherwise what came meanwhile waits for the event loop's next pass, which
        calls this reader again while the socket is readable: no system call is spent finding the
        socket empty."""
        arrivals = self._arrivals
        monotonic = time.monotonic
        batch: list[tuple[bytes, float]] = []
        if self.read_one_first:
            try:
                first = self._receive_one()
            except OSError:
                self.io_errors += 1
                return
            if first is None:
                return
            data, stamp = first
            last = monotonic()
            offset = time.time() - last             # kernel stamps are CLOCK_REALTIME
            batch.append((data, last))
            if stamp == stamp:                       # not NaN: the kernel stamped it
                arrival = arrivals[last] = stamp - offset
                if last - arrival <= RECV_LATE:      # fresh: alone (the common case at 64x1 on a quiet host)
                    self.batches += 1
                    self.datagrams += 1
                    self.receive_datagrams(batch)
                    arrivals.clear()
                    return
        else:
            last = 0.0
            offset = time.time() - monotonic()
        receive = self.batch_receiver.receive_stamped
        for _ in range(RECV_CALLS):
            try:
                payloads, stamps = receive()
            except OSError:
                self.io_errors += 1
                break
            for data, stamp in zip(payloads, stamps):
                now = monotonic()
                if now <= last:
                    now = math.nextafter(last, math.inf)
                last = now
                if stamp == stamp:
                    arrivals[now] = stamp - offset
                batch.append((data, now))
            if len(payloads) < RECV_BATCH:
                break
        if batch:
            self.batches += 1
            self.datagrams += len(batch)
            self.receive_datagrams(batch)
            arrivals.clear()

    def snapshot(self) -> dict:
        out = super().snapshot()
        receiver = self.batch_receiver
        out.update(recv_batches=self.batches, recv_datagrams=self.datagrams,
                   recv_syscalls=receiver.syscalls if receiver is not None else 0,
                   recv_truncated=receiver.truncated if receiver is not None else 0,
                   send_errors=self.transport.send_errors if self.transport is not None else 0)
        return out


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
    bots_in_process: bool = True      # one worker and no budget: the bots run in the experiment's own process,
                                      # beside the game server (False: a worker process, as the comparison's
                                      # KCP and ENet bots always have)
    budget: float = 0.0               # CPU cores per role (reflector, each bots worker, relay): its own cgroup; 0: none
    budget_period_us: int = 10_000    # CFS period: short, so a throttled role stalls for milliseconds, not 100 ms
    recvmmsg: bool = True             # the bots read their sockets with recvmmsg (False: one recvmsg per datagram)
    rtt_trace: str | None = None      # write every bot's RTT samples during play here (JSON)
    gc_freeze: bool = True            # collect and freeze the heap once joined, before play (a game's loading screen)
    redundancy: bool = True           # the clients send redundant copies of reliable updates over a lossy uplink

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
        if self.budget < 0 or (self.budget and self.budget * self.budget_period_us < 1000):
            raise ConfigError("--budget must be 0 (none) or at least 1000 us of CPU per --budget-period-us")
        if not 0 < self.min_rto <= 1.0:
            raise ConfigError("--min-rto must be in (0, 1] seconds")
        if self.loss_mode not in ("relay", "iptables", "none"):
            raise ConfigError("--loss-mode must be relay, iptables or none")
        if self.reflector_mode == "booster" and bool(self.control) != bool(self.box):
            raise ConfigError("--reflector-mode booster takes both --control and --box (a running boxd) or neither "
                              "(a boxd with the user engine is started)")


class DeliveryLog:
    """Every delivery a receiver records during play, written into flat arrays (an integer key, the
    latency at the game, the latency at the socket or ``NO_STAMP``) allocated and touched before play
    (``capacity`` deliveries; more grow them), and turned into dicts only when read, after play.  A
    dict entry per delivery (a tuple key, two boxed floats, growing tables) cost a bots worker new
    memory at 10,000 updates/s - page faults and copies inside the CPU share being measured; so did
    arrays grown by ``append`` (each growth by 1/16 copies the whole array).  The first delivery of
    a key is the one kept; every later one counts as a duplicate (the library filters them: a
    protocol bug).

    The receiver records with :meth:`record`, or inline as :meth:`Bot.on_event` does: ``i = log.count``,
    the three arrays' item ``i`` set (``IndexError``: :meth:`grow` and again), ``log.count = i + 1``.
    """

    __slots__ = ("keys", "game", "socket", "count", "_got", "_arrived", "_duplicates", "_settled")

    def __init__(self, capacity: int = 1024) -> None:
        zeros = bytes(8 * max(1, capacity))
        self.keys = array.array("Q", zeros)        # (copied from zeros: every page touched now, not in play)
        self.game = array.array("d", zeros)
        self.socket = array.array("d", zeros)
        self.count = 0
        self._got: dict[int, float] = {}
        self._arrived: dict[int, float] = {}
        self._duplicates = 0
        self._settled = 0           # deliveries already folded into the dicts

    @classmethod
    def from_dicts(cls, got: dict[int, float], arrived: dict[int, float], duplicates: int) -> "DeliveryLog":
        log = cls(0)
        log._got, log._arrived, log._duplicates = got, arrived, duplicates
        return log

    def grow(self) -> None:
        """Double the room (in place: what holds the arrays keeps them)."""
        zeros = bytes(8 * len(self.keys))
        for column in (self.keys, self.game, self.socket):
            column.frombytes(zeros)

    def record(self, key: int, game_latency: float, socket_latency: float = NO_STAMP) -> None:
        i = self.count
        if i >= len(self.keys):
            self.grow()
        self.keys[i], self.game[i], self.socket[i] = key, game_latency, socket_latency
        self.count = i + 1

    def _settle(self) -> None:
        if self._settled == self.count:
            return
        keys, game, socket_ = self.keys, self.game, self.socket
        got, arrived = self._got, self._arrived
        for i in range(self._settled, self.count):
            key = keys[i]
            if key in got:
                self._duplicates += 1
                continue
            got[key] = game[i]
            stamp = socket_[i]
            if stamp == stamp:                  # not NO_STAMP
                arrived[key] = stamp
        self._settled = self.count

    @property
    def got(self) -> dict[int, float]:
        """key -> latency at the game (s), first delivery of each key."""
        self._settle()
        return self._got

    @property
    def arrived(self) -> dict[int, float]:
        """key -> latency at the receiving socket (s), for the deliveries that had a kernel stamp."""
        self._settle()
        return self._arrived

    @property
    def duplicates(self) -> int:
        self._settle()
        return self._duplicates


def expected_deliveries(rate: float, duration: float, players: int, locations: int, receivers: int = 1) -> int:
    """A DeliveryLog's room for what ``receivers`` players get in a session of ``players`` sending ``rate``
    updates/s for ``duration`` s over ``locations`` (half as much again as the mean; more grows it)."""
    per_receiver = rate * duration * (players - 1) / locations
    return int(1.5 * per_receiver * receivers) + 1024


def _update_key(sender: int, number: int) -> int:
    return sender << 32 | number


def _update_of(key: int) -> tuple[int, int]:
    return key >> 32, key & 0xFFFF_FFFF


@dataclass
class Bot:
    index: int
    client: GameClient
    rng: random.Random
    intervals: list = field(default_factory=list)       # [location, start, end]
    sent: list = field(default_factory=list)            # (n, t, location, reliable)
    deliveries: DeliveryLog = field(default_factory=DeliveryLog)   # what it received: got / arrived below
    delivered: int = 0
    expired: int = 0
    unrecoverable: int = 0
    moves: int = 0
    pid_number: dict = field(default_factory=dict)      # packet id -> update number (reliable sends)
    echo_seq: dict = field(default_factory=dict)        # update number -> seq of the echo that acknowledged it
    expired_numbers: set = field(default_factory=set)
    lost: set = field(default_factory=set)              # (location, seq) reported unrecoverable
    missing_at_end: set = field(default_factory=set)    # (location, seq) still being recovered when the run ended
    rto_at_send: dict = field(default_factory=dict)     # update number -> the sender's RTO (s) when it sent it (reliable)
    resent: set = field(default_factory=set)            # update numbers the sender had to retransmit (echo came late)
    rtt_at_start: tuple = ()                            # (SRTT, RTO) in s when play began: what the join left
    rtt_trace: list = field(default_factory=list)       # with Params.rtt_trace: [start state, [[t, rtt], ...]]

    def __post_init__(self) -> None:
        self._views: dict[str, tuple[int, dict]] = {}     # "got"/"arrived" -> (log.count, view)

    def _view(self, which: str) -> dict[tuple[int, int], float]:
        """The delivery log's ``which`` by (sender, n), rebuilt only when the log grew."""
        log = self.deliveries
        cached = self._views.get(which)
        if cached is None or cached[0] != log.count:
            cached = self._views[which] = (log.count, {_update_of(key): latency
                                                       for key, latency in getattr(log, which).items()})
        return cached[1]

    @property
    def got(self) -> dict[tuple[int, int], float]:
        """(sender, n) -> latency at the game (event handed out), s."""
        return self._view("got")

    @property
    def arrived(self) -> dict[tuple[int, int], float]:
        """(sender, n) -> latency at the bot's socket (kernel stamp), s."""
        return self._view("arrived")

    @property
    def duplicates(self) -> int:
        return self.deliveries.duplicates

    def on_event(self, event: Event) -> None:
        if type(event) is Received:       # 40k/s at 64 players x 1 location: the rest is rare
            now = event.now
            sender, number, sent_at = _unpack_update(event.payload)
            arrival = self.client.arrival_of(now)
            log = self.deliveries                             # DeliveryLog.record, inline
            i = log.count
            try:
                log.keys[i] = sender << 32 | number           # _update_key
            except IndexError:
                log.grow()
                log.keys[i] = sender << 32 | number
            log.game[i] = now - sent_at
            log.socket[i] = NO_STAMP if arrival is None else arrival - sent_at
            log.count = i + 1
        elif type(event) is Delivered:
            self.delivered += 1
            number = self.pid_number.pop(event.packet_id, None)
            if number is not None:
                self.echo_seq[number] = event.seq
                if event.retransmitted:
                    self.resent.add(number)
        elif type(event) is Expired:
            self.expired += 1
            number = self.pid_number.pop(event.packet_id, None)
            if number is not None:
                self.expired_numbers.add(number)
        elif type(event) is Unrecoverable:
            self.unrecoverable += event.count
            self.lost.update((event.location, seq) for seq in range(event.first, event.first + event.count))


async def run_bots(indices: list[int], params: Params, server_url: str,
                   reflector_map: Callable[[tuple[str, int]], tuple[str, int]] | None,
                   start_at: Callable[[], "asyncio.Future[float]"],
                   stop: asyncio.Event) -> tuple[list[Bot], list[dict], dict]:
    """Bots ``indices`` join, wait for ``start_at()``, play ``params.duration``, drain; returns them, their
    stats, and the process's own (``gc_pauses``: its garbage collections of generations 1-2 during play)."""
    bots: list[Bot] = []
    # logins hash with scrypt (tens of ms each, more on a busy host): 64 bots queue behind each other
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        config = ClientConfig(default_deadline=params.deadline, min_rto=params.min_rto,
                              initial_rto=max(params.min_rto, ClientConfig().initial_rto),
                              redundancy=params.redundancy)
        for index in indices:
            bot_rng = random.Random(params.seed * 1_000_003 + index)
            client = BotClient(server_url, f"bot{index}", f"bot-{index}-{params.seed}-plays", http=http, config=config,
                                reflector_map=reflector_map, rng=bot_rng, join_timeout=10.0, recvmmsg=params.recvmmsg)
            bot = Bot(index, client, bot_rng, deliveries=DeliveryLog(expected_deliveries(
                params.rate, params.duration, params.players, params.locations)))
            client.on_event = bot.on_event
            bots.append(bot)
        account = _worker_account()

        async def enter(bot: Bot) -> None:
            await bot.client.start()
            await bot.client.register()
            await bot.client.login()
            location = bot.rng.randrange(params.locations)
            await bot.client.move(*_position(bot.rng, location))
            bot.intervals.append([location, time.monotonic(), float("inf")])

        await asyncio.gather(*(enter(bot) for bot in bots))
        if account is not None:
            for bot in bots:
                _account_bot(account, bot)
        if params.gc_freeze:
            # what joining left (aiohttp, logins, imports) is long-lived: collect it now and keep it out of
            # every later full collection.  Without this the first full collection came 0.7-0.8 s into play
            # and stopped every bots worker for 110-140 ms at once: the cold start's p99 (docs/mmpog.md)
            freeze_startup_heap()
        t_start = await start_at()
        collections = GcWatch().start()
        profile = _play_profiler()
        if account is not None:
            account.start()
        t_end = t_start + params.duration
        payload_pad = bytes(params.payload - UPDATE.size)

        async def play(bot: Bot) -> None:
            interval = 1.0 / params.rate
            next_send = t_start + bot.rng.random() * interval
            next_move = t_start + bot.rng.uniform(0.5, 1.5) * params.move_interval
            number = 0
            client = bot.client
            estimator = client.endpoint.rtt
            bot.rtt_at_start = (estimator.srtt, estimator.rto)
            if params.rtt_trace:
                _trace_rtt(bot, estimator, t_start)
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
                    bot.rto_at_send[number] = client.endpoint.rtt.rto
                bot.sent.append((number, sent_at, client.location, reliable))
                number += 1

        await asyncio.sleep(max(0.0, t_start - time.monotonic()))
        await asyncio.gather(*(play(bot) for bot in bots))
        if profile is not None:
            profile()
        if account is not None:
            account.stop()
            _write_account(account, len(bots))
        await asyncio.sleep(params.drain)      # let retransmissions finish
        collections.stop()
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
    return bots, client_stats, {"gc_pauses": collections.since(t_start)}


PROFILE_ENV = "MMPOG_BOTS_PROFILE"


def _play_profiler() -> Callable[[], None] | None:
    """With ``MMPOG_BOTS_PROFILE=PREFIX`` in the environment, profile this bots process during play
    (cProfile) and write ``PREFIX.<pid>.prof`` when play ends: what a real worker spends its CPU on
    (docs/mmpog.md, "A real bots worker's CPU").  Returns the function that stops and writes it."""
    import os
    prefix = os.environ.get(PROFILE_ENV)
    if not prefix:
        return None
    import cProfile
    # MMPOG_BOTS_PROFILE_CLOCK=cpu: the thread's CPU time (a system call per event: slower, but a call
    # the scheduler preempted, e.g. a sendto whose wake-up runs the reflector first, is not charged)
    cpu = os.environ.get(PROFILE_ENV + "_CLOCK") == "cpu"
    profiler = cProfile.Profile(time.thread_time) if cpu else cProfile.Profile()
    profiler.enable()

    def finish() -> None:
        profiler.disable()
        profiler.dump_stats(f"{prefix}.{os.getpid()}.prof")

    return finish


ACCOUNT_ENV = "MMPOG_BOTS_ACCOUNT"


def _worker_account():
    """With ``MMPOG_BOTS_ACCOUNT=PREFIX``: a :class:`mmpog.cpu_account.CpuAccount` for this bots process."""
    import os
    if not os.environ.get(ACCOUNT_ENV):
        return None
    from .cpu_account import CpuAccount
    return CpuAccount()


def _account_bot(account, bot: "Bot") -> None:
    """Time the parts of one joined bot's work (instance attributes over the methods it is reached by)."""
    client = bot.client
    client._receive_one = account.wrap("read: recvmsg (a wake-up's first datagram)", client._receive_one)
    receiver = client.batch_receiver
    receiver.receive_stamped = account.wrap("read: recvmmsg (the rest, when late)", receiver.receive_stamped)
    client.receive_datagrams = account.wrap("GameClient.receive_datagrams (protocol + service)", client.receive_datagrams)
    client.endpoint.receive_datagrams = account.wrap("ClientEndpoint.receive_datagrams (decode, dedup, gaps)",
                                                     client.endpoint.receive_datagrams)
    client._service = account.wrap("GameClient._service (flush, events, timer)", client._service)
    # (Bot.on_event, 10,000 calls/s, is not wrapped: a clock read per event - a system call - costs more
    # than the event and disturbs what it times; it is inside _service's figure)
    client._on_timer = account.wrap("GameClient._on_timer", client._on_timer)
    client.send = account.wrap("GameClient.send (the bot's own updates)", client.send)
    # the wake-up as the loop calls it: registered at open_transport, so the reader is replaced
    loop = asyncio.get_running_loop()
    loop.remove_reader(client.transport.sock.fileno())
    loop.add_reader(client.transport.sock.fileno(), account.wrap("BotClient._drain (a readable wake-up)", client._drain))


def _write_account(account, bots: int) -> None:
    import os
    report = account.report()
    report["bots"] = bots
    Path(f"{os.environ[ACCOUNT_ENV]}.{os.getpid()}.json").write_text(json.dumps(report, indent=1))


def _trace_rtt(bot: Bot, estimator, t_start: float) -> None:
    """Record every RTT sample the bot's estimator takes from now on (seconds of play, sample), after its
    state when play begins (what the join left): the input to replaying other estimators offline.  Until
    the bot moves (a new location's endpoint has an estimator of its own)."""
    samples: list = []
    bot.rtt_trace = [[estimator.srtt, estimator.rttvar, estimator.rto, estimator.provisional], samples]
    update = estimator.update

    def recording_update(rtt: float, provisional: bool = False) -> None:
        samples.append([time.monotonic() - t_start, rtt])
        update(rtt, provisional)

    estimator.update = recording_update


def dump_bots(bots: list[Bot], client_stats: list[dict], process: dict, path: Path) -> None:
    records = [{"index": b.index, "intervals": b.intervals, "sent": b.sent,
                "got": [[*_update_of(key), lat] for key, lat in b.deliveries.got.items()],
                "arrived": [[*_update_of(key), lat] for key, lat in b.deliveries.arrived.items()],
                "duplicates": b.deliveries.duplicates,
                "delivered": b.delivered, "expired": b.expired, "unrecoverable": b.unrecoverable, "moves": b.moves,
                "echo_seq": [[n, seq] for n, seq in b.echo_seq.items()], "expired_numbers": sorted(b.expired_numbers),
                "lost": [list(item) for item in b.lost], "missing_at_end": [list(item) for item in b.missing_at_end],
                "rto_at_send": [[n, rto] for n, rto in b.rto_at_send.items()], "resent": sorted(b.resent),
                "rtt_at_start": list(b.rtt_at_start), "rtt_trace": b.rtt_trace}
               for b in bots]
    path.write_bytes(msgpack.packb({"bots": records, "stats": client_stats, "process": process}))


def load_bots(path: Path) -> tuple[list[Bot], list[dict], dict]:
    data = msgpack.unpackb(path.read_bytes(), strict_map_key=False)
    bots = []
    for rec in data["bots"]:
        deliveries = DeliveryLog.from_dicts({_update_key(s, n): lat for s, n, lat in rec["got"]},
                                            {_update_key(s, n): lat for s, n, lat in rec["arrived"]}, rec["duplicates"])
        bot = Bot(rec["index"], None, random.Random(0), intervals=[list(i) for i in rec["intervals"]],
                  sent=[tuple(x) for x in rec["sent"]], deliveries=deliveries,
                  delivered=rec["delivered"], expired=rec["expired"],
                  unrecoverable=rec["unrecoverable"], moves=rec["moves"],
                  echo_seq={n: seq for n, seq in rec["echo_seq"]}, expired_numbers=set(rec["expired_numbers"]),
                  lost={tuple(item) for item in rec["lost"]},
                  missing_at_end={tuple(item) for item in rec["missing_at_end"]},
                  rto_at_send={n: rto for n, rto in rec["rto_at_send"]}, resent=set(rec["resent"]),
                  rtt_at_start=tuple(rec["rtt_at_start"]), rtt_trace=rec["rtt_trace"])
        bots.append(bot)
    return bots, data["stats"], data["process"]


async def run_worker(spec_path: Path) -> int:
    """A bots worker process: join, write the ready file, wait for SIGUSR1 (the start time is then in the
    start file), play, write the results."""
    spec = json.loads(spec_path.read_text())
    params = Params(**spec["params"])
    relay = tuple(spec["relay"]) if spec["relay"] else None
    reflector_map = (lambda addr: relay) if relay else None
    loop = asyncio.get_running_loop()
    go = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, go.set)

    async def start_at() -> float:
        Path(spec["ready"]).write_text("joined\n")
        await go.wait()
        return float(Path(spec["start"]).read_text())

    bots, stats, process = await run_bots(spec["indices"], params, spec["server"], reflector_map, start_at,
                                          asyncio.Event())
    dump_bots(bots, stats, process, Path(spec["out"]))
    return 0


def _position(rng: random.Random, location: int) -> tuple[float, float]:
    return location * CELL + rng.uniform(1, CELL - 1), rng.uniform(1, CELL - 1)


def main(argv: list[str] | None = None) -> int:
    """``python -m mmpog.bots --worker SPEC``: one process of bots, started by the experiment
    (``mmpog-bots``, :mod:`tools.mmpog_experiment`, which orchestrates the session)."""
    parser = make_parser("mmpog-bots --worker", "One process of bots (started by the mmpog-bots experiment).")
    parser.add_argument("--worker", type=Path, required=True)
    return run_async(parser, lambda args, ctx: run_worker(args.worker), argv)


if __name__ == "__main__":
    raise SystemExit(main())
