"""Async sockets for boosters (``booster.open_udp``)."""

from __future__ import annotations

import asyncio

__all__ = ["UdpEndpoint"]


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
