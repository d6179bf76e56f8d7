"""The servent's message logic, sans-IO: what to send when a message arrives.

Connections are integer ids given by the I/O layer; inputs are established
peers, decoded messages and ``now``; outputs are actions (:class:`Send`,
:class:`Close`) and events (:class:`SearchHit`, :class:`PushRequested`).
No sockets, no clock: the asyncio servent (``servent.py``) feeds it.
"""

from __future__ import annotations

import random
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from .handshake import Identity, parse_address
from .qrp import DEFAULT_TABLE_BITS, MAX_TABLE_SIZE, RouteTable, TableReceiver, receive_table
from .routing import LOCAL, Router
from .share import ShareIndex
from . import vendor
from .wire import (BYE, PING, PONG, PUSH, QRP, QUERY, QUERY_HIT, STD_VENDOR, VENDOR, Bye, GGEPExtension, ggep_get,
                   HitResult, Message, Ping, Pong, Push, Query, QueryHit,
                   new_guid, next_hop, QF_MARKER)

VENDOR_CODE = b"BBOX"
QHD_PUSH, QHD_BUSY, QHD_UPLOADED, QHD_MEASURED = 0x01, 0x04, 0x08, 0x10


def needs_push(hit: QueryHit) -> bool:
    """The hit's servent says it is firewalled: reach it with a PUSH, not a direct GET."""
    flags = hit.open_data
    return len(flags) >= 2 and bool(flags[0] & QHD_PUSH) and bool(flags[1] & QHD_PUSH)


# ---------------------------------------------------------------- actions and events

@dataclass(frozen=True, slots=True)
class Send:
    cid: int
    message: Message


@dataclass(frozen=True, slots=True)
class Close:
    cid: int
    reason: str
    bye_code: int | None = None      # send a Bye first


@dataclass(frozen=True, slots=True)
class SearchHit:
    query_guid: bytes
    hit: QueryHit
    hops: int
    at: float


@dataclass(frozen=True, slots=True)
class PushRequested:
    """Someone wants a file of ours but cannot reach us: connect to them and send GIV."""
    push: Push


@dataclass
class NodeConfig:
    ultrapeer: bool = True
    max_ttl: int = 7
    query_ttl: int = 4
    ping_ttl: int = 4                 # as gtk-gnutella's pings: answered from pong caches, never relayed
    ping_interval: float = 30.0       # a link's pongs are refreshed this often (one ping per link)
    route_entries: int = 10000
    pong_cache: int = 100
    pongs_per_ping: int = 10
    host_cache: int = 1000
    alive_interval: float = 15.0      # idle time before an alive ping (TTL 1)
    alive_timeout: float = 30.0       # unanswered alive ping for this long: close
    qrp_bits: int = DEFAULT_TABLE_BITS
    max_qrp_table: int = MAX_TABLE_SIZE
    max_results: int = 50
    speed: int = 1000                 # kbit/s, reported in hits, compared to legacy min speed
    firewalled: bool = False          # advertise the push flag: downloaders must use PUSH/GIV
    tls: bool = False                 # we accept TLS: say so in our pongs (GGEP "TLS", as gtk-gnutella)


@dataclass
class Peer:
    cid: int
    ip: str                       # listen address (from headers) or the socket's address
    port: int
    ultrapeer: bool               # the remote side runs as an ultrapeer (or flat 0.4)
    our_leaf: bool                # the remote is a leaf of ours
    guid: bytes | None
    version: str
    last_rx: float
    alive: dict[bytes, float] = field(default_factory=dict)
    qrp: TableReceiver | None = None
    table: RouteTable | None = None
    user_agent: str = ""
    last_ping: float = 0.0        # our last (non-alive) ping on this link


class Node:
    def __init__(self, config: NodeConfig, me: Identity, shares: ShareIndex,
                 rng: random.Random | None = None, stats: Counter | None = None,
                 wall_clock=time.time) -> None:
        self.wall_clock = wall_clock       # for time sync answers only (``now`` is monotonic)
        self.config = config
        self.me = me
        self.shares = shares
        self.rng = rng or random.Random()
        self.stats: Counter = stats if stats is not None else Counter()
        self.router = Router(me.guid, config.route_entries, config.max_ttl, self.stats)
        self.peers: dict[int, Peer] = {}
        self.pong_cache: OrderedDict[tuple[str, int], Pong] = OrderedDict()
        self.host_cache: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.tls_hosts: OrderedDict[tuple[str, int], None] = OrderedDict()   # pongs said they speak TLS
        self.my_searches: OrderedDict[bytes, float] = OrderedDict()
        self._table: RouteTable | None = None

    # ---------------------------------------------------------------- helpers

    def _guid(self) -> bytes:
        return new_guid(self.rng.randbytes(16))

    def own_pong(self) -> Pong:
        ggep = (GGEPExtension("TLS", b""),) if self.config.tls else ()
        return Pong(self.me.port, self.me.ip, len(self.shares), self.shares.kbytes, ggep)

    def _qhd_flags(self) -> bytes:
        # QHD open data: first byte says which flags are meaningful, second holds them
        # (push, busy, have-uploaded, speed-measured); only "push" (firewalled) is ever set.
        return bytes([QHD_PUSH | QHD_BUSY | QHD_UPLOADED | QHD_MEASURED,
                      QHD_PUSH if self.config.firewalled else 0])

    def route_table(self) -> RouteTable:
        if self._table is None:
            self._table = self.shares.route_table(self.config.qrp_bits)
        return self._table

    def learn_host(self, ip: str, port: int) -> None:
        if (ip, port) == (self.me.ip, self.me.port):
            return
        if parse_address(f"{ip}:{port}") != (ip, port):
            self.stats["hosts_refused"] += 1      # never cache what a pong or a dial cannot carry
            return
        self.host_cache[(ip, port)] = None
        self.host_cache.move_to_end((ip, port))
        while len(self.host_cache) > self.config.host_cache:
            self.host_cache.popitem(last=False)
            self.stats["host_cache_evicted"] += 1

    def hosts(self) -> list[tuple[str, int]]:
        return list(reversed(self.host_cache))

    def connected_guids(self) -> set[bytes]:
        return {p.guid for p in self.peers.values() if p.guid is not None}

    def slot_counts(self) -> tuple[int, int, int]:
        """(ultrapeer/flat peers, our leaves, our ultrapeers as a leaf)."""
        leaves = sum(1 for p in self.peers.values() if p.our_leaf)
        if self.config.ultrapeer:
            return len(self.peers) - leaves, leaves, 0
        return 0, 0, len(self.peers)

    # ---------------------------------------------------------------- connection events

    def peer_up(self, cid: int, now: float, ip: str, port: int, guid: bytes | None, version: str,
                remote_ultrapeer: bool, our_leaf: bool, user_agent: str = "", remote_qrp: bool = False) -> list:
        """A connection finished its handshake.  ``remote_qrp``: the peer said
        X-Ultrapeer-Query-Routing, so ultrapeers exchange tables for last-hop routing."""
        peer = Peer(cid, ip, port, remote_ultrapeer, our_leaf, guid, version, now, user_agent=user_agent)
        peer.qrp = TableReceiver(self.config.max_qrp_table)
        self.peers[cid] = peer
        self.router.connection_up(cid)
        self.learn_host(ip, port)
        self.stats["peers_up"] += 1
        out: list = []
        leaf_to_up = not self.config.ultrapeer and remote_ultrapeer
        up_to_up = self.config.ultrapeer and remote_ultrapeer and remote_qrp and not our_leaf
        if leaf_to_up or up_to_up:
            # a leaf tells its ultrapeer what it shares, so only matching queries come down;
            # between ultrapeers the table (ours and our leaves') filters the last hop
            for payload in self.table_for_peers().to_messages():
                out.append(Send(cid, Message(self._guid(), 1, 0, payload)))
            self.stats["qrp_tables_sent"] += 1
        # what a genuine servent sends first: its supported vendor messages
        out.append(Send(cid, vendor.messages_supported_message()))
        # a first ping fills the host and pong caches (the peer answers from its pong cache)
        out.append(self._ping(peer, now))
        return out

    def _ping(self, peer: Peer, now: float) -> Send:
        ping = Message(self._guid(), self.config.ping_ttl, 0, Ping())
        self.router.originate(ping)
        peer.last_ping = now
        self.stats["pings_sent"] += 1
        return Send(peer.cid, ping)

    def table_for_peers(self) -> RouteTable:
        table = self.route_table().copy()
        for peer in self.peers.values():
            if peer.our_leaf and peer.table is not None and peer.table.bits == table.bits:
                table.merge(peer.table)
        return table

    def peer_down(self, cid: int) -> None:
        if self.peers.pop(cid, None) is not None:
            self.stats["peers_down"] += 1
        self.router.connection_down(cid)

    # ---------------------------------------------------------------- locally originated

    def search(self, criteria: str, now: float, urns: tuple[str, ...] = (), ttl: int | None = None) -> tuple[bytes, list]:
        guid = self._guid()
        msg = Message(guid, ttl or self.config.query_ttl, 0, Query(criteria, QF_MARKER, urns))
        self.router.originate(msg)
        self.my_searches[guid] = now
        while len(self.my_searches) > 1000:
            self.my_searches.popitem(last=False)
        out = []
        for peer in self.peers.values():
            if peer.our_leaf and not self._leaf_may_have(peer, msg.payload):
                continue
            out.append(Send(peer.cid, msg))
        self.stats["searches"] += 1
        return guid, out

    def push_for(self, hit: QueryHit, result: HitResult, my_ip: str, my_port: int) -> list:
        """Ask the servent behind ``hit`` to connect to us (for a firewalled source)."""
        push = Push(hit.servent_guid, result.index, my_ip, my_port)
        cid = self.router.route_push(push)
        if cid is None or cid == LOCAL:
            return []
        return [Send(cid, Message(self._guid(), self.config.max_ttl, 0, push))]

    def tick(self, now: float) -> list:
        """Alive pings on idle links; close links whose alive pings went unanswered."""
        out: list = []
        for peer in list(self.peers.values()):
            if any(now - sent > self.config.alive_timeout for sent in peer.alive.values()):
                out.append(Close(peer.cid, "alive ping unanswered", 406))
                self.stats["alive_timeouts"] += 1
                continue
            idle = now - peer.last_rx >= self.config.alive_interval and not peer.alive
            if now - peer.last_ping >= self.config.ping_interval:
                refresh = self._ping(peer, now)
                if idle:       # the peer's own pong (same GUID) answers for liveness too
                    peer.alive[refresh.message.guid] = now
                out.append(refresh)
            elif idle:
                guid = self._guid()
                peer.alive[guid] = now
                out.append(Send(peer.cid, Message(guid, 1, 0, Ping())))
        return out

    # ---------------------------------------------------------------- incoming

    def receive(self, cid: int, msg: Message, now: float) -> list:
        peer = self.peers.get(cid)
        if peer is None:
            return []
        peer.last_rx = now
        self.stats[f"rx_{msg.type_name}"] += 1
        kind = msg.type
        if kind == PING:
            return self._on_ping(peer, msg)
        if kind == PONG:
            return self._on_pong(peer, msg)
        if kind == QUERY:
            return self._on_query(peer, msg)
        if kind == QUERY_HIT:
            return self._on_hit(peer, msg, now)
        if kind == PUSH:
            return self._on_push(peer, msg)
        if kind == BYE:
            assert isinstance(msg.payload, Bye)
            return [Close(cid, f"bye {msg.payload.code} {msg.payload.reason}")]
        if kind == QRP:
            return self._on_qrp(peer, msg, now)
        if kind in (VENDOR, STD_VENDOR):
            return [Send(cid, reply) for reply in vendor.answer(msg, self.wall_clock(), self.stats)]
        return []

    def _on_ping(self, peer: Peer, msg: Message) -> list:
        if not self.router.accept_broadcast(msg, peer.cid):
            return []
        # Our own pong carries the ping's GUID: that is how it is routed back
        # (and what gtk-gnutella checks on its TTL-1 "alive" pings).
        reply_ttl = next_hop(msg.hops)
        out: list = [Send(peer.cid, Message(msg.guid, reply_ttl, 0, self.own_pong()))]
        if msg.ttl <= 1 or not self.config.ultrapeer:
            return out
        # pong caching (0.6): answered from the cache, never relayed - a relayed ping would reach
        # gtk-gnutella as a burst from one link, and it throttles (drops) those
        cached = [p for key, p in self.pong_cache.items() if key != (peer.ip, peer.port)]
        self.rng.shuffle(cached)
        for pong in cached[: self.config.pongs_per_ping]:
            out.append(Send(peer.cid, Message(msg.guid, reply_ttl, 1, pong)))
        self.stats["pongs_from_cache"] += min(len(cached), self.config.pongs_per_ping)
        return out

    def _on_pong(self, peer: Peer, msg: Message) -> list:
        pong = msg.payload
        assert isinstance(pong, Pong)
        if msg.guid in peer.alive:
            del peer.alive[msg.guid]
            self.stats["alive_answered"] += 1
        self.learn_host(pong.ip, pong.port)
        key = (pong.ip, pong.port)
        if ggep_get(pong.ggep, "TLS") is not None and pong.port:
            self.tls_hosts[key] = None
            self.tls_hosts.move_to_end(key)
            while len(self.tls_hosts) > self.config.host_cache:
                self.tls_hosts.popitem(last=False)
        if key != (self.me.ip, self.me.port):
            self.pong_cache[key] = pong
            self.pong_cache.move_to_end(key)
            while len(self.pong_cache) > self.config.pong_cache:
                self.pong_cache.popitem(last=False)
                self.stats["pong_cache_evicted"] += 1
        cid = self.router.route_reply(msg)
        if cid is None or cid == LOCAL:
            return []
        relay = self.router.reply_copy(msg)
        return [Send(cid, relay)] if relay else []

    def _leaf_may_have(self, peer: Peer, query: Query) -> bool:
        return peer.table is not None and (peer.table.matches(query.criteria) or bool(query.urns))

    def _on_query(self, peer: Peer, msg: Message) -> list:
        query = msg.payload
        assert isinstance(query, Query)
        if not self.router.accept_broadcast(msg, peer.cid):
            return []
        out: list = []
        answer = query.modern or query.flags <= self.config.speed
        if answer:
            found = self.shares.search(query.criteria, query.urns, self.config.max_results)
            if found:
                hit = QueryHit(
                    self.me.port, self.me.ip, self.config.speed,
                    tuple(HitResult(f.index, f.size, f.name, (f.urn,)) for f in found[:255]),
                    self.me.guid, VENDOR_CODE, self._qhd_flags())
                out.append(Send(peer.cid, Message(msg.guid, min(msg.hops + 2, self.config.max_ttl), 0, hit)))
                self.stats["hits_sent"] += 1
        if not self.config.ultrapeer:
            return out          # a leaf answers but never relays
        relay = self.router.relay_copy(msg)
        for other in self.peers.values():
            if other.cid == peer.cid:
                continue
            if other.our_leaf:
                # leaves sit one hop away: QRP decides, whatever the remaining TTL
                if self._leaf_may_have(other, query):
                    out.append(Send(other.cid, Message(msg.guid, 1, next_hop(msg.hops), query)))
                else:
                    self.stats["qrp_filtered"] += 1
            elif relay is not None and other.ultrapeer:
                if relay.ttl == 1 and other.table is not None and not self._leaf_may_have(other, query):
                    self.stats["qrp_filtered"] += 1      # last hop: its table says nothing there
                    continue
                out.append(Send(other.cid, relay))
        return out

    def _on_hit(self, peer: Peer, msg: Message, now: float) -> list:
        hit = msg.payload
        assert isinstance(hit, QueryHit)
        self.router.learn_servent(hit.servent_guid, peer.cid)
        cid = self.router.route_reply(msg)
        if cid is None:
            return []
        if cid == LOCAL:
            self.stats["hits_received"] += 1
            return [SearchHit(msg.guid, hit, msg.hops, now)]
        relay = self.router.reply_copy(msg)
        return [Send(cid, relay)] if relay else []

    def _on_push(self, peer: Peer, msg: Message) -> list:
        push = msg.payload
        assert isinstance(push, Push)
        cid = self.router.route_push(push)
        if cid is None:
            return []
        if cid == LOCAL:
            self.stats["pushes_received"] += 1
            return [PushRequested(push)]
        relay = self.router.reply_copy(msg)
        return [Send(cid, relay)] if relay else []

    def _on_qrp(self, peer: Peer, msg: Message, now: float) -> list:
        if peer.qrp is None or (not self.config.ultrapeer):
            self.stats["qrp_ignored"] += 1        # a leaf routes nothing
            return []
        receive_table(peer, msg.payload, self.stats, now)   # type: ignore[arg-type]
        return []
