"""The NP4GS3 control protocol: guided frames on the virtual control interface.

Declared once here, sans-IO (bytes in, objects out and back).  A guided frame
is an Ethernet frame with EtherType :data:`ETHERTYPE` whose payload is::

    header   !BBIHH   version, flags (REPLY, MORE), correlator, fragment, count
    command  !BBH     type, status, length      then ``length`` bytes of value
    ...               (``count`` commands)
    END      !BBH     0, 0, 0
    padding           zero bytes only (Ethernet minimum frame size)

Requests carry status 0.  A reply echoes the correlator and, for each request
command in order, one command of the same type with a status; an OK reply
carries the command's reply body (often empty), an error reply carries a short
UTF-8 reason.  A TABLE_DUMP reply is followed by one ENTRY command per table
entry; a reply too large for one frame is split at command boundaries across
frames numbered by ``fragment``, all but the last flagged MORE.

Every body is a frozen dataclass with ``encode()`` and ``decode(data)``;
decoding is strict and raises :class:`GuidedFrameDecodeError` saying what was
wrong.  See docs/npdrv.md for the byte layouts.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field
from typing import ClassVar

from cliruntime.wirefields import Layout

ETHERTYPE = 0x88B5
VERSION = 1
ETH_HEADER = Layout("!", (("dst", "6s"), ("src", "6s"), ("ethertype", "H")))
HEADER = Layout("!", (("version", "B"), ("flags", "B"), ("correlator", "I"), ("fragment", "H"), ("count", "H")))
TLV = Layout("!", (("type", "B"), ("status", "B"), ("length", "H")))
MAX_PAYLOAD = 1500          # Ethernet payload (MTU) a guided frame must fit in
MIN_FRAME = 60              # frames shorter than this are zero-padded on the wire
FLAG_REPLY = 0x01
FLAG_MORE = 0x02
KNOWN_FLAGS = FLAG_REPLY | FLAG_MORE
BROADCAST = b"\xff" * 6

MAX_ECHO = 1024
MAX_REASON = 200
MAX_PATTERNS = 4
MAX_PATTERN_LEN = 32
MAX_PATTERN_OFFSET = 1480
MAX_GROUP_MEMBERS = 200     # 6 bytes each: one MCAST_SET fits a frame
PORT_HOST = 0xFF            # forwarding entry "deliver to the host"
ALL = 0xFFFFFFFF            # COUNTERS_CLEAR every object of a scope
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")


class GuidedFrameDecodeError(ValueError):
    """A control frame or command body that does not follow the format."""


DecodeError = GuidedFrameDecodeError


class Cmd(enum.IntEnum):
    END = 0
    ECHO = 1
    PORT_CONFIG = 2
    FWD_ADD = 3
    FWD_DELETE = 4
    RULE_INSERT = 5
    RULE_DELETE = 6
    RULE_READ = 7
    MCAST_SET = 8
    COUNTERS_READ = 9
    COUNTERS_CLEAR = 10
    CODE_LOAD = 11
    TABLE_DUMP = 12
    ENTRY = 13          # reply only: one entry of a TABLE_DUMP


class Status(enum.IntEnum):
    OK = 0
    BAD_REQUEST = 1
    NOT_FOUND = 2
    EXISTS = 3
    TABLE_FULL = 4
    UNSUPPORTED = 5
    BAD_PORT = 6
    INTERNAL = 7


class NpAction(enum.IntEnum):
    FORWARD = 0
    REDIRECT = 1        # to the host interface of the ingress port
    COPY = 2            # a copy to the host, the original goes on
    DROP = 3
    MULTICAST = 4       # one stored frame sent to every member of ``group``


class Table(enum.IntEnum):
    RULES = 1
    FORWARDING = 2
    MULTICAST = 3
    PORTS = 4


class Scope(enum.IntEnum):
    RULE = 1
    PORT_RX = 2
    PORT_TX = 3
    PORT_DROP = 4
    PORT_TO_HOST = 5


# Commands a driver may resend after a timeout: repeating them leaves the card
# in the same state (the control point also answers a duplicate correlator from
# its reply cache).  Re-running CODE_LOAD wipes tables; COUNTERS_CLEAR loses counts.
IDEMPOTENT = frozenset({
    Cmd.ECHO, Cmd.PORT_CONFIG, Cmd.FWD_ADD, Cmd.FWD_DELETE, Cmd.RULE_INSERT, Cmd.RULE_DELETE,
    Cmd.RULE_READ, Cmd.MCAST_SET, Cmd.COUNTERS_READ, Cmd.TABLE_DUMP,
})


def _fail(what: str) -> GuidedFrameDecodeError:
    return GuidedFrameDecodeError(what)


def _unpack(layout: Layout, data: bytes, what: str) -> tuple:
    if len(data) != layout.size:
        raise _fail(f"{what}: expected {layout.size} bytes, got {len(data)}")
    return layout.unpack(data)


def mac_bytes(mac: str | bytes) -> bytes:
    if isinstance(mac, bytes):
        if len(mac) != 6:
            raise ValueError(f"a MAC address has 6 bytes, got {len(mac)}")
        return mac
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"bad MAC address {mac!r}")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"bad MAC address {mac!r}") from None


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def ip_int(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def ip_text(value: int) -> str:
    return str(ipaddress.IPv4Address(value))


def prefix_mask(plen: int) -> int:
    return (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF if plen else 0


# ---------------------------------------------------------------- command bodies

class Body:
    """A command value.  Subclasses declare ``encode`` and ``decode``."""

    def encode(self) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def decode(cls, data: bytes) -> "Body":  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Empty(Body):
    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, data: bytes) -> "Empty":
        if data:
            raise _fail(f"expected an empty value, got {len(data)} bytes")
        return cls()


@dataclass(frozen=True, slots=True)
class Echo(Body):
    data: bytes = b""

    def __post_init__(self) -> None:
        if len(self.data) > MAX_ECHO:
            raise ValueError(f"echo data is limited to {MAX_ECHO} bytes")

    def encode(self) -> bytes:
        return bytes(self.data)

    @classmethod
    def decode(cls, data: bytes) -> "Echo":
        if len(data) > MAX_ECHO:
            raise _fail(f"echo data of {len(data)} bytes exceeds {MAX_ECHO}")
        return cls(bytes(data))


@dataclass(frozen=True, slots=True)
class Reason(Body):
    """The value of an error reply."""

    text: str = ""

    def encode(self) -> bytes:
        return self.text.encode("utf-8", "replace")[:MAX_REASON]

    @classmethod
    def decode(cls, data: bytes) -> "Reason":
        if len(data) > MAX_REASON:
            raise _fail(f"error reason of {len(data)} bytes exceeds {MAX_REASON}")
        try:
            return cls(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise _fail("error reason is not UTF-8") from None


@dataclass(frozen=True, slots=True)
class PortConfig(Body):
    """Set a port: enabled, MTU, MAC.  The reply carries the resulting config."""

    LAYOUT: ClassVar[Layout] = Layout("!", (("port", "B"), ("enabled", "B"), ("mtu", "H"), ("mac", "6s")))
    port: int
    enabled: bool = True
    mtu: int = 1500
    mac: bytes = b"\x00" * 6

    def __post_init__(self) -> None:
        if not 0 <= self.port < PORT_HOST:
            raise ValueError(f"port {self.port} out of range")
        if not 68 <= self.mtu <= 9216:
            raise ValueError(f"MTU {self.mtu} out of range 68..9216")
        object.__setattr__(self, "mac", mac_bytes(self.mac))

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.port, int(self.enabled), self.mtu, self.mac)

    @classmethod
    def decode(cls, data: bytes) -> "PortConfig":
        port, enabled, mtu, mac = _unpack(cls.LAYOUT, data, "PORT_CONFIG")
        if enabled not in (0, 1):
            raise _fail(f"PORT_CONFIG: enabled must be 0 or 1, got {enabled}")
        try:
            return cls(port, bool(enabled), mtu, mac)
        except ValueError as exc:
            raise _fail(f"PORT_CONFIG: {exc}") from None


@dataclass(frozen=True, slots=True)
class FwdAdd(Body):
    """A longest-prefix-match forwarding entry: ``network`` -> port, next-hop MAC.

    ``port`` :data:`PORT_HOST` delivers matching packets to the host.
    """

    LAYOUT: ClassVar[Layout] = Layout("!", (("address", "I"), ("prefix_len", "B"), ("port", "B"), ("next_hop", "6s")))
    network: str
    port: int
    next_hop: bytes = b"\x00" * 6

    def __post_init__(self) -> None:
        net = ipaddress.IPv4Network(self.network, strict=True)
        object.__setattr__(self, "network", str(net))
        if not 0 <= self.port <= PORT_HOST:
            raise ValueError(f"port {self.port} out of range")
        object.__setattr__(self, "next_hop", mac_bytes(self.next_hop))

    @property
    def prefix(self) -> tuple[int, int]:
        net = ipaddress.IPv4Network(self.network)
        return int(net.network_address), net.prefixlen

    def encode(self) -> bytes:
        addr, plen = self.prefix
        return self.LAYOUT.pack(addr, plen, self.port, self.next_hop)

    @classmethod
    def decode(cls, data: bytes) -> "FwdAdd":
        addr, plen, port, mac = _unpack(cls.LAYOUT, data, "FWD_ADD")
        return cls(_network(addr, plen, "FWD_ADD"), port, mac)


def _network(addr: int, plen: int, what: str) -> str:
    if plen > 32:
        raise _fail(f"{what}: prefix length {plen} > 32")
    if addr & ~prefix_mask(plen) & 0xFFFFFFFF:
        raise _fail(f"{what}: {ip_text(addr)}/{plen} has host bits set")
    return f"{ip_text(addr)}/{plen}"


@dataclass(frozen=True, slots=True)
class FwdDelete(Body):
    LAYOUT: ClassVar[Layout] = Layout("!", (("address", "I"), ("prefix_len", "B")))
    network: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "network", str(ipaddress.IPv4Network(self.network, strict=True)))

    def encode(self) -> bytes:
        net = ipaddress.IPv4Network(self.network)
        return self.LAYOUT.pack(int(net.network_address), net.prefixlen)

    @classmethod
    def decode(cls, data: bytes) -> "FwdDelete":
        addr, plen = _unpack(cls.LAYOUT, data, "FWD_DELETE")
        return cls(_network(addr, plen, "FWD_DELETE"))


@dataclass(frozen=True, slots=True)
class Pattern:
    """payload[offset:offset+len(value)] & mask == value (value has no bits outside mask)."""

    LAYOUT: ClassVar[Layout] = Layout("!", (("offset", "H"), ("length", "B")))
    offset: int
    value: bytes
    mask: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.offset <= MAX_PATTERN_OFFSET:
            raise ValueError(f"pattern offset {self.offset} out of range 0..{MAX_PATTERN_OFFSET}")
        if not 1 <= len(self.value) <= MAX_PATTERN_LEN:
            raise ValueError(f"pattern length {len(self.value)} out of range 1..{MAX_PATTERN_LEN}")
        if len(self.mask) != len(self.value):
            raise ValueError("pattern mask and value differ in length")
        if any(v & ~m for v, m in zip(self.value, self.mask)):
            raise ValueError("pattern value has bits outside its mask")


@dataclass(frozen=True, slots=True)
class NpRule(Body):
    """An entry of the software-managed multi-field table.

    Addresses are value/mask pairs (masks may be non-contiguous), ports inclusive
    ranges, the protocol a value/mask byte; all-zero masks and full ranges are
    wildcards.  Higher ``priority`` wins.  ``group`` is the multicast group of a
    MULTICAST rule (0 otherwise).
    """

    LAYOUT: ClassVar[Layout] = Layout("!", (
        ("rule_id", "I"), ("priority", "i"), ("action", "B"), ("reserved", "B"), ("group", "H"),
        ("proto", "B"), ("proto_mask", "B"), ("src", "I"), ("src_mask", "I"), ("dst", "I"), ("dst_mask", "I"),
        ("sport_lo", "H"), ("sport_hi", "H"), ("dport_lo", "H"), ("dport_hi", "H"), ("patterns", "B")))
    rule_id: int
    priority: int = 100
    action: NpAction = NpAction.FORWARD
    group: int = 0
    proto: int = 0
    proto_mask: int = 0
    src: int = 0
    src_mask: int = 0
    dst: int = 0
    dst_mask: int = 0
    sport: tuple[int, int] = (0, 0xFFFF)
    dport: tuple[int, int] = (0, 0xFFFF)
    patterns: tuple[Pattern, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "action", NpAction(self.action))
        object.__setattr__(self, "sport", tuple(self.sport))
        object.__setattr__(self, "dport", tuple(self.dport))
        object.__setattr__(self, "patterns", tuple(self.patterns))
        if not 0 <= self.rule_id <= 0xFFFFFFFF:
            raise ValueError(f"rule id {self.rule_id} out of range")
        if not -(2 ** 31) <= self.priority < 2 ** 31:
            raise ValueError(f"priority {self.priority} out of range")
        if not 0 <= self.group <= 0xFFFF:
            raise ValueError(f"group {self.group} out of range")
        if (self.action is NpAction.MULTICAST) != (self.group != 0):
            raise ValueError("a MULTICAST rule needs a group 1..65535, other actions group 0")
        for name in ("proto", "proto_mask"):
            if not 0 <= getattr(self, name) <= 0xFF:
                raise ValueError(f"{name} out of range")
        for name in ("src", "src_mask", "dst", "dst_mask"):
            if not 0 <= getattr(self, name) <= 0xFFFFFFFF:
                raise ValueError(f"{name} out of range")
        for value, mask, name in ((self.proto, self.proto_mask, "proto"), (self.src, self.src_mask, "src"),
                                  (self.dst, self.dst_mask, "dst")):
            if value & ~mask:
                raise ValueError(f"{name} value has bits outside its mask")
        for name in ("sport", "dport"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi <= 0xFFFF:
                raise ValueError(f"{name} range {lo}..{hi} is not 0 <= lo <= hi <= 65535")
        if len(self.patterns) > MAX_PATTERNS:
            raise ValueError(f"at most {MAX_PATTERNS} payload patterns")

    def encode(self) -> bytes:
        parts = [self.LAYOUT.pack(
            self.rule_id, self.priority, self.action, 0, self.group, self.proto, self.proto_mask,
            self.src, self.src_mask, self.dst, self.dst_mask, *self.sport, *self.dport,
            len(self.patterns))]
        for pat in self.patterns:
            parts += [Pattern.LAYOUT.pack(pat.offset, len(pat.value)), pat.value, pat.mask]
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> "NpRule":
        rule, rest = cls.decode_prefix(data)
        if rest:
            raise _fail(f"rule: {len(rest)} trailing bytes")
        return rule

    @classmethod
    def decode_prefix(cls, data: bytes) -> tuple["NpRule", bytes]:
        size = cls.LAYOUT.size
        if len(data) < size:
            raise _fail(f"rule: expected at least {size} bytes, got {len(data)}")
        (rule_id, priority, action, reserved, group, proto, proto_mask, src, src_mask, dst, dst_mask,
         slo, shi, dlo, dhi, npat) = cls.LAYOUT.unpack_from(data)
        if reserved:
            raise _fail("rule: reserved byte is not zero")
        try:
            action = NpAction(action)
        except ValueError:
            raise _fail(f"rule: unknown action {action}") from None
        if npat > MAX_PATTERNS:
            raise _fail(f"rule: {npat} payload patterns, at most {MAX_PATTERNS}")
        pos = size
        patterns = []
        for _ in range(npat):
            if len(data) < pos + Pattern.LAYOUT.size:
                raise _fail("rule: truncated payload pattern")
            offset, length = Pattern.LAYOUT.unpack_from(data, pos)
            pos += Pattern.LAYOUT.size
            if len(data) < pos + 2 * length:
                raise _fail("rule: truncated payload pattern value/mask")
            value, mask = data[pos:pos + length], data[pos + length:pos + 2 * length]
            pos += 2 * length
            try:
                patterns.append(Pattern(offset, bytes(value), bytes(mask)))
            except ValueError as exc:
                raise _fail(f"rule: {exc}") from None
        try:
            rule = cls(rule_id, priority, action, group, proto, proto_mask, src, src_mask, dst, dst_mask,
                       (slo, shi), (dlo, dhi), tuple(patterns))
        except ValueError as exc:
            raise _fail(f"rule: {exc}") from None
        return rule, data[pos:]


@dataclass(frozen=True, slots=True)
class RuleRef(Body):
    LAYOUT: ClassVar[Layout] = Layout("!", (("rule_id", "I"),))
    rule_id: int

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.rule_id)

    @classmethod
    def decode(cls, data: bytes) -> "RuleRef":
        return cls(*_unpack(cls.LAYOUT, data, "rule reference"))


@dataclass(frozen=True, slots=True)
class RuleRecord(Body):
    """A rule with its counters (RULE_READ reply, rule-table dump entry)."""

    COUNTS: ClassVar[Layout] = Layout("!", (("packets", "Q"), ("bytes", "Q")))
    rule: NpRule
    packets: int = 0
    bytes: int = 0

    def encode(self) -> bytes:
        return self.rule.encode() + self.COUNTS.pack(self.packets, self.bytes)

    @classmethod
    def decode(cls, data: bytes) -> "RuleRecord":
        if len(data) < cls.COUNTS.size:
            raise _fail("rule record: too short for its counters")
        rule = NpRule.decode(data[:-cls.COUNTS.size])
        packets, nbytes = cls.COUNTS.unpack(data[-cls.COUNTS.size:])
        return cls(rule, packets, nbytes)


@dataclass(frozen=True, slots=True)
class McastSet(Body):
    """Create or replace multicast group ``group``; no members deletes it.

    Each member is (IPv4 address, UDP port): the card rewrites the stored
    frame's destination for each member and forwards it by its LPM table.
    """

    LAYOUT: ClassVar[Layout] = Layout("!", (("group", "H"), ("count", "H")))
    MEMBER: ClassVar[Layout] = Layout("!", (("address", "I"), ("port", "H")))
    group: int
    members: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.group <= 0xFFFF:
            raise ValueError(f"group {self.group} out of range 1..65535")
        members = tuple((str(ipaddress.IPv4Address(ip)), int(port)) for ip, port in self.members)
        if len(members) > MAX_GROUP_MEMBERS:
            raise ValueError(f"at most {MAX_GROUP_MEMBERS} members in a group")
        if any(not 0 < port <= 0xFFFF for _, port in members):
            raise ValueError("member port out of range 1..65535")
        object.__setattr__(self, "members", members)

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.group, len(self.members)) + b"".join(
            self.MEMBER.pack(ip_int(ip), port) for ip, port in self.members)

    @classmethod
    def decode(cls, data: bytes) -> "McastSet":
        if len(data) < cls.LAYOUT.size:
            raise _fail("MCAST_SET: too short")
        group, count = cls.LAYOUT.unpack_from(data)
        if len(data) != cls.LAYOUT.size + count * cls.MEMBER.size:
            raise _fail(f"MCAST_SET: {count} members need {cls.LAYOUT.size + count * cls.MEMBER.size} "
                        f"bytes, got {len(data)}")
        members = tuple((ip_text(ip), port) for ip, port in
                        cls.MEMBER.iter_unpack(data[cls.LAYOUT.size:]))
        try:
            return cls(group, members)
        except ValueError as exc:
            raise _fail(f"MCAST_SET: {exc}") from None


@dataclass(frozen=True, slots=True)
class CounterRef(Body):
    """COUNTERS_READ / COUNTERS_CLEAR target: a scope and an id (:data:`ALL` to clear a scope)."""

    LAYOUT: ClassVar[Layout] = Layout("!", (("scope", "B"), ("ident", "I")))
    scope: Scope
    ident: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "scope", Scope(self.scope))

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.scope, self.ident)

    @classmethod
    def decode(cls, data: bytes) -> "CounterRef":
        scope, ident = _unpack(cls.LAYOUT, data, "counter reference")
        try:
            return cls(Scope(scope), ident)
        except ValueError:
            raise _fail(f"counter reference: unknown scope {scope}") from None


@dataclass(frozen=True, slots=True)
class Counters(Body):
    LAYOUT: ClassVar[Layout] = Layout("!", (("scope", "B"), ("ident", "I"), ("packets", "Q"), ("bytes", "Q")))
    scope: Scope
    ident: int
    packets: int
    bytes: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "scope", Scope(self.scope))

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.scope, self.ident, self.packets, self.bytes)

    @classmethod
    def decode(cls, data: bytes) -> "Counters":
        scope, ident, packets, nbytes = _unpack(cls.LAYOUT, data, "counters")
        try:
            return cls(Scope(scope), ident, packets, nbytes)
        except ValueError:
            raise _fail(f"counters: unknown scope {scope}") from None


@dataclass(frozen=True, slots=True)
class CodeLoad(Body):
    """Load the named action set (picocode image) on the card; resets the tables."""

    name: str

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"bad code name {self.name!r} (lowercase letters, digits, _.-, 1..32)")

    def encode(self) -> bytes:
        return self.name.encode("ascii")

    @classmethod
    def decode(cls, data: bytes) -> "CodeLoad":
        try:
            return cls(data.decode("ascii"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _fail(f"CODE_LOAD: {exc}") from None


@dataclass(frozen=True, slots=True)
class DumpRequest(Body):
    LAYOUT: ClassVar[Layout] = Layout("!", (("table", "B"),))
    table: Table

    def __post_init__(self) -> None:
        object.__setattr__(self, "table", Table(self.table))

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.table)

    @classmethod
    def decode(cls, data: bytes) -> "DumpRequest":
        (table,) = _unpack(cls.LAYOUT, data, "TABLE_DUMP")
        try:
            return cls(Table(table))
        except ValueError:
            raise _fail(f"TABLE_DUMP: unknown table {table}") from None


@dataclass(frozen=True, slots=True)
class DumpHead(Body):
    """TABLE_DUMP reply: how many ENTRY commands follow (possibly in later fragments)."""

    LAYOUT: ClassVar[Layout] = Layout("!", (("table", "B"), ("count", "I")))
    table: Table
    count: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "table", Table(self.table))

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.table, self.count)

    @classmethod
    def decode(cls, data: bytes) -> "DumpHead":
        table, count = _unpack(cls.LAYOUT, data, "TABLE_DUMP reply")
        try:
            return cls(Table(table), count)
        except ValueError:
            raise _fail(f"TABLE_DUMP reply: unknown table {table}") from None


@dataclass(frozen=True, slots=True)
class PortRecord(Body):
    """A port-table dump entry: the config and its rx/tx counters."""

    COUNTS: ClassVar[Layout] = Layout("!", (("rx_packets", "Q"), ("rx_bytes", "Q"), ("tx_packets", "Q"), ("tx_bytes", "Q"), ("drops", "Q")))
    config: PortConfig
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    drops: int = 0

    def encode(self) -> bytes:
        return self.config.encode() + self.COUNTS.pack(
            self.rx_packets, self.rx_bytes, self.tx_packets, self.tx_bytes, self.drops)

    @classmethod
    def decode(cls, data: bytes) -> "PortRecord":
        size = PortConfig.LAYOUT.size
        if len(data) != size + cls.COUNTS.size:
            raise _fail(f"port record: expected {size + cls.COUNTS.size} bytes, got {len(data)}")
        return cls(PortConfig.decode(data[:size]), *cls.COUNTS.unpack(data[size:]))


ENTRY_BODIES: dict[Table, type[Body]] = {
    Table.RULES: RuleRecord, Table.FORWARDING: FwdAdd, Table.MULTICAST: McastSet, Table.PORTS: PortRecord,
}


@dataclass(frozen=True, slots=True)
class Entry(Body):
    """One TABLE_DUMP entry: the table byte then that table's record."""

    record: Body

    @property
    def table(self) -> Table:
        for table, cls in ENTRY_BODIES.items():
            if isinstance(self.record, cls):
                return table
        raise ValueError(f"{type(self.record).__name__} is not a table record")

    def encode(self) -> bytes:
        return bytes([self.table]) + self.record.encode()

    @classmethod
    def decode(cls, data: bytes) -> "Entry":
        if not data:
            raise _fail("ENTRY: empty")
        try:
            table = Table(data[0])
        except ValueError:
            raise _fail(f"ENTRY: unknown table {data[0]}") from None
        try:
            return cls(ENTRY_BODIES[table].decode(data[1:]))
        except GuidedFrameDecodeError as exc:
            raise _fail(f"ENTRY {table.name}: {exc}") from None
        except ValueError as exc:
            raise _fail(f"ENTRY {table.name}: {exc}") from None


# The one declaration of which body each command carries, in requests and OK replies.
REQUEST_BODIES: dict[Cmd, type[Body]] = {
    Cmd.ECHO: Echo, Cmd.PORT_CONFIG: PortConfig, Cmd.FWD_ADD: FwdAdd, Cmd.FWD_DELETE: FwdDelete,
    Cmd.RULE_INSERT: NpRule, Cmd.RULE_DELETE: RuleRef, Cmd.RULE_READ: RuleRef, Cmd.MCAST_SET: McastSet,
    Cmd.COUNTERS_READ: CounterRef, Cmd.COUNTERS_CLEAR: CounterRef, Cmd.CODE_LOAD: CodeLoad,
    Cmd.TABLE_DUMP: DumpRequest,
}
REPLY_BODIES: dict[Cmd, type[Body]] = {
    Cmd.ECHO: Echo, Cmd.PORT_CONFIG: PortConfig, Cmd.FWD_ADD: Empty, Cmd.FWD_DELETE: Empty,
    Cmd.RULE_INSERT: Empty, Cmd.RULE_DELETE: Empty, Cmd.RULE_READ: RuleRecord, Cmd.MCAST_SET: Empty,
    Cmd.COUNTERS_READ: Counters, Cmd.COUNTERS_CLEAR: Empty, Cmd.CODE_LOAD: CodeLoad,
    Cmd.TABLE_DUMP: DumpHead, Cmd.ENTRY: Entry,
}
BODY_COMMAND: dict[type[Body], Cmd] = {
    Echo: Cmd.ECHO, PortConfig: Cmd.PORT_CONFIG, FwdAdd: Cmd.FWD_ADD, FwdDelete: Cmd.FWD_DELETE,
    NpRule: Cmd.RULE_INSERT, McastSet: Cmd.MCAST_SET, CodeLoad: Cmd.CODE_LOAD, DumpRequest: Cmd.TABLE_DUMP,
}


@dataclass(frozen=True, slots=True)
class Command:
    """One command of a guided frame: its type, status (replies) and body."""

    type: Cmd
    body: Body = field(default_factory=Empty)
    status: Status = Status.OK

    def encode(self) -> bytes:
        value = self.body.encode()
        if len(value) > 0xFFFF:
            raise ValueError(f"{self.type.name} value too long")
        return TLV.pack(self.type, self.status, len(value)) + value

    @property
    def size(self) -> int:
        return TLV.size + len(self.body.encode())

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


def request(body: Body, cmd: Cmd | None = None) -> Command:
    """A request command; the type follows from the body unless it is ambiguous."""
    if cmd is None:
        try:
            cmd = BODY_COMMAND[type(body)]
        except KeyError:
            raise ValueError(f"say which command carries a {type(body).__name__}") from None
    if not isinstance(body, REQUEST_BODIES[cmd]):
        raise ValueError(f"{cmd.name} carries a {REQUEST_BODIES[cmd].__name__}, not {type(body).__name__}")
    return Command(cmd, body)


@dataclass(frozen=True, slots=True)
class Message:
    """One guided frame's payload."""

    correlator: int
    commands: tuple[Command, ...]
    reply: bool = False
    more: bool = False
    fragment: int = 0

    def encode(self) -> bytes:
        flags = (FLAG_REPLY if self.reply else 0) | (FLAG_MORE if self.more else 0)
        parts = [HEADER.pack(VERSION, flags, self.correlator, self.fragment, len(self.commands))]
        parts += [cmd.encode() for cmd in self.commands]
        parts.append(TLV.pack(Cmd.END, 0, 0))
        out = b"".join(parts)
        if len(out) > MAX_PAYLOAD:
            raise ValueError(f"guided frame of {len(out)} bytes exceeds {MAX_PAYLOAD}")
        return out


OVERHEAD = HEADER.size + TLV.size   # header + END


def decode_message(payload: bytes) -> Message:
    """Decode a guided frame's payload (after the Ethernet header), strictly."""
    if len(payload) < OVERHEAD:
        raise _fail(f"guided frame of {len(payload)} bytes is shorter than header + END ({OVERHEAD})")
    if len(payload) > MAX_PAYLOAD:
        raise _fail(f"guided frame of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    version, flags, correlator, fragment, count = HEADER.unpack_from(payload)
    if version != VERSION:
        raise _fail(f"unsupported version {version}")
    if flags & ~KNOWN_FLAGS:
        raise _fail(f"unknown flags 0x{flags:02x}")
    reply = bool(flags & FLAG_REPLY)
    if flags & FLAG_MORE and not reply:
        raise _fail("MORE flag on a request")
    if fragment and not reply:
        raise _fail("fragment number on a request")
    bodies = REPLY_BODIES if reply else REQUEST_BODIES
    pos = HEADER.size
    commands = []
    while True:
        if len(payload) < pos + TLV.size:
            raise _fail(f"truncated command header at byte {pos} (no END)")
        ctype, status, length = TLV.unpack_from(payload, pos)
        pos += TLV.size
        if ctype == Cmd.END:
            if status or length:
                raise _fail("END with a status or a value")
            break
        if len(commands) == count:
            raise _fail(f"more commands than the header's count {count}")
        try:
            cmd = Cmd(ctype)
        except ValueError:
            raise _fail(f"unknown command type 0x{ctype:02x} at byte {pos - TLV.size}") from None
        if cmd not in bodies:
            raise _fail(f"{cmd.name} is not allowed in a {'reply' if reply else 'request'}")
        try:
            st = Status(status)
        except ValueError:
            raise _fail(f"{cmd.name}: unknown status {status}") from None
        if not reply and st is not Status.OK:
            raise _fail(f"{cmd.name}: a request carries status {status}")
        if len(payload) < pos + length:
            raise _fail(f"{cmd.name}: value of {length} bytes runs past the frame end")
        value = payload[pos:pos + length]
        pos += length
        try:
            body = bodies[cmd].decode(value) if st is Status.OK else Reason.decode(value)
        except GuidedFrameDecodeError as exc:
            raise _fail(f"{cmd.name}: {exc}") from None
        commands.append(Command(cmd, body, st))
    if len(commands) != count:
        raise _fail(f"header says {count} commands, END after {len(commands)}")
    if payload[pos:].strip(b"\x00"):
        raise _fail("non-zero bytes after END")
    return Message(correlator, tuple(commands), reply, bool(flags & FLAG_MORE), fragment)


# ---------------------------------------------------------------- Ethernet framing

def frame(dst: bytes, src: bytes, message: Message) -> bytes:
    """A complete Ethernet frame carrying ``message``, padded to the minimum size."""
    out = ETH_HEADER.pack(dst, src, ETHERTYPE) + message.encode()
    if len(out) < MIN_FRAME:
        out += b"\x00" * (MIN_FRAME - len(out))
    return out


def parse_frame(data: bytes) -> tuple[bytes, bytes, Message]:
    """(dst MAC, src MAC, message) of a guided frame; GuidedFrameDecodeError otherwise."""
    if len(data) < ETH_HEADER.size:
        raise _fail(f"frame of {len(data)} bytes has no Ethernet header")
    dst, src, ethertype = ETH_HEADER.unpack_from(data)
    if ethertype != ETHERTYPE:
        raise _fail(f"EtherType 0x{ethertype:04x} is not 0x{ETHERTYPE:04x}")
    return dst, src, decode_message(data[ETH_HEADER.size:])


def split_commands(commands: list[Command], budget: int = MAX_PAYLOAD - OVERHEAD) -> list[list[Command]]:
    """Split commands into groups whose encodings each fit one frame."""
    groups: list[list[Command]] = [[]]
    used = 0
    for cmd in commands:
        size = cmd.size
        if size > budget:
            raise ValueError(f"{cmd.type.name} of {size} bytes cannot fit in one frame")
        if used + size > budget and groups[-1]:
            groups.append([])
            used = 0
        groups[-1].append(cmd)
        used += size
    return groups


def reply_messages(correlator: int, commands: list[Command]) -> list[Message]:
    """A reply split at command boundaries into frames, all but the last flagged MORE."""
    groups = split_commands(commands)
    if len(groups) > 0xFFFF:
        raise ValueError("reply needs more than 65535 fragments")
    return [Message(correlator, tuple(group), reply=True, more=i < len(groups) - 1, fragment=i)
            for i, group in enumerate(groups)]
