"""The asyncio adapter for boxcore's wire protocols (:mod:`boxcore.wire` is the sans-IO codec).

:class:`FramedConnection` carries control frames and the file descriptors beside them over a
Unix stream socket with bounded output; :func:`socketpair_dgram` makes a booster's data channel;
:func:`peer_credentials` reads SO_PEERCRED.
"""

from __future__ import annotations

import array
import asyncio
import collections
import logging
import os
import socket
import struct
from typing import Any, Callable, Iterable

from boxcore.framing import FramingError
from boxcore.wire import DEFAULT_MAX_FRAME, FrameDecoder, encode

log = logging.getLogger("boxcore.transport")

MAX_FDS_PER_RECV = 16
READ_SIZE = 65536   # bytes read per wakeup: one connection's burst cannot hold the loop for long


def socketpair_dgram(bufsize: int = 4 << 20) -> tuple[socket.socket, socket.socket]:
    """A data channel: a non-blocking Unix datagram socketpair with big buffers."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (a, b):
        s.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, bufsize)
            except OSError:
                pass
    return a, b


# ------------------------------------------------------------------ asyncio adapter

class ReplyTooLarge(ValueError):
    """A message larger than the connection's ``max_reply``: it was not sent."""


class FramedConnection:
    """A control connection on a non-blocking Unix stream socket, with descriptors.

    ``on_message(msg, fds)`` gets every decoded frame (a dict, or a
    :class:`~boxcore.wire.WireDecodeError` for an undecodable body) and the descriptors it
    declared with ``nfds`` (the receiver owns them).  ``on_close(reason)`` runs once when the
    peer goes away or the stream is broken.

    Fairness: each wakeup reads at most ``read_size`` bytes; the owner may
    :meth:`pause_reading` while it has too much queued (the peer's own socket buffer then fills
    and the peer blocks, rather than boxd).  Output is bounded by ``max_output``: a peer that
    does not read its replies is disconnected (``closed_not_reading``) rather than buffered
    for; one frame is always accepted onto an empty queue, so a large reply still goes out.
    """

    def __init__(self, sock: socket.socket, on_message: Callable[[Any, list[int]], None],
                 on_close: Callable[[str], None], *, max_frame: int = DEFAULT_MAX_FRAME,
                 max_output: int = 8 << 20, loop: asyncio.AbstractEventLoop | None = None,
                 accept_fds: bool = True, read_size: int = READ_SIZE, max_reply: int | None = None) -> None:
        sock.setblocking(False)
        # boxd's side: boosters never send descriptors, so any that arrive are closed
        # and a message's "nfds" is left to validation (INVALID), not fatal pairing.
        self.accept_fds = accept_fds
        self.sock = sock
        self.loop = loop or asyncio.get_running_loop()
        self.decoder = FrameDecoder(max_frame)
        self.on_message = on_message
        self.on_close = on_close
        self.max_output = max_output
        self._fds: collections.deque[int] = collections.deque()
        self._out: collections.deque[tuple[memoryview, list[int], bool]] = collections.deque()
        self._out_bytes = 0
        self._writing = False
        self.closed = False
        self.frames_in = 0
        self.frames_out = 0
        self.read_size = read_size
        self.max_reply = max_reply
        self.closed_not_reading = False
        self.reading = True
        self.loop.add_reader(sock.fileno(), self._on_readable)

    def pause_reading(self) -> None:
        if self.reading and not self.closed:
            self.reading = False
            self.loop.remove_reader(self.sock.fileno())

    def resume_reading(self) -> None:
        if not self.reading and not self.closed:
            self.reading = True
            self.loop.add_reader(self.sock.fileno(), self._on_readable)

    # reading
    def _on_readable(self) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, self.read_size, MAX_FDS_PER_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"read error: {exc}")
            return
        if self.accept_fds:
            self._fds.extend(fds)
        else:
            for fd in fds:
                _close_fd(fd)
        if flags & getattr(socket, "MSG_CTRUNC", 0) and self.accept_fds:
            self.close("descriptors truncated")
            return
        if not data:
            self.close("peer closed")
            return
        try:
            messages = self.decoder.feed(data)
        except FramingError as exc:
            self.close(f"broken stream: {exc}")
            return
        for msg in messages:
            if self.closed:
                return
            nfds = msg.get("nfds", 0) if isinstance(msg, dict) and self.accept_fds else 0
            if not isinstance(nfds, int) or isinstance(nfds, bool) or nfds < 0:
                nfds = 0  # not a count: validation will say so
            if nfds > len(self._fds):
                self.close(f"message declares {nfds!r} descriptors, {len(self._fds)} received")
                return
            fds_for = [self._fds.popleft() for _ in range(nfds)]
            self.frames_in += 1
            self.on_message(msg, fds_for)

    # writing
    def send(self, msg: dict[str, Any], fds: Iterable[int] = (), *, close_fds: bool = False) -> bool:
        """Queue one message with descriptors (the peer gets duplicates).

        With ``close_fds`` the connection owns ``fds`` and closes them once sent
        (or when it closes first).
        """
        fds = list(fds)
        if self.closed:
            if close_fds:
                for fd in fds:
                    _close_fd(fd)
            return False
        if fds:
            msg = dict(msg, nfds=len(fds))
        frame = encode(msg)
        if self.max_reply is not None and len(frame) > self.max_reply:
            if close_fds:
                for fd in fds:
                    _close_fd(fd)
            raise ReplyTooLarge(f"a {msg.get('t')} of {len(frame)} bytes is larger than the "
                                f"{self.max_reply} bytes one message may carry")
        if self._out and self._out_bytes + len(frame) > self.max_output:
            if close_fds:
                for fd in fds:
                    _close_fd(fd)
            self.closed_not_reading = True
            self.close("peer not reading: output limit reached")
            return False
        self._out.append((memoryview(frame), fds, close_fds))
        self._out_bytes += len(frame)
        self.frames_out += 1
        self._flush()
        return True

    def _flush(self) -> None:
        while self._out:
            view, fds, owned = self._out[0]
            try:
                if fds:
                    sent = self.sock.sendmsg([view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                       array.array("i", fds))])
                else:
                    sent = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.close(f"write error: {exc}")
                return
            self._out_bytes -= sent
            if owned:
                for fd in fds:
                    _close_fd(fd)
            if sent < len(view):
                self._out[0] = (view[sent:], [], False)  # descriptors went with the first byte
                break
            self._out.popleft()
        if self._out and not self._writing:
            self.loop.add_writer(self.sock.fileno(), self._flush)
            self._writing = True
        elif not self._out and self._writing:
            self.loop.remove_writer(self.sock.fileno())
            self._writing = False

    def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.reading:
                self.loop.remove_reader(self.sock.fileno())
            if self._writing:
                self.loop.remove_writer(self.sock.fileno())
        except (ValueError, OSError):
            pass
        while self._fds:
            _close_fd(self._fds.popleft())
        for _, fds, owned in self._out:
            if owned:
                for fd in fds:
                    _close_fd(fd)
        self._out.clear()
        self.sock.close()
        self.on_close(reason)


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)
