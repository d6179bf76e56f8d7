"""``booster-loadgen mmpog --compare kcp,enet``: the mmpog-bots workload over mmpog, KCP and ENet, side by side.

The same workload for every stack: ``players`` bots in ``locations`` locations (each bot's
location drawn as mmpog-bots draws it, and kept: nobody moves, so every stack sees the same
audience), ``rate`` updates/s of ``payload`` bytes each, ``reliable_fraction`` of them reliable,
``deadline`` the delivery bound; ``loss`` of the datagrams dropped each way by iptables
``statistic`` on the relay's port, in a fresh network namespace per stack (``boxcore.lab``).

* ``mmpog``: ``tools.mmpog_experiment.run_experiment`` (reflector, game server, bots) with no movement.
* ``kcp``: a relay that keeps one KCP conversation per player (the ``kcp`` package, "turbo"
  settings: nodelay, 10 ms interval, fast resend after 2 ACK skips, no congestion window) and
  forwards each reliable update over the KCP conversation of every other member of the
  location; unreliable updates go as plain datagrams (KCP has no unreliable mode).
* ``enet``: a relay on one ENet host (the ``pyenet`` package, defaults); reliable updates as
  reliable packets on channel 0, unreliable ones unsequenced on channel 1; ENet packs what is
  queued for a peer into one datagram per service pass.

Every relay counts the updates it relayed (one per update and receiving member) and the
datagrams it sent; each stack's section has mmpog-bots' fields: ``reliable``/``unreliable``
{``sent``, ``expected``, ``delivered_ratio``, ``delivered_within_deadline_ratio``,
``latency_ms`` {``p50``, ``p90``, ``p99``, ``max``}, ``first_second_latency_ms``},
``duplicates_delivered``, ``updates_relayed_per_s``, ``datagrams_sent_per_s``.  Percentiles
come from :func:`tools.stats.percentile`.

Every role (the relay or reflector, each bots worker) may run at the same CPU budget in its own
cgroup (``Workload.budget``, :func:`tools.mmpog_experiment.cpu_budgets`); each section also has
``cpu_share`` and ``cpu_budget``.  :func:`compare_matrix` runs a list of scenarios and losses in
one go; :func:`table` and :func:`plot` render the whole matrix.

KCP and ENet come from the optional extra ``compare`` (``pip install 'booster-boxes[compare]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import pickle
import random
import socket
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mmpog.bots import NO_STAMP, DeliveryLog, expected_deliveries
from mmpog.gcwatch import freeze_startup_heap
from tools.stats import cpu_seconds
from tools.stats import percentile

STACKS = ("mmpog", "kcp", "enet")
# bot index, location, update number, reliable, send time (time.monotonic(): one clock per host)
UPDATE = struct.Struct("!HIIBd")
JOIN = struct.Struct("!BHI")          # kind, bot index, location
K_UNRELIABLE, K_KCP, K_JOIN, K_JOINED = 0, 1, 2, 3


@dataclass
class Workload:
    players: int = 64
    locations: int = 1
    duration: float = 10.0
    rate: float = 10.0
    reliable_fraction: float = 0.25
    deadline: float = 1.0
    payload: int = 64
    loss: float = 0.05
    seed: int = 1
    workers: int = 2
    drain: float = 1.5                # seconds of receiving after the last send, at least ...
    drain_limit: float = 30.0         # ... and then until nothing reliable is unacknowledged, at most this
    reflector_mode: str = "standalone"
    budget: float = 0.0               # CPU cores per role (relay or reflector, each bots worker); 0: none
    budget_period_us: int = 10_000
    hops: bool = False                # capture the namespace's loopback: each section gets ``hops`` (tools.mmpog_hops)

    def location_of(self, index: int) -> int:
        # mmpog-bots draws the first location with this generator's first call
        return random.Random(self.seed * 1_000_003 + index).randrange(self.locations)


def _latencies(values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    out = {f"p{q}": (None if not ms else round(percentile(ms, q / 100), 3)) for q in (50, 90, 99)}
    out["max"] = round(max(ms), 3) if ms else None
    return out


def analyse(w: Workload, sent: list[tuple[int, int, int, bool, float]], got: dict, duplicates: int,
            t_start: float) -> dict:
    """``sent``: (bot, number, location, reliable, time); ``got``: (receiver, bot, number) -> latency."""
    members: dict[int, list[int]] = {}
    for index in range(w.players):
        members.setdefault(w.location_of(index), []).append(index)
    out = {}
    for reliable, name in ((True, "reliable"), (False, "unreliable")):
        expected = delivered = in_time = 0
        latencies, first = [], []
        count = 0
        for bot, number, location, is_reliable, at in sent:
            if is_reliable != reliable:
                continue
            count += 1
            for receiver in members[location]:
                if receiver == bot:
                    continue
                expected += 1
                latency = got.get((receiver, bot, number))
                if latency is None:
                    continue
                delivered += 1
                in_time += latency <= w.deadline
                latencies.append(latency)
                if at < t_start + 1.0:
                    first.append(latency)
        out[name] = {"sent": count, "expected": expected,
                     "delivered_ratio": round(delivered / expected, 6) if expected else None,
                     "delivered_within_deadline_ratio": round(in_time / expected, 6) if expected else None,
                     "latency_ms": _latencies(latencies), "first_second_latency_ms": _latencies(first)}
    out["duplicates_delivered"] = duplicates
    return out


# ====================================================================== KCP

def _kcp_clock() -> int:
    return int(time.monotonic() * 1000) & 0xFFFFFFFF


def _new_kcp(conv: int, send):
    from kcp import KCP

    kcp = KCP(conv, max_transmission=1400, no_delay=True, update_interval=10, resend_count=2,
              no_congestion_control=True, send_window_size=256, receive_window_size=256)
    kcp.include_outbound_handler(lambda _, data: send(bytes([K_KCP]) + data))
    return kcp


def kcp_relay(port: int, ready, stop, counters) -> None:
    """One UDP socket; per player a KCP conversation (conv = bot index + 1)."""
    import selectors

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", port))
    sock.setblocking(False)
    conns: dict = {}                      # addr -> KCP
    location_of: dict = {}                # addr -> location
    rooms: dict[int, list] = {}           # location -> [addr]
    sent = [0, 0]                         # updates relayed, datagrams sent

    def sender(addr):
        def send(data: bytes) -> None:
            sent[1] += 1
            try:
                sock.sendto(data, addr)
            except BlockingIOError:
                pass
        return send

    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    ready.set()
    next_update = 0.0
    while not stop.is_set():
        now = time.monotonic()
        if now >= next_update:
            clock = _kcp_clock()
            for kcp in conns.values():
                kcp.update(clock)
            next_update = now + 0.01
        if not selector.select(max(0.0, next_update - time.monotonic())):
            continue
        touched = set()
        for _ in range(512):
            try:
                data, addr = sock.recvfrom(2048)
            except BlockingIOError:
                break
            kind = data[0]
            if kind == K_JOIN:
                _, index, location = JOIN.unpack(data)
                if addr not in conns:
                    conns[addr] = _new_kcp(index + 1, sender(addr))
                    conns[addr].update(_kcp_clock())
                    location_of[addr] = location
                    rooms.setdefault(location, []).append(addr)
                sock.sendto(bytes([K_JOINED]), addr)
            elif kind == K_UNRELIABLE:
                location = location_of.get(addr)
                for member in rooms.get(location, ()):
                    if member != addr:
                        sent[0] += 1
                        sent[1] += 1
                        try:
                            sock.sendto(data, member)
                        except BlockingIOError:
                            pass
            elif kind == K_KCP and addr in conns:
                kcp = conns[addr]
                kcp.receive(data[1:])
                touched.add(addr)
                for message in kcp.get_all_received():
                    for member in rooms.get(location_of[addr], ()):
                        if member != addr:
                            sent[0] += 1
                            conns[member].enqueue(bytes(message))
                            touched.add(member)
        for addr in touched:
            conns[addr].flush()           # data and ACKs out now ("turbo"), not at the next 10 ms update
        counters[0], counters[1] = sent   # live: the runner reads them at the start and end of play
        counters[2] = sum(kcp.get_outbound_packets() for kcp in conns.values())


class KcpBot:
    def __init__(self, index: int, location: int, relay: tuple[str, int]) -> None:
        self.index, self.location, self.relay = index, location, relay
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.kcp = _new_kcp(index + 1, self._send)
        self.kcp.update(_kcp_clock())
        self.joined = False

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendto(data, self.relay)
        except BlockingIOError:
            pass

    def join(self) -> None:
        self._send(JOIN.pack(K_JOIN, self.index, self.location))

    def send(self, update: bytes, reliable: bool) -> None:
        if reliable:
            self.kcp.enqueue(update)
            self.kcp.flush()
        else:
            self._send(bytes([K_UNRELIABLE]) + update)

    def receive(self, on_update) -> None:
        flushed = False
        while True:
            try:
                data = self.sock.recv(2048)
            except BlockingIOError:
                break
            if data[0] == K_JOINED:
                self.joined = True
            elif data[0] == K_UNRELIABLE:
                on_update(data[1:])
            elif data[0] == K_KCP:
                self.kcp.receive(data[1:])
                flushed = True
                for message in self.kcp.get_all_received():
                    on_update(bytes(message))
        if flushed:
            self.kcp.flush()

    def tick(self, clock: int) -> None:
        self.kcp.update(clock)

    def in_flight(self) -> int:
        """Reliable segments queued or sent and not yet acknowledged."""
        return self.kcp.get_outbound_packets()

    def fileno(self) -> int:
        return self.sock.fileno()


# ====================================================================== ENet

def enet_relay(port: int, ready, stop, counters) -> None:
    import enet

    host = enet.Host(enet.Address(b"127.0.0.1", port), 4095, 2, 0, 0)
    location_of: dict = {}
    rooms: dict[int, list] = {}
    relayed = 0
    ready.set()
    while not stop.is_set():
        event = host.service(5)
        while event.type != enet.EVENT_TYPE_NONE:
            if event.type == enet.EVENT_TYPE_RECEIVE:
                data = event.packet.data
                peer = event.peer
                key = peer.incomingPeerID
                if data[0] == K_JOIN:
                    _, index, location = JOIN.unpack(data)
                    if key not in location_of:
                        location_of[key] = location
                        rooms.setdefault(location, []).append(peer)
                    peer.send(0, enet.Packet(bytes([K_JOINED]), enet.PACKET_FLAG_RELIABLE))
                else:
                    reliable = event.channelID == 0
                    flags = enet.PACKET_FLAG_RELIABLE if reliable else enet.PACKET_FLAG_UNSEQUENCED
                    for member in rooms.get(location_of.get(key), ()):
                        if member.incomingPeerID != key:
                            relayed += 1
                            member.send(event.channelID, enet.Packet(data, flags))
            event = host.service(0)
        host.flush()
        counters[0], counters[1] = relayed, host.totalSentPackets   # live, read by the runner
        counters[2] = sum(peer.reliableDataInTransit for peers in rooms.values() for peer in peers)


class EnetBot:
    def __init__(self, index: int, location: int, relay: tuple[str, int]) -> None:
        import enet

        self.enet = enet
        self.index, self.location = index, location
        self.host = enet.Host(None, 1, 2, 0, 0)
        self.peer = self.host.connect(enet.Address(relay[0].encode(), relay[1]), 2)
        self.connected = self.joined = False

    def join(self) -> None:
        if self.connected:
            self.peer.send(0, self.enet.Packet(JOIN.pack(K_JOIN, self.index, self.location),
                                               self.enet.PACKET_FLAG_RELIABLE))
            self.host.flush()

    def send(self, update: bytes, reliable: bool) -> None:
        enet = self.enet
        if reliable:
            self.peer.send(0, enet.Packet(update, enet.PACKET_FLAG_RELIABLE))
        else:
            self.peer.send(1, enet.Packet(update, enet.PACKET_FLAG_UNSEQUENCED))
        self.host.flush()

    def receive(self, on_update) -> None:
        enet = self.enet
        event = self.host.service(0)
        while event.type != enet.EVENT_TYPE_NONE:
            if event.type == enet.EVENT_TYPE_CONNECT:
                self.connected = True
            elif event.type == enet.EVENT_TYPE_RECEIVE:
                data = event.packet.data
                if data[:1] == bytes([K_JOINED]):
                    self.joined = True
                else:
                    on_update(data)
            event = self.host.service(0)

    def tick(self, clock: int) -> None:
        """ENet's timers run inside service(), which receive() calls on every pump."""

    def in_flight(self) -> int:
        """Reliable bytes sent and not yet acknowledged."""
        return self.peer.reliableDataInTransit

    def fileno(self) -> int:
        return self.host.socket.fileno()


# ====================================================================== bots worker

def bots_worker(stack: str, indices: list[int], w: Workload, relay: tuple[str, int], ready, start_at, relay_counters,
                out) -> None:
    """Join, wait for the common start, play, drain; put (sent, got, duplicates, drain) on ``out``.

    The drain lasts ``w.drain`` seconds and then as long as anything reliable is unacknowledged
    here or at the relay (``relay_counters[2]``), at most ``w.drain_limit`` seconds: a
    retransmission backed off on a busy host still counts as delivered, as it would in a game that
    goes on, and the section says how long the drain took and whether it settled.
    """
    import selectors

    bots = [(KcpBot if stack == "kcp" else EnetBot)(i, w.location_of(i), relay) for i in indices]
    selector = selectors.DefaultSelector()
    for bot in bots:
        selector.register(bot.fileno(), selectors.EVENT_READ, bot)
    # recorded as mmpog's bots record (mmpog.bots.DeliveryLog: flat arrays during play, dicts after),
    # so no stack's bots pay more for the measurement than another's
    deliveries = DeliveryLog(expected_deliveries(w.rate, w.duration, w.players, w.locations, receivers=len(bots)))
    me = [0]

    def on_update(data: bytes) -> None:
        sender, _, number, _, sent_at = UPDATE.unpack_from(data)
        log = deliveries                          # DeliveryLog.record, inline (as mmpog.bots.Bot.on_event)
        i = log.count
        try:
            log.keys[i] = me[0] << 48 | sender << 32 | number
        except IndexError:
            log.grow()
            log.keys[i] = me[0] << 48 | sender << 32 | number
        log.game[i] = time.monotonic() - sent_at
        log.socket[i] = NO_STAMP                  # (these bots read no kernel stamps)
        log.count = i + 1

    def pump(timeout: float) -> None:
        for key, _ in selector.select(timeout):
            me[0] = key.data.index
            key.data.receive(on_update)
        if stack == "enet":
            for bot in bots:             # ENet retransmits and acknowledges inside service()
                me[0] = bot.index
                bot.receive(on_update)
        else:
            clock = _kcp_clock()
            for bot in bots:
                bot.tick(clock)

    deadline = time.monotonic() + 60
    last_join = 0.0
    while not all(bot.joined for bot in bots):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{stack} bots did not join")
        if time.monotonic() - last_join > 0.2:
            for bot in bots:
                if not bot.joined:
                    bot.join()
            last_join = time.monotonic()
        pump(0.01)
    freeze_startup_heap()        # as mmpog's bots do: no full collection of the start-up heap in play
    ready.set()
    while start_at.value == 0.0:
        pump(0.01)
    t_start = start_at.value
    rng = {bot.index: random.Random(w.seed * 7_919 + bot.index) for bot in bots}
    interval = 1.0 / w.rate
    schedule = sorted((t_start + rng[bot.index].random() * interval, bot.index) for bot in bots)
    by_index = {bot.index: bot for bot in bots}
    numbers = dict.fromkeys(by_index, 0)
    sent = []
    pad = bytes(max(0, w.payload - UPDATE.size))
    t_end = t_start + w.duration
    import heapq
    heapq.heapify(schedule)
    while schedule:
        due, index = schedule[0]
        now = time.monotonic()
        if due > now:
            pump(min(due - now, 0.005))
            continue
        heapq.heappop(schedule)
        if due >= t_end:
            continue
        bot = by_index[index]
        reliable = rng[index].random() < w.reliable_fraction
        number = numbers[index]
        numbers[index] += 1
        at = time.monotonic()
        bot.send(UPDATE.pack(index, bot.location, number, reliable, at) + pad, reliable)
        sent.append((index, number, bot.location, reliable, at))
        heapq.heappush(schedule, (due + interval, index))
    drain_start = time.monotonic()
    drain_min, drain_max = drain_start + w.drain, drain_start + max(w.drain, w.drain_limit)

    def settled() -> bool:
        return relay_counters[2] == 0 and not any(bot.in_flight() for bot in bots)

    while (now := time.monotonic()) < drain_min or (now < drain_max and not settled()):
        pump(0.005)
    out.put(json.dumps({"sent": sent, "got": [[key >> 48, key >> 32 & 0xFFFF, key & 0xFFFF_FFFF, lat]
                                              for key, lat in deliveries.got.items()],
                        "duplicates": deliveries.duplicates,
                        "drain": {"seconds": round(time.monotonic() - drain_start, 3), "settled": settled()}}))


def run_relay_stack(stack: str, w: Workload, port: int, updates: dict | None = None) -> dict:
    """KCP or ENet: the relay and the bots (``w.workers`` processes) on loopback, port ``port``.

    ``updates``, when given, gets ``sent`` {(sender, number): (send time, reliable)} and ``got``
    {(receiver, sender, number): latency}: the per-update input of ``tools.mmpog_hops``."""
    from tools.mmpog_experiment import _throttled, cpu_budgets
    from tools.stats import sleeps

    ctx = multiprocessing.get_context("fork")
    stop, relay_ready = ctx.Event(), ctx.Event()
    counters = ctx.Array("q", 3, lock=False)   # updates relayed, datagrams sent, reliable unacknowledged
    relay = ctx.Process(target=kcp_relay if stack == "kcp" else enet_relay, args=(port, relay_ready, stop, counters))
    budgets = cpu_budgets(w.budget, w.budget_period_us)
    relay.start()
    try:
        if budgets is not None:
            budgets.add("relay", relay.pid)
        if not relay_ready.wait(20):
            raise RuntimeError(f"{stack} relay did not start")
        start_at = ctx.Value("d", 0.0)
        out = ctx.Queue()
        groups = [list(range(k, w.players, w.workers)) for k in range(w.workers)]
        readies = [ctx.Event() for _ in groups]
        workers = [ctx.Process(target=bots_worker, args=(stack, g, w, ("127.0.0.1", port), r, start_at, counters, out))
                   for g, r in zip(groups, readies)]
        for number, proc in enumerate(workers):
            proc.start()
            if budgets is not None:
                budgets.add(f"worker{number}", proc.pid)
        for r, proc in zip(readies, workers):
            while not r.wait(0.5):
                if not proc.is_alive():
                    raise RuntimeError(f"a {stack} bots worker died before joining")
        t_start = time.monotonic() + 0.2
        start_at.value = t_start
        # the relay's counters and each process's CPU over the play window only, as mmpog's are read
        pids = {"relay": relay.pid, **{f"worker{n}": proc.pid for n, proc in enumerate(workers)}}
        time.sleep(max(0.0, t_start - time.monotonic()))
        before = list(counters)
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        sleeps_before = {name: sleeps(pid) for name, pid in pids.items()}
        throttled_before = _throttled(budgets, list(pids))
        time.sleep(max(0.0, t_start + w.duration - time.monotonic()))
        after = list(counters)
        played = time.monotonic() - t_start
        cpu_share = {name: round((cpu_seconds(pid) - cpu_before[name]) / played, 3) for name, pid in pids.items()}
        wakeups = {name: round((sleeps(pid) - sleeps_before[name]) / played) for name, pid in pids.items()}
        throttled = {name: count - throttled_before[name] for name, count in _throttled(budgets, list(pids)).items()}
        results = [json.loads(out.get(timeout=w.duration + max(w.drain, w.drain_limit) + 120)) for _ in workers]
        for proc in workers:
            proc.join(10)
    finally:
        stop.set()
        relay.join(10)
        if relay.is_alive():
            relay.kill()
        if budgets is not None:
            budgets.cleanup()
    sent, got, duplicates = [], {}, 0
    for result in results:
        sent += [tuple(x) for x in result["sent"]]
        got.update({(r, s, n): lat for r, s, n, lat in result["got"]})
        duplicates += result["duplicates"]
    out_section = analyse(w, sent, got, duplicates, t_start)
    if updates is not None:
        updates["sent"] = {(bot, number): (at, reliable) for bot, number, _, reliable, at in sent}
        updates["got"] = got
    out_section["updates_relayed_per_s"] = round((after[0] - before[0]) / played, 1)
    out_section["datagrams_sent_per_s"] = round((after[1] - before[1]) / played, 1)
    out_section["cpu_share"] = cpu_share
    out_section["wakeups_per_s"] = wakeups
    out_section["drain"] = {"seconds": max(r["drain"]["seconds"] for r in results),
                            "settled": all(r["drain"]["settled"] for r in results)}
    out_section["cpu_budget"] = {"cores_per_role": w.budget or None, "period_us": w.budget_period_us,
                                 "throttled_periods": throttled}
    out_section["stack"] = {"kcp": "kcp (turbo: nodelay, 10 ms interval, resend 2, no congestion window)",
                            "enet": "enet (pyenet defaults)"}[stack]
    return out_section


def run_mmpog_stack(w: Workload, port: int, updates: dict | None = None) -> dict:
    """``updates`` as in :func:`run_relay_stack`, and ``arrived``: the latency at the receiving socket."""
    from mmpog.bots import Params
    from tools.mmpog_experiment import run_experiment

    params = Params(players=w.players, locations=w.locations, duration=w.duration, loss=0.0, loss_mode="none",
                    rate=w.rate, reliable_fraction=w.reliable_fraction, deadline=w.deadline, payload=w.payload,
                    move_interval=1e9, seed=w.seed, reflector_mode=w.reflector_mode, reflector_port=port,
                    workers=w.workers, drain=w.drain, budget=w.budget, budget_period_us=w.budget_period_us,
                    bots_in_process=False)     # the bots in worker processes of their own, as KCP's and ENet's
    bots: list = []
    result = asyncio.run(run_experiment(params, bots_out=bots))
    if updates is not None:
        updates["sent"] = {(bot.index, number): (at, reliable) for bot in bots for number, at, _, reliable in bot.sent}
        updates["got"] = {(bot.index, sender, number): lat for bot in bots for (sender, number), lat in bot.got.items()}
        updates["arrived"] = {(bot.index, sender, number): lat for bot in bots
                              for (sender, number), lat in bot.arrived.items()}
    out = {name: result[name] for name in ("reliable", "unreliable")}
    out["duplicates_delivered"] = result["duplicates_delivered"]
    out["updates_relayed_per_s"] = result.get("reflector_updates_per_s")
    out["datagrams_sent_per_s"] = result.get("reflector_pps")
    out["stack"] = "mmpog (reflector " + w.reflector_mode + ")"
    out["retransmissions"] = result.get("retransmissions_detail")
    out["cpu_share"] = result.get("cpu_share")
    out["wakeups_per_s"] = result.get("wakeups_per_s")
    out["cpu_budget"] = result.get("cpu_budget")
    return out


# ====================================================================== driver

def run_in_namespace(stack: str, w: Workload, port: int = 7400) -> dict:
    """Run one stack's session in a fresh namespace whose iptables drop ``w.loss`` each way on ``port``."""
    from tools.mmpog_experiment import PRIVATE_MOUNTS, lossy_namespace

    with lossy_namespace("mmpogcmp", w.loss, port) as lab:
        with tempfile.TemporaryDirectory(prefix="mmpog-compare-") as tmp:
            out = Path(tmp) / "out.json"
            proc = lab.popen("game", [sys.executable, "-m", "tools.compare_mmpog", "--child", stack, "--port", str(port),
                                      "--workload", json.dumps(asdict(w)), "--json", str(out)],
                             env=dict(os.environ, **{PRIVATE_MOUNTS: "1"}))
            if proc.wait() != 0:
                raise RuntimeError(f"the {stack} session failed (status {proc.returncode})")
            return json.loads(out.read_text())


def compare(w: Workload, stacks: list[str], say=print) -> dict:
    result = {"workload": asdict(w), "loss_mode": "iptables statistic in a namespace, each way, on the relay port"}
    for stack in stacks:
        say(f"{stack}: {w.players} players, {w.locations} location(s), {w.loss:.0%} loss each way, {w.duration:g} s")
        result[stack] = run_in_namespace(stack, w)
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def compare_matrix(base: Workload, scenarios: list[tuple[int, int]], losses: list[float], stacks: list[str],
                   say=print) -> dict:
    """Every (players x locations, loss) of the matrix over every stack: the whole table in one run."""
    runs = []
    for players, locations in scenarios:
        for loss in losses:
            w = Workload(**{**asdict(base), "players": players, "locations": locations, "loss": loss})
            runs.append(compare(w, stacks, say))
    return {"stacks": stacks, "runs": runs, "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def _ms(value) -> str:
    return "-" if value is None else f"{value:,.1f}"


def table(result: dict) -> str:
    """One markdown row per (scenario, loss, stack), in the layout of docs/mmpog.md."""
    lines = ["| scenario, loss | stack | reliable within deadline (delivered) | p50 / p90 / p99 / max ms | "
             "first-second p99 ms | at the socket p99 ms | duplicates | updates relayed/s | datagrams/s | "
             "CPU share (relay or reflector / bots) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        w = run["workload"]
        label = f"{w['players']}x{w['locations']}, {w['loss']:.0%}"
        for stack in result["stacks"]:
            s = run[stack]
            r = s["reliable"]
            lat = r["latency_ms"]
            cpu = s.get("cpu_share") or {}
            server = cpu.get("relay", cpu.get("reflector"))
            bots = sum(v for k, v in cpu.items() if k.startswith("worker"))
            socket_p99 = (r.get("arrival_latency_ms") or {}).get("p99")
            lines.append(f"| {label} | {stack} | {r['delivered_within_deadline_ratio']:.2%} ({r['delivered_ratio']:.2%}) | "
                         f"{_ms(lat['p50'])} / {_ms(lat['p90'])} / {_ms(lat['p99'])} / {_ms(lat['max'])} | "
                         f"{_ms(r['first_second_latency_ms']['p99'])} | {_ms(socket_p99)} | "
                         f"{s['duplicates_delivered']} | {s['updates_relayed_per_s']:,.0f} | "
                         f"{s['datagrams_sent_per_s']:,.0f} | {server} / {round(bots, 3)} |")
            label = ""
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """A grid: one panel per run (scenario x loss), the stacks' reliable-latency percentiles side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, stacks = result["runs"], result["stacks"]
    scenarios = sorted({(r["workload"]["players"], r["workload"]["locations"]) for r in runs}, reverse=True)
    losses = sorted({r["workload"]["loss"] for r in runs})
    labels = ["p50", "p90", "p99", "max"]
    fig, axes = plt.subplots(len(scenarios), len(losses), figsize=(4.2 * len(losses), 3.4 * len(scenarios)),
                             squeeze=False, sharey=True)
    width = 0.8 / len(stacks)
    for run in runs:
        w = run["workload"]
        ax = axes[scenarios.index((w["players"], w["locations"]))][losses.index(w["loss"])]
        for k, stack in enumerate(stacks):
            values = [run[stack]["reliable"]["latency_ms"][q] or 0 for q in labels]
            ax.bar([i + (k - (len(stacks) - 1) / 2) * width for i in range(len(labels))], values, width=width,
                   label=stack)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yscale("log")
        ax.axhline(w["deadline"] * 1000, color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(f"{w['players']} players, {w['locations']} loc., {w['loss']:.0%} loss each way", fontsize=9)
    for row in axes:
        row[0].set_ylabel("reliable latency (ms)")
    axes[0][0].legend(fontsize=8)
    budget = runs[0]["workload"].get("budget") if runs else None
    fig.suptitle("mmpog vs " + ", ".join(s for s in stacks if s != "mmpog")
                 + (f" (CPU budget {budget:g} core per role)" if budget else ""), fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    """The namespace child: ``--child STACK`` runs one stack's session and writes its section."""
    parser = argparse.ArgumentParser(description="one stack of the mmpog comparison (run by booster-loadgen)")
    parser.add_argument("--child", choices=STACKS, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workload", required=True)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    w = Workload(**json.loads(args.workload))
    if not w.hops:
        section = run_mmpog_stack(w, args.port) if args.child == "mmpog" else run_relay_stack(args.child, w, args.port)
        args.json.write_text(json.dumps(section, indent=2))
        return 0
    from tools import mmpog_hops

    ctx = multiprocessing.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    captured_path = args.json.with_suffix(".capture")
    capturer = ctx.Process(target=mmpog_hops.capture, args=(ready, stop, str(captured_path)))
    capturer.start()
    try:
        if not ready.wait(10):
            raise RuntimeError("the loopback capture did not start")
        updates: dict = {}
        section = (run_mmpog_stack(w, args.port, updates) if args.child == "mmpog"
                   else run_relay_stack(args.child, w, args.port, updates))
    finally:
        stop.set()
        capturer.join(60)
    captured = pickle.loads(captured_path.read_bytes())
    section["hops"] = mmpog_hops.analyse(args.child, captured, args.port, updates["sent"], updates["got"],
                                         updates.get("arrived"))
    args.json.write_text(json.dumps(section, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
