"""Gnutella routing rules, sans-IO.

- Broadcasts (Ping, Query) are recorded by (GUID, type) in a bounded table: a
  second copy is a duplicate and is dropped, which is what stops loops.
- Replies are back-routed: a Pong goes to the connection its Ping came from, a
  QueryHit to the connection its Query came from.  A reply whose route is
  unknown (or whose connection is gone) is dropped and counted.
- Push messages are routed by servent GUID, learned from the QueryHits that
  passed through us.
- TTL/hops: a message is relayed with TTL-1 and hops+1 only while TTL-1 > 0;
  TTL+hops above ``max_ttl`` is clamped (hostile TTLs do not flood further).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from .wire import PING, PONG, QUERY, QUERY_HIT, Message, Push, next_hop

LOCAL = 0   # connection id of "ourselves": routes that end here


class BoundedTable:
    """An insertion-ordered map with a size limit; the oldest entry is evicted."""

    def __init__(self, limit: int, stats: Counter, name: str) -> None:
        if limit <= 0:
            raise ValueError(f"{name} limit must be positive")
        self.limit = limit
        self._data: OrderedDict = OrderedDict()
        self._stats = stats
        self._name = name

    def __contains__(self, key) -> bool:
        return key in self._data

    def get(self, key, default=None):
        return self._data.get(key, default)

    def put(self, key, value) -> None:
        if key in self._data:
            self._data.move_to_end(key)
        self._data[key] = value
        while len(self._data) > self.limit:
            self._data.popitem(last=False)
            self._stats[f"{self._name}_evicted"] += 1

    def __len__(self) -> int:
        return len(self._data)


@dataclass
class Router:
    my_guid: bytes
    max_entries: int = 10000
    max_ttl: int = 7
    stats: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.seen = BoundedTable(self.max_entries, self.stats, "route_table")
        self.servents = BoundedTable(self.max_entries, self.stats, "push_table")
        self.live: set[int] = {LOCAL}

    # connections
    def connection_up(self, cid: int) -> None:
        self.live.add(cid)

    def connection_down(self, cid: int) -> None:
        self.live.discard(cid)

    # broadcasts
    def originate(self, msg: Message) -> None:
        """Remember a broadcast we send ourselves so replies come back to us."""
        self.seen.put((msg.guid, msg.type), LOCAL)

    def accept_broadcast(self, msg: Message, from_cid: int) -> bool:
        """Record a Ping/Query; False (counted) for a duplicate, which must be dropped."""
        key = (msg.guid, msg.type)
        if key in self.seen:
            self.stats["duplicates_dropped"] += 1
            return False
        self.seen.put(key, from_cid)
        return True

    def relay_copy(self, msg: Message) -> Message | None:
        """The copy to relay onwards, or None when the TTL is used up."""
        ttl = min(msg.ttl, max(0, self.max_ttl - msg.hops))
        if ttl <= 1:
            return None
        return Message(msg.guid, ttl - 1, next_hop(msg.hops), msg.payload)

    # replies
    def route_reply(self, msg: Message) -> int | None:
        """Connection id a Pong/QueryHit goes back to (LOCAL for ours), None to drop."""
        request_type = {PONG: PING, QUERY_HIT: QUERY}.get(msg.type)
        if request_type is None:
            raise ValueError(f"not a reply: {msg.type_name}")
        cid = self.seen.get((msg.guid, request_type))
        if cid is None or cid not in self.live:
            self.stats["replies_unroutable"] += 1
            return None
        return cid

    def learn_servent(self, servent_guid: bytes, cid: int) -> None:
        self.servents.put(servent_guid, cid)

    def route_push(self, push: Push) -> int | None:
        if push.servent_guid == self.my_guid:
            return LOCAL
        cid = self.servents.get(push.servent_guid)
        if cid is None or cid not in self.live:
            self.stats["pushes_unroutable"] += 1
            return None
        return cid

    def reply_copy(self, msg: Message) -> Message | None:
        """The copy of a reply (or push) to relay one hop further, None when its TTL is used up."""
        if msg.ttl <= 1:
            self.stats["replies_ttl_expired"] += 1
            return None
        return Message(msg.guid, msg.ttl - 1, next_hop(msg.hops), msg.payload)
