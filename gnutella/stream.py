"""A Gnutella link after its handshake: the one message stream the servent and the booster share.

:class:`MessageStream` sends messages over a :class:`~gnutella.channel.Channel` (TLS or clear),
deflating them when the handshake settled ``Content-Encoding: deflate`` for our direction, and
bounds what waits for a stalled peer.  :func:`pump_messages` reads the other direction, inflating
(with the decompression-bomb bound) when the peer compresses, frames it into messages and hands
each to the owner.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
import time
from collections import Counter
from typing import Callable

from cliruntime.supervisor import within
from .channel import Channel, CompressionError, Deflater, Inflater
from .handshake import Negotiated
from .wire import GnutellaDecodeError, Message, MessageReader, RawMessage

log = logging.getLogger("gnutella.stream")

MAX_OUTBUF = 512 * 1024


class MessageStream:
    def __init__(self, channel: Channel, negotiated: Negotiated = Negotiated(), *,
                 max_outbuf: int = MAX_OUTBUF, stats: Counter | None = None) -> None:
        self.channel = channel
        self.stats = stats if stats is not None else Counter()
        self.negotiated = negotiated
        self.deflater = Deflater() if negotiated.deflate_out else None
        self.inflater = Inflater() if negotiated.inflate_in else None
        self.max_outbuf = max_outbuf

    def is_closing(self) -> bool:
        return self.channel.is_closing()

    def backlogged(self) -> bool:
        return self.channel.write_buffer_size() > self.max_outbuf

    def send(self, msg: Message) -> int:
        """Write one message; the bytes it took on the link (after compression), 0 if not sent."""
        if self.channel.is_closing():
            return 0
        try:
            data = msg.encode()
        except (struct.error, ValueError, OverflowError) as exc:
            # a message our logic built from hostile input (a port or hop count out of range):
            # it alone is lost, never the link that would carry it
            self.stats["encode_failed"] += 1
            log.warning("message %s not sent, it cannot be encoded: %s", msg.type_name, exc)
            return 0
        if self.deflater is not None:
            data = self.deflater.compress(data)
        self.channel.write(data)
        return len(data)

    def close(self) -> None:
        self.channel.close()


async def pump_messages(
    stream: MessageStream,
    leftover: bytes,
    max_payload: int,
    stats: Counter,
    on_message: Callable[[Message, float], None],
    *,
    keep_going: Callable[[], bool],
    traffic: Counter | None = None,
    label: str = "connection",
    idle_timeout: float | None = None,
    stall_timeout: float | None = None,
) -> None:
    """Frame bytes into messages and hand each to ``on_message(msg, now)`` until EOF.

    A framing error (a header that cannot be trusted) ends the connection and is counted in
    ``stats["framing_errors"]``; a corrupt or bombing deflate stream in
    ``stats["decompression_refused"]``; a malformed message inside a good frame is counted in
    ``stats["malformed_dropped"]`` and skipped.  ``traffic`` (if given) counts ``bytes_in`` (on the
    link) and ``msgs_in``.  The loop also ends when ``keep_going()`` turns false after a batch,
    after ``idle_timeout`` seconds without a byte, after ``stall_timeout`` (default: ``idle_timeout``)
    with our own bytes unread by the peer (``stats["stalled_peers"]``), and on socket errors; the
    caller's ``finally`` cleans up.
    """
    if stall_timeout is None:
        stall_timeout = idle_timeout
    framer = MessageReader(max_payload)
    inflater = stream.inflater
    data = leftover
    try:
        while True:
            if data:
                if traffic is not None:
                    traffic["bytes_in"] += len(data)
                try:
                    chunks = inflater.feed(data) if inflater is not None else (data,)
                    for chunk in chunks:
                        messages = framer.feed(chunk)
                        now = time.monotonic()
                        for msg in messages:
                            if isinstance(msg, RawMessage):
                                stats["malformed_dropped"] += 1
                                continue
                            if traffic is not None:
                                traffic["msgs_in"] += 1
                            on_message(msg, now)
                        if not keep_going():
                            return
                except GnutellaDecodeError as exc:
                    stats["framing_errors"] += 1
                    log.info("%s: %s; closing", label, exc)
                    return
                except CompressionError as exc:
                    stats["decompression_refused"] += 1
                    log.warning("%s: %s; closing", label, exc)
                    return
                try:
                    await within(stream.channel.drain(), stall_timeout)
                except asyncio.TimeoutError:
                    # a peer that stops reading would hold this task (and its slot) forever
                    stats["stalled_peers"] += 1
                    log.info("%s: not reading our data for %.0f s; closing", label, stall_timeout)
                    return
            if idle_timeout is None:
                data = await stream.channel.read()
            else:
                try:
                    data = await within(stream.channel.read(), idle_timeout)
                except asyncio.TimeoutError:
                    stats["idle_timeouts"] += 1
                    log.info("%s: idle for %.0f s; closing", label, idle_timeout)
                    return
            if not data:
                return
    except (OSError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
        log.debug("%s: %r", label, exc)
