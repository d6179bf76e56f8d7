"""Reading Gnutella messages off a connection: the one loop the servent and the booster share."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Callable

from .wire import GnutellaDecodeError, Message, MessageReader, RawMessage

log = logging.getLogger("gnutella.stream")


async def pump_messages(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    leftover: bytes,
    max_payload: int,
    stats: Counter,
    on_message: Callable[[Message, float], None],
    *,
    keep_going: Callable[[], bool],
    traffic: Counter | None = None,
    label: str = "connection",
) -> None:
    """Frame bytes into messages and hand each to ``on_message(msg, now)`` until EOF.

    A framing error (a header that cannot be trusted) ends the connection and is counted in
    ``stats["framing_errors"]``; a malformed message inside a good frame is counted in
    ``stats["malformed_dropped"]`` and skipped.  ``traffic`` (if given) counts ``bytes_in`` and
    ``msgs_in``.  The loop also ends when ``keep_going()`` turns false after a batch, and on
    socket errors; the caller's ``finally`` cleans up.
    """
    framer = MessageReader(max_payload)
    data = leftover
    try:
        while True:
            if data:
                if traffic is not None:
                    traffic["bytes_in"] += len(data)
                try:
                    messages = framer.feed(data)
                except GnutellaDecodeError as exc:
                    stats["framing_errors"] += 1
                    log.info("%s: %s; closing", label, exc)
                    return
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
                await writer.drain()
            data = await reader.read(1 << 16)
            if not data:
                return
    except (OSError, asyncio.IncompleteReadError) as exc:
        log.debug("%s: %r", label, exc)
