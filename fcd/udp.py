"""Batch receive on a UDP socket: many datagrams per system call (``recvmmsg``).

The server's raw ingest is bound by per-datagram costs: one ``recv`` system call and one Python
call each.  :class:`BatchReceiver` asks the kernel for up to ``batch`` datagrams at once with
Linux ``recvmmsg(2)`` (through ctypes: the standard library has no binding) into one
preallocated buffer of fixed ``slot``-byte slots, and returns the payloads (:meth:`~BatchReceiver.receive`)
or, with no Python object per datagram, the slots' first bytes as rows of a numpy array
(:meth:`~BatchReceiver.receive_slots`, the server's raw path).  A datagram larger
than a slot is cut to the slot size, which no valid FCD message has, so it is counted as
malformed downstream.  Where ``recvmmsg`` is missing, the same interface loops ``recv_into``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket

import numpy as np

MSG_DONTWAIT = 0x40


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_IoVec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


def _libc_recvmmsg():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.recvmmsg
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_MMsgHdr), ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_RECVMMSG = _libc_recvmmsg()


class BatchReceiver:
    """Datagrams of a non-blocking UDP socket, up to ``batch`` per call of :meth:`receive`."""

    def __init__(self, sock: socket.socket, batch: int = 1024, slot: int = 64, use_recvmmsg: bool = True) -> None:
        self.sock, self.batch, self.slot = sock, batch, slot
        self.fd = sock.fileno()
        self.buffer = ctypes.create_string_buffer(batch * slot)
        self.view = memoryview(self.buffer).cast("B")
        self.syscalls = 0
        self.recvmmsg = _RECVMMSG if use_recvmmsg else None
        if self.recvmmsg is not None:
            base = ctypes.addressof(self.buffer)
            self._iov = (_IoVec * batch)(*[_IoVec(base + i * slot, slot) for i in range(batch)])
            self._msgs = (_MMsgHdr * batch)()
            for i in range(batch):
                self._msgs[i].msg_hdr.msg_iov = ctypes.pointer(self._iov[i])
                self._msgs[i].msg_hdr.msg_iovlen = 1
            # every msg_len field at once, as a numpy view over the headers
            words = ctypes.sizeof(_MMsgHdr) // 4
            self._lengths = np.frombuffer(self._msgs, dtype=np.uint32).reshape(batch, words)[
                :, _MMsgHdr.msg_len.offset // 4]

    @property
    def kind(self) -> str:
        return "recvmmsg" if self.recvmmsg is not None else "recv_into"

    def _recvmmsg(self) -> int:
        """Datagrams now in the buffer's slots (0 when nothing waits); one system call."""
        self.syscalls += 1
        n = self.recvmmsg(self.fd, self._msgs, self.batch, MSG_DONTWAIT, None)
        if n < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return 0
            raise OSError(err, os.strerror(err))
        return n

    def receive(self) -> list[bytes]:
        """What the socket holds now, up to ``batch`` datagrams (empty when nothing waits)."""
        if self.recvmmsg is None:
            return self._receive_loop()
        n = self._recvmmsg()
        if n == 0:
            return []
        slot = self.slot
        raw = self.buffer.raw[:n * slot]
        return [raw[start:start + length] for start, length in zip(range(0, n * slot, slot), self._lengths[:n].tolist())]

    def receive_slots(self, keep: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, lengths) of what the socket holds now, up to ``batch`` datagrams, with no bytes
        object per datagram: ``rows`` is a (n, ``keep``) uint8 copy of the first ``keep`` bytes
        of each slot (the buffer is reused; bytes past a datagram's length are not its own),
        ``lengths`` the datagrams' lengths (int64; up to ``slot``, a longer one was cut)."""
        if keep > self.slot:
            raise ValueError(f"keep {keep} exceeds the slot size {self.slot}")
        if self.recvmmsg is None:
            batch = self._receive_loop()
            rows = np.zeros((len(batch), keep), dtype=np.uint8)
            for i, d in enumerate(batch):
                rows[i, :min(len(d), keep)] = np.frombuffer(d[:keep], dtype=np.uint8)
            return rows, np.fromiter(map(len, batch), dtype=np.int64, count=len(batch))
        n = self._recvmmsg()
        slots = np.frombuffer(self.buffer, dtype=np.uint8, count=n * self.slot).reshape(n, self.slot)
        return slots[:, :keep].copy(), self._lengths[:n].astype(np.int64)

    def _receive_loop(self) -> list[bytes]:
        out = []
        recv_into, view, slot = self.sock.recv_into, self.view, self.slot
        for i in range(self.batch):
            self.syscalls += 1
            try:
                n = recv_into(view[i * slot:(i + 1) * slot], slot)
            except (BlockingIOError, InterruptedError):
                break
            out.append(bytes(view[i * slot:i * slot + n]))
        return out
