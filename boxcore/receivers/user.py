"""Receivers for the user (and memory) engine: ``channel``, ``socket``, ``stream``.

* ``channel``: boxd classifies and pushes each packet on the booster's data
  channel; verdicts go back on it.  The booster library demultiplexes the
  channel by cookie, so this receiver only (un)registers the handler.
* ``socket``: boxd delegated a whole listening UDP port: the bound socket
  arrives as a descriptor and the booster reads it directly (no boxd hop: the
  fast path).  Packets show ``dst``/``dport`` = the relay destination (from the
  delivery's params), like every other engine.  PASS / modify re-inject the
  packet through boxd, which relays it as if the box had forwarded it.
  Counted here and reported to boxd with the heartbeats.  A REDIRECT booster
  that consumes everything may ask for batches instead
  (:meth:`boxcore.booster.Subscription.receive_batches`): one call per wakeup
  with the payloads read, no Packet objects.  When another rule
  comes to share the port, boxd takes the socket back (``undelegate``) and the
  receiver carries on as a channel receiver.
* ``stream``: boxd accepts intercepted TCP connections and passes each one
  (descriptor + original destination) over the control connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
from typing import Any

from boxcore.packet import Packet
from boxcore.receivers import register
from boxcore.rules import Action
from boxcore.wire import VerdictCode

MAX_READS_PER_WAKEUP = 512
MAX_DATAGRAM = 65535


@register("channel")
class ChannelReceiver:
    async def start(self, booster: Any, rule: Any, delivery: Any, handler: Any) -> None:
        for fd in delivery.fds:  # none expected; never leak one
            socket.socket(fileno=fd).close()
        self.booster = booster
        self.cookie = rule.cookie
        booster._channel_handlers[rule.cookie] = (handler, rule.action is Action.REDIRECT)

    async def stop(self) -> None:
        self.booster._channel_handlers.pop(self.cookie, None)


@register("socket")
class SocketReceiver:
    """Reads a delegated UDP socket directly; verdicts other than CONSUME re-inject."""

    async def start(self, booster: Any, rule: Any, delivery: Any, handler: Any) -> None:
        if len(delivery.fds) != 1:
            raise ValueError(f"socket delivery needs exactly one descriptor, got {len(delivery.fds)}")
        self.booster = booster
        self.rule = rule
        self.handler = handler
        self.redirect = rule.action is Action.REDIRECT
        self.sock = socket.socket(fileno=delivery.fds[0])
        self.sock.setblocking(False)
        self.dst = str(delivery.params["dst"])
        self.dport = int(delivery.params["dport"])
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self._on_readable)
        self.stopped = False

    def set_batch_handler(self, batch_handler: Any, max_batch: int = 1024) -> bool:
        """Deliver ``batch_handler(payloads)`` once per wakeup instead of the per-packet handler.

        Only for REDIRECT rules (the batch is consumed; nothing is re-injected).  False if the
        socket is no longer ours.  After an ``undelegate`` packets go to the per-packet handler.
        """
        if self.stopped or not self.redirect:
            return False
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.batch_handler = batch_handler
        self.max_batch = max_batch
        self.loop.remove_reader(self.sock.fileno())
        self.loop.add_reader(self.sock.fileno(), self._on_readable_batch)
        return True

    def _on_readable_batch(self) -> None:
        recv = self.sock.recv
        payloads: list[bytes] = []
        append = payloads.append
        nbytes = 0
        for _ in range(self.max_batch):
            try:
                data = recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            append(data)
            nbytes += len(data)
        if not payloads:
            return
        self.booster.count_packets(self.rule.cookie, len(payloads), nbytes)
        try:
            self.batch_handler(payloads)
        except Exception:
            self.booster.handler_failed(self.batch_handler)

    def _on_readable(self) -> None:
        booster = self.booster
        handler = self.handler
        recvfrom = self.sock.recvfrom
        dst, dport, cookie = self.dst, self.dport, self.rule.cookie
        counts = booster._counts.get(cookie)
        if counts is None:
            counts = booster._counts[cookie] = [0, 0]
        redirect = self.redirect
        for _ in range(MAX_READS_PER_WAKEUP):
            try:
                data, (src, sport, *_) = recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            counts[0] += 1
            counts[1] += len(data)
            pkt = Packet(17, src, sport, dst, dport, data)
            try:
                result = handler(pkt)
            except Exception:
                booster.handler_failed(handler)
                continue
            if inspect.isawaitable(result):
                booster._spawn(self._finish(result, pkt))
            elif redirect and result is not None:
                self._apply(result, pkt)
            elif not redirect:
                booster.send(pkt)  # a copy: the original goes on

    async def _finish(self, awaitable: Any, pkt: Packet) -> None:
        try:
            result = await awaitable
        except asyncio.CancelledError:
            raise
        except Exception:
            self.booster.handler_failed(self.handler)
            return
        if not self.redirect:
            self.booster.send(pkt)
        elif result is not None:
            self._apply(result, pkt)

    def _apply(self, result: Any, pkt: Packet) -> None:
        verdict = self.booster._verdict_of(self.handler, result)
        if verdict.code is VerdictCode.CONSUME:
            return
        if verdict.code is VerdictCode.MODIFY:
            pkt = Packet(pkt.proto, pkt.src, pkt.sport, pkt.dst, pkt.dport, verdict.payload)
        self.booster.send(pkt)

    def undelegate(self) -> None:
        """boxd took the socket back (another rule now shares the port): from now on
        the rule's packets arrive on the data channel, to the same handler."""
        if self.stopped:
            return
        self._close()
        self.booster._channel_handlers[self.rule.cookie] = (self.handler, self.redirect)
        self.undelegated = True

    def abandon(self) -> None:
        """boxd went away: let go of its socket at once."""
        if not self.stopped:
            self._close()

    def _close(self) -> None:
        self.stopped = True
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    async def stop(self) -> None:
        if getattr(self, "undelegated", False):
            self.booster._channel_handlers.pop(self.rule.cookie, None)
        self.booster._counts.pop(self.rule.cookie, None)  # the rule is gone: nothing to report
        if not self.stopped:
            self._close()


@register("stream")
class StreamReceiver:
    async def start(self, booster: Any, rule: Any, delivery: Any, handler: Any) -> None:
        for fd in delivery.fds:
            socket.socket(fileno=fd).close()
        self.booster = booster
        self.cookie = rule.cookie
        booster._stream_handlers[rule.cookie] = handler

    async def stop(self) -> None:
        self.booster._stream_handlers.pop(self.cookie, None)
