"""The control session: the booster's framed connection to boxd (requests, replies, events).

Requests carry an ``id`` and wait (at most ``request_timeout``) for the reply with the same id; a
refusal raises the :mod:`~boxcore.booster.errors` class of its status.  Everything else boxd sends
(``dir_event``, ``stream``, ``undelegate``, ``delegate``) goes to ``on_event(kind, msg, fds)``;
``evicted`` is logged and becomes the close reason.
The message types themselves are declared once, in :mod:`boxcore.wire`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
from typing import Any, Callable

from boxcore import transport, wire
from boxcore.booster.errors import BoxdGone, error_for
from boxcore.wire import Status
from cliruntime.supervisor import within

log = logging.getLogger("boxcore.booster")

__all__ = ["ControlSession"]


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class ControlSession:
    def __init__(self, on_event: Callable[[str, dict, list[int]], None], on_close: Callable[[str], None],
                 stats: Any, *, request_timeout: float = 10.0) -> None:
        self._on_event = on_event
        self._on_close = on_close
        self._stats = stats
        self.request_timeout = request_timeout
        self._conn: transport.FramedConnection | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self.closed = True
        self.close_reason: str | None = None
        self.gone = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def open(self, path: str, sock: socket.socket | None = None) -> None:
        """Connect to boxd's control socket at ``path`` (or adopt an already connected ``sock``)."""
        self.loop = asyncio.get_running_loop()
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await self.loop.sock_connect(sock, path)
            except OSError as exc:
                sock.close()
                raise BoxdGone(f"cannot connect to boxd at {path}: {exc.strerror or exc}") from None
        self._conn = transport.FramedConnection(sock, self._on_message, self._closed, loop=self.loop)
        self.closed = False
        self.close_reason = None
        self.gone.clear()

    def send(self, msg: dict) -> None:
        """A one-way message (heartbeat, bye)."""
        if self._conn is not None and not self._conn.closed:
            self._conn.send(msg)

    def close(self, reason: str) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close(reason)

    async def request_fds(self, msg: dict) -> tuple[Any, list[int]]:
        """Send a request; its result and the descriptors that came with the reply (ours to close)."""
        if self.closed or self._conn is None:
            raise BoxdGone(f"not connected to boxd ({self.close_reason or 'closed'})")
        rid = next(self._ids)
        fut = self.loop.create_future()
        self._pending[rid] = fut
        self._conn.send(dict(msg, id=rid))
        try:
            reply, fds = await within(fut, self.request_timeout)
        except asyncio.TimeoutError:
            self._pending.pop(rid, None)
            raise BoxdGone(f"boxd did not answer {msg['t']} within {self.request_timeout}s") from None
        status = reply["status"]
        if status != Status.OK.value:
            _close_fds(fds)
            raise error_for(status, reply.get("reason") or "", reply.get("holder"))
        return reply.get("result"), fds

    async def request(self, msg: dict) -> Any:
        result, fds = await self.request_fds(msg)
        _close_fds(fds)
        return result

    async def heartbeats(self, interval: float, counters: Callable[[], list], handler_errors: Callable[[], int]) -> None:
        """Tell boxd we are alive every ``interval`` seconds, with the counts only we know."""
        while not self.closed:
            try:
                self.send({"t": "heartbeat", "counters": counters(), "handler_errors": handler_errors()})
            except Exception:
                log.exception("heartbeat failed")
            await asyncio.sleep(interval)

    # ---------------------------------------------------------------- from the transport
    def _closed(self, reason: str) -> None:
        self.closed = True
        self.close_reason = self.close_reason or reason
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BoxdGone(f"boxd connection closed: {reason}"))
        self._pending.clear()
        self._on_close(self.close_reason)
        self.gone.set()

    def _on_message(self, msg: Any, fds: list[int]) -> None:
        try:
            wire.validate(msg)
        except wire.WireDecodeError as exc:
            self._stats["control_malformed"] += 1
            log.warning("malformed message from boxd: %s", exc)
            _close_fds(fds)
            return
        kind = msg["t"]
        if kind == "reply":
            fut = self._pending.pop(msg["id"], None)
            if fut is None or fut.done():
                _close_fds(fds)
                return
            fut.set_result((msg, fds))
        elif kind == "evicted":
            log.error("boxd evicted this booster: %s", msg["reason"])
            self.close_reason = f"evicted: {msg['reason']}"
            _close_fds(fds)
        else:
            self._on_event(kind, msg, fds)
