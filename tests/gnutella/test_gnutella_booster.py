"""The clustering booster over real loopback sockets, two clusters on distinct loopback addresses.

Interception is done by a small stand-in for boxd's stream delivery (a listener per remote
address that hands each accepted connection to the booster with its original destination);
the same booster under real boxd runs in test_gnutella_booster_box.py and in the lab test."""

import asyncio
import ipaddress
import os
from types import SimpleNamespace

import pytest

from gnutella.booster import GnutellaBooster
from gnutella.boostercore import BoosterConfig, BoosterCore
from gnutella.node import NodeConfig
from gnutella.servent import Servent
from gnutella.share import ShareIndex
from tests.polling import EVENT_WAIT, until


class FakeEdge:
    """Listeners at the edge address that deliver connections to the booster as intercepted."""

    def __init__(self, booster: GnutellaBooster, edge_ip: str):
        self.booster, self.edge_ip = booster, edge_ip
        self.servers = []
        self.by_dst = {}

    def divert(self, servent: Servent, remote: str) -> None:
        """Every connection the servent opens to the remote prefix goes to the booster instead,
        as TPROXY does at a real edge."""
        direct = servent.connect
        net = ipaddress.ip_network(remote)

        def connect(host, port):
            if ipaddress.ip_address(host) not in net:
                return direct(host, port)

            async def through_edge():
                direct(*await self.intercept((host, port)))
            asyncio.get_running_loop().create_task(through_edge())
        servent.connect = connect

    async def intercept(self, original_dst):
        if original_dst in self.by_dst:
            return self.by_dst[original_dst]
        async def handle(reader, writer):
            conn = SimpleNamespace(client=writer.get_extra_info("peername")[:2], original_dst=original_dst)
            try:
                await self.booster.on_intercepted(reader, writer, conn)
            finally:
                writer.close()
        server = await asyncio.start_server(handle, self.edge_ip, 0)
        self.servers.append(server)
        self.by_dst[original_dst] = (self.edge_ip, server.sockets[0].getsockname()[1])
        return self.by_dst[original_dst]

    def close(self):
        for s in self.servers:
            s.close()


PEER_SECRET = b"a secret the boosters share"


def share_dir(root, name, files):
    d = root / name
    d.mkdir()
    for fname, data in files.items():
        (d / fname).write_bytes(data)
    return ShareIndex.scan(d)


@pytest.fixture
async def two_clusters(tmp_path):
    """Cluster A: 127.0.1.1-3, cluster B: 127.0.2.1-2, one booster each, peered."""
    cores, boosters, edges, servents = {}, {}, {}, {}
    for name, net in (("A", "127.0.1"), ("B", "127.0.2")):
        core = BoosterCore(BoosterConfig(f"booster-{name}", (f"{net}.0/24",), sightings=0, local_wait=0.3),
                           secret=name.encode())
        cores[name] = core
        boosters[name] = GnutellaBooster(core, peer_secret=PEER_SECRET)
        edges[name] = FakeEdge(boosters[name], f"{net}.254")
    await boosters["A"].start(("127.0.1.253", 0), [])
    await boosters["B"].start(("127.0.2.253", 0), [("127.0.1.253", boosters["A"].peer_port)])
    tune = dict(alive_interval=1.0, alive_timeout=5.0)
    files = {
        "A1": {}, "A2": {"notes.txt": b"n"}, "A3": {"local lullaby.ogg": os.urandom(20000)},
        "B1": {}, "B2": {"faraway fugue.flac": os.urandom(30000)},
    }
    for sname, f in files.items():
        net = "127.0.1" if sname[0] == "A" else "127.0.2"
        ip = f"{net}.{sname[1]}"
        servents[sname] = Servent(listen=(ip, 0), shares=share_dir(tmp_path, sname, f), seed=hash(sname) % 1000,
                                  config=NodeConfig(**tune), target_peers=3)
    for s in servents.values():
        await s.start()
    # every servent was told of remote peers only: the edge intercepts those connections
    for sname, s in servents.items():
        mine = sname[0]
        other = "B" if mine == "A" else "A"
        edges[mine].divert(s, "127.0.2.0/24" if mine == "A" else "127.0.1.0/24")
        for rname, r in servents.items():
            if rname[0] == other:
                s.connect(r.advertise_ip, r.port)
    yield SimpleNamespace(cores=cores, boosters=boosters, servents=servents, edges=edges)
    for s in servents.values():
        await s.stop()
    for b in boosters.values():
        await b.stop()
    for e in edges.values():
        e.close()


async def test_booster_clusters_the_overlay_and_keeps_queries_local(two_clusters, tmp_path):
    t = two_clusters
    s = t.servents
    # steering: each servent keeps one intercepted link and meets the local servents
    await until(lambda: all(len(x.links) >= 2 for x in (s["A1"], s["A2"], s["A3"])), timeout=10)
    await until(lambda: len(t.boosters["A"].peer_writers) == 1 and len(t.boosters["B"].peer_writers) == 1)
    await until(lambda: t.cores["A"].peers and all(p.table for p in t.cores["A"].peers.values()), timeout=5)
    for name, servent in s.items():
        links = [link.remote_ip for link in servent.links.values()]
        # one link (at most) through the edge, the others inside the cluster
        assert sum(ip.endswith(".254") for ip in links) <= 1, (name, links)
        assert all(ip.startswith("127.0.1." if name[0] == "A" else "127.0.2.") for ip in links), (name, links)
    assert t.cores["A"].stats["steered_away"] >= 1

    # a file inside the cluster: answered there, nothing sent to the other booster
    before = t.boosters["A"].peer_traffic["booster-B"]["query_out"]
    hits = await s["A1"].search("lullaby", timeout=1.5)
    assert {h.ip for h, _ in hits} == {"127.0.1.3"}
    # the negative, proven at a defined point: the core settled the query (a local hit, no longer
    # pending), so no timer can send it out later
    state = t.cores["A"].queries.get(hits[0][1].query_guid)
    assert state is not None and state.local_hits >= 1 and not state.forwarded
    assert hits[0][1].query_guid not in t.cores["A"].pending
    assert t.boosters["A"].peer_traffic["booster-B"]["query_out"] == before

    # a file only in the other cluster: no local table may hold it, so it goes out at once
    # (adaptive forwarding), to the one booster that may have it
    hits = await s["A1"].search("faraway fugue", timeout=EVENT_WAIT, max_hits=1)
    assert t.cores["A"].stats["forwarded_by_tables"] >= 1
    assert t.boosters["A"].peer_traffic["booster-B"]["query_out"] == before + 1
    assert t.cores["B"].stats["remote_queries_injected"] == 1
    # this edge is opaque (servents reach the outside only through the box): the hit names a relay
    # on the box, never the remote servent 127.0.2.2
    hit = hits[0][0]
    assert hit.ip == "127.0.1.254" and t.boosters["A"].stats["opaque_hits_rewritten"] >= 1
    assert t.boosters["A"].relays[("127.0.1.254", ("127.0.2.2", s["B2"].port))] == hit.port
    # the servent's own download goes to the relay, which passes it on untouched (SHA-1 verified)
    result = await s["A1"].download(hit, hits[0][1], tmp_path)
    assert result.ok and result.size == 30000
    assert t.boosters["A"].stats["relayed_connections"] == 1 and t.boosters["A"].stats["spliced_bytes_down"] > 30000
    # no cluster-A servent ever connected to an address outside its cluster
    for name in ("A1", "A2", "A3"):
        assert all(ip.startswith("127.0.1.") for ip in s[name].dialed), (name, s[name].dialed)

    # a file nowhere: the cluster table of B says no, so it does not even cross
    await s["A2"].search("nonexistent zebra", timeout=1.0)
    assert t.cores["A"].stats["queries_not_sent_by_table"] >= 1
    assert t.boosters["A"].peer_traffic["booster-B"]["query_out"] == before + 1


async def test_alive_pings_answered_as_the_impersonated_peer(two_clusters):
    t = two_clusters
    # servents send TTL-1 alive pings on idle links (every second here); the booster answers
    # them as the impersonated peer, with the same GUID, so no link is dropped
    await until(lambda: all(x.stats["alive_answered"] >= 3 for x in t.servents.values()), timeout=8)
    assert all(x.stats["alive_timeouts"] == 0 for x in t.servents.values())
    assert t.cores["A"].stats["pings_answered"] >= 3 and t.cores["B"].stats["pings_answered"] >= 2


def test_impersonated_identities_are_distinct_and_stable():
    core = BoosterCore(BoosterConfig("x"), secret=b"s")
    a = core.impersonate(("10.12.0.11", 6346))
    b = core.impersonate(("10.12.0.12", 6346))
    assert a.guid != b.guid and a.guid == core.impersonate(("10.12.0.11", 6346)).guid
    assert (a.ip, a.port, a.ultrapeer) == ("10.12.0.11", 6346, True)
    other = BoosterCore(BoosterConfig("y"), secret=b"t")
    assert other.impersonate(("10.12.0.11", 6346)).guid != a.guid


async def test_push_crosses_boosters_to_a_firewalled_source(two_clusters, tmp_path):
    t = two_clusters
    s = t.servents
    s["B2"].config.firewalled = True                  # its hits now carry the push flag
    await until(lambda: t.cores["A"].peers and all(p.table for p in t.cores["A"].peers.values()), timeout=10)
    await until(lambda: all(len(x.links) >= 2 for x in s.values()), timeout=10)
    hits = await s["A1"].search("faraway fugue", timeout=EVENT_WAIT, max_hits=1)
    (hit, event), = hits
    assert hit.push
    result = await s["A1"].download(hit, event, tmp_path)
    assert result.ok and result.size == 30000
    assert t.cores["A"].stats["pushes_to_boosters"] == 1         # A's booster sent it across ...
    assert t.cores["B"].stats["pushes_routed"] == 1              # ... B's gave it to the servent
    assert s["B2"].stats["push_uploads"] == 1 and s["A1"].stats["giv_received"] == 1


def test_command_line_reaches_the_core_and_the_adapter():
    from gnutella.booster import adapter_options, build_parser, config_from_args
    args = build_parser().parse_args(["--name", "e1", "--cluster", "10.11.0.0/24", "--forward", "wait",
                                      "--local-wait", "0.5", "--max-relays", "7", "--no-compression"])
    config = config_from_args(args)
    assert (config.forward, config.local_wait, config.cluster) == ("wait", 0.5, ("10.11.0.0/24",))
    assert build_parser().parse_args(["--name", "e1"]).forward == "adaptive"
    options = adapter_options(args)
    assert options["max_relays"] == 7 and options["compress"] is False
    adapter = GnutellaBooster(BoosterCore(config, b"s"), **options)
    assert adapter.max_relays == 7 and adapter.link_options.compress is False and not adapter.link_options.tls


async def test_a_dead_critical_task_fails_the_booster_loudly():
    """Review finding: the booster's critical tasks (ticker, peer sessions) could die and nobody
    awaited ``supervisor.wait_failed()``: the booster ran on degraded, boxd saw it healthy."""
    from cliruntime.supervisor import TaskFailed
    core = BoosterCore(BoosterConfig("e1", ("127.0.1.0/24",)), b"s")
    adapter = GnutellaBooster(core, tick=0.01)

    def broken_tick(now):
        raise RuntimeError("tick broke")
    core.tick = broken_tick
    await adapter.start(None, [])
    try:
        with pytest.raises(TaskFailed, match="ticker"):
            await asyncio.wait_for(adapter.raise_on_failure(), EVENT_WAIT)
    finally:
        await adapter.stop()


# ---------------------------------------------------------------- booster peers authenticate

from boxcore.framing import encode_frame  # noqa: E402

from gnutella import b2b  # noqa: E402


async def _frames(reader, framer, want: int, timeout: float = EVENT_WAIT) -> list:
    """Read until ``want`` frames came (or EOF: what came)."""
    got: list = []
    async with asyncio.timeout(timeout):
        while len(got) < want:
            data = await reader.read(1 << 16)
            if not data:
                break
            got += framer.feed(data)
    return got


async def _listening_booster(**options) -> GnutellaBooster:
    core = BoosterCore(BoosterConfig("booster-A", ("127.0.1.0/24",)), secret=b"A")
    adapter = GnutellaBooster(core, **{"peer_secret": PEER_SECRET, **options})
    await adapter.start(("127.0.1.253", 0), [])
    return adapter


async def _authenticated_client(adapter, secret=PEER_SECRET):
    reader, writer = await asyncio.open_connection("127.0.1.253", adapter.peer_port)
    framer = b2b.frame_decoder()
    auth = b2b.PeerAuth(secret, True, os.urandom(32))
    writer.write(b2b.encode(auth.challenge()))
    (challenge,) = await _frames(reader, framer, 1)
    for reply in auth.receive(challenge):
        writer.write(b2b.encode(reply))
    return reader, writer, framer, auth


async def test_a_stranger_on_the_peer_port_gets_nothing_and_injects_nothing():
    """Review finding: any TCP client of --peer-listen became a peer, got our hello and keyword
    table before sending anything, and could flood queries into the cluster."""
    adapter = await _listening_booster()
    try:
        reader, writer = await asyncio.open_connection("127.0.1.253", adapter.peer_port)
        framer = b2b.frame_decoder()
        first = await _frames(reader, framer, 1)
        assert [f["t"] for f in first] == ["challenge"]          # no hello, no table
        writer.write(encode_frame({"t": "hello", "id": "booster-B", "cluster": [], "v": 1})
                     + encode_frame({"t": "query", "guid": b"\x01" * 16, "ttl": 2, "hops": 0, "criteria": "song",
                                     "flags": 0x8000, "urns": []}))
        assert await _frames(reader, framer, 1) == []             # closed, nothing more said
        await until(lambda: adapter.stats["peer_auth_failed"] == 1, what="the refusal counted")
        assert adapter.core.stats["peers_up"] == 0 and adapter.core.stats["peer_rx_query"] == 0
        writer.close()
    finally:
        await adapter.stop()


async def test_a_wrong_secret_is_refused_and_the_right_one_gets_hello_and_table():
    adapter = await _listening_booster()
    try:
        reader, writer, framer, auth = await _authenticated_client(adapter, secret=b"not the secret, same length!")
        # at most the booster's own proof (an HMAC: nothing to learn from it), then the close
        assert [f["t"] for f in await _frames(reader, framer, 3)] in ([], ["auth"])
        await until(lambda: adapter.stats["peer_auth_failed"] == 1, what="the wrong MAC counted")
        writer.close()
        reader, writer, framer, auth = await _authenticated_client(adapter)
        got = await _frames(reader, framer, 3)
        assert got[0]["t"] == "auth"
        auth.receive(got[0])
        assert auth.done and [f["t"] for f in got[1:]] == ["hello", "table"]
        assert adapter.stats["peer_authenticated"] == 1
        writer.close()
    finally:
        await adapter.stop()


async def test_peer_connections_are_capped_and_silent_ones_time_out(monkeypatch):
    import gnutella.booster as booster_module
    monkeypatch.setattr(booster_module, "HANDSHAKE_TIMEOUT", 0.5)
    adapter = await _listening_booster(max_peer_connections=2)
    try:
        conns = [await asyncio.open_connection("127.0.1.253", adapter.peer_port) for _ in range(3)]
        await until(lambda: adapter.stats["peer_refused_cap"] == 1, what="the third refused at accept")
        # the two others never answer the challenge: closed at the authentication deadline
        for reader, _ in conns[:2]:
            assert [f["t"] for f in await _frames(reader, b2b.frame_decoder(), 5)] == ["challenge"]
        await until(lambda: adapter.stats["peer_auth_timeout"] == 2, what="both timed out")
        for _, writer in conns:
            writer.close()
    finally:
        await adapter.stop()


async def test_a_silent_peer_link_is_closed_and_a_live_one_kept_alive():
    adapter = await _listening_booster(peer_idle_timeout=0.6)
    try:
        reader, writer, framer, auth = await _authenticated_client(adapter)
        got = await _frames(reader, framer, 3)
        auth.receive(got[0])
        # we say nothing: the booster keeps talking (alive) but closes our silent link
        rest = await _frames(reader, framer, 100)
        assert any(f["t"] == "alive" for f in rest)
        await until(lambda: adapter.stats["peer_idle_closed"] == 1, what="the idle link closed")
        writer.close()
    finally:
        await adapter.stop()


def test_a_mac_got_from_a_second_connection_cannot_be_replayed():
    """The MAC names which end computed it: the acceptor's answer on one connection is no
    connector's proof on another, even for the same nonces."""
    acceptor = b2b.PeerAuth(PEER_SECRET, False, b"\x01" * 32)
    acceptor.receive({"t": "challenge", "nonce": b"\x02" * 32})
    # an attacker opens a second connection to the same booster and sends the first one's nonce
    second = b2b.PeerAuth(PEER_SECRET, False, b"\x02" * 32)
    (reflected,) = second.receive({"t": "challenge", "nonce": b"\x01" * 32})
    with pytest.raises(b2b.B2BAuthError, match="wrong MAC"):
        acceptor.receive(reflected)
    with pytest.raises(b2b.B2BAuthError, match="before authentication"):
        b2b.PeerAuth(PEER_SECRET, True, b"\x03" * 32).receive({"t": "query"})


async def test_peering_without_a_secret_must_be_asked_for(tmp_path):
    from gnutella.booster import adapter_options, build_parser
    core = BoosterCore(BoosterConfig("booster-A", ("127.0.1.0/24",)), secret=b"A")
    with pytest.raises(ValueError, match="secret"):
        await GnutellaBooster(core).start(("127.0.1.253", 0), [])
    from cliruntime import ConfigError
    with pytest.raises(ConfigError, match="peer-secret-file"):
        adapter_options(build_parser().parse_args(["--name", "e1", "--peer-listen", "127.0.0.1:6350"]))
    secret = tmp_path / "secret"
    secret.write_bytes(b"0123456789abcdef0123\n")
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        adapter_options(build_parser().parse_args(["--name", "e1", "--booster", "127.0.0.1:6350",
                                                   "--peer-secret-file", str(secret)]))
    secret.chmod(0o600)
    options = adapter_options(build_parser().parse_args(["--name", "e1", "--booster", "127.0.0.1:6350",
                                                         "--peer-secret-file", str(secret)]))
    assert options["peer_secret"] == b"0123456789abcdef0123"
    open_ = adapter_options(build_parser().parse_args(["--name", "e1", "--peer-listen", "127.0.0.1:6350",
                                                       "--peer-allow-unauthenticated"]))
    assert open_["peer_secret"] is None and open_["unauthenticated_peers"]


async def test_a_silent_local_link_is_closed():
    core = BoosterCore(BoosterConfig("booster-A", ("127.0.1.0/24",)), secret=b"A")
    adapter = GnutellaBooster(core, idle_timeout=0.5)
    edge = FakeEdge(adapter, "127.0.1.254")
    await adapter.start(None, [])
    try:
        reader, writer = await asyncio.open_connection(*await edge.intercept(("127.0.2.9", 6346)),
                                                       local_addr=("127.0.1.7", 0))
        writer.write(b"GNUTELLA CONNECT/0.6\r\nX-Ultrapeer: True\r\nListen-IP: 127.0.1.7:6346\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"GNUTELLA/0.6 200")
        writer.write(b"GNUTELLA/0.6 200 OK\r\n\r\n")
        async with asyncio.timeout(EVENT_WAIT):
            while await reader.read(1 << 16):       # the booster's pings; then its close
                pass
        assert adapter.stats["idle_timeouts"] == 1 and adapter.local_streams == {}
        writer.close()
    finally:
        await adapter.stop()
        edge.close()


async def test_boosters_with_different_secrets_never_peer():
    a = await _listening_booster()
    core_b = BoosterCore(BoosterConfig("booster-B", ("127.0.2.0/24",)), secret=b"B")
    b = GnutellaBooster(core_b, peer_secret=b"another secret, not the mesh's")
    await b.start(None, [("127.0.1.253", a.peer_port)])
    try:
        await until(lambda: a.stats["peer_auth_failed"] and b.stats["peer_auth_failed"],
                    what="both ends refusing the other")
        assert a.core.stats["peers_up"] == 0 and core_b.stats["peers_up"] == 0
        assert a.stats["peer_authenticated"] == 0 and b.stats["peer_authenticated"] == 0
    finally:
        await b.stop()
        await a.stop()
