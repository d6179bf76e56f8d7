"""The card's lookup tables, modelled on the NP4GS3 tree search engine.

* :class:`LpmTable` - longest-prefix match (the forwarding table): a multibit
  trie with 8-bit strides and prefix expansion inside each node, so a lookup
  is at most four array reads whatever the number of prefixes.
* :class:`RuleTable` - the software-managed multi-field table (booster rules:
  value/mask fields, port ranges, payload patterns, priorities).  Rules are
  filed by shape: a full-match hash on the exact 5-tuple, hash buckets on
  (protocol, destination port) for rules with an exact protocol and a small
  destination-port range, and a short list for the rest.  A lookup reads one
  exact entry, one bucket and the wildcard list, so its cost does not grow
  with the number of rules filed under other keys.

Every table is bounded by its ``limit``; an insert beyond it is refused and
counted.
"""

from __future__ import annotations

import collections
from typing import Any, Iterator

from npdrv.wire import NpAction, NpRule, prefix_mask

MAX_BUCKET_SPAN = 64     # a dst-port range up to this wide is filed in per-port buckets


class TableFull(Exception):
    pass


class _Node:
    __slots__ = ("slots", "children")

    def __init__(self) -> None:
        self.slots: list[tuple[int, Any] | None] = [None] * 256
        self.children: dict[int, _Node] = {}


class LpmTable:
    """IPv4 longest-prefix match: ``add((addr, plen), value)``, ``lookup(addr)``."""

    def __init__(self, limit: int = 65536) -> None:
        self.limit = limit
        self._prefixes: dict[tuple[int, int], Any] = {}
        self._default: Any = None
        self._root = _Node()
        self.stats: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._prefixes)

    def items(self) -> Iterator[tuple[tuple[int, int], Any]]:
        return iter(sorted(self._prefixes.items()))

    def get(self, prefix: tuple[int, int]) -> Any:
        return self._prefixes.get(prefix)

    def add(self, prefix: tuple[int, int], value: Any) -> None:
        addr, plen = prefix
        if prefix not in self._prefixes and len(self._prefixes) >= self.limit:
            self.stats["refused_full"] += 1
            raise TableFull(f"forwarding table holds {self.limit} prefixes")
        self._prefixes[prefix] = value
        if plen == 0:
            self._default = value
            return
        node, first, count = self._span(addr, plen, create=True)
        for idx in range(first, first + count):
            slot = node.slots[idx]
            if slot is None or slot[0] <= plen:
                node.slots[idx] = (plen, value)

    def delete(self, prefix: tuple[int, int]) -> bool:
        if prefix not in self._prefixes:
            return False
        del self._prefixes[prefix]
        addr, plen = prefix
        if plen == 0:
            self._default = None
            return True
        node, first, count = self._span(addr, plen, create=False)
        level_base = ((plen - 1) // 8) * 8
        shift = 24 - level_base
        for idx in range(first, first + count):
            slot = node.slots[idx]
            if slot is None or slot[0] != plen:
                continue      # a longer prefix owns this slot
            slot_addr = (addr & ~(0xFF << shift) & 0xFFFFFFFF) | (idx << shift)
            node.slots[idx] = None
            for shorter in range(plen - 1, level_base, -1):   # the next best prefix in this node
                key = (slot_addr & prefix_mask(shorter), shorter)
                if key in self._prefixes:
                    node.slots[idx] = (shorter, self._prefixes[key])
                    break
        self._prune(addr, plen)
        return True

    def lookup(self, addr: int) -> Any:
        best = self._default
        node: _Node | None = self._root
        shift = 24
        while node is not None:
            idx = (addr >> shift) & 0xFF
            slot = node.slots[idx]
            if slot is not None:
                best = slot[1]
            node = node.children.get(idx) if node.children else None
            shift -= 8
        return best

    def _span(self, addr: int, plen: int, create: bool) -> tuple[_Node, int, int]:
        level = (plen - 1) // 8
        node = self._root
        for depth in range(level):
            byte = (addr >> (24 - 8 * depth)) & 0xFF
            child = node.children.get(byte)
            if child is None:
                if not create:
                    raise KeyError(addr)
                child = node.children[byte] = _Node()
            node = child
        bits = plen - 8 * level
        byte = (addr >> (24 - 8 * level)) & 0xFF
        first = byte & (0xFF << (8 - bits)) & 0xFF
        return node, first, 1 << (8 - bits)

    def _prune(self, addr: int, plen: int) -> None:
        """Drop nodes left with no slots and no children (bounded memory under churn)."""
        path = [self._root]
        for depth in range((plen - 1) // 8):
            child = path[-1].children.get((addr >> (24 - 8 * depth)) & 0xFF)
            if child is None:
                return
            path.append(child)
        for depth in range(len(path) - 1, 0, -1):
            node = path[depth]
            if node.children or any(slot is not None for slot in node.slots):
                return
            del path[depth - 1].children[(addr >> (24 - 8 * (depth - 1))) & 0xFF]


class CompiledRule:
    """A rule in the form the data path matches against, with its counters."""

    __slots__ = ("rule", "rule_id", "priority", "action", "group", "proto", "proto_mask", "src",
                 "src_mask", "dst", "dst_mask", "slo", "shi", "dlo", "dhi", "ports_any", "patterns",
                 "packets", "bytes", "order")

    def __init__(self, rule: NpRule) -> None:
        self.rule = rule
        self.rule_id = rule.rule_id
        self.priority = rule.priority
        self.action = rule.action
        self.group = rule.group
        self.proto, self.proto_mask = rule.proto, rule.proto_mask
        self.src, self.src_mask = rule.src, rule.src_mask
        self.dst, self.dst_mask = rule.dst, rule.dst_mask
        self.slo, self.shi = rule.sport
        self.dlo, self.dhi = rule.dport
        self.ports_any = rule.sport == (0, 0xFFFF) and rule.dport == (0, 0xFFFF)
        self.patterns = tuple((p.offset, p.value, p.mask) for p in rule.patterns)
        self.packets = 0
        self.bytes = 0
        self.order = (-rule.priority, rule.rule_id)   # sort key: higher priority first

    def matches(self, proto: int, src: int, dst: int, sport: int, dport: int, payload: bytes) -> bool:
        if proto & self.proto_mask != self.proto or src & self.src_mask != self.src \
                or dst & self.dst_mask != self.dst:
            return False
        if not self.ports_any:
            if sport < 0 or not (self.slo <= sport <= self.shi and self.dlo <= dport <= self.dhi):
                return False
        for offset, value, mask in self.patterns:
            chunk = payload[offset:offset + len(value)]
            if len(chunk) != len(value) or any(c & m != v for c, m, v in zip(chunk, mask, value)):
                return False
        return True

    @property
    def exact_key(self) -> tuple[int, int, int, int, int] | None:
        if (self.proto_mask == 0xFF and self.src_mask == 0xFFFFFFFF and self.dst_mask == 0xFFFFFFFF
                and self.slo == self.shi and self.dlo == self.dhi and not self.patterns):
            return (self.proto, self.src, self.dst, self.slo, self.dlo)
        return None


class RuleTable:
    """The multi-field classifier: the winning terminating rule plus every matching COPY."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self.rules: dict[int, CompiledRule] = {}
        self._exact: dict[tuple[int, int, int, int, int], list[CompiledRule]] = {}
        self._buckets: dict[tuple[int, int], list[CompiledRule]] = {}
        self._wild: list[CompiledRule] = []
        self._wild_index: dict[None, list[CompiledRule]] = {None: self._wild}
        self.stats: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[CompiledRule]:
        return iter(sorted(self.rules.values(), key=lambda r: r.order))

    def insert(self, rule: NpRule) -> CompiledRule:
        if len(self.rules) >= self.limit:
            self.stats["refused_full"] += 1
            raise TableFull(f"rule table holds {self.limit} rules")
        compiled = CompiledRule(rule)
        self.rules[rule.rule_id] = compiled
        for index, key in self._homes(compiled):
            lst = index.setdefault(key, [])
            lst.append(compiled)
            lst.sort(key=lambda r: r.order)
        return compiled

    def delete(self, rule_id: int) -> bool:
        compiled = self.rules.pop(rule_id, None)
        if compiled is None:
            return False
        for index, key in self._homes(compiled):
            lst = index[key]
            lst.remove(compiled)
            if not lst and index is not self._wild_index:
                del index[key]
        return True

    def clear(self) -> None:
        self.rules.clear()
        self._exact.clear()
        self._buckets.clear()
        self._wild.clear()

    def _homes(self, rule: CompiledRule) -> list[tuple[dict, object]]:
        """Where a rule is filed: (index, key) pairs."""
        key = rule.exact_key
        if key is not None:
            return [(self._exact, key)]
        if rule.proto_mask == 0xFF and rule.dhi - rule.dlo < MAX_BUCKET_SPAN:
            return [(self._buckets, (rule.proto, port)) for port in range(rule.dlo, rule.dhi + 1)]
        return [(self._wild_index, None)]

    def lookup(self, proto: int, src: int, dst: int, sport: int, dport: int,
               payload: bytes) -> tuple[CompiledRule | None, list[CompiledRule]]:
        """(winning terminating rule or None, matching COPY rules).  ``sport`` -1: no ports."""
        best: CompiledRule | None = None
        copies: list[CompiledRule] = []
        candidates = []
        if sport >= 0:
            exact = self._exact.get((proto, src, dst, sport, dport))
            if exact:
                candidates.append(exact)
            bucket = self._buckets.get((proto, dport))
            if bucket:
                candidates.append(bucket)
        if self._wild:
            candidates.append(self._wild)
        for lst in candidates:
            for rule in lst:
                if rule.action is NpAction.COPY:
                    if rule.matches(proto, src, dst, sport, dport, payload):
                        copies.append(rule)
                    continue
                if best is not None and rule.order >= best.order:
                    continue          # cannot beat the current winner; copies may still follow
                if rule.matches(proto, src, dst, sport, dport, payload):
                    best = rule
        return best, copies
