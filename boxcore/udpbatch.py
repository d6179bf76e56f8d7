"""Batch receive on a UDP socket: many datagrams per system call (``recvmmsg``), with each one's ancillary data.

A Python receive path is bound by per-datagram costs: one ``recv``/``recvmsg`` system call and
one Python call each, and for ``recvmsg`` a list of ancillary tuples per datagram.
:class:`BatchReceiver` asks the kernel for up to ``batch`` datagrams at once with Linux
``recvmmsg(2)`` (through ctypes: the standard library has no binding) into one preallocated
buffer of fixed ``slot``-byte slots, each with its own ``control``-byte slot of ancillary data
(``cmsg``), and returns

* the payloads (:meth:`~BatchReceiver.receive`);
* with no Python object per datagram, the slots' first bytes as rows of a numpy array
  (:meth:`~BatchReceiver.receive_slots`: a raw ingest that parses columns);
* the payloads and each one's kernel receive time (:meth:`~BatchReceiver.receive_stamped`,
  ``SO_TIMESTAMPNS`` set on the socket: :func:`enable_timestamps`), read for the whole batch at
  once from the control slots; or one datagram and its time with the stdlib's ``recvmsg``
  (:meth:`~BatchReceiver.receive_one_stamped`: cheaper when a wake-up finds one datagram);
* the payloads and each one's ancillary data as ``recvmsg`` gives it
  (:meth:`~BatchReceiver.receive_ancillary`: ``[(level, type, data), ...]`` per datagram).

A datagram larger than a slot is cut to the slot size, as ``recv(slot)`` would (``truncated``
counts them, except on the ``recv_into`` fallback, which cannot tell); ancillary data larger than its control slot is cut too
(``control_truncated``).  Where ``recvmmsg`` is missing (or ``use_recvmmsg=False``), the same
interface loops ``recv_into`` / ``recvmsg``, one system call per datagram.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import math
import os
import socket
import struct

import numpy as np

MSG_DONTWAIT = 0x40
MSG_CTRUNC = 0x08
MSG_TRUNC = 0x20
# Linux: SO_TIMESTAMPNS (and its cmsg type SCM_TIMESTAMPNS, the same number) stamps each datagram with
# CLOCK_REALTIME when the kernel queued it on the socket; the standard library names neither
SO_TIMESTAMPNS = 35
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
TIMESPEC = struct.Struct("@qq")
CMSG_HEADER = struct.Struct("@NiI")                 # cmsg_len (size_t), cmsg_level, cmsg_type
_ALIGN = ctypes.sizeof(ctypes.c_size_t)
STAMP_CONTROL = socket.CMSG_SPACE(TIMESPEC.size)    # control bytes one SCM_TIMESTAMPNS needs


def _cmsg_align(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


_CMSG_DATA = _cmsg_align(CMSG_HEADER.size)          # where a cmsg's data starts (CMSG_DATA)
_FIRST_STAMP = struct.Struct(f"@NiI{_CMSG_DATA - CMSG_HEADER.size}xqq")   # a cmsg header + a timespec
_STAMP_END = _CMSG_DATA + TIMESPEC.size
_unpack_timespec = TIMESPEC.unpack_from


# Linux: SO_MEMINFO answers the socket's memory counters (u32[SK_MEMINFO_VARS]); the last one,
# SK_MEMINFO_DROPS, counts the datagrams dropped on this socket (its receive buffer was full)
SO_MEMINFO = 55
SK_MEMINFO_DROPS = 8


def kernel_drops(sock: socket.socket) -> int | None:
    """Datagrams the kernel dropped on ``sock`` since it was opened (receive buffer full, bad
    checksums), from ``SO_MEMINFO``; None where the kernel has no such option."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * (SK_MEMINFO_DROPS + 1))
    except OSError:
        return None
    if len(raw) < 4 * (SK_MEMINFO_DROPS + 1):
        return None
    return struct.unpack_from("=I", raw, 4 * SK_MEMINFO_DROPS)[0]


def enable_timestamps(sock: socket.socket) -> None:
    """Ask the kernel to stamp every datagram ``sock`` receives (``SO_TIMESTAMPNS``, CLOCK_REALTIME)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_IoVec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


# one mmsghdr's fields the receiver reads back: msg_controllen, msg_flags, msg_len (each slot's record)
_ENTRY = struct.Struct(f"{_MsgHdr.msg_controllen.offset}xNi{_MMsgHdr.msg_len.offset - _MsgHdr.msg_flags.offset - 4}xI"
                       f"{ctypes.sizeof(_MMsgHdr) - _MMsgHdr.msg_len.offset - 4}x")
_CONTROLLEN = struct.Struct("N")
_CONTROLLEN_OFFSET = _MsgHdr.msg_controllen.offset
assert _ENTRY.size == ctypes.sizeof(_MMsgHdr)


def _libc_recvmmsg():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.recvmmsg
    except (OSError, AttributeError):
        return None
    # the header array goes as a plain address: no ctypes conversion per call
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_RECVMMSG = _libc_recvmmsg()


def _column(array, dtype, field_offset: int) -> np.ndarray:
    """One field of every element of a ctypes array of ``_MMsgHdr``, as a writable numpy column."""
    size = np.dtype(dtype).itemsize
    assert field_offset % size == 0 and ctypes.sizeof(_MMsgHdr) % size == 0
    words = ctypes.sizeof(_MMsgHdr) // size
    return np.frombuffer(array, dtype=dtype).reshape(len(array), words)[:, field_offset // size]


def parse_ancillary(control: bytes) -> list[tuple[int, int, bytes]]:
    """``[(level, type, data), ...]`` of a control buffer as the kernel filled it (what ``recvmsg`` returns)."""
    out = []
    offset, end = 0, len(control)
    while offset + CMSG_HEADER.size <= end:
        length, level, kind = CMSG_HEADER.unpack_from(control, offset)
        if length < _CMSG_DATA or offset + length > end:
            break
        out.append((level, kind, bytes(control[offset + _CMSG_DATA:offset + length])))
        offset += _cmsg_align(length)
    return out


def timestamp_ns_of(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    """The ``SCM_TIMESTAMPNS`` stamp (CLOCK_REALTIME, integer nanoseconds) in one datagram's ancillary
    data; None if none."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS and len(data) >= TIMESPEC.size:
            seconds, nanoseconds = TIMESPEC.unpack_from(data)
            return seconds * 1_000_000_000 + nanoseconds
    return None


def timestamp_of(ancillary: list[tuple[int, int, bytes]]) -> float:
    """The ``SCM_TIMESTAMPNS`` stamp (CLOCK_REALTIME seconds) in one datagram's ancillary data; NaN if none."""
    stamp = timestamp_ns_of(ancillary)
    return math.nan if stamp is None else stamp * 1e-9


class BatchReceiver:
    """Datagrams of a non-blocking UDP socket, up to ``batch`` per call, each with ``control`` bytes of
    ancillary data (0: none; :data:`STAMP_CONTROL` holds a kernel timestamp)."""

    def __init__(self, sock: socket.socket, batch: int = 1024, slot: int = 64, use_recvmmsg: bool = True,
                 control: int = 0) -> None:
        if batch < 1 or slot < 1 or control < 0:
            raise ValueError("batch and slot must be positive, control at least 0")
        self.sock, self.batch, self.slot = sock, batch, slot
        self.control = max(_cmsg_align(control), _FIRST_STAMP.size) if control else 0   # room for a stamp at least
        self.fd = sock.fileno()
        self.buffer = ctypes.create_string_buffer(batch * slot)
        self.view = memoryview(self.buffer).cast("B")
        self.syscalls = 0
        self.truncated = 0              # datagrams longer than a slot (cut)
        self.control_truncated = 0      # datagrams whose ancillary data did not fit the control slot
        self.recvmmsg = _RECVMMSG if use_recvmmsg else None
        self._filled = 0                # slots the last recvmmsg filled (their msg_controllen need a reset)
        if self.recvmmsg is not None:
            base = ctypes.addressof(self.buffer)
            self._iov = (_IoVec * batch)(*[_IoVec(base + i * slot, slot) for i in range(batch)])
            self._msgs = (_MMsgHdr * batch)()
            self._msgs_view = memoryview(self._msgs).cast("B")
            self._msgs_address = ctypes.addressof(self._msgs)
            if self.control:
                self.control_buffer = ctypes.create_string_buffer(batch * self.control)
                control_base = ctypes.addressof(self.control_buffer)
                self._control_view = memoryview(self.control_buffer).cast("B")
            for i in range(batch):
                header = self._msgs[i].msg_hdr
                header.msg_iov = ctypes.pointer(self._iov[i])
                header.msg_iovlen = 1
                if self.control:
                    header.msg_control = control_base + i * self.control
                    header.msg_controllen = self.control
            # every msg_len and msg_flags field at once, as numpy views over the headers (the raw paths)
            self._lengths = _column(self._msgs, np.uint32, _MMsgHdr.msg_len.offset)
            self._flags = _column(self._msgs, np.int32, _MsgHdr.msg_flags.offset)

    @property
    def kind(self) -> str:
        return "recvmmsg" if self.recvmmsg is not None else ("recvmsg" if self.control else "recv_into")

    def _recvmmsg(self) -> int:
        """Datagrams now in the buffer's slots (0 when nothing waits); one system call."""
        if self.control and self._filled:
            # the kernel wrote back how much control room each filled slot used: give it all back
            pack_into, control = _CONTROLLEN.pack_into, self.control
            for offset in range(_CONTROLLEN_OFFSET, self._filled * _ENTRY.size, _ENTRY.size):
                pack_into(self._msgs, offset, control)
        self.syscalls += 1
        n = self.recvmmsg(self.fd, self._msgs_address, self.batch, MSG_DONTWAIT, None)
        if n < 0:
            self._filled = 0
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return 0
            raise OSError(err, os.strerror(err))
        self._filled = n
        return n

    def _entries(self, n: int) -> list[tuple[int, int, int]]:
        """(controllen, flags, length) of the first ``n`` slots, truncations counted."""
        entries = list(_ENTRY.iter_unpack(self._msgs_view[:n * _ENTRY.size]))
        for _, flags, _ in entries:
            if flags & (MSG_TRUNC | MSG_CTRUNC):
                self.truncated += bool(flags & MSG_TRUNC)
                self.control_truncated += bool(flags & MSG_CTRUNC)
        return entries

    def _count_truncated(self, n: int) -> None:
        """The same count for a large batch, without a Python object per slot (the raw paths)."""
        flags = self._flags[:n]
        if (flags & (MSG_TRUNC | MSG_CTRUNC)).any():
            self.truncated += int(np.count_nonzero(flags & MSG_TRUNC))
            self.control_truncated += int(np.count_nonzero(flags & MSG_CTRUNC))

    def receive(self) -> list[bytes]:
        """What the socket holds now, up to ``batch`` datagrams (empty when nothing waits)."""
        if self.recvmmsg is None:
            return [data for data, _ in self._receive_loop(False)]
        n = self._recvmmsg()
        if not n:
            return []
        self._count_truncated(n)
        slot = self.slot
        raw = self.buffer.raw[:n * slot]           # one copy, then slices (small slots: the raw ingest's)
        return [raw[start:start + length] for start, length in zip(range(0, n * slot, slot), self._lengths[:n].tolist())]

    def receive_stamped(self) -> tuple[list[bytes], list[float]]:
        """(payloads, kernel receive times) of what the socket holds now, up to ``batch`` datagrams.

        A time is the ``SCM_TIMESTAMPNS`` stamp in CLOCK_REALTIME seconds (``time.time()``'s
        clock), NaN for a datagram without one (the socket has no :func:`enable_timestamps`, or
        the receiver no ``control`` room).  Built for small batches (a game client's wake-up
        often finds one datagram): no numpy, one ``struct`` read of each slot's header and of its
        first cmsg, and the slot's control room given back in the same pass."""
        if self.recvmmsg is None:
            pairs = self._receive_loop(True)
            return [data for data, _ in pairs], [timestamp_of(ancillary) for _, ancillary in pairs]
        n = self._recvmmsg()
        if not n:
            return [], []
        self._filled = 0                           # every control room is given back below
        msgs, view, slot, control = self._msgs_view, self.view, self.slot, self.control
        entry_from = _ENTRY.unpack_from
        payloads: list[bytes] = []
        stamps: list[float] = []
        if not control:
            for index in range(n):
                _, flags, length = entry_from(msgs, index * _ENTRY.size)
                if flags & (MSG_TRUNC | MSG_CTRUNC):
                    self.truncated += bool(flags & MSG_TRUNC)
                    self.control_truncated += bool(flags & MSG_CTRUNC)
                start = index * slot
                payloads.append(view[start:start + length].tobytes())
            return payloads, [math.nan] * n
        controls, stamp_from, give_back = self._control_view, _FIRST_STAMP.unpack_from, _CONTROLLEN.pack_into
        for index in range(n):
            offset = index * _ENTRY.size
            controllen, flags, length = entry_from(msgs, offset)
            if flags & (MSG_TRUNC | MSG_CTRUNC):
                self.truncated += bool(flags & MSG_TRUNC)
                self.control_truncated += bool(flags & MSG_CTRUNC)
            start = index * slot
            payloads.append(view[start:start + length].tobytes())
            _, level, kind, seconds, nanoseconds = stamp_from(controls, index * control)
            if kind == SCM_TIMESTAMPNS and level == socket.SOL_SOCKET and controllen >= _STAMP_END:
                stamps.append(seconds + nanoseconds * 1e-9)
            else:                                  # another cmsg first, or none: walk that slot's list
                stamps.append(timestamp_of(self._ancillary(index, controllen)))
            give_back(msgs, offset + _CONTROLLEN_OFFSET, control)
        return payloads, stamps

    def receive_one_stamped(self) -> tuple[bytes, float] | None:
        """(payload, kernel receive time) of the next datagram, None when nothing waits.

        One stdlib ``recvmsg`` (C, no ctypes, no header array to read back): the cheapest stamped
        read of a single datagram, for a reader that the event loop calls again while its socket
        stays readable.  The time is what :meth:`receive_stamped` gives for the same datagram
        (``SCM_TIMESTAMPNS`` in CLOCK_REALTIME seconds, NaN without one); cut datagrams and
        control data are counted the same way."""
        self.syscalls += 1
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(self.slot, self.control)
        except (BlockingIOError, InterruptedError):
            return None
        if flags & (MSG_TRUNC | MSG_CTRUNC):
            self.truncated += bool(flags & MSG_TRUNC)
            self.control_truncated += bool(flags & MSG_CTRUNC)
        if ancillary:
            level, kind, stamp = ancillary[0]
            if kind == SCM_TIMESTAMPNS and level == socket.SOL_SOCKET and len(stamp) >= TIMESPEC.size:
                seconds, nanoseconds = _unpack_timespec(stamp)
                return data, seconds + nanoseconds * 1e-9
        return data, timestamp_of(ancillary)

    def receive_ancillary(self) -> list[tuple[bytes, list[tuple[int, int, bytes]]]]:
        """``(payload, [(level, type, data), ...])`` for what the socket holds now, as ``recvmsg`` gives each."""
        if self.recvmmsg is None:
            return self._receive_loop(True)
        n = self._recvmmsg()
        if not n:
            return []
        view, slot = self.view, self.slot
        return [(view[index * slot:index * slot + length].tobytes(), self._ancillary(index, controllen))
                for index, (controllen, _, length) in enumerate(self._entries(n))]

    def _ancillary(self, index: int, used: int) -> list[tuple[int, int, bytes]]:
        if not self.control:
            return []
        start = index * self.control
        return parse_ancillary(self._control_view[start:start + min(used, self.control)].tobytes())

    def receive_slots(self, keep: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, lengths) of what the socket holds now, up to ``batch`` datagrams, with no bytes
        object per datagram: ``rows`` is a (n, ``keep``) uint8 copy of the first ``keep`` bytes
        of each slot (the buffer is reused; bytes past a datagram's length are not its own),
        ``lengths`` the datagrams' lengths (int64; up to ``slot``, a longer one was cut)."""
        if keep > self.slot:
            raise ValueError(f"keep {keep} exceeds the slot size {self.slot}")
        if self.recvmmsg is None:
            batch = [data for data, _ in self._receive_loop(False)]
            rows = np.zeros((len(batch), keep), dtype=np.uint8)
            for i, d in enumerate(batch):
                rows[i, :min(len(d), keep)] = np.frombuffer(d[:keep], dtype=np.uint8)
            return rows, np.fromiter(map(len, batch), dtype=np.int64, count=len(batch))
        n = self._recvmmsg()
        self._count_truncated(n)
        slots = np.frombuffer(self.buffer, dtype=np.uint8, count=n * self.slot).reshape(n, self.slot)
        return slots[:, :keep].copy(), self._lengths[:n].astype(np.int64)

    def _receive_loop(self, ancillary: bool) -> list[tuple[bytes, list]]:
        """The fallback: one ``recv_into`` (or ``recvmsg``, for ancillary data) per datagram."""
        out: list[tuple[bytes, list]] = []
        slot = self.slot
        if ancillary:
            recvmsg, control = self.sock.recvmsg, self.control
            for _ in range(self.batch):
                self.syscalls += 1
                try:
                    data, anc, flags, _ = recvmsg(slot, control)
                except (BlockingIOError, InterruptedError):
                    break
                self.truncated += bool(flags & MSG_TRUNC)
                self.control_truncated += bool(flags & MSG_CTRUNC)
                out.append((data, anc))
            return out
        recv_into, view = self.sock.recv_into, self.view
        for i in range(self.batch):
            self.syscalls += 1
            try:
                n = recv_into(view[i * slot:(i + 1) * slot], slot)
            except (BlockingIOError, InterruptedError):
                break
            out.append((bytes(view[i * slot:i * slot + n]), []))
        return out
