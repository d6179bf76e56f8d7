"""Booster-side receivers for the ``linux`` engine: ``nfqueue``, ``nflog`` and ``tproxy``.

* ``nfqueue`` {queue}: the booster binds the NFQUEUE boxd allocated (netfilterqueue), drives it
  from its asyncio loop through the queue's file descriptor, reads at most ``batch`` packets
  per wake-up, and gives verdicts itself: CONSUME = drop, PASS = accept, MODIFY = accept with
  the new payload (lengths and checksums fixed by :func:`boxcore.packet.replace_payload`).
  Runs of identical plain verdicts go back as one NFQNL_MSG_VERDICT_BATCH message.  The queue
  is set fail-open (a full queue accepts instead of dropping), and the kernel rule carries
  ``--queue-bypass`` (no listener: packets pass).
* ``nflog`` {group}: copies.  A netlink socket bound to the NFLOG group; the kernel rule is
  non-terminating, so the original goes on whatever the booster does (or if it is gone).
* original destination of a datagram on a transparent UDP socket (a socket delivery whose
  params say ``orig_dst``: the xdp engine's REDIRECT, packets handed over by bpf_sk_assign keep
  their destination): :func:`want_original_destination` turns IP_RECVORIGDSTADDR on and
  :func:`recv_original` reads a datagram with its source and original destination.
* ``tproxy`` {port}: a listening socket with IP_TRANSPARENT; each accepted connection carries
  its original destination as its local address.  :func:`connect_onward` (the receiver's
  ``connect_onward``, offered to applications as ``Subscription.connect_onward``) opens the
  booster's own connection to that destination, optionally spoofing the client's address.

Every receiver here uses only its :class:`boxcore.booster.ReceiverContext`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import os
import socket
import struct
from typing import Any, Callable

from boxcore import iptables as nf
from boxcore.packet import Packet, PacketDecodeError, PacketError, replace_payload
from boxcore.receivers import register
from cliruntime.supervisor import within

log = logging.getLogger("boxcore.receivers.linux")

IP_TRANSPARENT = 19
NF_DROP, NF_ACCEPT = 0, 1
NFQNL_MSG_VERDICT_BATCH = 3
NFQA_VERDICT_HDR = 2
VERDICT_HDR = struct.Struct("!II")     # verdict, packet id
DEFAULT_BATCH = 256
DEFAULT_QUEUE_LEN = 4096
SO_RCVBUFFORCE = 33


def verdict_batch_message(queue: int, verdict: int, last_id: int) -> bytes:
    """One verdict for every packet of ``queue`` with an id up to ``last_id``."""
    return nf.nfnl_message(nf.NFNL_SUBSYS_QUEUE, NFQNL_MSG_VERDICT_BATCH, queue,
                           nf.nla(NFQA_VERDICT_HDR, VERDICT_HDR.pack(verdict, last_id)))


class _BudgetSocket:
    """What netfilterqueue's ``run_socket`` reads from: the queue's netlink socket, but
    reporting EAGAIN after ``budget`` packets so one wake-up never starves the event loop."""

    __slots__ = ("sock", "left", "overruns")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.left = 0
        self.overruns = 0

    def recv(self, size: int) -> bytes:
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "batch budget spent")
        self.left -= 1
        try:
            return self.sock.recv(size)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:   # the kernel dropped packets for us: count, go on
                self.overruns += 1
            raise


class QueueReader:
    """An NFQUEUE bound with netfilterqueue and read from an asyncio loop in bounded batches.

    ``on_batch(items)`` gets a list of ``(nfq_packet, raw_ip_bytes)``; it must give every
    packet a verdict, now (``verdict`` / ``verdicts``) or later (``verdict``).
    """

    RCVBUF = 32 << 20

    def __init__(self, queue: int, on_batch: Callable[[list], None], *, max_len: int = DEFAULT_QUEUE_LEN,
                 batch: int = DEFAULT_BATCH, fail_open: bool = True,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        from netfilterqueue import NetfilterQueue

        self.queue = queue
        self.on_batch = on_batch
        self.batch_size = batch
        self.loop = loop or asyncio.get_running_loop()
        self.stats = {"packets": 0, "batches": 0, "verdict_messages": 0, "overruns": 0}
        self._items: list = []
        self._nfq = NetfilterQueue()
        self._nfq.bind(queue, self._collect, max_len=max_len)
        # Our own handle on the same netlink socket: for non-blocking batched reads, the
        # fail-open flag and batch verdicts (netfilterqueue exposes neither).
        self._sock = socket.socket(fileno=os.dup(self._nfq.get_fd()))
        self._sock.setblocking(False)
        with contextlib.suppress(OSError):
            # a deep socket buffer rides out scheduling gaps (overflow fails open, but loses
            # the packet for the booster)
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.RCVBUF)
        self._reader = _BudgetSocket(self._sock)
        if fail_open:
            self._sock.send(nf.nfqueue_fail_open(queue))
        self.loop.add_reader(self._sock.fileno(), self._readable)
        self.closed = False

    def _collect(self, pkt) -> None:
        # the payload buffer is reused after the callback returns: copy it now
        self._items.append((pkt, pkt.get_payload()))

    def _readable(self) -> None:
        self._reader.left = self.batch_size
        try:
            self._nfq.run_socket(self._reader)
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                log.warning("queue %d: read failed: %s", self.queue, exc)
        self.stats["overruns"] = self._reader.overruns
        items, self._items = self._items, []
        if items:
            self.stats["packets"] += len(items)
            self.stats["batches"] += 1
            try:
                self.on_batch(items)
            except Exception:
                # a bug here must not leave packets waiting: let them all pass
                log.exception("queue %d: batch processing failed; passing %d packets", self.queue, len(items))
                self.stats["batch_failures"] = self.stats.get("batch_failures", 0) + 1
                for pkt, _raw in items:
                    with contextlib.suppress(RuntimeError, OSError):
                        pkt.accept()

    def send_batch_verdict(self, verdict: int, last_id: int) -> None:
        self._sock.send(verdict_batch_message(self.queue, verdict, last_id))
        self.stats["verdict_messages"] += 1

    def verdicts(self, decided: list[tuple[Any, int, bytes | None]]) -> None:
        """Give verdicts for packets in queue order: ``(nfq_packet, NF_DROP|NF_ACCEPT, new_payload)``.

        Only valid when every earlier packet of the queue already has its verdict: runs of the
        same plain verdict are then sent as one batch message.
        """
        if len(decided) == 1:               # light traffic: netfilterqueue's own C verdict path
            pkt, verdict, payload = decided[0]
            self.verdict(pkt, verdict, payload)
            self.stats["verdict_messages"] += 1
            return
        run_verdict, run_last = None, None
        for pkt, verdict, payload in decided:
            if payload is None and (run_verdict is None or verdict == run_verdict):
                run_verdict, run_last = verdict, pkt.id
                continue
            if run_verdict is not None:
                self.send_batch_verdict(run_verdict, run_last)
                run_verdict = run_last = None
            if payload is not None:
                pkt.set_payload(payload)
                pkt.accept()
                self.stats["verdict_messages"] += 1
            else:
                run_verdict, run_last = verdict, pkt.id
        if run_verdict is not None:
            self.send_batch_verdict(run_verdict, run_last)

    @staticmethod
    def verdict(pkt, verdict: int, payload: bytes | None = None) -> None:
        """One packet's verdict on its own (any order)."""
        if payload is not None:
            pkt.set_payload(payload)
        if verdict == NF_DROP:
            pkt.drop()
        else:
            pkt.accept()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self._sock.fileno())
        # Unbinding destroys the kernel queue: packets still in it are dropped, and new
        # ones pass (--queue-bypass).
        with contextlib.suppress(Exception):
            self._nfq.unbind()
        self._sock.close()


def _nf_verdict(verdict: Any) -> tuple[int, bytes | None]:
    """(NF verdict, new payload) of a Verdict: CONSUME drop, PASS accept, modify accept with payload."""
    from boxcore.booster import VerdictCode

    if verdict.code is VerdictCode.CONSUME:
        return NF_DROP, None
    if verdict.code is VerdictCode.PASS:
        return NF_ACCEPT, None
    return NF_ACCEPT, verdict.payload


@register("nfqueue")
class NfqueueReceiver:
    """REDIRECT on the linux engine: the booster is the queue's listener."""

    def __init__(self) -> None:
        self.reader: QueueReader | None = None
        self.pending = 0           # packets whose (async) handler has not finished
        self.stats = {"packets": 0, "malformed": 0, "not_matching": 0, "modify_failed": 0}

    async def start(self, ctx: Any, delivery: Any, handler: Callable) -> None:
        self.ctx, self.rule, self.handler = ctx, ctx.rule, handler
        params = delivery.params
        for fd in delivery.fds:
            os.close(fd)
        self.check_payload = bool(self.rule.match.payload)
        self.reader = QueueReader(int(params["queue"]), self._on_batch,
                                  max_len=int(params.get("max_len", DEFAULT_QUEUE_LEN)),
                                  batch=int(params.get("batch", DEFAULT_BATCH)),
                                  fail_open=bool(params.get("fail_open", True)),
                                  loop=ctx.loop)
        ctx.stats.providers[f"nfqueue_{ctx.cookie}"] = self.snapshot

    def snapshot(self) -> dict[str, int]:
        return {**self.stats, **(self.reader.stats if self.reader else {})}

    def _on_batch(self, items: list) -> None:
        from boxcore.booster import Verdict

        consume, passed = Verdict.CONSUME, Verdict.PASS
        decided: list[tuple[Any, int, bytes | None]] = []
        append = decided.append
        in_order = self.pending == 0
        handler, ctx, parse = self.handler, self.ctx, Packet.parse_ip
        check_payload, match = self.check_payload, self.rule.match
        seen = 0
        for nfq_pkt, raw in items:
            try:
                pkt = parse(raw, verify_checksum=False)
            except PacketDecodeError:
                self.stats["malformed"] += 1
                append((nfq_pkt, NF_ACCEPT, None))   # not ours to judge: let it pass
                continue
            if check_payload and not match.matches(pkt):
                self.stats["not_matching"] += 1      # defensive: the kernel's u32 test should agree
                append((nfq_pkt, NF_ACCEPT, None))
                continue
            seen += 1
            try:
                result = handler(pkt)
            except Exception:
                ctx.handler_failed(handler)
                append((nfq_pkt, NF_DROP, None))     # a failed handler consumes, as on every engine
                continue
            # the common verdicts first, without a call
            if result is None or result is consume:
                append((nfq_pkt, NF_DROP, None))
            elif result is passed:
                append((nfq_pkt, NF_ACCEPT, None))
            elif inspect.isawaitable(result):
                if ctx.finish_in_task(self._finish(nfq_pkt, raw, result), result, name="packet handler"):
                    self.pending += 1           # the task starts after this pass: it decrements when done
                    in_order = False
                else:
                    append((nfq_pkt, NF_ACCEPT, None))      # over the handler bound: fail open
            else:
                append((nfq_pkt, *self._decide(raw, result)))
        self.stats["packets"] += seen
        if in_order:
            self.reader.verdicts(decided)
        else:
            for nfq_pkt, verdict, payload in decided:
                QueueReader.verdict(nfq_pkt, verdict, payload)

    def _decide(self, raw: bytes, result: Any) -> tuple[int, bytes | None]:
        verdict, payload = _nf_verdict(self.ctx.verdict(self.handler, result))
        if payload is not None:
            try:
                payload = replace_payload(raw, payload)
            except (PacketDecodeError, PacketError) as exc:
                self.stats["modify_failed"] += 1
                log.warning("cannot modify packet: %s; passing it unchanged", exc)
                return NF_ACCEPT, None
        return verdict, payload

    async def _finish(self, nfq_pkt: Any, raw: bytes, awaitable: Any) -> None:
        verdict, payload = NF_ACCEPT, None     # cancelled (booster closing): let it pass
        try:
            try:
                result = await awaitable
            except Exception:
                self.ctx.handler_failed(self.handler)
                result = None
            verdict, payload = self._decide(raw, result)
        finally:
            self.pending -= 1
            if self.reader is not None and not self.reader.closed:
                with contextlib.suppress(RuntimeError, OSError):
                    QueueReader.verdict(nfq_pkt, verdict, payload)

    async def stop(self) -> None:
        if self.reader is not None:
            self.reader.close()


# ---------------------------------------------------------------- NFLOG

class NflogSocket:
    """A netlink socket bound to one NFLOG group, read from the asyncio loop."""

    RCVBUF = 8 << 20

    def __init__(self, group: int, on_packet: Callable[[nf.NflogPacket], None], *,
                 loop: asyncio.AbstractEventLoop | None = None, batch: int = DEFAULT_BATCH) -> None:
        self.group = group
        self.on_packet = on_packet
        self.batch = batch
        self.loop = loop or asyncio.get_running_loop()
        self.stats = {"packets": 0, "malformed": 0, "overruns": 0}
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nf.NETLINK_NETFILTER)
        try:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.RCVBUF)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RCVBUF)
            self.sock.bind((0, 0))
            self.sock.settimeout(2.0)
            for seq, message in enumerate(nf.nflog_bind(group), start=1):
                self.sock.send(message)
                self._expect_ack(seq, message)
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise
        self.closed = False
        self.loop.add_reader(self.sock.fileno(), self._readable)

    def _expect_ack(self, seq: int, message: bytes) -> None:
        while True:
            data = self.sock.recv(65536)
            for msg in nf.split_messages(data):
                if msg.kind == nf.NLMSG_ERROR:
                    code = nf.netlink_error(msg)
                    if code:
                        raise OSError(code, f"binding NFLOG group {self.group}: {os.strerror(code)}")
                    return

    def _readable(self) -> None:
        for _ in range(self.batch):
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.stats["overruns"] += 1
                    continue
                log.warning("nflog group %d: read failed: %s", self.group, exc)
                return
            try:
                messages = list(nf.split_messages(data))
            except nf.NetlinkDecodeError:
                self.stats["malformed"] += 1
                continue
            for msg in messages:
                try:
                    packet = nf.parse_nflog(msg)
                except nf.NetlinkDecodeError:
                    self.stats["malformed"] += 1
                    continue
                if packet is not None:
                    self.stats["packets"] += 1
                    self.on_packet(packet)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()   # closing the socket unbinds the group


@register("nflog")
class NflogReceiver:
    """COPY on the linux engine: copies from an NFLOG group; the originals never wait."""

    def __init__(self) -> None:
        self.nflog: NflogSocket | None = None
        self.stats = {"packets": 0, "malformed": 0, "not_matching": 0}

    async def start(self, ctx: Any, delivery: Any, handler: Callable) -> None:
        self.ctx, self.rule, self.handler = ctx, ctx.rule, handler
        for fd in delivery.fds:
            os.close(fd)
        self.nflog = NflogSocket(int(delivery.params["group"]), self._on_packet, loop=ctx.loop)

    def _on_packet(self, copy: nf.NflogPacket) -> None:
        try:
            pkt = Packet.parse_ip(copy.payload, verify_checksum=False)
        except PacketDecodeError:
            self.stats["malformed"] += 1
            return
        if self.rule.match.payload and not self.rule.match.matches(pkt):
            self.stats["not_matching"] += 1
            return
        self.stats["packets"] += 1
        try:
            result = self.handler(pkt)
        except Exception:
            self.ctx.handler_failed(self.handler)
            return
        if inspect.isawaitable(result):
            self.ctx.finish_in_task(self._finish(result), result, name="copy handler")   # refused: counted

    async def _finish(self, awaitable: Any) -> None:
        try:
            await awaitable
        except Exception:
            self.ctx.handler_failed(self.handler)

    async def stop(self) -> None:
        if self.nflog is not None:
            self.nflog.close()


# ---------------------------------------------------------------- original destination (UDP)

IP_RECVORIGDSTADDR = 20                 # linux/in.h; the ancillary message has the same number
SOCKADDR_IN = struct.Struct("=H2s4s8x")  # family (host order), port and address (network order)
ORIGDST_CMSG_SPACE = socket.CMSG_SPACE(SOCKADDR_IN.size)


def want_original_destination(sock: socket.socket) -> None:
    """Have every datagram read with :func:`recv_original` carry its original destination."""
    sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)


def recv_original(sock: socket.socket, size: int = 65535
                  ) -> tuple[bytes, tuple[str, int], tuple[str, int] | None]:
    """One datagram: (payload, (source, port), (original destination, port) or None when the
    socket does not report it).  Raises BlockingIOError when nothing is waiting."""
    data, ancillary, _flags, source = sock.recvmsg(size, ORIGDST_CMSG_SPACE)
    for level, kind, value in ancillary:
        if level == socket.SOL_IP and kind == IP_RECVORIGDSTADDR and len(value) >= SOCKADDR_IN.size:
            family, port, address = SOCKADDR_IN.unpack_from(value)
            if family == socket.AF_INET:
                return data, source[:2], (socket.inet_ntoa(address), int.from_bytes(port, "big"))
    return data, source[:2], None


# ---------------------------------------------------------------- TPROXY

def transparent_listener(port: int, host: str = "0.0.0.0", backlog: int = 128) -> socket.socket:
    """A listening TCP socket that accepts connections addressed to any host (IP_TRANSPARENT)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_onward(conn: Any, *, spoof_client: bool = False, timeout: float = 10.0,
                         ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The booster's own connection to an intercepted connection's original destination.

    With ``spoof_client`` the connection leaves from the client's address (IP_TRANSPARENT),
    so the server sees the client, and the server's replies are steered back to this socket
    by the TPROXY chain's socket match.  Marked as injected: it never re-enters the booster
    chains.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        nf.mark_injected(sock)
        if spoof_client:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.bind((conn.client[0], 0))
        sock.setblocking(False)
        await within(asyncio.get_running_loop().sock_connect(sock, tuple(conn.original_dst)), timeout)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


@register("tproxy")
class TproxyReceiver:
    """Transparent TCP interception: connections to any address on the rule's port arrive here."""

    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None
        self.stats = {"connections": 0}

    async def start(self, ctx: Any, delivery: Any, handler: Callable) -> None:
        for fd in delivery.fds:
            os.close(fd)
        listener = transparent_listener(int(delivery.params["port"]))

        async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            client = writer.get_extra_info("peername")[:2]
            original_dst = writer.get_extra_info("sockname")[:2]   # TPROXY keeps the original destination
            self.stats["connections"] += 1
            try:
                await ctx.serve_connection(handler, reader, writer, ctx.intercepted(client, original_dst))
            except asyncio.CancelledError:
                # the booster is stopping; asyncio's server would log a cancelled connection task
                # as an error traceback, though nothing failed
                writer.close()

        self.server = await asyncio.start_server(on_connection, sock=listener)

    connect_onward = staticmethod(connect_onward)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await within(self.server.wait_closed(), 1.0)
