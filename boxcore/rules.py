"""Classifier rules: what a booster asks the box to do with which packets.

Modelled after P4Runtime table entries and OpenFlow flow mods: a :class:`Match`
(ternary/range fields, omitted = wildcard), an :class:`Action`, a priority
(higher wins), the owner (booster name) and a cookie that names the rule.

Everything is validated and normalized when constructed, so two rules that
mean the same thing compare (and hash) equal, which makes repeated requests
idempotent:

* ``proto`` accepts ``"udp"``, ``"tcp"``, ``"icmp"`` or a number 0..255;
* ``src``/``dst`` accept an address or a prefix, stored as a canonical
  prefix string (``"10.0.0.1"`` -> ``"10.0.0.1/32"``); host bits set below the
  prefix length are an error, as in P4Runtime;
* ports accept an int or an inclusive ``(lo, hi)`` range; ``(p, p)`` becomes ``p``;
* payload patterns are sorted, their values masked.

Semantics are per packet field: a port constraint compares the packet's
``sport``/``dport`` (0 for protocols without ports and for non-first
fragments); a payload pattern needs the payload to be at least
``offset + len(value)`` bytes long.  :meth:`Match.overlaps` and
:meth:`Match.covers` are exact under those semantics.

``to_dict``/``from_dict`` give the msgpack form used on the control socket;
``from_dict`` is strict (unknown keys, wrong types: :class:`RuleError`).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from boxcore.packet import PROTO_NAMES

if TYPE_CHECKING:
    from boxcore.packet import Packet

MAX_PORT = 0xFFFF
#: Payload patterns are bounded so a rule stays cheap to evaluate and to map
#: onto the NP's tree search tables.
MAX_PATTERNS = 16
MAX_PATTERN_BYTES = 256
MAX_PAYLOAD_OFFSET = 0xFFFF
PRIORITY_MIN = -(2 ** 31)
PRIORITY_MAX = 2 ** 31 - 1
COOKIE_MAX = 2 ** 64 - 1
GROUP_MAX = 2 ** 32 - 1

Port = int | tuple[int, int] | None


class RuleError(ValueError):
    """An invalid rule, match or payload pattern (the message says what)."""


class Action(enum.Enum):
    FORWARD = "forward"      # the default: the packet goes on
    REDIRECT = "redirect"    # to the booster; consumed unless it re-injects it
    COPY = "copy"            # the packet goes on and the booster gets a copy
    DROP = "drop"
    MULTICAST = "multicast"  # fanned out to the members of ``Rule.group``

    @classmethod
    def parse(cls, value: "Action | str") -> "Action":
        if isinstance(value, Action):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        names = ", ".join(a.value for a in cls)
        raise RuleError(f"action must be one of {names}, got {value!r}")

    @property
    def terminal(self) -> bool:
        """True for actions that decide the packet's fate (all but COPY)."""
        return self is not Action.COPY


# ------------------------------------------------------------------ helpers

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _to_bytes(value: Any, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise RuleError(f"{what} must be bytes, got {type(value).__name__}")


def parse_proto(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        name = value.strip().lower()
        if name in PROTO_NAMES:
            return PROTO_NAMES[name]
        if name.isdigit():
            value = int(name)
        else:
            raise RuleError(f"protocol must be udp, tcp, icmp or 0..255, got {value!r}")
    if not _is_int(value) or not 0 <= value <= 255:
        raise RuleError(f"protocol must be udp, tcp, icmp or 0..255, got {value!r}")
    return value


def parse_prefix(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RuleError(f"{what} must be an address or prefix string, got {type(value).__name__}")
    try:
        return str(ipaddress.ip_network(value.strip(), strict=True))
    except ValueError as exc:
        raise RuleError(f"{what} {value!r} is not a valid prefix: {exc}") from None


def parse_port(value: Any, what: str) -> Port:
    if value is None:
        return None
    if _is_int(value):
        if not 0 <= value <= MAX_PORT:
            raise RuleError(f"{what} {value} is not in 0..65535")
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        lo, hi = value
        if not (0 <= lo <= MAX_PORT and 0 <= hi <= MAX_PORT):
            raise RuleError(f"{what} range {lo}..{hi} is not within 0..65535")
        if lo > hi:
            raise RuleError(f"{what} range {lo}..{hi} is empty (lo > hi)")
        return lo if lo == hi else (lo, hi)
    raise RuleError(f"{what} must be a port or a (lo, hi) range, got {value!r}")


def port_bounds(port: Port) -> tuple[int, int]:
    """The inclusive range a port field allows (wildcard = 0..65535)."""
    if port is None:
        return 0, MAX_PORT
    if isinstance(port, int):
        return port, port
    return port


@functools.lru_cache(maxsize=8192)
def _prefix_key(prefix: str) -> tuple[int, int, int, int]:
    """(version, network int, mask int, prefix length) of a canonical prefix."""
    net = ipaddress.ip_network(prefix)
    return net.version, int(net.network_address), int(net.netmask), net.prefixlen


@functools.lru_cache(maxsize=65536)
def address_key(address: str) -> tuple[int, int] | None:
    """(version, int) of an address string, None if it is not one.

    Cached (bounded) because the same few addresses recur on every packet.
    """
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return None
    return addr.version, int(addr)


def prefix_contains(prefix: str, address: str) -> bool:
    key = address_key(address)
    if key is None:
        return False
    version, net, mask, _ = _prefix_key(prefix)
    return key[0] == version and key[1] & mask == net


def _prefixes_intersect(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return True
    va, na, ma, _ = _prefix_key(a)
    vb, nb, mb, _ = _prefix_key(b)
    # Two prefixes intersect iff they agree on the shorter one's bits.
    return va == vb and (na ^ nb) & ma & mb == 0


def _prefix_covers(outer: str | None, inner: str | None) -> bool:
    if outer is None:
        return True
    if inner is None:
        return False  # a wildcard spans both address families; no prefix does
    vo, no, mo, lo = _prefix_key(outer)
    vi, ni, _mi, li = _prefix_key(inner)
    return vo == vi and lo <= li and ni & mo == no


# ------------------------------------------------------------------ patterns

@dataclass(frozen=True, slots=True)
class PayloadPattern:
    """``payload[offset:offset+len(value)] & mask == value & mask``.

    ``mask`` None means every bit counts; an all-ones mask is normalized to
    None and ``value`` is stored already masked.
    """

    offset: int
    value: bytes
    mask: bytes | None = None
    _value_int: int = field(init=False, repr=False, compare=False)
    _mask_int: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _is_int(self.offset) or not 0 <= self.offset <= MAX_PAYLOAD_OFFSET:
            raise RuleError(f"payload offset must be an int in 0..{MAX_PAYLOAD_OFFSET}, got {self.offset!r}")
        value = _to_bytes(self.value, "payload value")
        if not 1 <= len(value) <= MAX_PATTERN_BYTES:
            raise RuleError(f"payload value must be 1..{MAX_PATTERN_BYTES} bytes, got {len(value)}")
        if self.offset + len(value) > MAX_PAYLOAD_OFFSET + 1:
            raise RuleError(f"payload pattern at {self.offset} of {len(value)} bytes runs past 65536")
        mask = None if self.mask is None else _to_bytes(self.mask, "payload mask")
        if mask is not None and len(mask) != len(value):
            raise RuleError(f"payload mask is {len(mask)} bytes but the value is {len(value)}")
        if mask is not None and mask == b"\xff" * len(mask):
            mask = None
        if mask is not None:
            value = bytes(v & m for v, m in zip(value, mask))
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "_value_int", int.from_bytes(value, "big"))
        object.__setattr__(self, "_mask_int", int.from_bytes(mask, "big") if mask is not None else -1)

    @property
    def end(self) -> int:
        """The payload length this pattern needs."""
        return self.offset + len(self.value)

    def matches(self, payload: bytes) -> bool:
        end = self.offset + len(self.value)
        if len(payload) < end:
            return False
        window = payload[self.offset:end]
        if self.mask is None:
            return window == self.value
        return int.from_bytes(window, "big") & self._mask_int == self._value_int

    def constraints(self):
        """(absolute offset, value byte, mask byte) for every byte with a non-zero mask."""
        mask = self.mask or b"\xff" * len(self.value)
        for i, (v, m) in enumerate(zip(self.value, mask)):
            if m:
                yield self.offset + i, v, m

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"offset": self.offset, "value": self.value}
        if self.mask is not None:
            out["mask"] = self.mask
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "PayloadPattern":
        data = _check_map(data, "payload pattern", {"offset", "value", "mask"}, {"offset", "value"})
        return cls(data["offset"], _to_bytes(data["value"], "payload value"),
                   None if data.get("mask") is None else _to_bytes(data["mask"], "payload mask"))


def _byte_constraints(patterns: tuple[PayloadPattern, ...]) -> dict[int, tuple[int, int]] | None:
    """Merge patterns into {offset: (value, mask)}; None if they contradict."""
    merged: dict[int, tuple[int, int]] = {}
    for pattern in patterns:
        for offset, value, mask in pattern.constraints():
            if offset in merged:
                old_value, old_mask = merged[offset]
                if (old_value ^ value) & old_mask & mask:
                    return None
                merged[offset] = ((old_value & old_mask) | (value & mask), old_mask | mask)
            else:
                merged[offset] = (value, mask)
    return merged


def _check_map(data: Any, what: str, allowed: set[str], required: set[str] = frozenset()) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise RuleError(f"{what} must be a map, got {type(data).__name__}")
    unknown = set(data) - allowed
    if unknown:
        raise RuleError(f"{what}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    missing = required - set(data)
    if missing:
        raise RuleError(f"{what}: missing key(s) {', '.join(sorted(missing))}")
    return data


# ------------------------------------------------------------------ match

@dataclass(frozen=True, slots=True)
class Match:
    """Which packets a rule applies to; every field None (or empty) is a wildcard."""

    proto: int | None = None
    src: str | None = None
    dst: str | None = None
    src_port: Port = None
    dst_port: Port = None
    payload: tuple[PayloadPattern, ...] = ()
    _payload_end: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "proto", parse_proto(self.proto))
        object.__setattr__(self, "src", parse_prefix(self.src, "source prefix"))
        object.__setattr__(self, "dst", parse_prefix(self.dst, "destination prefix"))
        object.__setattr__(self, "src_port", parse_port(self.src_port, "source port"))
        object.__setattr__(self, "dst_port", parse_port(self.dst_port, "destination port"))
        patterns = self.payload
        if isinstance(patterns, PayloadPattern):
            patterns = (patterns,)
        if not isinstance(patterns, (tuple, list)):
            raise RuleError(f"payload must be a sequence of patterns, got {type(patterns).__name__}")
        if len(patterns) > MAX_PATTERNS:
            raise RuleError(f"at most {MAX_PATTERNS} payload patterns, got {len(patterns)}")
        checked = []
        for pattern in patterns:
            if isinstance(pattern, Mapping):
                pattern = PayloadPattern.from_dict(pattern)
            if not isinstance(pattern, PayloadPattern):
                raise RuleError(f"payload patterns must be PayloadPattern, got {type(pattern).__name__}")
            checked.append(pattern)
        patterns = tuple(sorted(set(checked), key=lambda p: (p.offset, p.value, p.mask or b"")))
        if _byte_constraints(patterns) is None:
            raise RuleError("payload patterns contradict each other: the match could never hit")
        object.__setattr__(self, "payload", patterns)
        object.__setattr__(self, "_payload_end", max((p.end for p in patterns), default=0))

    # ---------------------------------------------------------- queries
    @property
    def is_exact(self) -> bool:
        """True when this is an exact 5-tuple with no payload pattern (fast-path eligible)."""
        return self.exact_key() is not None

    def exact_key(self) -> tuple[int, str, int, str, int] | None:
        """The 5-tuple (proto, src, sport, dst, dport) of an exact match, else None."""
        if (self.proto is None or self.payload or self.src is None or self.dst is None
                or not isinstance(self.src_port, int) or not isinstance(self.dst_port, int)):
            return None
        src, dst = ipaddress.ip_network(self.src), ipaddress.ip_network(self.dst)
        if src.num_addresses != 1 or dst.num_addresses != 1:
            return None
        return (self.proto, str(src.network_address), self.src_port,
                str(dst.network_address), self.dst_port)

    def matches(self, pkt: "Packet") -> bool:
        if self.proto is not None and pkt.proto != self.proto:
            return False
        port = self.dst_port
        if port is not None:
            if isinstance(port, int):
                if pkt.dport != port:
                    return False
            elif not port[0] <= pkt.dport <= port[1]:
                return False
        port = self.src_port
        if port is not None:
            if isinstance(port, int):
                if pkt.sport != port:
                    return False
            elif not port[0] <= pkt.sport <= port[1]:
                return False
        if self.dst is not None and not prefix_contains(self.dst, pkt.dst):
            return False
        if self.src is not None and not prefix_contains(self.src, pkt.src):
            return False
        if self.payload:
            payload = pkt.payload
            if len(payload) < self._payload_end:
                return False
            for pattern in self.payload:
                if not pattern.matches(payload):
                    return False
        return True

    def overlaps(self, other: "Match") -> bool:
        """Exact: True iff some packet matches both ``self`` and ``other``."""
        if self.proto is not None and other.proto is not None and self.proto != other.proto:
            return False
        for mine, theirs in ((self.src_port, other.src_port), (self.dst_port, other.dst_port)):
            lo1, hi1 = port_bounds(mine)
            lo2, hi2 = port_bounds(theirs)
            if max(lo1, lo2) > min(hi1, hi2):
                return False
        if not _prefixes_intersect(self.src, other.src) or not _prefixes_intersect(self.dst, other.dst):
            return False
        if self.payload and other.payload:
            # Lengths are lower bounds only, so the patterns conflict only
            # where masked bits at the same absolute offset disagree.
            return _byte_constraints(self.payload + other.payload) is not None
        return True

    def covers(self, other: "Match") -> bool:
        """Exact: True iff every packet matching ``other`` also matches ``self``."""
        if self.proto is not None and self.proto != other.proto:
            return False
        for mine, theirs in ((self.src_port, other.src_port), (self.dst_port, other.dst_port)):
            lo1, hi1 = port_bounds(mine)
            lo2, hi2 = port_bounds(theirs)
            if not (lo1 <= lo2 and hi2 <= hi1):
                return False
        if not _prefix_covers(self.src, other.src) or not _prefix_covers(self.dst, other.dst):
            return False
        if self.payload:
            if other._payload_end < self._payload_end:
                return False  # other admits payloads too short for self
            # Every bit self tests must be forced by other to the same value.
            forced = _byte_constraints(other.payload) or {}
            for offset, (value, mask) in (_byte_constraints(self.payload) or {}).items():
                other_value, other_mask = forced.get(offset, (0, 0))
                if mask & ~other_mask or (value ^ other_value) & mask:
                    return False
        return True

    # ---------------------------------------------------------- msgpack
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.proto is not None:
            out["proto"] = self.proto
        if self.src is not None:
            out["src"] = self.src
        if self.dst is not None:
            out["dst"] = self.dst
        for key in ("src_port", "dst_port"):
            port = getattr(self, key)
            if port is not None:
                out[key] = port if isinstance(port, int) else list(port)
        if self.payload:
            out["payload"] = [p.to_dict() for p in self.payload]
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "Match":
        data = _check_map(data, "match", {"proto", "src", "dst", "src_port", "dst_port", "payload"})
        patterns = data.get("payload", ())
        if patterns is None:
            patterns = ()
        if not isinstance(patterns, (list, tuple)):
            raise RuleError(f"match payload must be a list of patterns, got {type(patterns).__name__}")
        return cls(
            proto=data.get("proto"),
            src=data.get("src"),
            dst=data.get("dst"),
            src_port=data.get("src_port"),
            dst_port=data.get("dst_port"),
            payload=tuple(PayloadPattern.from_dict(p) for p in patterns),
        )

    def describe(self) -> str:
        """A short human form, e.g. ``udp dst 10.0.0.0/8 dport 7000``."""
        names = {v: k for k, v in PROTO_NAMES.items()}
        parts = []
        if self.proto is not None:
            parts.append(names.get(self.proto, f"proto {self.proto}"))
        for label, value in (("src", self.src), ("dst", self.dst)):
            if value is not None:
                parts.append(f"{label} {value}")
        for label, port in (("sport", self.src_port), ("dport", self.dst_port)):
            if port is not None:
                parts.append(f"{label} {port}" if isinstance(port, int) else f"{label} {port[0]}-{port[1]}")
        for p in self.payload:
            mask = f"/{p.mask.hex()}" if p.mask is not None else ""
            parts.append(f"payload[{p.offset}]={p.value.hex()}{mask}")
        return " ".join(parts) or "any"


# ------------------------------------------------------------------ rule

@dataclass(frozen=True, slots=True)
class Rule:
    """A match, what to do with matching packets, and who asked."""

    match: Match
    action: Action
    priority: int = 100     # higher wins
    owner: str = ""
    cookie: int = 0
    group: int | None = None   # the multicast group of a MULTICAST rule

    def __post_init__(self) -> None:
        if not isinstance(self.match, Match):
            raise RuleError(f"rule match must be a Match, got {type(self.match).__name__}")
        action = Action.parse(self.action)
        object.__setattr__(self, "action", action)
        if not _is_int(self.priority) or not PRIORITY_MIN <= self.priority <= PRIORITY_MAX:
            raise RuleError(f"priority must be a 32-bit signed int, got {self.priority!r}")
        if not isinstance(self.owner, str):
            raise RuleError(f"owner must be a string, got {type(self.owner).__name__}")
        if not _is_int(self.cookie) or not 0 <= self.cookie <= COOKIE_MAX:
            raise RuleError(f"cookie must be an int in 0..2**64-1, got {self.cookie!r}")
        if action is Action.MULTICAST:
            if not _is_int(self.group) or not 0 <= self.group <= GROUP_MAX:
                raise RuleError(f"a MULTICAST rule needs a group in 0..2**32-1, got {self.group!r}")
        elif self.group is not None:
            raise RuleError(f"only MULTICAST rules take a group ({action.name} rule has group {self.group!r})")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "match": self.match.to_dict(),
            "action": self.action.value,
            "priority": self.priority,
            "owner": self.owner,
            "cookie": self.cookie,
        }
        if self.group is not None:
            out["group"] = self.group
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "Rule":
        data = _check_map(data, "rule", {"match", "action", "priority", "owner", "cookie", "group"},
                          {"match", "action"})
        action = data["action"]
        if not isinstance(action, str):
            raise RuleError(f"rule action must be a string, got {type(action).__name__}")
        return cls(
            match=Match.from_dict(data["match"]),
            action=Action.parse(action),
            priority=data.get("priority", 100),
            owner=data.get("owner", ""),
            cookie=data.get("cookie", 0),
            group=data.get("group"),
        )

    def describe(self) -> str:
        group = f" group {self.group}" if self.group is not None else ""
        return f"{self.action.name}{group} [{self.match.describe()}] prio {self.priority} owner {self.owner or '-'} cookie {self.cookie}"
