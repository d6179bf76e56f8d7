"""Copying one TCP connection into another, both ways, with time bounds.

A relay must not be held for ever by a peer that stops: a connection on which neither side sent
a byte for ``idle`` seconds is closed, and so is one whose receiver leaves our bytes unread for
``stall`` seconds (backpressure slows the copy, for that long at most).  Each end is counted in
the caller's stats under the names it gives (:class:`SpliceCounters`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, MutableMapping

from cliruntime.supervisor import within

__all__ = ["SpliceCounters", "splice"]

CHUNK = 65536


@dataclass(frozen=True)
class SpliceCounters:
    """The stats keys a splice adds to: bytes each way, and why it was cut short."""

    bytes_up: str = "tcp_bytes_up"
    bytes_down: str = "tcp_bytes_down"
    idle: str = "tcp_idle_closed"
    stalled: str = "tcp_stalled"


async def splice(client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 server: tuple[asyncio.StreamReader, asyncio.StreamWriter], stats: MutableMapping[str, Any], *,
                 idle: float | None, stall: float | None, counters: SpliceCounters = SpliceCounters()) -> None:
    """Copy ``client`` -> ``server`` and back until both ends closed, or the connection was idle
    (no byte either way) for ``idle`` seconds, or a writer left our bytes unread for ``stall``
    seconds (None: no such bound).  The writers are not closed here."""
    last = [time.monotonic()]                  # the newest byte, either way

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: str) -> None:
        try:
            await copy(reader, writer, counter)
        except (ConnectionError, OSError):
            pass                                # this way is over; the other goes on to its end

    async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: str) -> None:
        while True:
            if idle is None:
                data = await reader.read(CHUNK)
            else:
                try:
                    data = await within(reader.read(CHUNK), max(0.0, last[0] + idle - time.monotonic()))
                except asyncio.TimeoutError:
                    if time.monotonic() - last[0] >= idle:
                        raise _Idle from None
                    continue                    # the other way was busy meanwhile
            if not data:
                break
            last[0] = time.monotonic()
            stats[counter] += len(data)
            writer.write(data)
            if stall is None:
                await writer.drain()
                continue
            try:
                await within(writer.drain(), stall)
            except asyncio.TimeoutError:
                raise _Stalled from None
        if writer.can_write_eof():
            writer.write_eof()

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(pipe(client[0], server[1], counters.bytes_up))
            group.create_task(pipe(server[0], client[1], counters.bytes_down))
    except* _Idle:
        stats[counters.idle] += 1
    except* _Stalled:
        stats[counters.stalled] += 1


class _Idle(Exception):
    pass


class _Stalled(Exception):
    pass
