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
  with the payloads read, no Packet objects; :attr:`~boxcore.booster.Subscription.delegated_socket`
  lets it send from the box's address itself.  When another rule
  comes to share the port, boxd takes the socket back (``undelegate``) and the
  receiver carries on as a channel receiver.
* ``stream``: boxd accepts intercepted TCP connections and passes each one
  (descriptor + original destination) over the control connection.  The booster's own
  connection onward is an ordinary one (boxd relays, nothing to steer or mark).

Every receiver here uses only its :class:`boxcore.booster.ReceiverContext`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
from typing import Any

from boxcore.booster.subscription import connect_directly
from boxcore.packet import Packet
from boxcore.receivers import register
from boxcore.wire import VerdictCode

MAX_READS_PER_WAKEUP = 512
MAX_DATAGRAM = 65535


def _close_all(fds: list[int]) -> None:
    for fd in fds:  # none expected; never leak one
        socket.socket(fileno=fd).close()


@register("channel")
class ChannelReceiver:
    async def start(self, ctx: Any, delivery: Any, handler: Any) -> None:
        _close_all(delivery.fds)
        self.ctx = ctx
        ctx.listen_on_channel(handler)

    async def stop(self) -> None:
        self.ctx.stop_listening()


@register("socket")
class SocketReceiver:
    """Reads a delegated UDP socket directly; verdicts other than CONSUME re-inject."""

    async def start(self, ctx: Any, delivery: Any, handler: Any) -> None:
        if len(delivery.fds) != 1:
            raise ValueError(f"socket delivery needs exactly one descriptor, got {len(delivery.fds)}")
        self.ctx = ctx
        self.handler = handler
        self.redirect = ctx.redirect
        self.counter = ctx.counter
        self.sock = socket.socket(fileno=delivery.fds[0])
        self.sock.setblocking(False)
        self.dst = str(delivery.params["dst"])
        self.dport = int(delivery.params["dport"])
        # a port-only rule's socket sees datagrams to many addresses: the kernel says which (xdp)
        self.recv_original = None
        if delivery.params.get("orig_dst"):
            from boxcore.receivers.linux import recv_original
            self.recv_original = recv_original
        self.loop = ctx.loop
        self.loop.add_reader(self.sock.fileno(), self._on_readable)
        self.stopped = False
        self.undelegated = False

    @property
    def delegated_socket(self) -> socket.socket | None:
        """The box's socket while it is ours (None once closed: taken back, abandoned, stopped)."""
        return None if self.stopped else self.sock

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
            except OSError:          # BlockingIOError: drained
                break
            append(data)
            nbytes += len(data)
        if not payloads:
            return
        self.counter.add(nbytes, len(payloads))
        try:
            self.batch_handler(payloads)
        except Exception:
            self.ctx.handler_failed(self.batch_handler)

    def _on_readable(self) -> None:
        ctx = self.ctx
        handler = self.handler
        recvfrom = self.sock.recvfrom
        recv_original = self.recv_original
        dst, dport = self.dst, self.dport
        counter = self.counter
        redirect = self.redirect
        for _ in range(MAX_READS_PER_WAKEUP):
            try:
                if recv_original is None:
                    data, (src, sport, *_) = recvfrom(MAX_DATAGRAM)
                else:
                    data, (src, sport), original = recv_original(self.sock, MAX_DATAGRAM)
                    dst, dport = original or (self.dst, self.dport)
            except OSError:          # BlockingIOError: drained
                return
            counter.packets += 1     # RuleCounter.add inlined: this is the fast path
            counter.bytes += len(data)
            pkt = Packet(17, src, sport, dst, dport, data)
            try:
                result = handler(pkt)
            except Exception:
                ctx.handler_failed(handler)
                continue
            if inspect.isawaitable(result):
                if not ctx.finish_in_task(self._finish(result, pkt), result, name="packet handler"):
                    ctx.send(pkt)       # over the handler bound: fail open, the packet goes on unchanged
            elif redirect and result is not None:
                self._apply(result, pkt)
            elif not redirect:
                ctx.send(pkt)  # a copy: the original goes on

    async def _finish(self, awaitable: Any, pkt: Packet) -> None:
        try:
            result = await awaitable
        except asyncio.CancelledError:
            raise
        except Exception:
            self.ctx.handler_failed(self.handler)
            return
        if not self.redirect:
            self.ctx.send(pkt)
        elif result is not None:
            self._apply(result, pkt)

    def _apply(self, result: Any, pkt: Packet) -> None:
        verdict = self.ctx.verdict(self.handler, result)
        if verdict.code is VerdictCode.CONSUME:
            return
        if verdict.code is VerdictCode.MODIFY:
            pkt = Packet(pkt.proto, pkt.src, pkt.sport, pkt.dst, pkt.dport, verdict.payload)
        self.ctx.send(pkt)

    def undelegate(self) -> None:
        """boxd took the socket back (another rule now shares the port): from now on
        the rule's packets arrive on the data channel, to the same handler."""
        if self.stopped:
            return
        self._close()
        self.ctx.listen_on_channel(self.handler)
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
        if self.undelegated:
            self.ctx.stop_listening()
        self.ctx.forget_counter()  # the rule is gone: nothing to report
        if not self.stopped:
            self._close()


@register("stream")
class StreamReceiver:
    async def start(self, ctx: Any, delivery: Any, handler: Any) -> None:
        _close_all(delivery.fds)
        self.ctx = ctx
        ctx.accept_streams(handler)

    connect_onward = staticmethod(connect_directly)

    async def stop(self) -> None:
        self.ctx.stop_streams()
