"""The reference packet classifier, in pure Python.

Used by the ``user`` engine and the NP emulator to decide what happens to a
packet, and by the tests as the oracle the other engines are checked against.

Semantics (the contract every engine implements):

* the *terminal* decision is the highest-priority matching rule whose action
  is REDIRECT, DROP, MULTICAST or FORWARD; ties go to the rule added first;
  no matching terminal rule means the default, FORWARD;
* *every* matching COPY rule also gets the packet, whatever its priority;
* each rule that takes part in a decision counts one packet and its bytes.

Rules are indexed so a lookup only evaluates rules that can match:

1. exact 5-tuple rules (no wildcards, no payload) in a dict: one hash probe;
2. other rules with an exact destination port, bucketed by that port;
3. other rules with a destination prefix, in one hash table per prefix
   length keyed by the masked network (as a software LPM does, but
   collecting every length, since priorities decide, not lengths);
4. everything else in one list.

The table is bounded (``max_rules``); refusals are counted.
"""

from __future__ import annotations

import bisect
import itertools
from typing import TYPE_CHECKING, Iterator

from boxcore.rules import Action, Rule, _prefix_key, address_key

if TYPE_CHECKING:
    from boxcore.packet import Packet

DEFAULT_MAX_RULES = 10_000


class ClassifierError(ValueError):
    """A rule the classifier cannot take (cookie already used by another rule)."""


class TableFull(ClassifierError):
    """The classifier already holds ``max_rules`` rules."""


class Decision:
    """The outcome of :meth:`Classifier.lookup`.

    ``terminal`` is the winning REDIRECT/DROP/MULTICAST/FORWARD rule, or None
    for the default (forward); ``copies`` every matching COPY rule, highest
    priority first.  Iterating gives the terminal rule (if any) then the
    copies, so a Decision can be used where a ``list[Rule]`` is expected.
    (A plain slotted class rather than a frozen dataclass: one is built per
    packet, and frozen dataclasses construct several times slower.)
    """

    __slots__ = ("terminal", "copies")

    def __init__(self, terminal: Rule | None, copies: tuple[Rule, ...] = ()) -> None:
        self.terminal = terminal
        self.copies = copies

    @property
    def action(self) -> Action:
        return Action.FORWARD if self.terminal is None else self.terminal.action

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self.copies if self.terminal is None else (self.terminal, *self.copies)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.copies) + (self.terminal is not None)

    def __getitem__(self, index):
        return self.rules[index]

    def __bool__(self) -> bool:
        return self.terminal is not None or bool(self.copies)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Decision):
            return NotImplemented
        return self.terminal == other.terminal and self.copies == other.copies

    def __hash__(self) -> int:
        return hash((self.terminal, self.copies))

    def __repr__(self) -> str:
        return f"Decision(terminal={self.terminal!r}, copies={self.copies!r})"


DEFAULT_DECISION = Decision(None, ())


class _Entry:
    """A rule with its order key and live counters."""

    __slots__ = ("rule", "order", "packets", "bytes", "bucket")

    def __init__(self, rule: Rule, seq: int) -> None:
        self.rule = rule
        self.order = (-rule.priority, seq)   # sorts best first
        self.packets = 0
        self.bytes = 0
        self.bucket: list[_Entry] | None = None


def _order(entry: _Entry) -> tuple[int, int]:
    return entry.order


class Classifier:
    """Priority classifier over :class:`~boxcore.rules.Rule` objects, keyed by cookie."""

    def __init__(self, max_rules: int = DEFAULT_MAX_RULES) -> None:
        if max_rules <= 0:
            raise ValueError(f"max_rules must be positive, got {max_rules}")
        self.max_rules = max_rules
        self._seq = itertools.count()
        self._by_cookie: dict[int, _Entry] = {}
        self._exact: dict[tuple, list[_Entry]] = {}
        self._by_dport: dict[int, list[_Entry]] = {}
        # (version, prefix length) -> (mask, {network int: bucket})
        self._by_prefix: dict[tuple[int, int], tuple[int, dict[int, list[_Entry]]]] = {}
        self._general: list[_Entry] = []
        self.stats = {"refused": 0, "lookups": 0, "default_forward": 0, "added": 0, "removed": 0}

    # ---------------------------------------------------------- table edits
    def __len__(self) -> int:
        return len(self._by_cookie)

    def __contains__(self, cookie: int) -> bool:
        return cookie in self._by_cookie

    def get(self, cookie: int) -> Rule | None:
        entry = self._by_cookie.get(cookie)
        return None if entry is None else entry.rule

    def rules(self) -> list[Rule]:
        """All rules, in decision order (highest priority, then oldest, first)."""
        return [e.rule for e in sorted(self._by_cookie.values(), key=_order)]

    def add(self, rule: Rule) -> bool:
        """Install ``rule``.  Returns False if this exact rule is already
        installed (idempotent); raises :class:`ClassifierError` if its cookie
        names a different rule and :class:`TableFull` at ``max_rules``."""
        existing = self._by_cookie.get(rule.cookie)
        if existing is not None:
            if existing.rule == rule:
                return False
            raise ClassifierError(f"cookie {rule.cookie} already names another rule ({existing.rule.describe()})")
        if len(self._by_cookie) >= self.max_rules:
            self.stats["refused"] += 1
            raise TableFull(f"classifier full: {self.max_rules} rules")
        entry = _Entry(rule, next(self._seq))
        bucket = self._bucket_for(rule, create=True)
        bisect.insort(bucket, entry, key=_order)
        entry.bucket = bucket
        self._by_cookie[rule.cookie] = entry
        self.stats["added"] += 1
        return True

    def remove(self, cookie: int) -> Rule | None:
        """Remove the rule named ``cookie``; returns it, or None if absent."""
        entry = self._by_cookie.pop(cookie, None)
        if entry is None:
            return None
        entry.bucket.remove(entry)
        if not entry.bucket:
            self._drop_empty_bucket(entry.rule)
        self.stats["removed"] += 1
        return entry.rule

    def clear(self) -> None:
        for cookie in list(self._by_cookie):
            self.remove(cookie)

    def _bucket_for(self, rule: Rule, create: bool) -> list[_Entry]:
        match = rule.match
        key = match.exact_key()
        if key is not None:
            return self._exact.setdefault(key, []) if create else self._exact[key]
        if isinstance(match.dst_port, int):
            return self._by_dport.setdefault(match.dst_port, []) if create else self._by_dport[match.dst_port]
        if match.dst is not None:
            version, network, mask, length = _prefix_key(match.dst)
            if create:
                _, table = self._by_prefix.setdefault((version, length), (mask, {}))
                return table.setdefault(network, [])
            return self._by_prefix[(version, length)][1][network]
        return self._general

    def _drop_empty_bucket(self, rule: Rule) -> None:
        match = rule.match
        key = match.exact_key()
        if key is not None:
            del self._exact[key]
        elif isinstance(match.dst_port, int):
            del self._by_dport[match.dst_port]
        elif match.dst is not None:
            version, network, _mask, length = _prefix_key(match.dst)
            _, table = self._by_prefix[(version, length)]
            del table[network]
            if not table:
                del self._by_prefix[(version, length)]

    # ---------------------------------------------------------- lookups
    def _candidates(self, pkt: "Packet") -> Iterator[list[_Entry]]:
        if self._exact:
            bucket = self._exact.get((pkt.proto, pkt.src, pkt.sport, pkt.dst, pkt.dport))
            if bucket:
                yield bucket
        if self._by_dport:
            bucket = self._by_dport.get(pkt.dport)
            if bucket:
                yield bucket
        if self._by_prefix:
            dst = address_key(pkt.dst)
            if dst is not None:
                version, value = dst
                for (table_version, _length), (mask, table) in self._by_prefix.items():
                    if table_version == version:
                        bucket = table.get(value & mask)
                        if bucket:
                            yield bucket
        if self._general:
            yield self._general

    def _decide(self, pkt: "Packet") -> tuple[_Entry | None, list[_Entry]]:
        best: _Entry | None = None
        copies: list[_Entry] = []
        for bucket in self._candidates(pkt):
            for entry in bucket:
                rule = entry.rule
                if rule.action is Action.COPY:
                    if rule.match.matches(pkt):
                        copies.append(entry)
                elif best is not None and best.order < entry.order:
                    continue   # cannot win; buckets are sorted, but COPYs may follow
                elif rule.match.matches(pkt):
                    best = entry
        if len(copies) > 1:
            copies.sort(key=_order)
        return best, copies

    def peek(self, pkt: "Packet") -> Decision:
        """The decision for ``pkt`` without counting it."""
        best, copies = self._decide(pkt)
        if best is None and not copies:
            return DEFAULT_DECISION
        return Decision(None if best is None else best.rule, tuple(e.rule for e in copies))

    def lookup(self, pkt: "Packet", nbytes: int | None = None) -> Decision:
        """Classify ``pkt`` and count it (``nbytes``, default the payload
        length) against every rule that takes part in the decision."""
        best, copies = self._decide(pkt)
        stats = self.stats
        stats["lookups"] += 1
        size = len(pkt.payload) if nbytes is None else nbytes
        if best is None:
            stats["default_forward"] += 1
            if not copies:
                return DEFAULT_DECISION
        else:
            best.packets += 1
            best.bytes += size
        for entry in copies:
            entry.packets += 1
            entry.bytes += size
        return Decision(None if best is None else best.rule, tuple(e.rule for e in copies) if copies else ())

    # ---------------------------------------------------------- counters
    def count(self, cookie: int, nbytes: int, packets: int = 1) -> None:
        """Add to a rule's counters (engines that classify elsewhere use this)."""
        entry = self._by_cookie.get(cookie)
        if entry is not None:
            entry.packets += packets
            entry.bytes += nbytes

    def counters(self) -> dict[int, tuple[int, int]]:
        """{cookie: (packets, bytes)} for every installed rule."""
        return {cookie: (e.packets, e.bytes) for cookie, e in self._by_cookie.items()}
