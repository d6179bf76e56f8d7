"""One datagram to many IPv4 addresses in one ``sendmmsg(2)`` call (Linux), for the reflector's fan-out.

Python's socket module has no ``sendmmsg``; a per-member ``sendto`` loop costs a
Python call and a syscall per datagram.  :class:`FanoutSender` keeps, per
member list, a prepared ``mmsghdr`` array whose entries share one ``iovec``
(the same payload) and differ only in the destination, so a fan-out is one
ctypes call.  :func:`available` says whether libc has ``sendmmsg``; the
reflector falls back to the loop otherwise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import socket
import struct

_libc = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _sendmmsg = _libc.sendmmsg
except (OSError, AttributeError):
    _sendmmsg = None


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _SockAddrIn(ctypes.Structure):
    _fields_ = [("sin_family", ctypes.c_ushort), ("sin_port", ctypes.c_uint16), ("sin_addr", ctypes.c_uint32),
                ("sin_zero", ctypes.c_char * 8)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_IoVec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t), ("msg_flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


if _sendmmsg is not None:
    _sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    _sendmmsg.restype = ctypes.c_int

_MMSG_SIZE = ctypes.sizeof(_MMsgHdr)
MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)
_NATIVE_U32 = struct.Struct("=I")


def available() -> bool:
    return _sendmmsg is not None


class _Batch:
    """Prepared messages for one member list (rebuilt when the list changes)."""

    __slots__ = ("addresses", "count", "iov", "names", "msgs", "base")

    def __init__(self, addresses: tuple[tuple[str, int], ...]) -> None:
        self.addresses = addresses
        self.count = len(addresses)
        self.iov = _IoVec()
        self.names = (_SockAddrIn * self.count)()
        self.msgs = (_MMsgHdr * self.count)()
        self.base = ctypes.addressof(self.msgs)
        for i, (host, port) in enumerate(addresses):
            name = self.names[i]
            name.sin_family = socket.AF_INET
            name.sin_port = socket.htons(port)                               # network byte order
            name.sin_addr = _NATIVE_U32.unpack(socket.inet_aton(host))[0]    # bytes already in network order
            hdr = self.msgs[i].msg_hdr
            hdr.msg_name = ctypes.addressof(name)
            hdr.msg_namelen = ctypes.sizeof(_SockAddrIn)
            hdr.msg_iov = ctypes.pointer(self.iov)
            hdr.msg_iovlen = 1


class FanoutSender:
    """``send(data, addresses) -> (sent, dropped)`` on one non-blocking UDP socket."""

    def __init__(self, sock: socket.socket, max_cached: int = 4096) -> None:
        if _sendmmsg is None:
            raise OSError("sendmmsg is not available")
        self.fd = sock.fileno()
        self.max_cached = max_cached
        self._batches: dict[int, _Batch] = {}
        self.errors = 0

    def send(self, data: bytes, addresses: tuple[tuple[str, int], ...], key: object = None) -> tuple[int, int]:
        """Send ``data`` to every address; ``key`` names the member list (e.g. the location).

        The prepared batch for ``key`` is reused while the caller passes the very
        same tuple object (the reflector keeps one per location until its
        membership changes) and rebuilt otherwise.
        """
        if not addresses:
            return 0, 0
        batch = self._batches.get(key)
        if batch is None or batch.addresses is not addresses:
            if batch is None and len(self._batches) >= self.max_cached:
                self._batches.clear()         # more member lists than expected: start over, stay bounded
            try:
                batch = self._batches[key] = _Batch(addresses)
            except OSError:                   # not an IPv4 address
                self.errors += 1
                return 0, len(addresses)
        buffer = ctypes.c_char_p(data)       # points into the bytes object, alive for this call
        batch.iov.iov_base = ctypes.cast(buffer, ctypes.c_void_p)
        batch.iov.iov_len = len(data)
        position = sent = 0
        count = batch.count
        while position < count:
            result = _sendmmsg(self.fd, batch.base + position * _MMSG_SIZE, count - position, MSG_DONTWAIT)
            if result > 0:
                position += result
                sent += result
                continue
            err = ctypes.get_errno() if result < 0 else errno.EAGAIN
            if err == errno.EINTR:
                continue
            if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS):
                break                          # the socket buffer is full: UDP semantics, the rest is dropped
            self.errors += 1                   # this destination failed (e.g. a late ICMP error): skip it
            position += 1
        return sent, count - sent
