"""A deterministic, in-memory network for the reliability protocol (for our tests and for game developers').

:class:`SimNetwork` joins one :class:`~mmpog.reliability.ReflectorCore` and
any number of :class:`~mmpog.reliability.ClientEndpoint` through seeded lossy
links with simulated time: per-direction loss, base latency plus jitter (which
reorders), duplication, and scripted drops (``drop_when``) to stage exact
scenarios such as the paper's Fig. 12.  Nothing here touches a clock or socket.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from dataclasses import dataclass
from typing import Callable

from . import wire
from .reliability import Address, ClientEndpoint, Event, ReflectorCore

UP = "up"        # client -> reflector
DOWN = "down"    # reflector -> client

DropRule = Callable[[str, Address, wire.Header], bool]


@dataclass
class LinkProfile:
    loss_up: float = 0.0
    loss_down: float = 0.0
    latency: float = 0.005       # one way
    jitter: float = 0.0          # uniform extra delay in [0, jitter): reorders packets
    duplicate: float = 0.0       # probability a datagram is delivered twice


class SimNetwork:
    def __init__(self, reflector: ReflectorCore, profile: LinkProfile | None = None, seed: int = 0,
                 start: float = 1000.0, reflector_tick: float = 0.0, probe_stream: bool = False) -> None:
        self.reflector = reflector
        self.reflector_tick = reflector_tick   # the reflector adapter's timer resolution (0: exact)
        self.profile = profile or LinkProfile()
        self.rng = random.Random(seed)
        # probe_stream: heartbeats draw their loss and delay from a stream of their own, so two probe
        # policies meet the same losses of every other datagram (a comparison of policies, not of luck)
        self.probe_rng = random.Random(seed * 7717 + 1) if probe_stream else self.rng
        self.now = start
        self.clients: dict[Address, ClientEndpoint] = {}
        self.events: dict[Address, list[Event]] = {}
        self.drop_rules: list[DropRule] = []
        self.dropped: list[tuple[str, Address, wire.Header]] = []
        self.delivered_datagrams = 0
        self.transmitted = {UP: 0, DOWN: 0}   # datagrams put on the links each way (before loss)
        self.sequenced: dict[tuple[int, int], tuple[int, int]] = {}   # (location, seq) -> (sender, packet id)
        self._queue: list[tuple[float, int, str, Address, bytes]] = []
        self._tiebreak = itertools.count()

    def add_client(self, endpoint: ClientEndpoint, addr: Address) -> None:
        self.clients[addr] = endpoint
        self.events[addr] = []

    def drop_when(self, rule: DropRule, times: int = 1) -> None:
        """Drop the next ``times`` datagrams for which ``rule(direction, client_addr, header)`` is true."""
        remaining = [times]

        def once(direction: str, addr: Address, header: wire.Header) -> bool:
            if remaining[0] > 0 and rule(direction, addr, header):
                remaining[0] -= 1
                return True
            return False

        self.drop_rules.append(once)

    # ------------------------------------------------------------------ running

    def flush(self) -> None:
        """Move every queued datagram of the endpoints and the reflector onto the links."""
        for addr, endpoint in self.clients.items():
            for data in endpoint.datagrams_to_send(self.now):
                self._transmit(UP, addr, data)
            self._collect(addr, endpoint)
        for data, dest in self.reflector.datagrams_to_send(self.now):
            if isinstance(dest, int):
                header, _ = wire.decode(data)
                if header.seq and header.kind is wire.Kind.DATA and header.reliable:
                    self.sequenced[(header.location, header.seq)] = (header.sender, header.packet_id)
                targets = self.reflector.members(dest)
            else:
                targets = (dest,)
            for addr in targets:
                self._transmit(DOWN, addr, data)
        while self.reflector.next_event() is not None:
            pass

    def _collect(self, addr: Address, endpoint: ClientEndpoint) -> None:
        sink = self.events[addr]
        while (event := endpoint.next_event()) is not None:
            sink.append(event)

    def _transmit(self, direction: str, addr: Address, data: bytes) -> None:
        self.transmitted[direction] += 1
        header, _ = wire.decode(data)
        for rule in self.drop_rules:
            if rule(direction, addr, header):
                self.dropped.append((direction, addr, header))
                return
        rng = self.probe_rng if header.kind is wire.Kind.HEARTBEAT else self.rng
        loss = self.profile.loss_up if direction == UP else self.profile.loss_down
        if loss and rng.random() < loss:
            self.dropped.append((direction, addr, header))
            return
        copies = 2 if self.profile.duplicate and rng.random() < self.profile.duplicate else 1
        for _ in range(copies):
            delay = self.profile.latency + (rng.random() * self.profile.jitter if self.profile.jitter else 0)
            heapq.heappush(self._queue, (self.now + delay, next(self._tiebreak), direction, addr, data))

    def _next_time(self) -> float | None:
        times = [self._queue[0][0]] if self._queue else []
        for endpoint in self.clients.values():
            timer = endpoint.get_timer()
            if timer is not None:
                times.append(timer)
        timer = self._reflector_timer()
        if timer is not None:
            times.append(timer)
        return min(times) if times else None

    def _reflector_timer(self) -> float | None:
        """The reflector's timer as its adapter would run it: at the next multiple of the tick."""
        timer = self.reflector.get_timer()
        if timer is None or not self.reflector_tick:
            return timer
        return math.ceil(timer / self.reflector_tick - 1e-9) * self.reflector_tick

    def step(self, until: float) -> bool:
        """Advance to the next thing that happens (not past ``until``); False if nothing is due."""
        self.flush()
        when = self._next_time()
        if when is None or when > until:
            self.now = max(self.now, until)
            return False
        self.now = max(self.now, when)
        while self._queue and self._queue[0][0] <= self.now:
            _, _, direction, addr, data = heapq.heappop(self._queue)
            self.delivered_datagrams += 1
            if direction == UP:
                self.reflector.receive_datagram(data, addr, self.now)
            elif addr in self.clients:
                self.clients[addr].receive_datagram(data, self.now)
        for endpoint in self.clients.values():
            timer = endpoint.get_timer()
            if timer is not None and timer <= self.now:
                endpoint.handle_timer(self.now)
        timer = self._reflector_timer()
        if timer is not None and timer <= self.now:
            self.reflector.handle_timer(self.now)
        self.flush()
        return True

    def run_for(self, duration: float) -> None:
        until = self.now + duration
        while self.step(until):
            pass

    def run_until_quiet(self, limit: float = 10.0) -> None:
        """Run until no datagram is in flight and no endpoint has a pending reliable packet or gap."""
        until = self.now + limit
        while self.now < until:
            busy = self._queue or any(ep.pending_count or ep._missing for ep in self.clients.values())
            if not busy:
                return
            if not self.step(until):
                return


def join(reflector: ReflectorCore, location: int, player: int, token: bytes, at: float,
         address: tuple[str, int], config=None, rng: random.Random | None = None) -> ClientEndpoint:
    """A client endpoint of ``player`` joined to ``location`` of ``reflector`` at ``at`` (its hello
    from ``address``, welcomed 0.5 ms later).  Its join's events are still queued."""
    reflector.add_member(location, player, token)
    endpoint = ClientEndpoint(player, location, token, config, rng=rng or random.Random(1))
    endpoint.connect(at)
    for hello in endpoint.datagrams_to_send(at):
        reflector.receive_datagram(hello, address, at)
    for welcome, _ in reflector.datagrams_to_send(at):
        endpoint.receive_datagram(welcome, at + 0.0005)
    if not endpoint.joined:
        raise RuntimeError(f"player {player} did not join")
    return endpoint


def joined_endpoint(location: int, player: int, token: bytes, at: float) -> ClientEndpoint:
    """A client endpoint of ``player`` that joined ``location`` at ``at`` (through a fresh
    reflector core), for benches and tests that feed it datagrams directly.  Its join's events
    are still queued."""
    return join(ReflectorCore(), location, player, token, at, ("127.0.0.1", 9))
