"""Loopback UDP for tests that talk to boxd or an engine over real sockets."""

from __future__ import annotations

import asyncio
import socket


def bound_udp(port: int = 0, host: str = "127.0.0.1") -> socket.socket:
    """A non-blocking UDP socket bound to ``host``:``port`` (0: any free port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


async def recv(sock: socket.socket, timeout: float = 3.0) -> tuple[bytes, tuple[str, int]]:
    """The next datagram on ``sock`` and its sender; TimeoutError after ``timeout`` seconds."""
    return await asyncio.wait_for(asyncio.get_running_loop().sock_recvfrom(sock, 65535), timeout)
