"""Data dispatch: the booster's data channel and the connections boxd hands over.

boxd pushes ``channel``-delivered packets on the data channel (a Unix datagram socket); they are
demultiplexed by cookie to the handler a receiver registered, and verdicts given during one
wakeup go back together in one VERDICTS datagram.  Packets and multicasts the booster sends leave
on the same channel.  ``stream`` events (TCP connections boxd accepted for an ``intercept_tcp``
rule) go to the handler registered for their cookie.  Per-rule counters for packets only the
booster sees (a delegated socket) are kept here and reported with the heartbeats.

The data channel and the control connection are two sockets, read in whatever order the loop
finds them ready: a packet boxd pushed after an ``undelegate`` event may be read before that
event, and packets it pushed before a ``delegate`` event may still wait on the channel after it.
For such a packet no receiver listens on the channel; ``claim(cookie)`` (given by the booster)
names the handler of the rule the booster holds, and the packet reaches it rather than passing
unseen (counted in ``packets_claimed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
from typing import Any, Callable, Coroutine

from boxcore import wire
from boxcore.booster.inflight import InFlight
from boxcore.booster.subscription import InterceptedConnection
from boxcore.booster.verdict import Verdict
from boxcore.packet import Packet
from boxcore.wire import Tag

log = logging.getLogger("boxcore.booster")

__all__ = ["DataDispatch", "RuleCounter", "HandlerGuard"]

READS_PER_WAKEUP = 64


class RuleCounter:
    """Packets and bytes of one rule that only the booster sees; reported to boxd."""

    __slots__ = ("packets", "bytes")

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0

    def add(self, nbytes: int, packets: int = 1) -> None:
        """Count ``packets`` packets totalling ``nbytes`` bytes."""
        self.packets += packets
        self.bytes += nbytes


class HandlerGuard:
    """Calls user handlers so that one bad packet never stops the booster: exceptions (and
    results that are no verdict) are logged and counted in ``stats["handler_errors"]``."""

    def __init__(self, stats: Any) -> None:
        self.stats = stats

    def failed(self, handler: Callable) -> None:
        """Log and count the exception being handled (call from an ``except`` block)."""
        self.stats["handler_errors"] += 1
        log.exception("handler %s raised", getattr(handler, "__qualname__", handler))

    async def run(self, handler: Callable, *args: Any) -> Any:
        """Call ``handler(*args)`` (plain or coroutine); an exception gives None."""
        try:
            result = handler(*args)
            if inspect.isawaitable(result):
                result = await result
            return result
        except asyncio.CancelledError:
            raise
        except Exception:
            self.failed(handler)
            return None

    def verdict(self, handler: Callable, result: Any) -> Verdict:
        """A redirect handler's result as a verdict; anything that is none counts as a failure
        (and consumes, as a raising handler does)."""
        try:
            return Verdict.coerce(result)
        except TypeError:
            self.failed(handler)
            return Verdict.CONSUME


MAX_HANDLERS_IN_FLIGHT = 1024


class DataDispatch:
    def __init__(self, stats: Any, guard: HandlerGuard, spawn: Callable[..., asyncio.Task],
                 claim: Callable[[int], tuple[Callable, bool] | None] = lambda cookie: None,
                 max_handlers_in_flight: int = MAX_HANDLERS_IN_FLIGHT) -> None:
        self.stats = stats
        self.guard = guard
        self._spawn = spawn
        self._claim = claim     # cookie -> (handler, wants a verdict) of a rule nobody listens for yet
        self.channel_handlers: dict[int, tuple[Callable, bool]] = {}   # cookie -> (handler, wants a verdict)
        self.stream_handlers: dict[int, Callable] = {}
        self.counters: dict[int, RuleCounter] = {}
        self.inflight = InFlight()          # coroutine packet handlers still running, on every delivery
        self.max_handlers_in_flight = max_handlers_in_flight
        self._channel: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._verdict_batch: list | None = None

    # ---------------------------------------------------------------- channel
    def attach(self, channel: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        channel.setblocking(False)
        self._channel, self._loop = channel, loop
        loop.add_reader(channel.fileno(), self._on_readable)

    def detach(self) -> None:
        if self._channel is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._channel.fileno())
            self._channel.close()
            self._channel = None

    def counter(self, cookie: int) -> RuleCounter:
        counter = self.counters.get(cookie)
        if counter is None:
            counter = self.counters[cookie] = RuleCounter()
        return counter

    def heartbeat_counters(self) -> list[list[int]]:
        return [[cookie, c.packets, c.bytes] for cookie, c in self.counters.items()]

    def _on_readable(self) -> None:
        # Verdicts given during one wakeup leave together (one VERDICTS datagram).
        self._verdict_batch = batch = []
        try:
            for _ in range(READS_PER_WAKEUP):
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
        entry = self.channel_handlers.get(cookie)
        if entry is None and (entry := self._claim(cookie)) is not None:
            self.stats["packets_claimed"] += 1
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
            self.guard.failed(handler)
            if want_verdict:
                self._send_verdict(token, Verdict.CONSUME)
            return
        if inspect.isawaitable(result):
            if not self.finish_in_task(self._finish(handler, result, token, want_verdict and is_redirect),
                                       result, name="packet handler") and want_verdict:
                self._send_verdict(token, Verdict.PASS)
        elif want_verdict:
            self._send_verdict(token, self.guard.verdict(handler, result) if is_redirect else Verdict.PASS)

    def finish_in_task(self, finish: Coroutine[Any, Any, Any], awaitable: Any, *, name: str) -> bool:
        """Run ``finish`` (which awaits ``awaitable``, what a coroutine handler returned for one
        packet) as a task, counted in :attr:`inflight`.  With ``max_handlers_in_flight`` already
        running, neither runs: False, counted in ``handlers_refused``, and the caller decides the
        packet at once, failing open (it passes) - a flood must not grow tasks without bound."""
        if self.inflight.count >= self.max_handlers_in_flight:
            self.stats["handlers_refused"] += 1
            finish.close()
            close = getattr(awaitable, "close", None)
            if close is not None:
                close()             # a coroutine never started: no "never awaited" warning
            return False
        self.inflight.enter()
        self._spawn(self._leave_after(finish), name=name, critical=False)
        return True

    async def _leave_after(self, finish: Coroutine[Any, Any, Any]) -> None:
        try:
            await finish
        finally:
            self.inflight.leave()

    async def _finish(self, handler: Callable, awaitable: Any, token: int, want: bool) -> None:
        try:
            result = await awaitable
        except asyncio.CancelledError:
            raise
        except Exception:
            self.guard.failed(handler)
            result = None
        if want:
            self._send_verdict(token, self.guard.verdict(handler, result))

    def _flush_verdicts(self, batch: list) -> None:
        size = 0
        start = 0
        for i, record in enumerate(batch):
            size += 16 + (len(record[2]) if record[2] is not None else 0)
            if i - start + 1 >= wire.MAX_BATCH or size > wire.BATCH_BYTES:
                self.send_datagram(wire.pack_batch(Tag.VERDICTS, batch[start:i + 1]))
                start, size = i + 1, 0
        if start < len(batch):
            self.send_datagram(wire.pack_batch(Tag.VERDICTS, batch[start:]))

    def _send_verdict(self, token: int, verdict: Verdict) -> None:
        if self._verdict_batch is not None:
            self._verdict_batch.append([token, int(verdict.code), verdict.payload])
        else:
            self.send_datagram(wire.pack_datagram(Tag.VERDICT, token, int(verdict.code), verdict.payload))

    def send_datagram(self, data: bytes) -> bool:
        """Send one datagram to boxd; False (counted) if the channel is gone or full."""
        if self._channel is None:
            self.stats["channel_send_dropped"] += 1
            return False
        try:
            self._channel.send(data)
        except OSError:     # BlockingIOError: boxd is not keeping up
            self.stats["channel_send_dropped"] += 1
            return False
        return True

    # ---------------------------------------------------------------- streams
    def on_stream(self, msg: dict, fds: list[int]) -> None:
        handler = self.stream_handlers.get(msg["cookie"])
        if handler is None or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            self.stats["streams_unclaimed"] += 1
            return
        sock = socket.socket(fileno=fds[0])
        conn = InterceptedConnection(tuple(msg["client"]), tuple(msg["original_dst"]), msg["cookie"])
        self.stats["streams"] += 1
        self._spawn(serve_connection(self.guard, handler, sock, conn), name="intercepted connection",
                    critical=False)


async def serve_connection(guard: HandlerGuard, handler: Callable, sock: socket.socket,
                           conn: InterceptedConnection) -> None:
    """Run ``handler(reader, writer, conn)`` on an intercepted connection and close it after."""
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    await guard_streams(guard, handler, reader, writer, conn)


async def guard_streams(guard: HandlerGuard, handler: Callable, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, *args: Any) -> None:
    """``handler(reader, writer, *args)`` with its errors isolated; the writer is closed after."""
    try:
        await guard.run(handler, reader, writer, *args)
    finally:
        if not writer.is_closing():
            writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
