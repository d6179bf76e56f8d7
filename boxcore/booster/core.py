"""The :class:`Booster`: one booster's connection to boxd and everything it installed.

It is assembled from explicit parts: the control session (:mod:`.control`), data dispatch
(:mod:`.dispatch`), timers (:mod:`.timers`), the directory client (:mod:`.directory`), and a
:class:`cliruntime.supervisor.Supervisor` (``booster.tasks``) that runs every background task of
the booster (heartbeats, coroutine handlers, intercepted connections, timer coroutines, and the
application's own work started with :meth:`Booster.spawn`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any, Callable, Coroutine

from boxcore import wire
from boxcore.booster.context import ReceiverContext
from boxcore.booster.control import ControlSession
from boxcore.booster.directory import DirectoryClient
from boxcore.booster.dispatch import MAX_HANDLERS_IN_FLIGHT, DataDispatch, HandlerGuard, guard_streams
from boxcore.booster.errors import BoosterError, BoxdGone
from boxcore.booster.inflight import InFlight
from boxcore.booster.sockets import UdpEndpoint
from boxcore.booster.subscription import Subscription
from boxcore.booster.timers import Timer, Timers
from boxcore.engines.base import Delivery
from boxcore.packet import Packet
from boxcore.receivers import get_receiver
from boxcore.rules import Action, Match, Rule
from boxcore.wire import Tag
from cliruntime import Stats
from cliruntime.supervisor import Supervisor, first_of

log = logging.getLogger("boxcore.booster")

DEFAULT_CONTROL = "/run/boxd/control.sock"
# optional protocol features this library speaks (announced in the hello, see wire.FEATURES)
FEATURES = ("delegate",)      # takes a socket boxd gives back after an "undelegate"

__all__ = ["Booster", "DEFAULT_CONTROL"]


class Booster:
    """An asyncio booster connected to boxd.  Use as ``async with Booster(name, control=...)``
    (or through :func:`boxcore.booster.run_booster`, which also turns startup errors into CLI
    errors and waits for the stop).

    ``max_handlers_in_flight`` bounds the coroutine packet handlers running at once (every rule,
    every delivery): a packet that finds them all busy is decided at once, failing open (it
    passes), and counted in ``stats["handlers_refused"]``."""

    def __init__(self, name: str, control: str | os.PathLike | None = None, *,
                 heartbeat: float | None = None, request_timeout: float = 10.0,
                 clock: Any = None, sock: socket.socket | None = None,
                 max_handlers_in_flight: int = MAX_HANDLERS_IN_FLIGHT) -> None:
        self.name = name
        self.control = os.fspath(control or os.environ.get("BOXD_CONTROL", DEFAULT_CONTROL))
        self.stats = Stats()
        self.engine: str | None = None
        self.sid: int | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tasks: Supervisor | None = None        # created on connect
        self._heartbeat_override = heartbeat
        self._clock = clock          # timers: the event loop unless a test passes a FakeClock
        self._given_sock = sock      # an already connected control socket (boxcore.testing)
        self._subscriptions: dict[int, Subscription] = {}
        self.session = ControlSession(self._on_event, self._on_close, self.stats,
                                      request_timeout=request_timeout)
        self.directory = DirectoryClient(self.session, self.stats)
        self._guard = HandlerGuard(self.stats)
        self.dispatch = DataDispatch(self.stats, self._guard, self.spawn, claim=self._channel_handler_of,
                                     max_handlers_in_flight=max_handlers_in_flight)
        self.timers = Timers(self.spawn, self._guard.failed)

    # ---------------------------------------------------------- state
    @property
    def closed(self) -> bool:
        """True before connect, after close, and as soon as boxd is gone."""
        return self.session.closed

    @property
    def close_reason(self) -> str | None:
        return self.session.close_reason

    @property
    def inflight(self) -> InFlight:
        """Coroutine packet handlers still running (``await booster.inflight.wait_idle()``)."""
        return self.dispatch.inflight

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subscriptions.values())

    # ---------------------------------------------------------- connection
    async def __aenter__(self) -> "Booster":
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect to boxd, register (``hello``), take the data channel, start heartbeats.

        Raises :class:`BoxdGone` if boxd cannot be reached, :class:`BoosterError` (e.g.
        ``Conflict``: the name is taken) if it refuses the booster.
        """
        self.loop = asyncio.get_running_loop()
        if self._clock is None:
            self._clock = self.loop
        self.timers.clock = self._clock
        sock, self._given_sock = self._given_sock, None
        await self.session.open(self.control, sock)
        self.tasks = Supervisor(f"booster {self.name}", logger=log)
        try:
            result, fds = await self.session.request_fds({"t": "hello", "name": self.name,
                                                          "version": wire.PROTOCOL_VERSION,
                                                          "features": list(FEATURES)})
        except BaseException:
            self.session.close("registration refused")
            await self.tasks.aclose()
            raise
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            await self.close()
            raise BoxdGone("boxd did not hand over a data channel")
        self.dispatch.attach(socket.socket(fileno=fds[0]), self.loop)
        self.sid, self.engine = result["sid"], result["engine"]
        interval = self._heartbeat_override or float(result["heartbeat"])
        self.spawn(self.session.heartbeats(interval, self.dispatch.heartbeat_counters,
                                           lambda: self.stats["handler_errors"]), name="heartbeats")
        log.info("booster %s registered with boxd (engine %s)", self.name, self.engine)

    async def close(self) -> None:
        """Stop receivers, say goodbye (boxd removes our rules) and disconnect; background tasks
        are cancelled and awaited."""
        self.timers.close()
        for sub in list(self._subscriptions.values()):
            if sub.receiver is not None:
                with contextlib.suppress(Exception):
                    await sub.receiver.stop()
        self._subscriptions.clear()
        if not self.session.closed:
            with contextlib.suppress(Exception):
                self.session.send({"t": "bye"})
            self.session.close("booster closed")
        self.dispatch.detach()
        if self.tasks is not None:
            await self.tasks.aclose()

    def _on_close(self, reason: str) -> None:
        # Without boxd our rules are gone: release what it handed over (a delegated
        # socket must not keep the box's port bound, or steal packets, after eviction).
        for sub in self._subscriptions.values():
            abandon = getattr(sub.receiver, "abandon", None)
            if abandon is not None:
                with contextlib.suppress(Exception):
                    abandon()
        self.dispatch.detach()
        self.directory.closed()

    def _on_event(self, kind: str, msg: dict, fds: list[int]) -> None:
        if kind == "dir_event":
            self.directory.event(msg)
        elif kind == "stream":
            self.dispatch.on_stream(msg, fds)
            return
        elif kind == "undelegate":
            sub = self._subscriptions.get(msg["cookie"])
            undelegate = getattr(sub.receiver, "undelegate", None) if sub is not None else None
            if undelegate is not None:
                undelegate()
                sub.delivery.kind, sub.delivery.fds = "channel", []
            self.stats["undelegated"] += 1
        elif kind == "delegate":
            if self._take_delegation(msg, fds):
                return      # the descriptor is the new receiver's
        else:
            self.stats["control_unexpected"] += 1
        for fd in fds:
            os.close(fd)

    def _take_delegation(self, msg: dict, fds: list[int]) -> bool:
        """boxd gives a taken-back socket back: the rule's packets stop coming on the data channel
        and arrive on that socket, read by the receiver of the new delivery.  True if a receiver
        is being started on ``fds`` (else the caller closes them)."""
        sub = self._subscriptions.get(msg["cookie"])
        try:
            delivery = Delivery.from_wire(msg["delivery"], fds)
        except ValueError as exc:
            log.warning("boxd gave back rule %d with %s", msg["cookie"], exc)
            self.stats["delegate_refused"] += 1
            return False
        if sub is None or sub.cancelled or sub.handler is None or sub.tcp or len(fds) != msg["nfds"]:
            self.stats["delegate_refused"] += 1
            return False
        try:
            receiver = get_receiver(delivery.kind)()
        except LookupError as exc:
            log.error("cannot take rule %d's %s delivery back: %s", sub.cookie, delivery.kind, exc)
            self.stats["delegate_refused"] += 1
            return False
        ctx = self._receiver_context(sub.rule)
        # What boxd pushed on the channel before it stopped reading the socket may still wait
        # there: it reaches the handler all the same (see _channel_handler_of).
        ctx.stop_listening()
        # critical: should it fail, the rule's packets would wait in a socket nobody reads
        self.spawn(self._start_delegated(sub, receiver, ctx, delivery), name=f"delegate {sub.cookie}")
        return True

    async def _start_delegated(self, sub: Subscription, receiver: Any, ctx: ReceiverContext,
                               delivery: Delivery) -> None:
        try:
            await receiver.start(ctx, delivery, sub.handler)
        except BaseException as exc:
            for fd in delivery.fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if not isinstance(exc, asyncio.CancelledError):
                self.stats["delegate_failed"] += 1
            raise           # logged by the supervisor; the booster stops
        if sub.cancelled or self._subscriptions.get(sub.cookie) is not sub:
            await receiver.stop()           # cancelled meanwhile: the socket goes back with the rule
            return
        sub._receiver_replaced(receiver, delivery)
        self.stats["delegated_again"] += 1
        if self.closed:                     # boxd left meanwhile: let go of its socket at once
            abandon = getattr(receiver, "abandon", None)
            if abandon is not None:
                abandon()

    def _channel_handler_of(self, cookie: int) -> tuple[Callable, bool] | None:
        """The handler of a rule this booster holds, for a packet on the data channel that no
        receiver listens for: pushed just after an ``undelegate`` the booster has not read yet,
        or just before a ``delegate`` it has already read."""
        sub = self._subscriptions.get(cookie)
        if sub is None or sub.cancelled or sub.handler is None or sub.tcp:
            return None
        return sub.handler, sub.rule.action is Action.REDIRECT

    # ---------------------------------------------------------- background work
    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str = "task", critical: bool = True) -> asyncio.Task:
        """Run ``coro`` as a supervised task of the booster (cancelled when it closes).

        A critical task (the default: background work the booster cannot do without) that fails
        is logged and ends :meth:`run_until_stopped` (and :func:`run_booster`, with a non-zero
        status); with ``critical=False`` (per-request work) a failure is only logged and counted.
        """
        if self.tasks is None:
            coro.close()
            raise BoxdGone("the booster is not connected")
        return self.tasks.spawn(coro, name=name, critical=critical)

    # ---------------------------------------------------------- rules
    async def redirect(self, match: Match, handler: Callable, *, priority: int = 100) -> Subscription:
        """Packets matching ``match`` go to ``handler(pkt)``, whose verdict decides their fate."""
        return await self._rule(Action.REDIRECT, match, handler, priority)

    async def copy(self, match: Match, handler: Callable, *, priority: int = 100) -> Subscription:
        """``handler(pkt)`` gets a copy of each matching packet; the packet goes on."""
        return await self._rule(Action.COPY, match, handler, priority)

    async def drop(self, match: Match, *, priority: int = 100) -> Subscription:
        """Matching packets are dropped by the data path."""
        return await self._rule(Action.DROP, match, None, priority)

    async def multicast(self, match: Match, group: int, *, priority: int = 100) -> Subscription:
        """Matching packets are fanned out by the data path to the members of ``group``."""
        return await self._rule(Action.MULTICAST, match, None, priority, group=group)

    async def intercept_tcp(self, match: Match, handler: Callable, *, priority: int = 100) -> Subscription:
        """TCP connections matching ``match`` are handed to ``handler(reader, writer, conn)``;
        ``sub.connect_onward(conn)`` opens the booster's own connection to where it was going."""
        return await self._rule(Action.REDIRECT, match, handler, priority, tcp=True)

    async def _rule(self, action: Action, match: Match, handler: Callable | None, priority: int,
                    *, group: int | None = None, tcp: bool = False) -> Subscription:
        if not isinstance(match, Match):
            raise TypeError(f"match must be a boxcore.rules.Match, not {type(match).__name__}")
        msg: dict[str, Any] = {"t": "rule", "action": action.value, "match": match.to_dict(),
                               "priority": priority}
        if group is not None:
            msg["group"] = group
        if tcp:
            msg["tcp"] = True
        result, fds = await self.session.request_fds(msg)
        cookie = result["cookie"]
        if result.get("existing") and cookie in self._subscriptions:
            for fd in fds:
                os.close(fd)
            return self._subscriptions[cookie]
        rule = Rule.from_dict(result["rule"])
        delivery = Delivery.from_wire(result["delivery"], fds)
        receiver = None
        if handler is not None:
            receiver = get_receiver(delivery.kind)()
            try:
                await receiver.start(self._receiver_context(rule), delivery, handler)
            except Exception:
                with contextlib.suppress(BoosterError, BoxdGone):
                    await self.session.request({"t": "cancel", "cookie": cookie})
                raise
        else:
            for fd in fds:
                os.close(fd)
        sub = Subscription(self, rule, delivery, receiver, handler, tcp=tcp)
        self._subscriptions[cookie] = sub
        return sub

    def _receiver_context(self, rule: Rule) -> ReceiverContext:
        return ReceiverContext(rule, stats=self.stats, guard=self._guard, dispatch=self.dispatch,
                               spawn=self.spawn, send=self.send, loop=self.loop)

    async def _forget(self, sub: Subscription) -> None:
        """``sub.cancel()``: stop its receiver and remove the rule."""
        self._subscriptions.pop(sub.cookie, None)
        if sub.receiver is not None:
            await sub.receiver.stop()
        if not self.closed:
            with contextlib.suppress(BoosterError, BoxdGone):
                await self.session.request({"t": "cancel", "cookie": sub.cookie})

    # ---------------------------------------------------------- sending
    def send(self, pkt: Packet) -> bool:
        """Inject a packet into the data path (a reply, or a new packet).  False if dropped."""
        ok = self.dispatch.send_datagram(wire.pack_datagram(Tag.SEND, pkt.proto, pkt.src, pkt.sport, pkt.dst,
                                                            pkt.dport, bytes(pkt.payload)))
        if ok:
            self.stats["packets_sent"] += 1
        return ok

    async def set_multicast_group(self, group: int, members: list[tuple[str, int]]) -> None:
        """Create or replace multicast ``group`` (an empty list deletes it)."""
        await self.session.request({"t": "set_multicast_group", "group": group,
                                    "members": [[h, int(p)] for h, p in members]})

    def send_multicast(self, group: int, payload: bytes, *, src_port: int = 0) -> bool:
        """Send one payload; the engine fans it out to every member of ``group``."""
        ok = self.dispatch.send_datagram(wire.pack_datagram(Tag.MULTICAST, group, src_port, bytes(payload)))
        if ok:
            self.stats["multicast_sent"] += 1
        return ok

    # ---------------------------------------------------------- timers
    def call_later(self, delay: float, fn: Callable, *args: Any) -> Timer:
        """Run ``fn(*args)`` (plain or coroutine) once after ``delay`` seconds."""
        return self.timers.call_later(delay, fn, *args)

    def call_every(self, interval: float, fn: Callable, *args: Any) -> Timer:
        """Run ``fn(*args)`` every ``interval`` seconds (no drift) until cancelled."""
        return self.timers.call_every(interval, fn, *args)

    # ---------------------------------------------------------- running
    async def run_until_stopped(self, stop: asyncio.Event | None = None) -> str:
        """Wait until ``stop`` is set, boxd goes away, or a critical background task fails;
        returns why: ``"stopped"``, the reason boxd went away (``"evicted: ..."``), or the failure
        (``booster.tasks.failed`` is then set)."""
        waits = [self.session.gone.wait(), self.tasks.wait_failed()]
        if stop is not None:
            waits.append(stop.wait())
        await first_of(*waits)
        if self.tasks.failed is not None:
            return str(self.tasks.failed)
        if self.session.gone.is_set():
            return self.close_reason or "boxd connection closed"
        return "stopped"

    # ---------------------------------------------------------- async sockets
    async def open_udp(self, local: tuple[str, int] | None = None,
                       remote: tuple[str, int] | None = None, *, max_queue: int = 4096) -> UdpEndpoint:
        """An async UDP socket bound to ``local`` (and connected to ``remote`` if given)."""
        _, endpoint = await self.loop.create_datagram_endpoint(
            lambda: UdpEndpoint(max_queue), local_addr=local, remote_addr=remote)
        return endpoint

    async def open_tcp(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An async TCP connection (asyncio streams)."""
        return await asyncio.open_connection(host, port)

    async def serve_tcp(self, host: str, port: int, handler: Callable) -> asyncio.AbstractServer:
        """A TCP server whose ``handler(reader, writer)`` errors are isolated like packet handlers."""
        async def guarded(reader, writer):
            await guard_streams(self._guard, handler, reader, writer)
        return await asyncio.start_server(guarded, host, port)
