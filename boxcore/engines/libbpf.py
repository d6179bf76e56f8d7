"""A thin ctypes binding over libbpf's stable API (Debian's libbpf1, ``libbpf.so.1``).

Only what the xdp engine needs: open and load a compiled BPF object, find its programs and
maps, attach XDP and tc (clsact) programs, pin, read and write map elements, run a program on
a crafted packet (BPF_PROG_TEST_RUN), and consume a BPF ring buffer.  libbpf does the ELF
parsing, relocation and BTF work; nothing here reads ELF itself.

Errors come back as :class:`BpfError` (an ``OSError`` with the errno libbpf reported).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import logging
import os
from typing import Callable

log = logging.getLogger("boxcore.engines.libbpf")
#: libbpf's own messages (the verifier's log on a failed load), newest last
MESSAGES: collections.deque[str] = collections.deque(maxlen=40)

__all__ = ["BpfError", "BpfObject", "available", "libbpf", "map_update", "map_lookup", "map_delete",
           "map_keys", "xdp_attach", "xdp_detach", "xdp_query_id", "tc_hook", "prog_test_run",
           "RingBuffer", "obj_pin", "obj_get", "prog_name_by_id", "num_possible_cpus",
           "XDP_FLAGS_SKB_MODE", "XDP_FLAGS_DRV_MODE", "XDP_FLAGS_UPDATE_IF_NOEXIST", "BPF_ANY",
           "BPF_NOEXIST", "BPF_EXIST", "TC_INGRESS", "TC_EGRESS"]

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
TC_INGRESS, TC_EGRESS = 1, 2
XDP_PASS, XDP_DROP = 2, 1


class BpfError(OSError):
    """A libbpf call failed; ``errno`` is what it reported."""


_lib: ctypes.CDLL | None = None


def libbpf() -> ctypes.CDLL:
    """The loaded libbpf (raises BpfError when it is not installed)."""
    global _lib
    if _lib is None:
        name = "libbpf.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            found = ctypes.util.find_library("bpf")
            if not found:
                raise BpfError(errno.ENOENT, "libbpf.so.1 is not installed (Debian package libbpf1)") from None
            lib = ctypes.CDLL(found, use_errno=True)
        _declare(lib)
        lib.libbpf_set_print.restype = _vp
        lib.libbpf_set_print.argtypes = [PRINT_CALLBACK]
        lib.libbpf_set_print(_print_callback)
        _lib = lib
    return _lib


def available() -> str | None:
    """None when libbpf loads here, else why not."""
    try:
        libbpf()
    except OSError as exc:
        return str(exc)
    return None


_vp, _int, _u32, _sz, _cp = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_size_t, ctypes.c_char_p


class TcHook(ctypes.Structure):
    _fields_ = [("sz", _sz), ("ifindex", _int), ("attach_point", _int), ("parent", _u32)]


class TcOpts(ctypes.Structure):
    _fields_ = [("sz", _sz), ("prog_fd", _int), ("flags", _u32), ("prog_id", _u32), ("handle", _u32),
                ("priority", _u32)]


class TestRunOpts(ctypes.Structure):
    _fields_ = [("sz", _sz), ("data_in", _vp), ("data_out", _vp), ("data_size_in", _u32),
                ("data_size_out", _u32), ("ctx_in", _vp), ("ctx_out", _vp), ("ctx_size_in", _u32),
                ("ctx_size_out", _u32), ("retval", _u32), ("repeat", _int), ("duration", _u32),
                ("flags", _u32), ("cpu", _u32), ("batch_size", _u32)]


RING_CALLBACK = ctypes.CFUNCTYPE(_int, _vp, _vp, _sz)
PRINT_CALLBACK = ctypes.CFUNCTYPE(_int, _int, _cp, _vp)    # level, format, va_list (x86-64: a pointer)
_libc = ctypes.CDLL(None)
_libc.vsnprintf.argtypes = [ctypes.c_char_p, _sz, _cp, _vp]


def _on_libbpf_message(level: int, fmt: bytes, args: int) -> int:
    """libbpf's messages go to our log (debug) and MESSAGES instead of stderr."""
    buf = ctypes.create_string_buffer(1024)
    _libc.vsnprintf(buf, len(buf), fmt, args)
    text = buf.value.decode(errors="replace").rstrip()
    if text:
        MESSAGES.append(text)
        log.debug("libbpf: %s", text)
    return 0


_print_callback = PRINT_CALLBACK(_on_libbpf_message)


def _declare(lib: ctypes.CDLL) -> None:
    sig = {
        "bpf_object__open_file": (_vp, [_cp, _vp]),
        "bpf_object__load": (_int, [_vp]),
        "bpf_object__close": (None, [_vp]),
        "bpf_object__find_program_by_name": (_vp, [_vp, _cp]),
        "bpf_object__find_map_by_name": (_vp, [_vp, _cp]),
        "bpf_program__fd": (_int, [_vp]),
        "bpf_map__fd": (_int, [_vp]),
        "libbpf_get_error": (ctypes.c_long, [_vp]),
        "bpf_xdp_attach": (_int, [_int, _int, _u32, _vp]),
        "bpf_xdp_detach": (_int, [_int, _u32, _vp]),
        "bpf_xdp_query_id": (_int, [_int, _int, ctypes.POINTER(_u32)]),
        "bpf_tc_hook_create": (_int, [ctypes.POINTER(TcHook)]),
        "bpf_tc_hook_destroy": (_int, [ctypes.POINTER(TcHook)]),
        "bpf_tc_attach": (_int, [ctypes.POINTER(TcHook), ctypes.POINTER(TcOpts)]),
        "bpf_tc_detach": (_int, [ctypes.POINTER(TcHook), ctypes.POINTER(TcOpts)]),
        "bpf_tc_query": (_int, [ctypes.POINTER(TcHook), ctypes.POINTER(TcOpts)]),
        "bpf_map_update_elem": (_int, [_int, _vp, _vp, ctypes.c_uint64]),
        "bpf_map_lookup_elem": (_int, [_int, _vp, _vp]),
        "bpf_map_delete_elem": (_int, [_int, _vp]),
        "bpf_map_get_next_key": (_int, [_int, _vp, _vp]),
        "bpf_prog_test_run_opts": (_int, [_int, ctypes.POINTER(TestRunOpts)]),
        "bpf_obj_pin": (_int, [_int, _cp]),
        "bpf_obj_get": (_int, [_cp]),
        "bpf_prog_get_fd_by_id": (_int, [_u32]),
        "bpf_obj_get_info_by_fd": (_int, [_int, _vp, ctypes.POINTER(_u32)]),
        "libbpf_num_possible_cpus": (_int, []),
        "ring_buffer__new": (_vp, [_int, RING_CALLBACK, _vp, _vp]),
        "ring_buffer__consume": (_int, [_vp]),
        "ring_buffer__epoll_fd": (_int, [_vp]),
        "ring_buffer__free": (None, [_vp]),
    }
    for name, (restype, argtypes) in sig.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes


def _check(rc: int, what: str) -> int:
    """libbpf 1.x returns -errno (and sets errno); turn that into BpfError."""
    if rc < 0:
        code = -rc if rc != -1 else (ctypes.get_errno() or errno.EIO)
        raise BpfError(code, f"{what}: {os.strerror(code)}")
    return rc


def num_possible_cpus() -> int:
    return _check(libbpf().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


class BpfObject:
    """A compiled BPF object file, opened and loaded into the kernel."""

    def __init__(self, path: str | os.PathLike) -> None:
        lib = libbpf()
        self.path = os.fspath(path)
        ptr = lib.bpf_object__open_file(self.path.encode(), None)
        if not ptr or lib.libbpf_get_error(ptr):
            code = ctypes.get_errno() or errno.EINVAL
            raise BpfError(code, f"cannot open BPF object {self.path}: {os.strerror(code)}")
        self._obj = ptr
        try:
            MESSAGES.clear()
            rc = lib.bpf_object__load(ptr)
            if rc < 0:
                tail = " | ".join(m for m in list(MESSAGES)[-4:])
                _check(rc, f"loading {self.path} into the kernel ({tail})")
        except BaseException:
            lib.bpf_object__close(ptr)
            self._obj = None
            raise

    def prog_fd(self, name: str) -> int:
        prog = libbpf().bpf_object__find_program_by_name(self._live(), name.encode())
        if not prog:
            raise BpfError(errno.ENOENT, f"{self.path} has no program {name}")
        return _check(libbpf().bpf_program__fd(prog), f"fd of program {name}")

    def map_fd(self, name: str) -> int:
        found = libbpf().bpf_object__find_map_by_name(self._live(), name.encode())
        if not found:
            raise BpfError(errno.ENOENT, f"{self.path} has no map {name}")
        return _check(libbpf().bpf_map__fd(found), f"fd of map {name}")

    def _live(self):
        if self._obj is None:
            raise BpfError(errno.EBADF, "BPF object already closed")
        return self._obj

    def close(self) -> None:
        """Unload (programs and maps stay only while attached or pinned)."""
        if self._obj is not None:
            libbpf().bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self) -> "BpfObject":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ maps

def _buf(data: bytes):
    return ctypes.create_string_buffer(bytes(data), len(data))


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    _check(libbpf().bpf_map_update_elem(fd, _buf(key), _buf(value), flags), "bpf_map_update_elem")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    out = ctypes.create_string_buffer(value_size)
    rc = libbpf().bpf_map_lookup_elem(fd, _buf(key), out)
    if rc < 0:
        if -rc == errno.ENOENT or ctypes.get_errno() == errno.ENOENT:
            return None
        _check(rc, "bpf_map_lookup_elem")
    return out.raw


def map_delete(fd: int, key: bytes) -> bool:
    rc = libbpf().bpf_map_delete_elem(fd, _buf(key))
    if rc < 0:
        if -rc == errno.ENOENT or ctypes.get_errno() == errno.ENOENT:
            return False
        _check(rc, "bpf_map_delete_elem")
    return True


def map_keys(fd: int, key_size: int) -> list[bytes]:
    keys = []
    nxt = ctypes.create_string_buffer(key_size)
    rc = libbpf().bpf_map_get_next_key(fd, None, nxt)
    while rc == 0:
        keys.append(nxt.raw)
        cur = _buf(nxt.raw)
        rc = libbpf().bpf_map_get_next_key(fd, cur, nxt)
    return keys


def obj_pin(fd: int, path: str) -> None:
    _check(libbpf().bpf_obj_pin(fd, path.encode()), f"pinning at {path}")


def obj_get(path: str) -> int:
    return _check(libbpf().bpf_obj_get(path.encode()), f"opening pinned {path}")


def prog_name_by_id(prog_id: int) -> str | None:
    """The name of the loaded program with ``prog_id`` (None if it is gone)."""
    fd = libbpf().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return None
    try:
        info = ctypes.create_string_buffer(256)
        size = _u32(256)
        _check(libbpf().bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)), "bpf_obj_get_info_by_fd")
        return info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")   # bpf_prog_info.name
    finally:
        os.close(fd)


# ------------------------------------------------------------------ attaching

def xdp_attach(ifindex: int, prog_fd: int, flags: int) -> None:
    _check(libbpf().bpf_xdp_attach(ifindex, prog_fd, flags, None), f"attaching XDP to ifindex {ifindex}")


def xdp_detach(ifindex: int, flags: int = 0) -> None:
    _check(libbpf().bpf_xdp_detach(ifindex, flags, None), f"detaching XDP from ifindex {ifindex}")


def xdp_query_id(ifindex: int, flags: int = 0) -> int:
    out = _u32(0)
    _check(libbpf().bpf_xdp_query_id(ifindex, flags, ctypes.byref(out)), f"querying XDP on ifindex {ifindex}")
    return out.value


class tc_hook:
    """The clsact hook of one interface (ingress)."""

    def __init__(self, ifindex: int, attach_point: int = TC_INGRESS) -> None:
        self.hook = TcHook(ctypes.sizeof(TcHook), ifindex, attach_point, 0)

    def create(self) -> bool:
        """Create the clsact qdisc; False if it existed already."""
        rc = libbpf().bpf_tc_hook_create(ctypes.byref(self.hook))
        if rc == -errno.EEXIST:
            return False
        _check(rc, f"creating clsact on ifindex {self.hook.ifindex}")
        return True

    def destroy(self) -> None:
        """Remove the whole clsact qdisc (ingress and egress) of the interface."""
        hook = TcHook(ctypes.sizeof(TcHook), self.hook.ifindex, TC_INGRESS | TC_EGRESS, 0)
        rc = libbpf().bpf_tc_hook_destroy(ctypes.byref(hook))
        if rc < 0 and -rc not in (errno.ENOENT, errno.EINVAL):
            _check(rc, f"removing clsact from ifindex {hook.ifindex}")

    def attach(self, prog_fd: int, handle: int, priority: int) -> None:
        opts = TcOpts(ctypes.sizeof(TcOpts), prog_fd, 1, 0, handle, priority)   # BPF_TC_F_REPLACE
        _check(libbpf().bpf_tc_attach(ctypes.byref(self.hook), ctypes.byref(opts)),
               f"attaching tc program to ifindex {self.hook.ifindex}")

    def query(self, handle: int, priority: int) -> int | None:
        """The id of the program attached with ``handle``/``priority``, or None."""
        opts = TcOpts(ctypes.sizeof(TcOpts), 0, 0, 0, handle, priority)
        rc = libbpf().bpf_tc_query(ctypes.byref(self.hook), ctypes.byref(opts))
        return None if rc < 0 else opts.prog_id

    def detach(self, handle: int, priority: int) -> bool:
        opts = TcOpts(ctypes.sizeof(TcOpts), 0, 0, 0, handle, priority)
        rc = libbpf().bpf_tc_detach(ctypes.byref(self.hook), ctypes.byref(opts))
        return rc == 0


def prog_test_run(prog_fd: int, data: bytes, *, out_size: int = 4096, repeat: int = 1,
                  timing: list | None = None) -> tuple[int, bytes]:
    """Run an XDP/tc program on ``data`` (BPF_PROG_TEST_RUN) ``repeat`` times: (return code, data
    out); ``timing`` (a list) gets the kernel's mean run time in ns appended."""
    data_in = _buf(data)
    data_out = ctypes.create_string_buffer(max(out_size, len(data) + 256))
    opts = TestRunOpts()
    opts.sz = ctypes.sizeof(TestRunOpts)
    opts.data_in = ctypes.cast(data_in, _vp)
    opts.data_size_in = len(data)
    opts.data_out = ctypes.cast(data_out, _vp)
    opts.data_size_out = len(data_out)
    opts.repeat = repeat
    _check(libbpf().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "bpf_prog_test_run_opts")
    if timing is not None:
        timing.append(opts.duration)
    return opts.retval, data_out.raw[:opts.data_size_out]


class RingBuffer:
    """A BPF ring buffer map read from user space; ``on_record(bytes)`` per record."""

    def __init__(self, map_fd: int, on_record: Callable[[bytes], None]) -> None:
        self.on_record = on_record

        def callback(_ctx, data, size):
            try:
                self.on_record(ctypes.string_at(data, size))
            except Exception:   # never unwind through C; the engine counts its own failures
                return 0
            return 0

        self._callback = RING_CALLBACK(callback)   # kept alive as long as the ring
        ptr = libbpf().ring_buffer__new(map_fd, self._callback, None, None)
        if not ptr or libbpf().libbpf_get_error(ptr):
            code = ctypes.get_errno() or errno.EINVAL
            raise BpfError(code, f"ring_buffer__new: {os.strerror(code)}")
        self._rb = ptr

    def fileno(self) -> int:
        return libbpf().ring_buffer__epoll_fd(self._rb)

    def consume(self) -> int:
        """Read every record available now; returns how many."""
        return _check(libbpf().ring_buffer__consume(self._rb), "ring_buffer__consume")

    def close(self) -> None:
        if self._rb:
            libbpf().ring_buffer__free(self._rb)
            self._rb = None
