"""Routing over an in-memory network of sans-IO nodes (deterministic, no sockets)."""

import random
from collections import Counter, deque
from pathlib import Path


from gnutella.handshake import Identity
from gnutella.node import Close, Node, NodeConfig, PushRequested, SearchHit, Send
from gnutella.routing import Router
from gnutella.share import ShareIndex, SharedFile
from gnutella.wire import HitResult, Message, Ping, Pong, Query, QueryHit


def shares(*names: str) -> ShareIndex:
    return ShareIndex([SharedFile(i + 1, n, 1000, f"SHA{i}{n}".upper().ljust(32, "A")[:32], Path("/nonexistent"))
                       for i, n in enumerate(names)])


class Net:
    """Nodes joined by links; delivers Send actions breadth-first and records what happened."""

    def __init__(self, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.nodes: list[Node] = []
        self.links: dict[tuple[int, int], tuple[int, int]] = {}   # (node, cid) -> (node, cid)
        self.queue: deque = deque()
        self.events: list[tuple[int, object]] = []
        self.delivered = Counter()       # (node index, message type) -> count
        self.now = 0.0

    def add(self, files=(), ultrapeer=True, **cfg) -> int:
        n = len(self.nodes)
        me = Identity(bytes([n + 1]) * 16, f"10.0.0.{n + 1}", 6346, ultrapeer)
        self.nodes.append(Node(NodeConfig(ultrapeer=ultrapeer, **cfg), me, shares(*files), random.Random(n)))
        return n

    def link(self, a: int, b: int, a_leaf_of_b: bool = False) -> None:
        ca, cb = 100 + b, 100 + a
        self.links[(a, ca)] = (b, cb)
        self.links[(b, cb)] = (a, ca)
        na, nb = self.nodes[a], self.nodes[b]
        out_a = na.peer_up(ca, self.now, nb.me.ip, 6346, nb.me.guid, "0.6", nb.me.ultrapeer, False)
        out_b = nb.peer_up(cb, self.now, na.me.ip, 6346, na.me.guid, "0.6", na.me.ultrapeer, a_leaf_of_b)
        self.push(a, out_a)
        self.push(b, out_b)

    def push(self, n: int, actions) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.queue.append((self.links[(n, action.cid)], action.message))
            else:
                self.events.append((n, action))

    def run(self) -> None:
        while self.queue:
            (n, cid), msg = self.queue.popleft()
            self.delivered[(n, msg.type_name)] += 1
            self.push(n, self.nodes[n].receive(cid, msg, self.now))


def mesh(n=6, files_at=None, seed=3):
    net = Net(seed)
    for i in range(n):
        net.add(files_at.get(i, ()) if files_at else ())
    for i in range(n):                 # a ring plus chords: plenty of cycles
        net.link(i, (i + 1) % n)
    net.link(0, 3)
    net.link(1, 4)
    net.run()
    net.events.clear()
    net.delivered.clear()
    for node in net.nodes:
        node.stats.clear()
    return net


def test_query_floods_without_loops_and_hits_come_back():
    net = mesh(files_at={2: ["free software song.ogg"], 4: ["song of free software.mp3", "other.txt"]})
    guid, actions = net.nodes[0].search("free software", net.now, ttl=7)
    net.push(0, actions)
    net.run()
    hits = [e for n, e in net.events if isinstance(e, SearchHit)]
    assert {h.hit.ip for h in hits} == {"10.0.0.3", "10.0.0.5"}
    assert all(h.query_guid == guid for h in hits)
    # every node answered and relayed once: later copies were dropped as duplicates
    dups = sum(node.stats["duplicates_dropped"] for node in net.nodes)
    queries = sum(c for (n, t), c in net.delivered.items() if t == "query")
    assert queries == 5 + dups           # 5 other nodes accepted it once each
    assert dups > 0
    assert all(node.stats["hits_sent"] <= 1 for node in net.nodes)


def test_ttl_limits_the_flood():
    net = Net()
    for _ in range(5):
        net.add(["needle in line.txt"])
    for i in range(4):                      # a line 0-1-2-3-4
        net.link(i, i + 1)
    net.run()
    net.events.clear()
    _, actions = net.nodes[0].search("needle", net.now, ttl=2)
    net.push(0, actions)
    net.run()
    hits = {e.hit.ip for n, e in net.events if isinstance(e, SearchHit)}
    assert hits == {"10.0.0.2", "10.0.0.3"}       # two hops, no further


def test_hostile_ttl_is_clamped_to_max_ttl():
    router = Router(b"\x00" * 16, max_ttl=7)
    msg = Message(b"\x01" * 16, 200, 5, Query("x"))
    relay = router.relay_copy(msg)
    assert relay.ttl == 1 and relay.hops == 6
    assert router.relay_copy(Message(b"\x01" * 16, 200, 6, Query("x"))) is None


def test_unroutable_reply_is_dropped_and_counted():
    router = Router(b"\x00" * 16)
    router.connection_up(5)
    q = Message(b"\x02" * 16, 3, 0, Query("abc"))
    assert router.accept_broadcast(q, 5)
    assert not router.accept_broadcast(q, 6)
    hit = Message(q.guid, 3, 0, QueryHit(1, "1.2.3.4", 1, (HitResult(1, 1, "abc"),), b"\x09" * 16))
    assert router.route_reply(hit) == 5
    router.connection_down(5)
    assert router.route_reply(hit) is None
    assert router.stats["replies_unroutable"] == 1
    stray = Message(b"\x03" * 16, 3, 0, Pong(1, "1.2.3.4"))
    assert router.route_reply(stray) is None


def test_route_table_is_bounded_and_counts_evictions():
    router = Router(b"\x00" * 16, max_entries=10)
    for i in range(25):
        router.accept_broadcast(Message(bytes([i]) * 16, 3, 0, Ping()), 1)
    assert len(router.seen) == 10 and router.stats["route_table_evicted"] == 15


def test_push_is_routed_by_servent_guid_to_the_hit_source():
    net = mesh(files_at={3: ["wanted file.bin"]})
    _, actions = net.nodes[0].search("wanted", net.now, ttl=7)
    net.push(0, actions)
    net.run()
    (hit_event,) = [e for n, e in net.events if isinstance(e, SearchHit)]
    net.events.clear()
    net.push(0, net.nodes[0].push_for(hit_event.hit, hit_event.hit.results[0], "10.0.0.1", 6346))
    net.run()
    pushes = [(n, e) for n, e in net.events if isinstance(e, PushRequested)]
    assert [(n, e.push.file_index, e.push.ip) for n, e in pushes] == [(3, 1, "10.0.0.1")]


def test_alive_ping_answered_with_the_same_guid_and_only_our_pong():
    net = mesh()
    node = net.nodes[2]
    ping = Message(b"\x77" * 16, 1, 0, Ping())
    out = node.receive(101, ping, 0.0)
    assert len(out) == 1 and isinstance(out[0], Send)
    pong = out[0].message
    assert pong.guid == ping.guid and isinstance(pong.payload, Pong) and pong.ttl == 1
    assert (pong.payload.ip, pong.payload.port) == ("10.0.0.3", 6346)


def test_pings_are_answered_from_pong_caches_and_never_relayed():
    net = mesh()
    # the first pings at link-up brought each neighbour's own pong (0 links to 1, 3 and 5)
    assert {("10.0.0.2", 6346), ("10.0.0.4", 6346), ("10.0.0.6", 6346)} <= set(net.nodes[0].pong_cache)
    # refresh pings (one per link per ping_interval) bring the neighbours' cached pongs: hosts two hops away
    for round_ in (1, 2):
        net.now = round_ * net.nodes[0].config.ping_interval
        for n, node in enumerate(net.nodes):
            net.push(n, [a for a in node.tick(net.now) if isinstance(a, Send)])
        net.run()
    assert ("10.0.0.3", 6346) in net.nodes[0].pong_cache and ("10.0.0.3", 6346) in net.nodes[0].host_cache
    # no ping was ever relayed: every ping delivered was sent by the link's own end (hops 0)
    assert all(node.stats["pings_sent"] >= 2 for node in net.nodes)
    assert sum(net.delivered[(n, "ping")] for n in range(6)) == sum(node.stats["pings_sent"] for node in net.nodes)


def test_unanswered_alive_pings_close_the_link():
    cfg = NodeConfig(alive_interval=10, alive_timeout=20)
    node = Node(cfg, Identity(b"\x01" * 16, "10.0.0.1", 6346, True), shares())
    node.peer_up(7, 0.0, "10.0.0.9", 6346, None, "0.6", True, False)
    out = node.tick(11.0)
    (send,) = [a for a in out if isinstance(a, Send)]
    assert send.message.ttl == 1 and isinstance(send.message.payload, Ping)
    assert node.tick(20.0) == []                       # still waiting
    (close,) = node.tick(32.0)
    assert isinstance(close, Close) and close.bye_code == 406
    # an answered alive ping keeps the link
    node2 = Node(cfg, Identity(b"\x01" * 16, "10.0.0.1", 6346, True), shares())
    node2.peer_up(7, 0.0, "10.0.0.9", 6346, None, "0.6", True, False)
    (ping,) = [a for a in node2.tick(11.0) if isinstance(a, Send)]
    node2.receive(7, Message(ping.message.guid, 1, 0, Pong(6346, "10.0.0.9")), 12.0)
    assert not any(isinstance(a, Close) for a in node2.tick(40.0))


def test_ultrapeer_routes_to_leaves_by_their_qrp_tables():
    net = Net()
    up = net.add()
    origin = net.add()
    leaf_a = net.add(["jazz piano trio.flac"], ultrapeer=False)
    leaf_b = net.add(["punk rock anthem.mp3"], ultrapeer=False)
    net.link(origin, up)
    net.link(leaf_a, up, a_leaf_of_b=True)
    net.link(leaf_b, up, a_leaf_of_b=True)
    net.run()                                     # delivers the leaves' QRP tables
    assert net.nodes[up].stats["qrp_tables"] == 2
    net.events.clear()
    net.delivered.clear()
    _, actions = net.nodes[origin].search("jazz piano", net.now)
    net.push(origin, actions)
    net.run()
    assert net.delivered[(leaf_a, "query")] == 1
    assert net.delivered[(leaf_b, "query")] == 0          # filtered by its table
    hits = [e for n, e in net.events if isinstance(e, SearchHit)]
    assert [h.hit.ip for h in hits] == ["10.0.0.3"]


def test_leaf_answers_but_never_relays():
    net = Net()
    up1, up2 = net.add(), net.add()
    leaf = net.add(["x file.txt"], ultrapeer=False)
    net.link(leaf, up1)
    net.link(leaf, up2)
    net.run()
    net.delivered.clear()
    net.push(up1, [Send(100 + leaf, Message(b"\x55" * 16, 5, 0, Query("file")))])
    net.run()
    assert net.delivered[(up2, "query")] == 0
    assert net.delivered[(up1, "query_hit")] == 1


def test_legacy_min_speed_above_ours_gets_no_answer():
    node = Node(NodeConfig(speed=100), Identity(b"\x01" * 16, "10.0.0.1", 6346, True), shares("abc def.txt"))
    node.peer_up(3, 0.0, "10.0.0.9", 6346, None, "0.4", True, False)
    assert node.receive(3, Message(b"\x01" * 16, 2, 0, Query("abc", 56)), 0.0)
    assert not [a for a in node.receive(3, Message(b"\x02" * 16, 2, 0, Query("abc", 5000)), 0.0)
                if isinstance(a, Send) and a.message.type_name == "query_hit"]


def test_ultrapeers_exchange_tables_and_filter_the_last_hop():
    net = Net()
    a = net.add()
    b = net.add()
    c = net.add(["rare bird song.ogg"])
    d = net.add(["other thing.txt"])
    for x, y in ((a, b), (b, c), (b, d)):
        na, nb = net.nodes[x], net.nodes[y]
        ca, cb = 100 + y, 100 + x
        net.links[(x, ca)] = (y, cb)
        net.links[(y, cb)] = (x, ca)
        net.push(x, na.peer_up(ca, 0.0, nb.me.ip, 6346, nb.me.guid, "0.6", True, False, remote_qrp=True))
        net.push(y, nb.peer_up(cb, 0.0, na.me.ip, 6346, na.me.guid, "0.6", True, False, remote_qrp=True))
    net.run()
    assert net.nodes[b].stats["qrp_tables"] == 3
    net.delivered.clear()
    _, actions = net.nodes[a].search("rare bird", 0.0, ttl=2)     # b relays it with TTL 1: the last hop
    net.push(a, actions)
    net.run()
    assert net.delivered[(c, "query")] == 1 and net.delivered[(d, "query")] == 0
    assert [e.hit.ip for n, e in net.events if isinstance(e, SearchHit)] == ["10.0.0.3"]
