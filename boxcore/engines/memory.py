"""The ``memory`` engine: an in-process data path for unit tests (boxcore.testing).

No sockets to the outside: packets enter with :meth:`MemoryEngine.process`
(``MemoryBox.inject``) and whatever the box would put on the wire is recorded
in :attr:`MemoryEngine.emitted`.  Classification is the reference classifier,
delivery is always ``channel`` (the booster's data channel), so booster code
runs exactly as on the user engine.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Any

from boxcore import wire
from boxcore.classifier import Classifier
from boxcore.engines.base import BoosterSession, Delivery, Route, TablesInBoxd
from boxcore.packet import Packet
from boxcore.rules import Action, Rule
from boxcore.wire import Tag, VerdictCode
from cliruntime.supervisor import within


@dataclass
class Emitted:
    """One packet the box put on the wire: ``why`` is forward, modified, inject or multicast."""

    why: str
    packet: Packet


@dataclass
class Outcome:
    """What the box did with one injected packet."""

    action: str                      # forwarded | modified | consumed | dropped | multicast | timeout
    rule: Rule | None = None
    emitted: list[Packet] = field(default_factory=list)
    copies: int = 0


class MemoryEngine(TablesInBoxd):
    name = "memory"

    def __init__(self, *, verdict_timeout: float = 5.0, max_emitted: int = 100_000) -> None:
        self.classifier = Classifier()
        self.owners: dict[int, BoosterSession] = {}
        self.groups: dict[int, list[tuple[str, int]]] = {}
        self.routes: list[Route] = []
        self.verdict_timeout = verdict_timeout
        self.emitted: collections.deque[Emitted] = collections.deque(maxlen=max_emitted)
        self.pending: dict[int, asyncio.Future] = {}
        self.delivered: collections.Counter = collections.Counter()  # sid -> datagrams pushed
        self.stats: collections.Counter = collections.Counter()
        self._token = 0

    async def start(self) -> None:
        self.classifier.clear()

    async def stop(self) -> None:
        self.classifier.clear()
        self.owners.clear()
        for fut in self.pending.values():
            if not fut.done():
                fut.cancel()

    async def install(self, rule: Rule, session: BoosterSession) -> Delivery:
        self.classifier.add(rule)
        self.owners[rule.cookie] = session
        return Delivery("channel", {})

    async def install_tcp(self, rule: Rule, session: BoosterSession) -> Delivery:
        raise NotImplementedError("the memory engine has no TCP streams")

    async def remove(self, rule: Rule) -> None:
        self.classifier.remove(rule.cookie)
        self.owners.pop(rule.cookie, None)

    def status(self) -> dict[str, Any]:
        return {"emitted": len(self.emitted), "pending_verdicts": len(self.pending),
                "counters": dict(self.stats)}

    # ---------------------------------------------------------- data path
    def _emit(self, why: str, pkt: Packet, out: list[Packet]) -> None:
        self.emitted.append(Emitted(why, pkt))
        out.append(pkt)

    def _push(self, session: BoosterSession, cookie: int, token: int, pkt: Packet, want: bool) -> bool:
        ok = session.send_datagram(wire.pack_datagram(
            Tag.PACKET, cookie, token, pkt.proto, pkt.src, pkt.sport, pkt.dst, pkt.dport, pkt.payload, want))
        if ok:
            self.delivered[session.sid] += 1
        return ok

    async def process(self, pkt: Packet) -> Outcome:
        decision = self.classifier.lookup(pkt)
        outcome = Outcome("forwarded", decision.terminal)
        for rule in decision.copies:
            session = self.owners.get(rule.cookie)
            if session is not None and self._push(session, rule.cookie, 0, pkt, False):
                outcome.copies += 1
        rule = decision.terminal
        if rule is None or rule.action is Action.FORWARD:
            self._emit("forward", pkt, outcome.emitted)
        elif rule.action is Action.DROP:
            outcome.action = "dropped"
        elif rule.action is Action.MULTICAST:
            outcome.action = "multicast"
            for host, port in self.groups.get(rule.group, ()):
                self._emit("multicast", Packet(pkt.proto, pkt.src, pkt.sport, host, port, pkt.payload),
                           outcome.emitted)
        else:  # REDIRECT: wait for the booster's verdict
            session = self.owners[rule.cookie]
            self._token += 1
            token = self._token
            fut = asyncio.get_running_loop().create_future()
            self.pending[token] = fut
            if not self._push(session, rule.cookie, token, pkt, True):
                del self.pending[token]
                self._emit("forward", pkt, outcome.emitted)  # fail open
                return outcome
            try:
                code, payload = await within(fut, self.verdict_timeout)
            except asyncio.TimeoutError:
                self.pending.pop(token, None)
                outcome.action = "timeout"
                self._emit("forward", pkt, outcome.emitted)
                return outcome
            if code == VerdictCode.PASS:
                self._emit("forward", pkt, outcome.emitted)
            elif code == VerdictCode.MODIFY:
                outcome.action = "modified"
                self._emit("modified", Packet(pkt.proto, pkt.src, pkt.sport, pkt.dst, pkt.dport,
                                              bytes(payload or b"")), outcome.emitted)
            else:
                outcome.action = "consumed"
        return outcome

    def verdict(self, session: BoosterSession, token: int, verdict: int, payload: bytes | None) -> None:
        fut = self.pending.pop(token, None)
        if fut is None or fut.done():
            self.stats["verdicts_late"] += 1
            return
        fut.set_result((verdict, payload))

    def inject(self, pkt: Packet, session: BoosterSession) -> None:
        self.emitted.append(Emitted("inject", pkt))

    def send_multicast(self, group: int, payload: bytes, src_port: int, session: BoosterSession) -> None:
        members = self.groups.get(group)
        if not members:
            raise ValueError(f"no multicast group {group}")
        for host, port in members:
            self.emitted.append(Emitted("multicast", Packet(17, "0.0.0.0", src_port, host, port, payload)))
