"""The booster library: write a booster as an asyncio program.

::

    from boxcore.booster import Booster, Verdict
    from boxcore.rules import Match

    async def on_probe(pkt):                 # plain function or coroutine
        return Verdict.PASS                  # or Verdict.CONSUME (also: None), Verdict.modify(b"...")

    async with Booster("fcd-booster", control="/run/boxd/control.sock") as booster:
        sub = await booster.redirect(Match(proto="udp", dst_port=7000), on_probe)
        await booster.copy(Match(proto="udp", dst_port=7001), on_copy)      # return value ignored
        await booster.intercept_tcp(Match(proto="tcp", dst_port=6346), on_connection)
        booster.send(Packet(...))
        booster.call_every(1.0, tick)
        await booster.directory.put("key", {"any": "msgpack value"})
        await booster.run_until_stopped(ctx.stop)

The library connects to boxd (:mod:`boxcore.wire`), registers, sends
heartbeats, and for each installed rule starts the receiver that boxd's
Delivery names (:mod:`boxcore.receivers`), so the same booster runs on every
engine.  Handler exceptions are logged and counted in
``booster.stats["handler_errors"]``; the booster keeps running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from boxcore import transport, wire
from boxcore.engines.base import Delivery
from boxcore.packet import Packet
from boxcore.receivers import get_receiver
from boxcore.rules import Action, Match, Rule
from cliruntime import Stats
from boxcore.wire import Status, Tag, VerdictCode

log = logging.getLogger("boxcore.booster")

DEFAULT_CONTROL = "/run/boxd/control.sock"

__all__ = ["Booster", "Verdict", "Subscription", "InterceptedConnection", "Timer", "BoosterError",
           "PermissionDenied", "Conflict", "InvalidRequest", "BoxdGone", "UdpEndpoint",
           "add_booster_options", "DEFAULT_CONTROL"]


# ------------------------------------------------------------------ errors

class BoosterError(Exception):
    """boxd refused a request; ``status`` and ``reason`` say why."""

    def __init__(self, status: str, reason: str, holder: str | None = None) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason
        self.holder = holder


class PermissionDenied(BoosterError):
    pass


class Conflict(BoosterError):
    """Another booster holds an overlapping rule; ``holder`` names it."""


class InvalidRequest(BoosterError):
    pass


class BoxdGone(ConnectionError):
    """The control connection to boxd is closed."""


_ERRORS = {Status.PERMISSION_DENIED.value: PermissionDenied, Status.CONFLICT.value: Conflict,
           Status.INVALID.value: InvalidRequest}


# ------------------------------------------------------------------ verdicts

class Verdict:
    """What happens to a redirected packet.

    ``Verdict.CONSUME`` (the booster keeps it; a handler returning None means
    this), ``Verdict.PASS`` (it goes on unchanged), ``Verdict.modify(payload)``
    (it goes on with a new payload).
    """

    __slots__ = ("code", "payload")
    CONSUME: "Verdict"
    PASS: "Verdict"

    def __init__(self, code: VerdictCode, payload: bytes | None = None) -> None:
        self.code = VerdictCode(code)
        self.payload = payload

    @classmethod
    def modify(cls, payload: bytes) -> "Verdict":
        return cls(VerdictCode.MODIFY, bytes(payload))

    @staticmethod
    def coerce(result: Any) -> "Verdict":
        """A redirect handler's return value as a verdict (None: CONSUME; bytes: modify)."""
        if result is None:
            return Verdict.CONSUME
        if isinstance(result, Verdict):
            return result
        if isinstance(result, (bytes, bytearray, memoryview)):
            return Verdict.modify(bytes(result))
        raise TypeError(f"a redirect handler must return a Verdict, bytes or None, not {type(result).__name__}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Verdict) and (self.code, self.payload) == (other.code, other.payload)

    def __hash__(self) -> int:
        return hash((self.code, self.payload))

    def __repr__(self) -> str:
        if self.code is VerdictCode.MODIFY:
            return f"Verdict.modify({self.payload!r:.40})"
        return f"Verdict.{self.code.name}"


Verdict.CONSUME = Verdict(VerdictCode.CONSUME)
Verdict.PASS = Verdict(VerdictCode.PASS)


@dataclass(frozen=True, slots=True)
class InterceptedConnection:
    """An intercepted TCP connection: who connected and where it was going."""

    client: tuple[str, int]
    original_dst: tuple[str, int]
    cookie: int


class Subscription:
    """An installed rule whose packets keep arriving until :meth:`cancel`."""

    def __init__(self, booster: "Booster", rule: Rule, delivery: Delivery, receiver: Any) -> None:
        self.booster = booster
        self.rule = rule
        self.cookie = rule.cookie
        self.delivery = delivery
        self.receiver = receiver
        self.cancelled = False

    async def cancel(self) -> None:
        """Stop the receiver and remove the rule from the box."""
        if self.cancelled:
            return
        self.cancelled = True
        self.booster._subscriptions.pop(self.cookie, None)
        if self.receiver is not None:
            await self.receiver.stop()
        if not self.booster.closed:
            with contextlib.suppress(BoosterError, BoxdGone):
                await self.booster._request({"t": "cancel", "cookie": self.cookie})

    def receive_batches(self, batch_handler: Callable[[list[bytes]], Any], *, max_batch: int = 1024) -> bool:
        """Batch fast path for a REDIRECT whose handler consumes every packet.

        On a delegated socket (user engine, ``socket`` delivery) the library then reads up to
        ``max_batch`` datagrams per wakeup and calls ``batch_handler(payloads)`` once with their
        payloads (a plain function; what it returns is ignored, the packets are consumed) instead
        of building a Packet and calling the handler for each.  Packets are still counted for
        boxd.  Returns False, changing nothing, for any other delivery (the per-packet handler
        keeps receiving); if boxd later takes the socket back, packets go to the per-packet
        handler again.
        """
        setter = getattr(self.receiver, "set_batch_handler", None)
        if self.cancelled or setter is None:
            return False
        return bool(setter(batch_handler, max_batch))

    def __repr__(self) -> str:
        return f"<Subscription {self.cookie} {self.rule.action.value} {self.rule.match.describe()} via {self.delivery.kind}>"


class Timer:
    """A pending ``call_later`` / ``call_every``; :meth:`cancel` stops it."""

    def __init__(self) -> None:
        self.handle: asyncio.TimerHandle | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        if self.handle is not None:
            self.handle.cancel()


# ------------------------------------------------------------------ directory client

class DirectoryClient:
    """The booster's persistent key-value state, kept by boxd (survives restarts)."""

    def __init__(self, booster: "Booster", max_queue: int = 1024) -> None:
        self._booster = booster
        self._queues: dict[int, asyncio.Queue] = {}
        self.max_queue = max_queue

    async def get(self, key: str, default: Any = None) -> Any:
        result = await self._booster._request({"t": "dir_get", "key": key})
        return result["value"] if result["found"] else default

    async def put(self, key: str, value: Any) -> None:
        await self._booster._request({"t": "dir_put", "key": key, "value": value})

    async def delete(self, key: str) -> bool:
        result = await self._booster._request({"t": "dir_delete", "key": key})
        return bool(result["deleted"])

    async def items(self, prefix: str = "") -> list[tuple[str, Any]]:
        result = await self._booster._request({"t": "dir_items", "prefix": prefix})
        return [(k, v) for k, v in result["items"]]

    async def watch(self, prefix: str = "") -> AsyncIterator[tuple[str, Any]]:
        """Changes under ``prefix`` as ``(key, value)``; value None means deleted."""
        result = await self._booster._request({"t": "dir_watch", "prefix": prefix})
        wid = result["watch"]
        queue: asyncio.Queue = asyncio.Queue(self.max_queue)
        self._queues[wid] = queue
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                yield item
        finally:
            self._queues.pop(wid, None)
            if not self._booster.closed:
                with contextlib.suppress(BoosterError, BoxdGone):
                    await self._booster._request({"t": "dir_unwatch", "watch": wid})

    def _event(self, msg: dict) -> None:
        queue = self._queues.get(msg["watch"])
        if queue is None:
            return
        try:
            queue.put_nowait((msg["key"], None if msg["deleted"] else msg.get("value")))
        except asyncio.QueueFull:
            self._booster.stats["directory_events_dropped"] += 1

    def _closed(self) -> None:
        for queue in self._queues.values():
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)


# ------------------------------------------------------------------ UDP helper

class UdpEndpoint(asyncio.DatagramProtocol):
    """An async UDP socket: ``await ep.recv()`` -> (data, addr); ``ep.send(data, addr)``.

    Received datagrams wait in a bounded queue; overflow is counted in ``dropped``.
    """

    def __init__(self, max_queue: int = 4096) -> None:
        self.queue: asyncio.Queue = asyncio.Queue(max_queue)
        self.transport: asyncio.DatagramTransport | None = None
        self.dropped = 0
        self.received = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.received += 1
        try:
            self.queue.put_nowait((data, addr))
        except asyncio.QueueFull:
            self.dropped += 1

    async def recv(self) -> tuple[bytes, tuple[str, int]]:
        return await self.queue.get()

    def send(self, data: bytes, addr: tuple[str, int] | None = None) -> None:
        self.transport.sendto(data, addr)

    @property
    def local_address(self) -> tuple[str, int]:
        return self.transport.get_extra_info("sockname")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


# ------------------------------------------------------------------ the booster

class Booster:
    """An asyncio booster connected to boxd.  Use as ``async with Booster(name, control=...)``."""

    def __init__(self, name: str, control: str | os.PathLike | None = None, *,
                 heartbeat: float | None = None, request_timeout: float = 10.0,
                 clock: Any = None, sock: socket.socket | None = None) -> None:
        self.name = name
        self.control = os.fspath(control or os.environ.get("BOXD_CONTROL", DEFAULT_CONTROL))
        self.stats = Stats()
        self.directory = DirectoryClient(self)
        self.engine: str | None = None
        self.sid: int | None = None
        self.closed = True
        self.close_reason: str | None = None
        self.request_timeout = request_timeout
        self._heartbeat_override = heartbeat
        self._clock = clock          # timers: the event loop unless a test passes a FakeClock
        self._given_sock = sock      # an already connected control socket (boxcore.testing)
        self._conn: transport.FramedConnection | None = None
        self._channel: socket.socket | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._subscriptions: dict[int, Subscription] = {}
        self._channel_handlers: dict[int, tuple[Callable, bool]] = {}
        self._stream_handlers: dict[int, Callable] = {}
        self._counts: dict[int, list[int]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._timer_tasks: set[asyncio.Task] = set()   # coroutines started by timers (testing waits on them)
        self._verdict_batch: list | None = None
        self._gone = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    # ---------------------------------------------------------- connection
    async def __aenter__(self) -> "Booster":
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def connect(self) -> None:
        self.loop = asyncio.get_running_loop()
        if self._clock is None:
            self._clock = self.loop
        if self._given_sock is not None:
            sock, self._given_sock = self._given_sock, None
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await self.loop.sock_connect(sock, self.control)
            except OSError as exc:
                sock.close()
                raise BoxdGone(f"cannot connect to boxd at {self.control}: {exc.strerror or exc}") from None
        self._conn = transport.FramedConnection(sock, self._on_message, self._on_close, loop=self.loop)
        self.closed = False
        self._gone.clear()
        try:
            result, fds = await self._request_fds({"t": "hello", "name": self.name,
                                                   "version": wire.PROTOCOL_VERSION})
        except BaseException:
            self._conn.close("registration refused")
            raise
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            await self.close()
            raise BoxdGone("boxd did not hand over a data channel")
        self._channel = socket.socket(fileno=fds[0])
        self._channel.setblocking(False)
        self.loop.add_reader(self._channel.fileno(), self._on_channel)
        self.sid, self.engine = result["sid"], result["engine"]
        interval = self._heartbeat_override or float(result["heartbeat"])
        self._spawn(self._heartbeats(interval))
        log.info("booster %s registered with boxd (engine %s)", self.name, self.engine)

    async def close(self) -> None:
        """Stop receivers, say goodbye (boxd removes our rules) and disconnect."""
        for sub in list(self._subscriptions.values()):
            if sub.receiver is not None:
                with contextlib.suppress(Exception):
                    await sub.receiver.stop()
        self._subscriptions.clear()
        if self._conn is not None and not self._conn.closed:
            with contextlib.suppress(Exception):
                self._conn.send({"t": "bye"})
            self._conn.close("booster closed")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_close(self, reason: str) -> None:
        self.closed = True
        self.close_reason = self.close_reason or reason
        # Without boxd our rules are gone: release what it handed over (a delegated
        # socket must not keep the box's port bound, or steal packets, after eviction).
        for sub in self._subscriptions.values():
            abandon = getattr(sub.receiver, "abandon", None)
            if abandon is not None:
                with contextlib.suppress(Exception):
                    abandon()
        if self._channel is not None:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self._channel.fileno())
            self._channel.close()
            self._channel = None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BoxdGone(f"boxd connection closed: {reason}"))
        self._pending.clear()
        self.directory._closed()
        self._gone.set()

    def _on_message(self, msg: Any, fds: list[int]) -> None:
        try:
            wire.validate(msg)
        except wire.WireDecodeError as exc:
            self.stats["control_malformed"] += 1
            log.warning("malformed message from boxd: %s", exc)
            for fd in fds:
                os.close(fd)
            return
        kind = msg["t"]
        if kind == "reply":
            fut = self._pending.pop(msg["id"], None)
            if fut is None or fut.done():
                for fd in fds:
                    os.close(fd)
                return
            fut.set_result((msg, fds))
        elif kind == "dir_event":
            self.directory._event(msg)
        elif kind == "stream":
            self._on_stream(msg, fds)
        elif kind == "undelegate":
            sub = self._subscriptions.get(msg["cookie"])
            undelegate = getattr(sub.receiver, "undelegate", None) if sub is not None else None
            if undelegate is not None:
                undelegate()
                sub.delivery.kind, sub.delivery.fds = "channel", []
            self.stats["undelegated"] += 1
        elif kind == "evicted":
            log.error("boxd evicted booster %s: %s", self.name, msg["reason"])
            self.close_reason = f"evicted: {msg['reason']}"
        else:
            for fd in fds:
                os.close(fd)
            self.stats["control_unexpected"] += 1

    async def _request_fds(self, msg: dict) -> tuple[Any, list[int]]:
        if self.closed or self._conn is None:
            raise BoxdGone(f"not connected to boxd ({self.close_reason or 'closed'})")
        rid = next(self._ids)
        fut = self.loop.create_future()
        self._pending[rid] = fut
        self._conn.send(dict(msg, id=rid))
        try:
            reply, fds = await asyncio.wait_for(fut, self.request_timeout)
        except asyncio.TimeoutError:
            self._pending.pop(rid, None)
            raise BoxdGone(f"boxd did not answer {msg['t']} within {self.request_timeout}s") from None
        status = reply["status"]
        if status != Status.OK.value:
            for fd in fds:
                os.close(fd)
            cls = _ERRORS.get(status, BoosterError)
            raise cls(status, reply.get("reason") or "", reply.get("holder"))
        return reply.get("result"), fds

    async def _request(self, msg: dict) -> Any:
        result, fds = await self._request_fds(msg)
        for fd in fds:
            os.close(fd)
        return result

    async def _heartbeats(self, interval: float) -> None:
        while not self.closed:
            counters = [[cookie, c[0], c[1]] for cookie, c in self._counts.items()]
            try:
                self._conn.send({"t": "heartbeat", "counters": counters,
                                 "handler_errors": self.stats["handler_errors"]})
            except Exception:
                log.exception("heartbeat failed")
            await asyncio.sleep(interval)

    def spawn(self, coro) -> asyncio.Task:
        """Run ``coro`` as a task owned by the booster (cancelled when it closes)."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    _spawn = spawn  # receivers written against the first version use this name

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
        """TCP connections matching ``match`` are handed to ``handler(reader, writer, conn)``."""
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
        result, fds = await self._request_fds(msg)
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
                await receiver.start(self, rule, delivery, handler)
            except Exception:
                with contextlib.suppress(BoosterError, BoxdGone):
                    await self._request({"t": "cancel", "cookie": cookie})
                raise
        else:
            for fd in fds:
                os.close(fd)
        sub = Subscription(self, rule, delivery, receiver)
        self._subscriptions[cookie] = sub
        return sub

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subscriptions.values())

    # ---------------------------------------------------------- handlers
    async def run_handler(self, handler: Callable, *args: Any) -> Any:
        """Call a user handler (plain or coroutine); exceptions are logged, counted, and give None."""
        try:
            result = handler(*args)
            if inspect.isawaitable(result):
                result = await result
            return result
        except asyncio.CancelledError:
            raise
        except Exception:
            self.handler_failed(handler)
            return None

    def handler_failed(self, handler: Callable) -> None:
        """Log and count the exception being handled (call from an ``except`` block)."""
        self.stats["handler_errors"] += 1
        log.exception("handler %s raised", getattr(handler, "__qualname__", handler))

    def count_packet(self, cookie: int, nbytes: int) -> None:
        """Count a packet the engine cannot count (reported to boxd with heartbeats)."""
        counts = self._counts.get(cookie)
        if counts is None:
            counts = self._counts[cookie] = [0, 0]
        counts[0] += 1
        counts[1] += nbytes

    def count_packets(self, cookie: int, packets: int, nbytes: int) -> None:
        """Count a batch of ``packets`` totalling ``nbytes`` in one call (see :meth:`count_packet`)."""
        counts = self._counts.get(cookie)
        if counts is None:
            counts = self._counts[cookie] = [0, 0]
        counts[0] += packets
        counts[1] += nbytes

    # data channel (delivery kind "channel"): boxd pushes packets, we answer verdicts
    def _on_channel(self) -> None:
        # Verdicts given during one wakeup leave together (one VERDICTS datagram).
        self._verdict_batch = batch = []
        try:
            for _ in range(64):
                channel = self._channel
                if channel is None:
                    return
                try:
                    data = channel.recv(wire.MAX_DATAGRAM)
                except OSError:  # BlockingIOError: drained
                    return
                try:
                    tag, fields = wire.unpack_datagram(data)
                except wire.WireDecodeError as exc:
                    self.stats["channel_malformed"] += 1
                    log.debug("bad datagram from boxd: %s", exc)
                    continue
                if tag is Tag.PACKETS:
                    for record in fields:
                        self._on_packet(*record)
                elif tag is Tag.PACKET:
                    self._on_packet(*fields)
                else:
                    self.stats["channel_malformed"] += 1
        finally:
            self._verdict_batch = None
            if batch:
                self._flush_verdicts(batch)

    def _on_packet(self, cookie: int, token: int, proto: int, src: str, sport: int, dst: str,
                   dport: int, payload: bytes, want_verdict: bool) -> None:
        entry = self._channel_handlers.get(cookie)
        if entry is None:
            self.stats["packets_unclaimed"] += 1
            if want_verdict:
                self._send_verdict(token, Verdict.PASS)
            return
        handler, is_redirect = entry
        self.stats["packets"] += 1
        pkt = Packet(proto, src, sport, dst, dport, payload)
        try:
            result = handler(pkt)
        except Exception:
            self.handler_failed(handler)
            if want_verdict:
                self._send_verdict(token, Verdict.CONSUME)
            return
        if inspect.isawaitable(result):
            self.spawn(self._finish_channel(handler, result, token, want_verdict and is_redirect))
        elif want_verdict:
            self._send_verdict(token, self._verdict_of(handler, result) if is_redirect else Verdict.PASS)

    def _flush_verdicts(self, batch: list) -> None:
        size = 0
        start = 0
        for i, record in enumerate(batch):
            size += 16 + (len(record[2]) if record[2] is not None else 0)
            if i - start + 1 >= wire.MAX_BATCH or size > wire.BATCH_BYTES:
                self._send_datagram(wire.pack_batch(Tag.VERDICTS, batch[start:i + 1]))
                start, size = i + 1, 0
        if start < len(batch):
            self._send_datagram(wire.pack_batch(Tag.VERDICTS, batch[start:]))

    def _verdict_of(self, handler: Callable, result: Any) -> Verdict:
        try:
            return Verdict.coerce(result)
        except TypeError:
            self.handler_failed(handler)
            return Verdict.CONSUME

    async def _finish_channel(self, handler: Callable, awaitable: Any, token: int, want: bool) -> None:
        try:
            result = await awaitable
        except asyncio.CancelledError:
            raise
        except Exception:
            self.handler_failed(handler)
            result = None
        if want:
            self._send_verdict(token, self._verdict_of(handler, result))

    def _send_verdict(self, token: int, verdict: Verdict) -> None:
        if self._verdict_batch is not None:
            self._verdict_batch.append([token, int(verdict.code), verdict.payload])
        else:
            self._send_datagram(wire.pack_datagram(Tag.VERDICT, token, int(verdict.code), verdict.payload))

    def _send_datagram(self, data: bytes) -> bool:
        if self._channel is None:
            self.stats["channel_send_dropped"] += 1
            return False
        try:
            self._channel.send(data)
        except (BlockingIOError, InterruptedError, OSError):
            self.stats["channel_send_dropped"] += 1
            return False
        return True

    # stream delivery: boxd hands us accepted TCP connections
    def _on_stream(self, msg: dict, fds: list[int]) -> None:
        handler = self._stream_handlers.get(msg["cookie"])
        if handler is None or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            self.stats["streams_unclaimed"] += 1
            return
        sock = socket.socket(fileno=fds[0])
        conn = InterceptedConnection(tuple(msg["client"]), tuple(msg["original_dst"]), msg["cookie"])
        self.stats["streams"] += 1
        self._spawn(self._run_stream(handler, sock, conn))

    async def _run_stream(self, handler: Callable, sock: socket.socket, conn: InterceptedConnection) -> None:
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            await self.run_handler(handler, reader, writer, conn)
        finally:
            if not writer.is_closing():
                writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # ---------------------------------------------------------- sending
    def send(self, pkt: Packet) -> bool:
        """Inject a packet into the data path (a reply, or a new packet).  False if dropped."""
        ok = self._send_datagram(wire.pack_datagram(Tag.SEND, pkt.proto, pkt.src, pkt.sport, pkt.dst,
                                                    pkt.dport, bytes(pkt.payload)))
        if ok:
            self.stats["packets_sent"] += 1
        return ok

    async def set_multicast_group(self, group: int, members: list[tuple[str, int]]) -> None:
        """Create or replace multicast ``group`` (an empty list deletes it)."""
        await self._request({"t": "set_multicast_group", "group": group,
                             "members": [[h, int(p)] for h, p in members]})

    def send_multicast(self, group: int, payload: bytes, *, src_port: int = 0) -> bool:
        """Send one payload; the engine fans it out to every member of ``group``."""
        ok = self._send_datagram(wire.pack_datagram(Tag.MULTICAST, group, src_port, bytes(payload)))
        if ok:
            self.stats["multicast_sent"] += 1
        return ok

    # ---------------------------------------------------------- timers
    def call_later(self, delay: float, fn: Callable, *args: Any) -> Timer:
        """Run ``fn(*args)`` (plain or coroutine) once after ``delay`` seconds."""
        timer = Timer()

        def fire() -> None:
            if not timer.cancelled:
                self._fire(fn, args)

        timer.handle = self._clock.call_later(delay, fire)
        return timer

    def call_every(self, interval: float, fn: Callable, *args: Any) -> Timer:
        """Run ``fn(*args)`` every ``interval`` seconds (no drift) until cancelled."""
        if interval <= 0:
            raise ValueError("interval must be positive")
        timer = Timer()
        clock = self._clock
        start = clock.time()
        ticks = itertools.count(1)

        def fire() -> None:
            if timer.cancelled:
                return
            self._fire(fn, args)
            timer.handle = clock.call_at(start + next(ticks) * interval, fire)

        timer.handle = clock.call_at(start + next(ticks) * interval, fire)
        return timer

    def _fire(self, fn: Callable, args: tuple) -> None:
        try:
            result = fn(*args)
        except Exception:
            self.handler_failed(fn)
            return
        if inspect.isawaitable(result):
            async def finish() -> None:
                try:
                    await result
                except Exception:
                    self.handler_failed(fn)
            task = self.spawn(finish())
            self._timer_tasks.add(task)
            task.add_done_callback(self._timer_tasks.discard)

    # ---------------------------------------------------------- running
    async def run_until_stopped(self, stop: asyncio.Event | None = None) -> str:
        """Wait until ``stop`` is set or boxd goes away; returns why."""
        waits = [self.loop.create_task(self._gone.wait())]
        if stop is not None:
            waits.append(self.loop.create_task(stop.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self._gone.is_set():
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
            try:
                await self.run_handler(handler, reader, writer)
            finally:
                writer.close()
        return await asyncio.start_server(guarded, host, port)



def add_booster_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--control PATH`` (default ``$BOXD_CONTROL`` or /run/boxd/control.sock)."""
    parser.add_argument("--control", metavar="PATH",
                        default=os.environ.get("BOXD_CONTROL", DEFAULT_CONTROL),
                        help="boxd's control socket")
