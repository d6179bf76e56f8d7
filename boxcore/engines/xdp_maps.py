"""The xdp engine's classifier in BPF maps: layouts, rule encoding and the index mirror.

The map layouts are declared once here and mirror ``boxcore/engines/bpf/boxd.bpf.c``.
:class:`Datapath` loads the compiled object and keeps the maps equal to a set of rules with
the semantics of :mod:`boxcore.classifier` (the oracle):

* a rule sits in one slot of the ``rules`` array (match, action, order key, cookie);
* it is indexed where the classifier would put it: exact 5-tuple (hash), exact destination
  port (hash), destination prefix (LPM trie: each installed prefix lists every rule whose
  prefix covers it, so the longest match yields all rules containing the address), or the
  general list;
* each candidate list holds at most :data:`BUCKET` slots, best first; the XDP program scans
  them, keeps the best terminal rule (order = priority, then install sequence) and every
  matching COPY rule, and counts each in a per-CPU array.

Limits a rule may hit (refused with :class:`DatapathRefused`): IPv4 only, payload patterns
within the first :data:`MAX_PAYLOAD_OFFSET` bytes in at most :data:`MAX_CHUNKS` windows of 8
bytes, :data:`BUCKET` rules per candidate list, :data:`MAX_RULES` rules.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from boxcore.engines import libbpf as bpf
from boxcore.rules import PRIORITY_MAX, Action, Rule, _byte_constraints

MAX_RULES = 4096
BUCKET = 32
MAX_CHUNKS = 4
MAX_COPIES = 8
MAX_MEMBERS = 256
COPY_SNAP = 1536
MAX_PAYLOAD_OFFSET = 1500

BPF_SOURCE = Path(__file__).with_name("bpf") / "boxd.bpf.c"
BPF_OBJECT = BPF_SOURCE.with_suffix(".o")

# actions as the BPF program knows them
A_NONE, A_FORWARD, A_REDIRECT, A_COPY, A_DROP, A_MULTICAST, A_INTERCEPT = range(7)
ACTION_CODES = {Action.FORWARD: A_FORWARD, Action.REDIRECT: A_REDIRECT, Action.COPY: A_COPY,
                Action.DROP: A_DROP, Action.MULTICAST: A_MULTICAST}
F_PROTO, F_SRC, F_DST = 1, 2, 4
STAT_NAMES = ("packets", "lease_expired", "copy_lost", "assigned", "no_socket", "assign_failed",
              "fanout_out", "fanout_failed", "no_neigh", "no_group", "no_meta", "replies_steered")

# ---- layouts (native byte order; addresses in network order as 4-byte strings)
CHUNK = struct.Struct("=HB5x8s8s")
RULE_HEAD = struct.Struct("=QQ4s4s4s4sHHHHBBBBHxxIxxxx")
RULE_SIZE = RULE_HEAD.size + MAX_CHUNKS * CHUNK.size
SLOT_LIST = struct.Struct(f"=I{BUCKET}I")
EXACT_KEY = struct.Struct("=4s4sHHBxxx")
LPM_KEY = struct.Struct("=I4s")
U32 = struct.Struct("=I")
COUNTER = struct.Struct("=QQ")
CONFIG = struct.Struct("=QIIIxxxx")   # lease_until_ns, mark, mcast_ifindex, steer_replies
MEMBER = struct.Struct("=4sHxx")
GROUP_HEAD = struct.Struct("=Ixxxx")
GROUP_SIZE = GROUP_HEAD.size + MAX_MEMBERS * MEMBER.size
COPY_HEAD = struct.Struct("=QII")
FLOW_KEY = struct.Struct("=4sHxx")     # source address, source port (host order)
FLOW_DST = struct.Struct("=4sHxx")     # original destination address, port

assert RULE_SIZE == 152, RULE_SIZE


class DatapathRefused(ValueError):
    """A rule the kernel data path cannot hold (the reason says which limit)."""


def object_problem() -> str | None:
    """None when the compiled BPF object is present and newer than its source, else why not."""
    if not BPF_OBJECT.exists():
        return f"{BPF_OBJECT} is missing: run tools/bootstrap.sh (needs clang and libbpf-dev)"
    if BPF_SOURCE.exists() and BPF_OBJECT.stat().st_mtime < BPF_SOURCE.stat().st_mtime:
        return f"{BPF_OBJECT} is older than its source: run tools/bootstrap.sh"
    return None


def _v4(prefix: str) -> ipaddress.IPv4Network:
    net = ipaddress.ip_network(prefix)
    if net.version != 4:
        raise DatapathRefused(f"the xdp engine is IPv4 only, got {prefix}")
    return net


def payload_chunks(rule: Rule) -> list[tuple[int, int, bytes, bytes]]:
    """The rule's payload patterns as (offset, length, value, mask) windows of at most 8 bytes."""
    merged = _byte_constraints(rule.match.payload) or {}
    chunks: list[tuple[int, int, bytes, bytes]] = []
    offsets = sorted(merged)
    i = 0
    while i < len(offsets):
        start = offsets[i]
        value, mask = bytearray(8), bytearray(8)
        while i < len(offsets) and offsets[i] < start + 8:
            v, m = merged[offsets[i]]
            value[offsets[i] - start], mask[offsets[i] - start] = v & m, m
            last = offsets[i]
            i += 1
        chunks.append((start, last - start + 1, bytes(value), bytes(mask)))
    if len(chunks) > MAX_CHUNKS:
        raise DatapathRefused(f"payload patterns span {len(chunks)} 8-byte windows, at most {MAX_CHUNKS} in the kernel")
    for start, length, _, _ in chunks:
        if start + length > MAX_PAYLOAD_OFFSET:
            raise DatapathRefused(f"payload patterns must end within the first {MAX_PAYLOAD_OFFSET} bytes")
    return chunks


def encode_rule(rule: Rule, seq: int, action: int, extra: int = 0) -> bytes:
    """The ``struct rule`` of ``rule`` (``extra``: the group, or the listener port of an
    interception)."""
    m = rule.match
    flags = 0
    src_net = src_mask = dst_net = dst_mask = b"\0\0\0\0"
    if m.proto is not None:
        flags |= F_PROTO
    if m.src is not None:
        net = _v4(m.src)
        flags |= F_SRC
        src_net, src_mask = net.network_address.packed, net.netmask.packed
    if m.dst is not None:
        net = _v4(m.dst)
        flags |= F_DST
        dst_net, dst_mask = net.network_address.packed, net.netmask.packed
    sport = (0, 0xFFFF) if m.src_port is None else (m.src_port, m.src_port) if isinstance(m.src_port, int) else m.src_port
    dport = (0, 0xFFFF) if m.dst_port is None else (m.dst_port, m.dst_port) if isinstance(m.dst_port, int) else m.dst_port
    chunks = payload_chunks(rule)
    payload_end = max((p.end for p in m.payload), default=0)
    if payload_end > 0xFFFF:
        raise DatapathRefused("payload pattern too far into the packet")
    order = ((PRIORITY_MAX - rule.priority) << 32) | (seq & 0xFFFFFFFF)
    head = RULE_HEAD.pack(order, rule.cookie, src_net, src_mask, dst_net, dst_mask, sport[0], sport[1],
                          dport[0], dport[1], m.proto or 0, flags, action, len(chunks), payload_end, extra)
    body = b"".join(CHUNK.pack(off, length, value, mask) for off, length, value, mask in chunks)
    return head + body + b"\0" * (MAX_CHUNKS - len(chunks)) * CHUNK.size


def _index_of(rule: Rule):
    """Where the classifier indexes ``rule``: ("exact", key) | ("dport", port) | ("prefix", (net, len)) | ("general", 0)."""
    m = rule.match
    key = m.exact_key()
    if key is not None:
        proto, src, sport, dst, dport = key
        return "exact", EXACT_KEY.pack(socket.inet_aton(src), socket.inet_aton(dst), sport, dport, proto)
    if isinstance(m.dst_port, int):
        return "dport", m.dst_port
    if m.dst is not None:
        net = _v4(m.dst)
        return "prefix", (int(net.network_address), net.prefixlen)
    return "general", 0


@dataclass
class Slot:
    rule: Rule
    slot: int
    order: int
    index: tuple
    has_socket: bool = False


class Datapath:
    """The loaded BPF object and its maps, kept equal to a set of rules."""

    MAPS = ("rules", "exact", "by_dport", "by_prefix", "general", "counters", "stats", "config", "socks",
            "groups", "copies", "flows")

    def __init__(self, path: Path = BPF_OBJECT) -> None:
        self.obj = bpf.BpfObject(path)
        self.fds = {name: self.obj.map_fd(name) for name in self.MAPS}
        self.xdp_fd = self.obj.prog_fd("boxd_xdp")
        self.tc_fd = self.obj.prog_fd("boxd_tc")
        self.ncpus = bpf.num_possible_cpus()
        self.free = list(range(MAX_RULES - 1, -1, -1))
        self.by_cookie: dict[int, Slot] = {}
        self.lists: dict[tuple, list[Slot]] = {}    # index -> slots of rules indexed exactly there
        self.seq = 0

    def close(self) -> None:
        self.obj.close()

    # ---------------------------------------------------------- rules
    def add(self, rule: Rule, action: int | None = None, extra: int = 0) -> int:
        """Install ``rule``; returns its slot.  Raises DatapathRefused when a limit is hit."""
        if rule.cookie in self.by_cookie:
            raise DatapathRefused(f"cookie {rule.cookie} is installed already")
        if not self.free:
            raise DatapathRefused(f"the kernel table holds {MAX_RULES} rules already")
        code = ACTION_CODES[rule.action] if action is None else action
        if rule.action is Action.COPY:
            overlapping = sum(1 for s in self.by_cookie.values()
                              if s.rule.action is Action.COPY and s.rule.match.overlaps(rule.match))
            if overlapping >= MAX_COPIES:
                raise DatapathRefused(f"{overlapping} COPY rules already overlap this one; a packet feeds at most "
                                      f"{MAX_COPIES} in the kernel")
        data = encode_rule(rule, self.seq, code, extra)
        index = _index_of(rule)
        entry = Slot(rule, self.free[-1], RULE_HEAD.unpack_from(data)[0], index)
        affected = self._lists_with(entry)           # checks every bucket bound first
        self.free.pop()
        self.seq += 1
        slot_key = U32.pack(entry.slot)
        bpf.map_update(self.fds["rules"], slot_key, data)
        bpf.map_update(self.fds["counters"], slot_key, COUNTER.pack(0, 0) * self.ncpus)
        self.by_cookie[rule.cookie] = entry
        self.lists.setdefault(index, []).append(entry)
        self.lists[index].sort(key=lambda s: s.order)
        for key in affected:
            self._write_list(key)
        return entry.slot

    def remove(self, cookie: int) -> Slot | None:
        entry = self.by_cookie.pop(cookie, None)
        if entry is None:
            return None
        bucket = self.lists[entry.index]
        bucket.remove(entry)
        affected = self._affected(entry.index)
        if not bucket:
            del self.lists[entry.index]
        for key in affected:
            self._write_list(key)
        slot_key = U32.pack(entry.slot)
        bpf.map_update(self.fds["rules"], slot_key, b"\0" * RULE_SIZE)
        if entry.has_socket:
            bpf.map_delete(self.fds["socks"], slot_key)
        self.free.append(entry.slot)
        return entry

    def _affected(self, index: tuple) -> list[tuple]:
        """Map entries whose candidate list changes when a rule at ``index`` comes or goes."""
        kind, key = index
        if kind != "prefix":
            return [index]
        net, length = key
        mask = (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF
        return [other for other in self.lists if other[0] == "prefix"
                and other[1][1] >= length and other[1][0] & mask == net] + \
            ([index] if index not in self.lists else [])

    def _candidates(self, index: tuple) -> list[Slot]:
        """The candidate list stored at ``index`` (for a prefix: every covering prefix's rules)."""
        kind, key = index
        if kind != "prefix":
            return list(self.lists.get(index, ()))
        net, length = key
        found: list[Slot] = []
        for (other_kind, other), slots in self.lists.items():
            if other_kind != "prefix":
                continue
            onet, olen = other
            omask = (0xFFFFFFFF << (32 - olen)) & 0xFFFFFFFF if olen else 0
            if olen <= length and net & omask == onet:
                found.extend(slots)
        return sorted(found, key=lambda s: s.order)

    def _lists_with(self, entry: Slot) -> list[tuple]:
        """The map entries to rewrite for a new ``entry``, after checking none overflows."""
        self.lists.setdefault(entry.index, []).append(entry)
        try:
            affected = self._affected(entry.index)
            if entry.index not in affected:
                affected.append(entry.index)
            for key in affected:
                size = len(self._candidates(key))
                if size > BUCKET:
                    raise DatapathRefused(
                        f"{size} rules would share one kernel candidate list ({key[0]}), at most {BUCKET}")
        finally:
            self.lists[entry.index].remove(entry)
            if not self.lists[entry.index]:
                del self.lists[entry.index]
        return affected

    def _write_list(self, index: tuple) -> None:
        kind, key = index
        slots = self._candidates(index)
        fd = self.fds[{"exact": "exact", "dport": "by_dport", "prefix": "by_prefix", "general": "general"}[kind]]
        if kind == "exact":
            map_key = key
        elif kind == "dport":
            map_key = U32.pack(key)
        elif kind == "prefix":
            map_key = LPM_KEY.pack(key[1], key[0].to_bytes(4, "big"))
        else:
            map_key = U32.pack(0)
        if kind == "prefix" and index not in self.lists:
            slots = []          # no rule has this prefix any more: its covering list goes too
        if not slots and kind != "general":
            bpf.map_delete(fd, map_key)
            return
        numbers = [s.slot for s in slots] + [0] * (BUCKET - len(slots))
        bpf.map_update(fd, map_key, SLOT_LIST.pack(len(slots), *numbers))

    def slot_of(self, cookie: int) -> int | None:
        entry = self.by_cookie.get(cookie)
        return None if entry is None else entry.slot

    # ---------------------------------------------------------- counters, config
    def counters(self) -> dict[int, tuple[int, int]]:
        """cookie -> (packets, payload bytes), summed over CPUs."""
        out = {}
        fd = self.fds["counters"]
        for cookie, entry in self.by_cookie.items():
            raw = bpf.map_lookup(fd, U32.pack(entry.slot), COUNTER.size * self.ncpus)
            packets = nbytes = 0
            if raw:
                for p, b in COUNTER.iter_unpack(raw):
                    packets += p
                    nbytes += b
            out[cookie] = (packets, nbytes)
        return out

    def stats(self) -> dict[str, int]:
        out = {}
        fd = self.fds["stats"]
        for i, name in enumerate(STAT_NAMES):
            raw = bpf.map_lookup(fd, U32.pack(i), 8 * self.ncpus)
            out[name] = sum(v for (v,) in struct.iter_unpack("=Q", raw)) if raw else 0
        return out

    def set_config(self, lease_until_ns: int, mark: int = 0, mcast_ifindex: int = 0, steer_replies: bool = False) -> None:
        bpf.map_update(self.fds["config"], U32.pack(0),
                       CONFIG.pack(lease_until_ns, mark, mcast_ifindex, int(steer_replies)))

    def set_socket(self, cookie: int, sock_fd: int) -> None:
        """The socket REDIRECT rule ``cookie`` hands its packets to (bpf_sk_assign)."""
        entry = self.by_cookie[cookie]
        bpf.map_update(self.fds["socks"], U32.pack(entry.slot), struct.pack("=Q", sock_fd))
        entry.has_socket = True

    def set_group(self, group: int, members: list[tuple[str, int]]) -> None:
        key = U32.pack(group)
        if not members:
            bpf.map_delete(self.fds["groups"], key)
            return
        if len(members) > MAX_MEMBERS:
            raise DatapathRefused(f"multicast group {group}: {len(members)} members, at most {MAX_MEMBERS} in the kernel")
        # the port goes in network byte order, as the program writes it into the UDP header
        body = b"".join(socket.inet_aton(host) + struct.pack("!H", port) + b"\0\0" for host, port in members)
        value = GROUP_HEAD.pack(len(members)) + body
        bpf.map_update(self.fds["groups"], key, value + b"\0" * (GROUP_SIZE - len(value)))

    def original_destination(self, src: str, sport: int) -> tuple[str, int] | None:
        """Where the last packet redirected from ``src``:``sport`` was going (LRU, kernel-written)."""
        raw = bpf.map_lookup(self.fds["flows"], FLOW_KEY.pack(socket.inet_aton(src), sport), FLOW_DST.size)
        if raw is None:
            return None
        addr, port = FLOW_DST.unpack(raw)
        return socket.inet_ntoa(addr), port

    def pin(self, directory: str) -> None:
        """Pin every map and both programs under ``directory`` (boxd-owned names)."""
        os.makedirs(directory, exist_ok=True)
        for name, fd in self.fds.items():
            bpf.obj_pin(fd, os.path.join(directory, f"map_{name}"))
        bpf.obj_pin(self.xdp_fd, os.path.join(directory, "prog_xdp"))
        bpf.obj_pin(self.tc_fd, os.path.join(directory, "prog_tc"))

    def test_run(self, frame: bytes) -> tuple[int, bytes]:
        """Run the XDP program once on ``frame`` (no traffic needed)."""
        return bpf.prog_test_run(self.xdp_fd, frame)


def unpin(directory: str) -> int:
    """Remove boxd's pins under ``directory`` (and the directory); returns how many."""
    removed = 0
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.startswith(("map_", "prog_")):
            try:
                os.unlink(os.path.join(directory, name))
                removed += 1
            except FileNotFoundError:
                pass
    try:
        os.rmdir(directory)
    except OSError:
        pass
    return removed


def decode_copy(record: bytes) -> tuple[int, bytes, int]:
    """(cookie, IPv4 bytes, original IPv4 length) of a ring buffer copy record."""
    cookie, length, wire_len = COPY_HEAD.unpack_from(record)
    return cookie, record[COPY_HEAD.size:COPY_HEAD.size + length], wire_len

