"""The clustering booster's logic, sans-IO (paper section III-B, Fig. 8 and 9).

At a cluster's edge the booster becomes the remote end of every Gnutella
connection a local servent opens to the outside ("local" connections, by
integer id).  It talks to the boosters of other clusters over the msgpack
protocol of :mod:`gnutella.b2b` ("peers", by integer id).  Inputs: decoded
messages and ``now``; outputs: :class:`~gnutella.node.Send` /
:class:`~gnutella.node.Close` on local connections and :class:`SendPeer` to
boosters.  No sockets, no clock.

Behaviour:

- **Impersonation.** Each remote address a servent dials gets its own stable
  identity (GUID derived from a secret and the address), so a servent that
  dials two remote peers sees two distinct peers (gtk-gnutella refuses a second
  connection with the same GUID).
- **Pings.** A TTL-1 ("alive") ping is answered with the impersonated peer's
  pong and the same GUID; a ping with more TTL also gets pongs of the other
  local servents (steering: the servent learns local peers).  Pings never
  leave the cluster.
- **Steering.** At most ``max_per_client`` intercepted connections per local
  servent are accepted; further ones are refused with 503 and
  ``X-Try-Ultrapeers`` naming local servents, so the overlay becomes congruent
  with the physical clusters.
- **Queries.** A local query is first tried locally: the booster probes
  (TTL 1, its own GUID) the local servents whose QRP tables may hold it, and
  passes their hits to the querying servent.  Adaptive forwarding (default):
  when no local table may hold it, it goes out at once; otherwise it goes
  outside after ``sightings`` local copies, or when the local attempt took
  longer than local hits recently take (times ``wait_margin``, at most
  ``local_wait``) with fewer than ``enough_local_hits`` local hits.  It goes
  only to the boosters whose cluster keyword table may hold it.  A query from a booster is flooded into the
  cluster (one copy per servent, filtered by its QRP table) and its hits go
  back to that booster.
- **Keyword tables.** The union of the local servents' QRP tables is sent to
  the other boosters whenever it changes (at most every ``table_interval``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass

from . import b2b, vendor
from .handshake import ConnectRequest, Decision, Identity, parse_address
from .node import Close, Send
from .qrp import DEFAULT_TABLE_BITS, MAX_TABLE_SIZE, RouteTable, TableReceiver, receive_table
from .routing import BoundedTable
from .wire import (BYE, PING, PONG, PUSH, QRP, QUERY, QUERY_HIT, STD_VENDOR, VENDOR, Bye, GnutellaDecodeError,
                   HitResult, Message, Pong, Push, Query, QueryHit, new_guid, next_hop)


OPAQUE_STRIPPED_GGEP = frozenset({"ALT", "ALT_TLS", "PUSH", "PUSH_TLS"})   # address lists in hits


def opaque_hit(hit: QueryHit, relay: tuple[str, int]) -> QueryHit:
    """The hit as a servent behind an opaque box must see it: the source is the box's relay for it,
    and no other address is left (alternate locations and push proxies are dropped, and the
    vendor-private area, which may carry them, with them)."""
    results = tuple(HitResult(r.index, r.size, r.name, r.urns,
                              tuple(g for g in r.ggep if g.id not in OPAQUE_STRIPPED_GGEP))
                    for r in hit.results)
    return QueryHit(relay[1], relay[0], hit.speed, results, hit.servent_guid, hit.vendor, hit.open_data, b"")


def opaque_push(push: Push, relay: tuple[str, int]) -> Push:
    """A push whose requester is reached through the box's relay (so the GIV goes through the box)."""
    return Push(push.servent_guid, push.file_index, relay[0], relay[1], ())


@dataclass(frozen=True, slots=True)
class SendPeer:
    pid: int
    obj: dict


@dataclass
class BoosterConfig:
    name: str
    cluster: tuple[str, ...] = ()           # prefixes of the local cluster
    sightings: int = 6                      # forward outside after this many local copies (0: never by count)
    local_wait: float = 0.3                 # ... or after this long with too few local hits
    enough_local_hits: int = 1
    max_queries: int = 20000                # bounded query/probe/push routing tables
    remote_ttl: int = 2                     # TTL of a query injected from another cluster
    max_per_client: int = 1                 # intercepted connections accepted per local servent
    max_local: int = 512                    # local connections in all
    pongs_per_ping: int = 8
    qrp_bits: int = DEFAULT_TABLE_BITS
    max_qrp_table: int = MAX_TABLE_SIZE
    table_interval: float = 1.0
    user_agent: str = "booster-boxes/0.1"
    # "adaptive": a query no local table may answer goes out at once (to the clusters whose tables may
    # hold it); one that a local servent may answer waits for the local attempt, as long as local hits
    # have recently taken (times wait_margin, within min_local_wait..local_wait).  "wait": the paper's
    # rule, every local query waits local_wait (or the sightings).
    forward: str = "adaptive"
    trust_tables: bool = False              # with "wait": still forward at once when no local table matches
    min_local_wait: float = 0.02
    wait_margin: float = 3.0
    upstream_ttl: int = 3                   # TTL of queries sent to conventional outside peers

    def networks(self) -> list[ipaddress.IPv4Network]:
        return [ipaddress.ip_network(p, strict=False) for p in self.cluster]


@dataclass
class LocalPeer:
    cid: int
    client_ip: str
    listen: tuple[str, int]                 # where the servent accepts connections
    impersonated: Identity
    leaf: bool
    qrp: TableReceiver
    table: RouteTable | None = None


@dataclass
class RemotePeer:
    pid: int
    name: str = "?"
    cluster: tuple[str, ...] = ()
    table: RouteTable | None = None


@dataclass
class QueryState:
    guid: bytes
    origin: tuple[str, int]                 # ("local", cid) or ("peer", pid)
    query: Query
    ttl: int
    hops: int
    first_seen: float
    sightings: int = 1
    local_hits: int = 0
    wait: float = 0.0                       # how long the local attempt may take before forwarding
    forwarded: bool = False


class BoosterCore:
    def __init__(self, config: BoosterConfig, secret: bytes, rng: random.Random | None = None,
                 stats: Counter | None = None, wall_clock=time.time) -> None:
        self.config = config
        self.secret = secret
        self.wall_clock = wall_clock          # for time sync answers only (``now`` is monotonic)
        self.rng = rng or random.Random()
        self.stats: Counter = stats if stats is not None else Counter()
        self.networks = config.networks()
        self.locals: dict[int, LocalPeer] = {}
        self.peers: dict[int, RemotePeer] = {}
        self.queries = BoundedTable(config.max_queries, self.stats, "query_table")
        self.probes = BoundedTable(config.max_queries, self.stats, "probe_table")
        self.servents = BoundedTable(config.max_queries, self.stats, "push_table")
        self.pending: OrderedDict[bytes, QueryState] = OrderedDict()   # local queries not yet decided
        self.upstreams: dict[int, Identity] = {}     # conventional Gnutella links to outside peers (our identity)
        self.known_servents: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._reserved: Counter = Counter()        # accepted handshakes not yet up, by servent
        self._table_version = 0
        self.local_hit_delays: deque[float] = deque(maxlen=64)     # recent first-local-hit delays
        self._table_sent_version = -1
        self._table_sent_at = float("-inf")

    # ---------------------------------------------------------------- identities and steering

    def is_local(self, ip: str) -> bool:
        if not self.networks:
            return True
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.networks)

    def impersonate(self, original_dst: tuple[str, int], shown: tuple[str, int] | None = None) -> Identity:
        """The identity shown to local servents for one remote address (stable, distinct).

        ``shown`` is the address the servent dialed: the remote itself under TPROXY, the box's
        own address in opaque mode (where the servent must keep reaching R through the box)."""
        digest = hashlib.sha1(self.secret + f"{original_dst[0]}:{original_dst[1]}".encode()).digest()
        ip, port = shown or original_dst
        return Identity(new_guid(digest[:16]), ip, port, True, self.config.user_agent)

    def _servent_key(self, listen: tuple[str, int]) -> tuple[str, int]:
        return listen

    def connections_of(self, listen: tuple[str, int]) -> list[int]:
        return [p.cid for p in self.locals.values() if p.listen == listen]

    def local_hosts(self, exclude: tuple[str, int] | None = None, limit: int = 10) -> list[tuple[str, int]]:
        hosts = [h for h in reversed(self.known_servents) if h != exclude]
        return hosts[:limit]

    def learn_servent(self, listen: tuple[str, int]) -> None:
        if parse_address(f"{listen[0]}:{listen[1]}") != tuple(listen):
            self.stats["servents_refused"] += 1   # would break every pong naming it
            return
        if not self.is_local(listen[0]):
            return
        self.known_servents[listen] = None
        self.known_servents.move_to_end(listen)
        while len(self.known_servents) > self.config.max_local:
            self.known_servents.popitem(last=False)

    def decide(self, request: ConnectRequest, listen: tuple[str, int]) -> Decision:
        """Accept an intercepted connect as the remote peer would, within the steering limits."""
        if len(self.locals) >= self.config.max_local:
            return Decision(503, "Too many connections")
        if len(self.connections_of(listen)) + self._reserved[listen] >= self.config.max_per_client:
            self.stats["steered_away"] += 1
            return Decision(503, "Busy, try local peers")
        leaf = request.headers.flag("X-Ultrapeer") is False
        self._reserved[listen] += 1
        return Decision(200, "OK", as_leaf=leaf)

    def release(self, listen: tuple[str, int]) -> None:
        """An accepted handshake that never came up (call exactly once, instead of local_up)."""
        self._reserved[listen] -= 1
        if self._reserved[listen] <= 0:
            del self._reserved[listen]

    # ---------------------------------------------------------------- local connections

    def local_up(self, cid: int, now: float, client_ip: str, listen: tuple[str, int],
                 original_dst: tuple[str, int], leaf: bool, shown: tuple[str, int] | None = None) -> list:
        if self._reserved[listen] > 0:
            self.release(listen)
        self.locals[cid] = LocalPeer(cid, client_ip, listen, self.impersonate(original_dst, shown), leaf,
                                     TableReceiver(self.config.max_qrp_table))
        self.learn_servent(listen)
        self.stats["local_up"] += 1
        # as the genuine servent it shows: its supported vendor messages first
        return [Send(cid, vendor.messages_supported_message())]

    def local_down(self, cid: int) -> None:
        peer = self.locals.pop(cid, None)
        if peer is not None:
            self.stats["local_down"] += 1
            if peer.table is not None:
                self._table_version += 1

    def _one_connection_per_servent(self, exclude_listen: tuple[str, int] | None = None) -> list[LocalPeer]:
        chosen: dict[tuple[str, int], LocalPeer] = {}
        for peer in self.locals.values():
            if peer.listen != exclude_listen and peer.listen not in chosen:
                chosen[peer.listen] = peer
        return list(chosen.values())

    @staticmethod
    def _may_have(peer_table: RouteTable | None, query: Query) -> bool:
        return peer_table is None or bool(query.urns) or peer_table.matches(query.criteria)

    def local_message(self, cid: int, msg: Message, now: float) -> list:
        peer = self.locals.get(cid)
        if peer is None:
            return []
        self.stats[f"local_rx_{msg.type_name}"] += 1
        kind = msg.type
        if kind == PING:
            return self._local_ping(peer, msg)
        if kind == PONG:
            pong = msg.payload
            assert isinstance(pong, Pong)
            self.learn_servent((pong.ip, pong.port))
            return []
        if kind == QUERY:
            return self._local_query(peer, msg, now)
        if kind == QUERY_HIT:
            return self._local_hit(peer, msg, now)
        if kind == PUSH:
            return self._push(msg.payload, ("local", cid))
        if kind == QRP:
            if receive_table(peer, msg.payload, self.stats, now):   # type: ignore[arg-type]
                self._table_version += 1
            return []
        if kind == BYE:
            assert isinstance(msg.payload, Bye)
            return [Close(cid, f"bye {msg.payload.code}")]
        if kind in (VENDOR, STD_VENDOR):
            return [Send(cid, reply) for reply in vendor.answer(msg, self.wall_clock(), self.stats)]
        self.stats["local_ignored"] += 1
        return []

    def _local_ping(self, peer: LocalPeer, msg: Message) -> list:
        me = peer.impersonated
        ttl = next_hop(msg.hops)
        out: list = [Send(peer.cid, Message(msg.guid, ttl, 0, Pong(me.port, me.ip, 0, 0)))]
        if msg.ttl > 1:
            for host in self.local_hosts(exclude=peer.listen, limit=self.config.pongs_per_ping):
                out.append(Send(peer.cid, Message(msg.guid, ttl, 1, Pong(host[1], host[0], 0, 0))))
                self.stats["local_pongs_sent"] += 1
        self.stats["pings_answered"] += 1
        return out

    def _local_query(self, peer: LocalPeer, msg: Message, now: float) -> list:
        query = msg.payload
        assert isinstance(query, Query)
        state = self.queries.get(msg.guid)
        if state is not None:
            state.sightings += 1
            self.stats["query_sightings"] += 1
            return self._maybe_forward(state, now)
        if msg.guid in self.probes:
            self.stats["probe_echo_dropped"] += 1
            return []
        state = QueryState(msg.guid, ("local", peer.cid), query, msg.ttl, msg.hops, now,
                           wait=self.config.local_wait)
        self.queries.put(msg.guid, state)
        self.pending[msg.guid] = state
        self.stats["local_queries"] += 1
        out: list = []
        # try the cluster first: a probe with our own GUID, so its hits surely come to us
        probe_guid = new_guid(self.rng.randbytes(16))
        self.probes.put(probe_guid, msg.guid)
        probe = Message(probe_guid, 1, 0, query)
        others = self._one_connection_per_servent(exclude_listen=peer.listen)
        for other in others:
            if self._may_have(other.table, query):
                out.append(Send(other.cid, probe))
                self.stats["probes_sent"] += 1
        adaptive = self.config.forward == "adaptive"
        if ((adaptive or self.config.trust_tables) and not out and not query.urns
                and all(other.table is not None for other in others)):
            # every local servent told us what it has, and none has this: nothing to wait for
            state.wait = 0.0
        elif adaptive:
            state.wait = self.local_wait()
        out += self._maybe_forward(state, now)
        return out

    def local_wait(self) -> float:
        """How long a local attempt may take: recent local hits' delays times a margin, bounded."""
        if not self.local_hit_delays:
            return self.config.local_wait
        learned = max(self.local_hit_delays) * self.config.wait_margin
        return min(self.config.local_wait, max(self.config.min_local_wait, learned))

    def _maybe_forward(self, state: QueryState, now: float) -> list:
        if state.forwarded or state.origin[0] != "local":
            return []
        if state.local_hits >= self.config.enough_local_hits:
            self.pending.pop(state.guid, None)
            return []
        by_count = self.config.sightings > 0 and state.sightings >= self.config.sightings
        by_time = now - state.first_seen >= state.wait
        if not (by_count or by_time):
            return []
        state.forwarded = True
        self.pending.pop(state.guid, None)
        # by_tables: no local table may answer, so it went out without any wait
        self.stats["forwarded_by_count" if by_count else
                   "forwarded_by_tables" if state.wait == 0 else "forwarded_by_timeout"] += 1
        query = state.query
        obj = {"t": "query", "guid": state.guid, "ttl": self.config.remote_ttl, "hops": next_hop(state.hops),
               "criteria": query.criteria, "flags": query.flags, "urns": list(query.urns)}
        out: list = []
        for remote in self.peers.values():
            if self._may_have(remote.table, query):
                out.append(SendPeer(remote.pid, obj))
            else:
                self.stats["queries_not_sent_by_table"] += 1
        if self.upstreams:
            ttl = max(1, min(state.ttl - 1, self.config.upstream_ttl))
            message = Message(state.guid, ttl, next_hop(state.hops), query)
            for uid in self.upstreams:
                out.append(Send(uid, message))
                self.stats["queries_to_upstream"] += 1
        if not out:
            self.stats["queries_kept_inside"] += 1
        return out

    def _local_hit(self, peer: LocalPeer, msg: Message, now: float) -> list:
        hit = msg.payload
        assert isinstance(hit, QueryHit)
        self.servents.put(hit.servent_guid, ("local", peer.cid))
        query_guid = self.probes.get(msg.guid)
        if query_guid is not None:
            state = self.queries.get(query_guid)
            if state is None:
                return []
            state.local_hits += 1
            self.stats["local_hits"] += 1
            if state.local_hits == 1 and not state.forwarded:
                self.local_hit_delays.append(now - state.first_seen)
            if state.local_hits >= self.config.enough_local_hits:
                self.pending.pop(state.guid, None)
            return self._hit_to_origin(state, hit, msg.hops, exclude_cid=peer.cid)
        state = self.queries.get(msg.guid)
        if state is None:
            self.stats["hits_unroutable"] += 1
            return []
        if state.origin[0] == "up":
            return self._hit_to_origin(state, hit, msg.hops, exclude_cid=None)
        if state.origin[0] == "peer":
            self.stats["hits_to_boosters"] += 1
            return [SendPeer(state.origin[1], {"t": "hit", "guid": state.guid, "hops": next_hop(msg.hops),
                                               "payload": hit.encode()})]
        state.local_hits += 1
        return self._hit_to_origin(state, hit, msg.hops, exclude_cid=None)

    def _hit_to_origin(self, state: QueryState, hit: QueryHit, hops: int, exclude_cid: int | None) -> list:
        kind, cid = state.origin
        if kind == "up" and cid in self.upstreams:
            self.stats["hits_to_upstream"] += 1
            return [Send(cid, Message(state.guid, next_hop(hops + 1), next_hop(hops), hit))]
        if kind != "local" or cid == exclude_cid or cid not in self.locals:
            return []
        self.stats["hits_delivered"] += 1
        return [Send(cid, Message(state.guid, 2, next_hop(hops), hit))]

    def _push(self, push, source: tuple[str, int]) -> list:
        assert isinstance(push, Push)
        route = self.servents.get(push.servent_guid)
        if route is None or route == source:
            self.stats["pushes_unroutable"] += 1
            return []
        kind, ident = route
        if kind == "local":
            if ident not in self.locals:
                self.stats["pushes_unroutable"] += 1
                return []
            self.stats["pushes_routed"] += 1
            return [Send(ident, Message(new_guid(self.rng.randbytes(16)), 3, 0, push))]
        if kind == "up":
            if ident not in self.upstreams:
                self.stats["pushes_unroutable"] += 1
                return []
            self.stats["pushes_to_upstream"] += 1
            return [Send(ident, Message(new_guid(self.rng.randbytes(16)), 3, 0, push))]
        if ident not in self.peers:
            self.stats["pushes_unroutable"] += 1
            return []
        self.stats["pushes_to_boosters"] += 1
        return [SendPeer(ident, {"t": "push", "payload": push.encode()})]

    # ---------------------------------------------------------------- boosters

    def hello(self) -> dict:
        return {"t": "hello", "id": self.config.name, "cluster": list(self.config.cluster), "v": b2b.VERSION}

    def cluster_table(self) -> RouteTable:
        table = RouteTable(self.config.qrp_bits)
        for peer in self.locals.values():
            if peer.table is not None:
                if peer.table.bits == table.bits:
                    table.merge(peer.table)
                else:   # a table of another size: fold it conservatively by re-hashing is impossible; take all
                    self.stats["qrp_foreign_size"] += 1
        return table

    def peer_up(self, pid: int) -> list:
        self.peers[pid] = RemotePeer(pid)
        self.stats["peers_up"] += 1
        return [SendPeer(pid, self.hello()), SendPeer(pid, b2b.table_message(self.cluster_table()))]

    def peer_down(self, pid: int) -> None:
        if self.peers.pop(pid, None) is not None:
            self.stats["peers_down"] += 1

    def peer_message(self, pid: int, obj: dict, now: float) -> list:
        remote = self.peers.get(pid)
        if remote is None:
            return []
        kind = obj["t"]
        self.stats[f"peer_rx_{kind}"] += 1
        if kind == "hello":
            remote.name, remote.cluster = obj["id"], tuple(obj["cluster"])
            return []
        if kind == "table":
            try:
                remote.table = b2b.table_from_message(obj)
            except b2b.B2BDecodeError:
                self.stats["peer_malformed"] += 1
            return []
        if kind == "query":
            return self._peer_query(remote, obj, now)
        if kind == "hit":
            try:
                hit = QueryHit.decode(obj["payload"])
            except GnutellaDecodeError:
                self.stats["peer_malformed"] += 1
                return []
            self.servents.put(hit.servent_guid, ("peer", pid))
            state = self.queries.get(obj["guid"])
            if state is None:
                self.stats["hits_unroutable"] += 1
                return []
            self.stats["remote_hits"] += 1
            return self._hit_to_origin(state, hit, obj["hops"], exclude_cid=None)
        if kind == "push":
            try:
                push = Push.decode(obj["payload"])
            except GnutellaDecodeError:
                self.stats["peer_malformed"] += 1
                return []
            return self._push(push, ("peer", pid))
        return []

    def _peer_query(self, remote: RemotePeer, obj: dict, now: float) -> list:
        guid = obj["guid"]
        if guid in self.queries:
            self.stats["peer_query_duplicates"] += 1
            return []
        query = Query(obj["criteria"], obj["flags"], tuple(obj["urns"]))
        state = QueryState(guid, ("peer", remote.pid), query, obj["ttl"], obj["hops"], now, forwarded=True)
        self.queries.put(guid, state)
        ttl = max(1, min(obj["ttl"], self.config.remote_ttl))
        msg = Message(guid, ttl, obj["hops"], query)
        out: list = []
        for peer in self._one_connection_per_servent():
            if self._may_have(peer.table, query):
                out.append(Send(peer.cid, msg))
            else:
                self.stats["remote_queries_filtered"] += 1
        self.stats["remote_queries_injected"] += 1
        return out

    # ---------------------------------------------------------------- conventional outside peers

    def upstream_up(self, uid: int, me: Identity) -> list:
        """A conventional Gnutella connection of ours to an outside servent (the paper's
        "the booster itself can peer with other Gnutella clients outside the domain")."""
        self.upstreams[uid] = me
        self.stats["upstream_up"] += 1
        return [Send(uid, vendor.messages_supported_message())]

    def upstream_down(self, uid: int) -> None:
        if self.upstreams.pop(uid, None) is not None:
            self.stats["upstream_down"] += 1

    def upstream_message(self, uid: int, msg: Message, now: float) -> list:
        me = self.upstreams.get(uid)
        if me is None:
            return []
        self.stats[f"upstream_rx_{msg.type_name}"] += 1
        kind = msg.type
        if kind == PING:
            # alive pings (and others) get our own pong, same GUID; pings never enter the cluster
            return [Send(uid, Message(msg.guid, next_hop(msg.hops), 0, Pong(me.port, me.ip, 0, 0)))]
        if kind == QUERY:
            if msg.guid in self.queries or msg.ttl <= 1:
                self.stats["upstream_queries_dropped"] += 1
                return []
            query = msg.payload
            assert isinstance(query, Query)
            state = QueryState(msg.guid, ("up", uid), query, msg.ttl, msg.hops, now, forwarded=True)
            self.queries.put(msg.guid, state)
            inject = Message(msg.guid, max(1, min(msg.ttl - 1, self.config.remote_ttl)), next_hop(msg.hops), query)
            out: list = []
            for peer in self._one_connection_per_servent():
                if self._may_have(peer.table, query):
                    out.append(Send(peer.cid, inject))
            self.stats["upstream_queries_injected"] += 1
            return out
        if kind == QUERY_HIT:
            hit = msg.payload
            assert isinstance(hit, QueryHit)
            self.servents.put(hit.servent_guid, ("up", uid))
            state = self.queries.get(msg.guid)
            if state is None:
                self.stats["hits_unroutable"] += 1
                return []
            self.stats["upstream_hits"] += 1
            return self._hit_to_origin(state, hit, msg.hops, exclude_cid=None)
        if kind == PUSH:
            return self._push(msg.payload, ("up", uid))
        if kind == BYE:
            return [Close(uid, "bye")]
        if kind in (VENDOR, STD_VENDOR):
            return [Send(uid, reply) for reply in vendor.answer(msg, self.wall_clock(), self.stats)]
        return []

    # ---------------------------------------------------------------- time

    def next_deadline(self) -> float | None:
        return min((s.first_seen + s.wait for s in self.pending.values()), default=None)

    def tick(self, now: float) -> list:
        out: list = []
        for state in list(self.pending.values()):
            if now - state.first_seen < state.wait:
                continue                                # (waits differ: not ordered by deadline)
            out += self._maybe_forward(state, now)
            self.pending.pop(state.guid, None)
        if (self._table_version != self._table_sent_version and self.peers
                and now - self._table_sent_at >= self.config.table_interval):
            table = b2b.table_message(self.cluster_table())
            out += [SendPeer(pid, table) for pid in self.peers]
            self._table_sent_version = self._table_version
            self._table_sent_at = now
            self.stats["tables_sent"] += 1
        return out
