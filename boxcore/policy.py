"""Which boosters may claim which traffic: the box's policy file.

A policy is a list of grants (TOML, ``[[grant]]`` tables).  A grant names
the boosters it applies to (by name pattern, and optionally by Unix uid from
SO_PEERCRED) and the region of traffic and actions it allows.  A rule is
allowed only if **one** grant that applies to the booster allows its action
and *covers* its match: every packet the rule could match lies in the
grant's region.  Anything else is refused, with a reason naming what the
closest grant does not allow.  No grant at all means nothing is allowed;
:meth:`Policy.allow_all` is the permissive policy boxd uses without
``--policy``.

See ``boxcore/policy.example.toml`` for the format.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import pwd
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boxcore.packet import PROTO_NAMES
from boxcore.rules import Action, Match, Rule, RuleError, parse_port, parse_proto, port_bounds


class PolicyError(ValueError):
    """A policy file that cannot be read or parsed: names the file, the line and what is wrong.

    boxd reports it as a configuration error (one line, exit status 2).
    """


_PROTO_LABELS = {v: k for k, v in PROTO_NAMES.items()}
_GRANT_KEYS = {"name", "boosters", "booster", "uids", "users", "actions", "protocols",
               "src_prefixes", "dst_prefixes", "src_ports", "dst_ports",
               "send", "copy_foreign", "max_group_members", "member_prefixes"}
_MANAGEMENT_KEYS = {"uids", "users"}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _merge_ranges(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Union of inclusive ranges as sorted, disjoint, non-adjacent ranges, so
    a range is inside the union iff it is inside one of them."""
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return tuple((lo, hi) for lo, hi in merged)


def _format_ranges(ranges: tuple[tuple[int, int], ...]) -> str:
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


@dataclass(frozen=True)
class Grant:
    """One ``[[grant]]``: who, which actions, which traffic (None = any)."""

    name: str
    boosters: tuple[str, ...]                       # fnmatch patterns on the booster name
    uids: frozenset[int] | None = None
    actions: frozenset[Action] = frozenset(Action)
    protocols: frozenset[int] | None = None
    src_prefixes: tuple[Network, ...] | None = None  # collapsed
    dst_prefixes: tuple[Network, ...] | None = None
    src_ports: tuple[tuple[int, int], ...] | None = None   # merged
    dst_ports: tuple[tuple[int, int], ...] | None = None
    send: bool = False                  # may inject packets lying in the region (booster.send)
    copy_foreign: bool = False          # may COPY traffic another uid's booster holds
    max_group_members: int | None = None
    member_prefixes: tuple[Network, ...] | None = None   # where multicast members may be (None: anywhere)
    line: int = 0

    def names(self, booster: str) -> bool:
        return any(fnmatch.fnmatchcase(booster, pattern) for pattern in self.boosters)

    def applies_to(self, booster: str, uid: int | None) -> bool:
        if not self.names(booster):
            return False
        return self.uids is None or (uid is not None and uid in self.uids)

    def why_not(self, rule: Rule) -> str | None:
        """None if this grant allows ``rule``, else what it does not allow."""
        match = rule.match
        if rule.action not in self.actions:
            allowed = ", ".join(sorted(a.name for a in self.actions))
            return f"grant {self.name!r} allows actions {allowed}, not {rule.action.name}"
        if self.protocols is not None and match.proto not in self.protocols:
            allowed = ", ".join(_PROTO_LABELS.get(p, str(p)) for p in sorted(self.protocols))
            asked = "any protocol" if match.proto is None else _PROTO_LABELS.get(match.proto, str(match.proto))
            return f"grant {self.name!r} allows protocols {allowed}, not {asked}"
        for label, prefixes, asked in (("source", self.src_prefixes, match.src),
                                       ("destination", self.dst_prefixes, match.dst)):
            if prefixes is not None and not self._prefix_inside(asked, prefixes):
                allowed = ", ".join(map(str, prefixes))
                return f"grant {self.name!r} allows {label} prefixes {allowed}, not {asked or 'any address'}"
        for label, ranges, asked in (("source", self.src_ports, match.src_port),
                                     ("destination", self.dst_ports, match.dst_port)):
            if ranges is None:
                continue
            lo, hi = port_bounds(asked)
            if not any(glo <= lo and hi <= ghi for glo, ghi in ranges):
                text = "any port" if asked is None else (f"{lo}" if lo == hi else f"{lo}-{hi}")
                return f"grant {self.name!r} allows {label} ports {_format_ranges(ranges)}, not {text}"
        return None

    def holds_point(self, proto: int, src: str | None, sport: int | None, dst: str | None,
                    dport: int | None) -> bool:
        """True if the packet (or, with src/sport None, any source) lies in this grant's region."""
        if self.protocols is not None and proto not in self.protocols:
            return False
        for prefixes, address in ((self.src_prefixes, src), (self.dst_prefixes, dst)):
            if prefixes is not None:
                if address is None:
                    return False
                ip = ipaddress.ip_address(address)
                if not any(ip.version == p.version and ip in p for p in prefixes):
                    return False
        for ranges, port in ((self.src_ports, sport), (self.dst_ports, dport)):
            if ranges is not None:
                if port is None or not any(lo <= port <= hi for lo, hi in ranges):
                    return False
        return True

    @staticmethod
    def _prefix_inside(asked: str | None, prefixes: tuple[Network, ...]) -> bool:
        if asked is None:
            return False    # a wildcard spans every address of both families
        net = ipaddress.ip_network(asked)
        return any(net.version == p.version and net.subnet_of(p) for p in prefixes)


class Policy:
    """The grants of a policy file; :meth:`check` decides a rule request."""

    def __init__(self, grants: list[Grant], *, allow_everything: bool = False, source: str = "",
                 managers: frozenset[int] = frozenset()) -> None:
        self.grants = list(grants)
        self.allow_everything = allow_everything
        self.source = source
        self.managers = frozenset(managers)   # uids that may query boxd (root always may)

    @classmethod
    def allow_all(cls) -> "Policy":
        return cls([], allow_everything=True, source="allow-all")

    def check(self, booster: str, uid: int | None, rule: Rule) -> str | None:
        """None if ``booster`` (running as ``uid``) may install ``rule``, else
        the reason, for a PERMISSION_DENIED reply."""
        if self.allow_everything:
            return None
        reasons = []
        for grant in self.grants:
            if grant.applies_to(booster, uid):
                reason = grant.why_not(rule)
                if reason is None:
                    return None
                reasons.append(reason)
            elif grant.names(booster):
                uids = ", ".join(map(str, sorted(grant.uids or ())))
                reasons.append(f"grant {grant.name!r} is only for uids {uids}")
        who = f"booster {booster!r} (uid {uid if uid is not None else 'unknown'})"
        if not reasons:
            return f"{who}: no grant in the policy applies"
        return f"{who} may not {rule.action.name} [{rule.match.describe()}]: " + "; ".join(reasons)

    # ---------------------------------------------------------- beyond rules
    # Under allow-all every rule, name and group is allowed, but two things stay with root:
    # sending from a source the booster holds no rule for, and copying traffic that a booster
    # of another uid holds.  A policy file grants them explicitly (``send``, ``copy_foreign``).

    def _who(self, booster: str, uid: int | None) -> str:
        return f"booster {booster!r} (uid {uid if uid is not None else 'unknown'})"

    def may_use_name(self, booster: str, uid: int | None) -> str | None:
        """None if ``uid`` may run a booster named ``booster``: the grants naming it bind it to
        their uids (a name no grant covers may register, and is then granted nothing)."""
        if self.allow_everything:
            return None
        naming = [g for g in self.grants if g.names(booster)]
        if not naming or any(g.applies_to(booster, uid) for g in naming):
            return None
        uids = sorted({u for g in naming for u in (g.uids or ())})
        return (f"{self._who(booster, uid)}: the policy binds this name to uid"
                f"{'s' if len(uids) > 1 else ''} {', '.join(map(str, uids))}")

    def may_query(self, uid: int | None) -> str | None:
        """None if ``uid`` may read boxd's state (boxctl, ``query``)."""
        if self.allow_everything or uid == 0 or uid in self.managers:
            return None
        return f"uid {uid} may not query boxd (the policy's [management] uids may)"

    def may_send(self, booster: str, uid: int | None, proto: int, src: str | None, sport: int | None,
                 dst: str | None, dport: int | None) -> str | None:
        """None if a grant lets ``booster`` inject this packet whatever rules it holds
        (src/sport None: a multicast fan-out from that port, whatever the address)."""
        if uid == 0 and self.allow_everything:
            return None
        for grant in self.grants:
            if grant.send and grant.applies_to(booster, uid) and grant.holds_point(proto, src, sport, dst, dport):
                return None
        source = f"{src}:{sport}" if src is not None else f"port {sport}"
        return (f"{self._who(booster, uid)} may not send from {source} to {dst}:{dport}: "
                "it holds no rule for that traffic and no grant with send = true covers it")

    def may_copy_foreign(self, booster: str, uid: int | None, rule: Rule) -> str | None:
        """None if ``booster`` may COPY ``rule``'s traffic although a booster of another uid holds it."""
        if uid == 0 and self.allow_everything:
            return None
        for grant in self.grants:
            if grant.copy_foreign and grant.applies_to(booster, uid) and grant.why_not(rule) is None:
                return None
        return (f"{self._who(booster, uid)} may not copy [{rule.match.describe()}]: a booster of another "
                "uid holds that traffic (a grant with copy_foreign = true may allow it)")

    def check_group(self, booster: str, uid: int | None, members: list[tuple[str, int]]) -> str | None:
        """None if ``booster`` may fan out to ``members`` (a grant with action multicast whose
        ``member_prefixes`` hold every member, and its ``max_group_members``)."""
        if self.allow_everything:
            return None
        reasons = []
        for grant in self.grants:
            if not grant.applies_to(booster, uid):
                continue
            if Action.MULTICAST not in grant.actions:
                reasons.append(f"grant {grant.name!r} does not allow multicast")
                continue
            if grant.max_group_members is not None and len(members) > grant.max_group_members:
                reasons.append(f"grant {grant.name!r} allows {grant.max_group_members} members, not {len(members)}")
                continue
            outside = [f"{h}:{p}" for h, p in members if not _holds_member(grant, h)]
            if outside:
                reasons.append(f"grant {grant.name!r} does not cover member {outside[0]}")
                continue
            return None
        if not reasons:
            return f"{self._who(booster, uid)}: no grant in the policy applies"
        return f"{self._who(booster, uid)} may not fan out to that group: " + "; ".join(reasons)

    def describe(self) -> list[dict[str, Any]]:
        """A JSON-able summary (for the management API)."""
        if self.allow_everything:
            return [{"name": "allow-all"}]
        out = []
        for g in self.grants:
            out.append({
                "name": g.name, "boosters": list(g.boosters),
                "uids": None if g.uids is None else sorted(g.uids),
                "actions": sorted(a.value for a in g.actions),
                "protocols": None if g.protocols is None else sorted(g.protocols),
                "src_prefixes": None if g.src_prefixes is None else [str(p) for p in g.src_prefixes],
                "dst_prefixes": None if g.dst_prefixes is None else [str(p) for p in g.dst_prefixes],
                "src_ports": None if g.src_ports is None else _format_ranges(g.src_ports),
                "dst_ports": None if g.dst_ports is None else _format_ranges(g.dst_ports),
                "send": g.send, "copy_foreign": g.copy_foreign, "max_group_members": g.max_group_members,
                "member_prefixes": None if g.member_prefixes is None else [str(p) for p in g.member_prefixes],
            })
        return out

    # ---------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        """Read a policy file; any problem is a :class:`PolicyError` naming
        the file, the line and what is wrong."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise PolicyError(f"cannot read policy {path}: {exc.strerror or exc}") from None
        return cls.loads(text, source=str(path))

    @classmethod
    def loads(cls, text: str, source: str = "<policy>") -> "Policy":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"{source}: {exc}") from None
        unknown = set(data) - {"grant", "management"}
        if unknown:
            raise PolicyError(f"{source}: unknown top-level key(s) {', '.join(sorted(unknown))} "
                              "(expected [[grant]] tables and a [management] table)")
        managers: set[int] = set()
        management = data.get("management", {})
        try:
            if not isinstance(management, dict):
                raise ValueError("must be a table")
            extra = set(management) - _MANAGEMENT_KEYS
            if extra:
                raise ValueError(f"unknown key(s) {', '.join(sorted(extra))}; allowed: uids, users")
            managers = _parse_uids(management) or set()
        except (ValueError, TypeError) as exc:
            raise PolicyError(f"{source}: [management]: {exc}") from None
        tables = data.get("grant", [])
        if not isinstance(tables, list):
            raise PolicyError(f"{source}: 'grant' must be an array of tables ([[grant]])")
        # tomllib keeps no positions: find each [[grant]] header for messages.
        lines = [i + 1 for i, line in enumerate(text.splitlines()) if re.match(r"\s*\[\[\s*grant\s*\]\]", line)]
        grants = []
        for index, table in enumerate(tables):
            line = lines[index] if index < len(lines) else 0
            where = f"{source}:{line}: grant #{index + 1}"
            try:
                grants.append(_parse_grant(table, index, line))
            except (ValueError, TypeError, KeyError) as exc:
                raise PolicyError(f"{where}: {exc}") from None
        return cls(grants, source=source, managers=frozenset(managers))


# -------------------------------------------------------------- parsing

def _list(table: dict, key: str, kind: type | tuple) -> list | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, list):
        value = [value]
    for item in value:
        if not isinstance(item, kind) or isinstance(item, bool):
            raise ValueError(f"{key}: {item!r} has the wrong type")
    return value


def _port_range(item: Any, key: str) -> tuple[int, int]:
    if isinstance(item, str):
        lo_text, dash, hi_text = item.partition("-")
        try:
            item = int(lo_text) if not dash else [int(lo_text), int(hi_text)]
        except ValueError:
            raise ValueError(f"{key}: {item!r} is not a port or 'lo-hi' range") from None
    try:
        return port_bounds(parse_port(item, key))
    except RuleError as exc:
        raise ValueError(str(exc)) from None


def _parse_grant(table: Any, index: int, line: int) -> Grant:
    if not isinstance(table, dict):
        raise ValueError("must be a table")
    unknown = set(table) - _GRANT_KEYS
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}; "
                         f"allowed: {', '.join(sorted(_GRANT_KEYS))}")
    if "booster" in table and "boosters" in table:
        raise ValueError("give either 'booster' or 'boosters', not both")
    boosters = _list(table, "boosters", str) or _list(table, "booster", str)
    if not boosters:
        raise ValueError("needs 'boosters' (a name or glob pattern, or a list of them)")
    name = table.get("name", boosters[0] if len(boosters) == 1 else f"grant-{index + 1}")
    if not isinstance(name, str):
        raise ValueError("name must be a string")

    uids = _parse_uids(table)

    action_list = _list(table, "actions", str)
    actions = frozenset(Action)
    if action_list is not None:
        try:
            actions = frozenset(Action.parse(a) for a in action_list)
        except RuleError as exc:
            raise ValueError(f"actions: {exc}") from None

    protocols = None
    proto_list = _list(table, "protocols", (str, int))
    if proto_list is not None:
        try:
            protocols = frozenset(parse_proto(p) for p in proto_list)
        except RuleError as exc:
            raise ValueError(f"protocols: {exc}") from None

    prefixes: dict[str, tuple[Network, ...] | None] = {}
    for key in ("src_prefixes", "dst_prefixes", "member_prefixes"):
        items = _list(table, key, str)
        if items is None:
            prefixes[key] = None
            continue
        nets = []
        for item in items:
            try:
                nets.append(ipaddress.ip_network(item, strict=True))
            except ValueError as exc:
                raise ValueError(f"{key}: {item!r}: {exc}") from None
        # Collapse so a prefix covered by several adjacent grants' halves
        # counts as covered (10.0.0.0/9 + 10.128.0.0/9 covers 10.0.0.0/8).
        collapsed = [n for version in (4, 6) for n in
                     ipaddress.collapse_addresses(x for x in nets if x.version == version)]
        prefixes[key] = tuple(collapsed)

    ports: dict[str, tuple[tuple[int, int], ...] | None] = {}
    for key in ("src_ports", "dst_ports"):
        items = _list(table, key, (str, int, list))
        ports[key] = None if items is None else _merge_ranges([_port_range(i, key) for i in items])

    flags = {}
    for key in ("send", "copy_foreign"):
        value = table.get(key, False)
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false")
        flags[key] = value
    max_members = table.get("max_group_members")
    if max_members is not None and (not isinstance(max_members, int) or isinstance(max_members, bool)
                                    or max_members < 1):
        raise ValueError("max_group_members must be a positive integer")

    return Grant(name=name, boosters=tuple(boosters), uids=None if uids is None else frozenset(uids),
                 send=flags["send"], copy_foreign=flags["copy_foreign"], max_group_members=max_members,
                 member_prefixes=prefixes["member_prefixes"],
                 actions=actions, protocols=protocols,
                 src_prefixes=prefixes["src_prefixes"], dst_prefixes=prefixes["dst_prefixes"],
                 src_ports=ports["src_ports"], dst_ports=ports["dst_ports"], line=line)


def _parse_uids(table: dict) -> set[int] | None:
    """``uids`` and ``users`` of a table as one set of uids (None when neither is given)."""
    uid_list = _list(table, "uids", int)
    user_list = _list(table, "users", str)
    if uid_list is None and user_list is None:
        return None
    uids: set[int] = set()
    for uid in uid_list or []:
        if uid < 0:
            raise ValueError(f"uids: {uid} is negative")
        uids.add(uid)
    for user in user_list or []:
        try:
            uids.add(pwd.getpwnam(user).pw_uid)
        except KeyError:
            raise ValueError(f"users: no such user {user!r}") from None
    return uids


def _holds_member(grant: Grant, host: str) -> bool:
    if grant.member_prefixes is None:
        return True
    ip = ipaddress.ip_address(host)
    return any(ip.version == p.version and ip in p for p in grant.member_prefixes)


def grant_region(grant: Grant) -> list[Match]:
    """The grant's traffic region as a union of Matches (for tests and tools)."""
    protos = [None] if grant.protocols is None else sorted(grant.protocols)
    srcs = [None] if grant.src_prefixes is None else [str(p) for p in grant.src_prefixes]
    dsts = [None] if grant.dst_prefixes is None else [str(p) for p in grant.dst_prefixes]
    sports = [None] if grant.src_ports is None else list(grant.src_ports)
    dports = [None] if grant.dst_ports is None else list(grant.dst_ports)
    return [Match(proto=p, src=s, dst=d, src_port=sp, dst_port=dp)
            for p in protos for s in srcs for d in dsts for sp in sports for dp in dports]
