"""``gnutella-booster``: the clustering booster at a cluster's edge (asyncio around :mod:`gnutella.boostercore`).

It asks boxd to intercept the TCP connections that local servents open to
Gnutella ports outside the cluster (``intercept_tcp``: transparently, or relayed
by the box, whichever the box does).  Each intercepted connection is identified by
its first bytes: ``GNUTELLA CONNECT`` is answered as the remote peer would
(the booster impersonates it); anything else (an HTTP download, a GIV) is
spliced on to where it was going, untouched, over the booster's own connection
onward (``Subscription.connect_onward``).  Boosters of other clusters are
reached over the msgpack protocol of :mod:`gnutella.b2b`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import logging
import os
import random
import socket
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Awaitable, Callable

from boxcore.splice import SpliceCounters, splice
from cliruntime.supervisor import Supervisor, within
from cliruntime import (ConfigError, RunContext, host_port, make_parser, non_negative_float,
                             positive_int, run_async)

from . import b2b
from .boostercore import BoosterConfig, BoosterCore, SendPeer, opaque_hit, opaque_push
from .handshake import (ConnectRequest, Established, Handshake, HandshakeError, Identity, LinkOptions, Negotiated,
                        Refused, Response, answer_headers, final_headers, identity_headers, listen_address,
                        negotiated, offer_headers)
from .node import Close, Send
from .channel import Channel
from .stream import MessageStream, pump_messages
from .wire import DEFAULT_MAX_PAYLOAD, Bye, Message, Push, QueryHit, new_guid

log = logging.getLogger("gnutella.booster")

HANDSHAKE_TIMEOUT = 10.0
from .stream import MAX_OUTBUF  # noqa: E402  (b2b links share the bound)
RECONNECT = 1.0
MAX_RECONNECT = 60.0         # backoff towards a booster that does not authenticate
MAX_PEER_CONNECTIONS = 64    # booster peer connections (authenticated or not yet) at once
IDLE_TIMEOUT = 120.0         # servent links: as the servent's --idle-timeout
PEER_IDLE_TIMEOUT = 120.0    # a booster link silent this long is gone (we send "alive" every third of it)
STALL_TIMEOUT = 120.0        # a peer that leaves what we send unread this long holds its slot for nothing
MAX_TRACKED = 10000          # intercepted (client, destination) pairs reported in the stats

Splicer = Callable[[Any], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def _plain_onward(conn: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await within(asyncio.open_connection(*conn.original_dst), HANDSHAKE_TIMEOUT)


# what a splice (a download or GIV passed on untouched) adds to the booster's stats
SPLICE_COUNTERS = SpliceCounters(bytes_up="spliced_bytes_up", bytes_down="spliced_bytes_down",
                                 idle="splice_idle", stalled="splice_stalled")


class GnutellaBooster:
    """The I/O of the booster: intercepted connections and booster peers."""

    def __init__(self, core: BoosterCore, stats: Counter | None = None, splice: Splicer = _plain_onward,
                 tick: float = 0.05, max_splices: int = 256, upstream: int = 0,
                 max_payload: int = DEFAULT_MAX_PAYLOAD, compress: bool = True, max_relays: int = 1024,
                 stall_timeout: float = STALL_TIMEOUT, peer_secret: bytes | None = None,
                 unauthenticated_peers: bool = False, max_peer_connections: int = MAX_PEER_CONNECTIONS,
                 peer_idle_timeout: float = PEER_IDLE_TIMEOUT,
                 idle_timeout: float | None = IDLE_TIMEOUT) -> None:
        if peer_secret is not None and len(peer_secret) < b2b.MIN_SECRET_BYTES:
            raise ValueError(f"the booster peers' secret needs at least {b2b.MIN_SECRET_BYTES} bytes")
        self.core = core
        # booster peers prove they hold this shared secret before anything is sent or processed;
        # without one, peering is refused unless the operator explicitly allows strangers
        self.peer_secret = peer_secret
        self.unauthenticated_peers = unauthenticated_peers
        self.max_peer_connections = max_peer_connections
        self.peer_idle_timeout = peer_idle_timeout
        # a servent link (local or upstream) without a byte this long is dead or hostile: servents
        # ping every link at least every 30 s (alive pings after 15 s idle)
        self.idle_timeout = idle_timeout
        self._peer_connections = 0
        self.peer_last_tx: dict[int, float] = {}
        self.stall_timeout = stall_timeout
        self.stats: Counter = stats if stats is not None else core.stats
        self.splice = splice
        self.max_splices = max_splices
        self.max_payload = max_payload
        self.splices = 0
        self.max_upstream = upstream            # conventional links to outside servents (0: none)
        self.upstream_addrs: set[tuple[str, int]] = set()
        self.upstream_traffic: Counter = Counter()
        self.tick_interval = tick
        self.local_streams: dict[int, MessageStream] = {}
        self.peer_writers: dict[int, asyncio.StreamWriter] = {}
        self.peer_names: dict[int, str] = {}
        self.peer_outgoing: dict[int, bool] = {}
        self.peer_traffic: dict[str, Counter] = defaultdict(Counter)
        self.intercepted: Counter = Counter()        # "client_ip>dst_ip:port" -> connections
        self.spliced_pairs: Counter = Counter()      # the same for connections passed on (downloads, GIV)
        # opaque mode (servents see the box, not the remote): cid -> the box address the servent dialed
        self.opaque: dict[int, str] = {}
        # relays on the box towards remote addresses the servents may only reach through it
        self.max_relays = max_relays
        self.relays: dict[tuple[str, tuple[str, int]], int] = {}      # (box ip, remote) -> relay port
        self._relay_servers: list[asyncio.AbstractServer] = []
        self._ids = 1
        self.supervisor = Supervisor("gnutella-booster", logger=log)
        # links with local servents and outside peers: deflate offered and accepted; the booster reads
        # every message, so it declines the TLS upgrade (a servent then stays in clear with it)
        self.link_options = LinkOptions(compress=compress, tls=False)
        self._server: asyncio.AbstractServer | None = None
        self.peer_port: int | None = None
        self.rng = random.Random()

    # ---------------------------------------------------------------- lifecycle

    async def start(self, peer_listen: tuple[str, int] | None, boosters: list[tuple[str, int]]) -> None:
        if (peer_listen is not None or boosters) and self.peer_secret is None and not self.unauthenticated_peers:
            raise ValueError("booster peering needs a shared secret (or unauthenticated peers explicitly allowed)")
        if peer_listen is not None:
            self._server = await asyncio.start_server(self._accept_peer, *peer_listen)
            self.peer_port = self._server.sockets[0].getsockname()[1]
        for addr in boosters:
            self.supervisor.spawn(self._keep_peer(addr), name=f"booster-peer {addr[0]}:{addr[1]}")
        self.supervisor.spawn(self._ticker(), name="ticker")

    async def raise_on_failure(self) -> None:
        """Raise the first critical failure of our tasks (the ticker, a booster peer's session,
        an upstream link): whoever runs the booster races this, so a dead critical task ends the
        booster loudly instead of leaving it running degraded while boxd sees it healthy."""
        raise await self.supervisor.wait_failed()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for pid, writer in list(self.peer_writers.items()):
            self._send_peer(pid, {"t": "bye", "reason": "shutting down"})
            writer.close()
        for stream in list(self.local_streams.values()):
            stream.close()
        for server in self._relay_servers:
            server.close()
        await self.supervisor.aclose()

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def snapshot(self) -> dict:
        return {
            "name": self.core.config.name,
            "local_connections": len(self.local_streams),
            "tasks": self.supervisor.snapshot(),
            "boosters": sorted(self.peer_names.get(pid, "?") for pid in self.peer_writers),
            "b2b": {name: dict(c) for name, c in self.peer_traffic.items()},
            "intercepted": dict(self.intercepted),
            "spliced": dict(self.spliced_pairs),
            "relays": {f"{ip}:{port}": f"{r[0]}:{r[1]}" for (ip, r), port in self.relays.items()},
            "local_servents": [f"{h}:{p}" for h, p in self.core.known_servents],
        }

    def boundary(self) -> dict:
        """What crossed the cluster boundary through this booster (b2b messages and bytes)."""
        out = Counter()
        for c in self.peer_traffic.values():
            out.update(c)
        up = self.upstream_traffic
        return {"messages_out": out["msgs_out"] + up["msgs_out"], "bytes_out": out["bytes_out"] + up["bytes_out"],
                "messages_in": out["msgs_in"] + up["msgs_in"], "bytes_in": out["bytes_in"] + up["bytes_in"],
                "upstream_messages_out": up["msgs_out"],
                "spliced_bytes": self.stats["spliced_bytes_up"] + self.stats["spliced_bytes_down"]}

    # ---------------------------------------------------------------- actions

    def _perform(self, actions: list) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._send_local(action.cid, action.message)
            elif isinstance(action, SendPeer):
                self._send_peer(action.pid, action.obj)
            elif isinstance(action, Close):
                stream = self.local_streams.get(action.cid)
                if stream is not None:
                    if action.bye_code is not None:
                        self._send_local(action.cid, Message(new_guid(), 1, 0, Bye(action.bye_code, action.reason)))
                    stream.close()

    def _send_local(self, cid: int, msg: Message) -> None:
        stream = self.local_streams.get(cid)
        if stream is None or stream.is_closing():
            return
        if cid in self.opaque:
            msg = self._opaque(cid, msg)
            if msg is None:
                return
        if stream.backlogged():
            self.stats["local_tx_dropped_backlog"] += 1
            return
        sent = stream.send(msg)
        if cid in self.core.upstreams:
            self.upstream_traffic["msgs_out"] += 1
            self.upstream_traffic["bytes_out"] += sent
            self.stats[f"upstream_tx_{msg.type_name}"] += 1
        else:
            self.stats[f"local_tx_{msg.type_name}"] += 1

    def _send_peer(self, pid: int, obj: dict) -> None:
        writer = self.peer_writers.get(pid)
        if writer is None or writer.is_closing():
            return
        transport = writer.transport
        if transport is not None and transport.get_write_buffer_size() > MAX_OUTBUF:
            self.stats["peer_tx_dropped_backlog"] += 1
            return
        try:
            frame = b2b.encode(obj)
        except (ValueError, TypeError, OverflowError) as exc:   # B2BDecodeError is a ValueError
            self.stats["peer_encode_failed"] += 1      # that message alone is lost, not the peer link
            log.warning("b2b %s not sent, it cannot be encoded: %s", obj.get("t"), exc)
            return
        writer.write(frame)
        self.peer_last_tx[pid] = time.monotonic()
        traffic = self.peer_traffic[self.peer_names.get(pid, f"#{pid}")]
        traffic["msgs_out"] += 1
        traffic["bytes_out"] += len(frame)
        traffic[f"{obj['t']}_out"] += 1

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            now = time.monotonic()
            self._perform(self.core.tick(now))
            for pid, sent in list(self.peer_last_tx.items()):
                if now - sent >= self.peer_idle_timeout / 3:
                    self._send_peer(pid, {"t": "alive"})

    # ---------------------------------------------------------------- intercepted connections

    async def on_intercepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Any) -> None:
        """boxcore's intercept_tcp handler: conn.client, conn.original_dst."""
        self.stats["intercepted"] += 1
        try:
            first = await within(reader.readline(), HANDSHAKE_TIMEOUT)
        except (asyncio.TimeoutError, OSError, ValueError):
            self.stats["intercepted_silent"] += 1
            return
        if first.startswith(b"GNUTELLA CONNECT/"):
            self._track(self.intercepted, conn)
            await self._gnutella(reader, writer, conn, first)
        else:
            await self._splice(reader, writer, conn, first)

    def _track(self, table: Counter, conn: Any) -> None:
        key = f"{conn.client[0]}>{conn.original_dst[0]}:{conn.original_dst[1]}"
        if key in table or len(table) < MAX_TRACKED:
            table[key] += 1
        else:
            self.stats["intercepted_untracked"] += 1

    # ---------------------------------------------------------------- opaque mode

    def _opaque(self, cid: int, msg: Message) -> Message | None:
        """A hit or push for a servent behind an opaque box: every remote address becomes a relay
        on the box, so the servent never learns (nor dials) an address past it."""
        payload = msg.payload
        box_ip = self.opaque[cid]
        if isinstance(payload, QueryHit) and not self.core.is_local(payload.ip):
            relay = self._relay_for(box_ip, (payload.ip, payload.port))
            if relay is None:
                self.stats["opaque_hits_dropped"] += 1     # no relay left: better lost than leaked
                return None
            self.stats["opaque_hits_rewritten"] += 1
            return Message(msg.guid, msg.ttl, msg.hops, opaque_hit(payload, (box_ip, relay)))
        if isinstance(payload, Push) and not self.core.is_local(payload.ip):
            relay = self._relay_for(box_ip, (payload.ip, payload.port))
            if relay is None:
                self.stats["opaque_pushes_dropped"] += 1
                return None
            self.stats["opaque_pushes_rewritten"] += 1
            return Message(msg.guid, msg.ttl, msg.hops, opaque_push(payload, (box_ip, relay)))
        return msg

    def _relay_for(self, box_ip: str, remote: tuple[str, int]) -> int | None:
        """The port on ``box_ip`` whose connections are passed on to ``remote`` (opened on first use;
        the socket listens at once, so a connection that comes before the server task runs waits
        in the backlog)."""
        key = (box_ip, remote)
        port = self.relays.get(key)
        if port is not None:
            return port
        if len(self.relays) >= self.max_relays:
            self.stats["relays_refused"] += 1
            return None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((box_ip, 0))
            sock.listen(64)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            self.stats["relay_bind_failed"] += 1
            log.warning("cannot open a relay on %s for %s:%d: %s", box_ip, *remote, exc)
            return None
        port = sock.getsockname()[1]
        self.relays[key] = port
        self.stats["relays_opened"] += 1
        self.supervisor.spawn(self._serve_relay(sock, remote), name=f"relay {box_ip}:{port}")
        return port

    async def _serve_relay(self, sock: socket.socket, remote: tuple[str, int]) -> None:
        async def relay(reader, writer) -> None:
            peer = writer.get_extra_info("peername") or ("0.0.0.0", 0)
            conn = SimpleNamespace(client=peer[:2], original_dst=remote)
            self.stats["relayed_connections"] += 1
            try:
                await self._splice(reader, writer, conn, b"")
            finally:
                writer.close()

        server = await asyncio.start_server(relay, sock=sock)
        self._relay_servers.append(server)
        await server.serve_forever()

    async def _splice(self, reader, writer, conn, first: bytes) -> None:
        """Not Gnutella overlay traffic (a download, a GIV...): pass it on untouched."""
        self._track(self.spliced_pairs, conn)
        if self.splices >= self.max_splices:
            self.stats["splice_refused"] += 1          # bounded: the client will retry
            return
        self.splices += 1
        self.stats["spliced"] += 1
        try:
            try:
                up_reader, up_writer = await self.splice(conn)
            except (OSError, asyncio.TimeoutError) as exc:
                self.stats["splice_failed"] += 1
                log.debug("splice to %s failed: %r", conn.original_dst, exc)
                return
            if first:
                up_writer.write(first)
                self.stats["spliced_bytes_up"] += len(first)
            try:
                await splice((reader, writer), (up_reader, up_writer), self.stats, idle=self.stall_timeout,
                             stall=self.stall_timeout, counters=SPLICE_COUNTERS)
            finally:
                up_writer.close()
        finally:
            self.splices -= 1

    async def _gnutella(self, reader, writer, conn, first: bytes) -> None:
        client_ip = conn.client[0]
        channel = Channel(reader, writer)
        sockname = channel.sockname()
        shown = (sockname[0], sockname[1]) if sockname else tuple(conn.original_dst)
        hs = Handshake("server")
        data = first
        est: Established | None = None
        settled = Negotiated()
        sent = identity_headers(self.core.impersonate(tuple(conn.original_dst), shown))
        leaf = False
        listen = (client_ip, 0)
        reserved = False
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):     # every read and write of the handshake
                while est is None:
                    for event in hs.receive_data(data):
                        if isinstance(event, ConnectRequest):
                            listen = listen_address(event.headers) or (client_ip, conn.original_dst[1])
                            if not self.core.is_local(listen[0]):
                                listen = (client_ip, listen[1])
                            decision = self.core.decide(event, listen)
                            me = self.core.impersonate(tuple(conn.original_dst), shown)
                            sent = identity_headers(me, client_ip)
                            sent["X-Try-Ultrapeers"] = ",".join(
                                f"{h}:{p}" for h, p in self.core.local_hosts(exclude=listen))
                            if decision.accepted and event.version == "0.6":
                                answer_headers(sent, event.headers, self.link_options)
                            out, done = hs.respond(decision.code, decision.reason, sent)
                            channel.write(out)
                            await channel.drain()
                            if not decision.accepted:
                                self.stats[f"refused_{decision.code}"] += 1
                                self.core.learn_servent(listen)
                                return
                            leaf = decision.as_leaf
                            reserved = True
                            est = done
                        elif isinstance(event, Established):
                            est = event
                            if event.version == "0.6":
                                settled = negotiated("server", sent, event.headers)
                        elif isinstance(event, Refused):
                            self.stats[f"refused_by_servent_{event.code}"] += 1
                            log.info("local servent %s declined: GNUTELLA/0.6 %d %s", client_ip, event.code,
                                     event.reason)
                    if est is not None:
                        break
                    data = await channel.read()
                    if not data:
                        return
        except (HandshakeError, asyncio.TimeoutError, OSError, RuntimeError) as exc:
            self.stats["handshake_failed"] += 1
            log.debug("intercepted handshake from %s failed: %r", client_ip, exc)
            est = None
        finally:
            if est is None and reserved:
                self.core.release(listen)
        if est is None:
            return
        original = (conn.original_dst[0], conn.original_dst[1])
        if self.max_upstream and original not in self.upstream_addrs and len(self.upstream_addrs) < self.max_upstream:
            self.upstream_addrs.add(original)
            self.supervisor.spawn(self._keep_upstream(original), name=f"upstream {original[0]}:{original[1]}")
        cid = self._next_id()
        stream = MessageStream(channel, settled, stats=self.stats)
        self.local_streams[cid] = stream
        if tuple(shown) != original:
            self.opaque[cid] = shown[0]          # the servent reaches the outside only through this box
        if settled.deflate_out or settled.inflate_in:
            self.stats["local_links_compressed"] += 1
        self._perform(self.core.local_up(cid, time.monotonic(), client_ip, listen, tuple(conn.original_dst), leaf,
                                         shown))
        log.debug("impersonating %s:%d for %s (%s)", *conn.original_dst, client_ip, "leaf" if leaf else "ultrapeer")
        try:
            await pump_messages(
                stream, est.leftover, self.max_payload, self.stats,
                lambda msg, now: self._perform(self.core.local_message(cid, msg, now)),
                keep_going=lambda: not stream.is_closing(), label=f"local {cid}",
                idle_timeout=self.idle_timeout, stall_timeout=self.stall_timeout)
        finally:
            self.local_streams.pop(cid, None)
            self.opaque.pop(cid, None)
            self.core.local_down(cid)

    # ---------------------------------------------------------------- conventional outside peers

    async def _keep_upstream(self, addr: tuple[str, int]) -> None:
        """Peer with an outside servent the conventional way (a 0.6 connection of our own)."""
        backoff = 2.0
        while True:
            try:
                reader, writer = await self.splice(SimpleNamespace(client=("0.0.0.0", 0), original_dst=addr))
            except (OSError, asyncio.TimeoutError):
                self.stats["upstream_connect_failed"] += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)
                continue
            try:
                if await self._upstream_session(reader, writer, addr):
                    backoff = 2.0
            finally:
                writer.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 60.0)

    async def _upstream_session(self, reader, writer, addr: tuple[str, int]) -> bool:
        channel = Channel(reader, writer)
        sockname = channel.sockname() or ("127.0.0.1", 0)
        digest = hashlib.sha1(self.core.secret + b"upstream").digest()
        # port 0: the booster takes no Gnutella connection of its own, so it advertises no Listen-IP
        me = Identity(new_guid(digest[:16]), sockname[0], 0, True, self.core.config.user_agent)
        hs = Handshake("client")
        channel.write(hs.connect(offer_headers(identity_headers(me, addr[0]), self.link_options)))
        est: Established | None = None
        settled = Negotiated()
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):     # every read and write of the handshake
                while est is None:
                    await channel.drain()
                    data = await channel.read()
                    if not data:
                        return False
                    for event in hs.receive_data(data):
                        if isinstance(event, Refused):
                            self.stats[f"upstream_refused_{event.code}"] += 1
                            log.warning("outside servent %s:%d refused the connection: GNUTELLA/0.6 %d %s",
                                        *addr, event.code, event.reason)
                            return False
                        if isinstance(event, Response):
                            final = final_headers(event.headers, self.link_options, offered_tls=False)
                            out, est = hs.confirm(final)
                            settled = negotiated("client", final, event.headers)
                            channel.write(out)
        except (HandshakeError, asyncio.TimeoutError, OSError) as exc:
            self.stats["upstream_handshake_failed"] += 1
            log.debug("upstream handshake with %s failed: %r", addr, exc)
            return False
        uid = self._next_id()
        stream = MessageStream(channel, settled, stats=self.stats)
        self.local_streams[uid] = stream
        self._perform(self.core.upstream_up(uid, me))
        log.info("peering with outside servent %s:%d", *addr)
        try:
            await pump_messages(
                stream, est.leftover, self.max_payload, self.stats,
                lambda msg, now: self._perform(self.core.upstream_message(uid, msg, now)),
                keep_going=lambda: not stream.is_closing(), traffic=self.upstream_traffic,
                label=f"upstream {uid}", stall_timeout=self.stall_timeout)
        finally:
            self.local_streams.pop(uid, None)
            self.core.upstream_down(uid)
        return True

    # ---------------------------------------------------------------- booster peers

    async def _keep_peer(self, addr: tuple[str, int]) -> None:
        """Keep a connection to another booster, reconnecting when it drops."""
        refused = 0
        while True:
            try:
                reader, writer = await within(asyncio.open_connection(*addr), HANDSHAKE_TIMEOUT)
            except (OSError, asyncio.TimeoutError):
                self.stats["peer_connect_failed"] += 1
                await asyncio.sleep(RECONNECT)
                continue
            if await self._peer_session(reader, writer, outgoing=True):
                refused = 0
                await asyncio.sleep(RECONNECT)
            else:   # not authenticated (another secret?): ask again less and less often
                refused += 1
                await asyncio.sleep(min(MAX_RECONNECT, RECONNECT * 2 ** refused))

    def _accept_peer(self, reader, writer) -> None:
        if self._peer_connections >= self.max_peer_connections:
            self.stats["peer_refused_cap"] += 1      # bounded: past the cap a connection is closed at once
            writer.close()
            return
        self.supervisor.spawn(self._peer_session(reader, writer, outgoing=False), name="booster peer in",
                              critical=False)

    async def _authenticate(self, reader, writer, framer, outgoing: bool, traffic: Counter) -> list:
        """Run :class:`b2b.PeerAuth` (under the caller's deadline); the frames that followed the
        peer's proof in the same read.  Raises B2BAuthError, FramingError or ConnectionError.
        What it sends and reads is counted in ``traffic`` (it crosses the cluster boundary too)."""
        assert self.peer_secret is not None
        auth = b2b.PeerAuth(self.peer_secret, outgoing, os.urandom(b2b.NONCE_BYTES))

        def send(obj: dict) -> None:
            frame = b2b.encode(obj)
            writer.write(frame)
            traffic.update({"msgs_out": 1, "bytes_out": len(frame), f"{obj['t']}_out": 1})
        send(auth.challenge())
        while True:
            data = await reader.read(4096)
            if not data:
                raise ConnectionError("closed during authentication")
            traffic["bytes_in"] += len(data)
            frames = framer.feed(data)
            for n, obj in enumerate(frames):
                if isinstance(obj, b2b.B2BDecodeError):
                    raise b2b.B2BAuthError(f"malformed frame before authentication: {obj}")
                traffic["msgs_in"] += 1
                for reply in auth.receive(obj):
                    send(reply)
                if auth.done:
                    return frames[n + 1:]
            await writer.drain()

    async def _peer_session(self, reader, writer, outgoing: bool) -> bool:
        """One booster link, from authentication to close; whether it was authenticated."""
        self._peer_connections += 1
        try:
            return await self._peer_link(reader, writer, outgoing)
        finally:
            self._peer_connections -= 1
            writer.close()

    async def _peer_link(self, reader, writer, outgoing: bool) -> bool:
        framer = b2b.frame_decoder()
        frames: list = []
        auth_traffic: Counter = Counter()
        if self.peer_secret is not None:
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    frames = await self._authenticate(reader, writer, framer, outgoing, auth_traffic)
            except TimeoutError:
                self.stats["peer_auth_timeout"] += 1
                return False
            except (b2b.B2BDecodeError, b2b.FramingError) as exc:
                self.stats["peer_auth_failed"] += 1
                log.warning("booster peer %s refused: %s", writer.get_extra_info("peername"), exc)
                return False
            except OSError:      # ConnectionError included
                self.stats["peer_auth_closed"] += 1
                return False
            self.stats["peer_authenticated"] += 1
        await self._serve_peer(reader, writer, outgoing, framer, frames, auth_traffic)
        return True

    async def _serve_peer(self, reader, writer, outgoing: bool, framer, frames: list, auth_traffic: Counter) -> None:
        """An authenticated (or, when allowed, unauthenticated) booster link until it ends."""
        pid = self._next_id()
        self.peer_traffic[f"#{pid}"].update(auth_traffic)     # under the peer's name once its hello comes
        self.peer_writers[pid] = writer
        self.peer_outgoing[pid] = outgoing
        self._perform(self.core.peer_up(pid))
        try:
            if not self._peer_frames(pid, frames):
                return
            while True:
                try:
                    data = await within(reader.read(1 << 16), self.peer_idle_timeout)
                except TimeoutError:
                    self.stats["peer_idle_closed"] += 1
                    log.info("booster peer %d: silent for %.0f s; closing", pid, self.peer_idle_timeout)
                    return
                if not data:
                    return
                self.peer_traffic[self.peer_names.get(pid, f"#{pid}")]["bytes_in"] += len(data)
                try:
                    frames = framer.feed(data)
                except b2b.FramingError as exc:
                    self.stats["peer_framing_errors"] += 1
                    log.info("booster peer %d: %s; closing", pid, exc)
                    return
                if not self._peer_frames(pid, frames):
                    return
                try:
                    await within(writer.drain(), self.stall_timeout)
                except TimeoutError:
                    self.stats["peer_stalled"] += 1
                    log.info("booster peer %d: not reading our frames for %.0f s; closing", pid, self.stall_timeout)
                    return
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.peer_writers.pop(pid, None)
            self.peer_outgoing.pop(pid, None)
            self.peer_names.pop(pid, None)
            self.peer_last_tx.pop(pid, None)
            self.core.peer_down(pid)

    def _peer_frames(self, pid: int, frames: list) -> bool:
        """Hand a peer's frames to the core; False when the link must end (bye, duplicate)."""
        now = time.monotonic()
        for obj in frames:
            if isinstance(obj, b2b.B2BDecodeError):
                self.stats["peer_malformed"] += 1
                continue
            kind = obj["t"]
            if kind in ("challenge", "auth"):      # only ever before the link is up
                self.stats["peer_malformed"] += 1
                continue
            self.peer_traffic[self.peer_names.get(pid, f"#{pid}")]["msgs_in"] += 1
            if kind == "alive":
                continue
            if kind == "hello" and not self._register_peer(pid, obj["id"]):
                return False
            self._perform(self.core.peer_message(pid, obj, now))
            if kind == "bye":
                return False
        return True

    def _register_peer(self, pid: int, name: str) -> bool:
        """One link per pair of boosters: of two crossing connections keep the one
        opened by the booster with the smaller name."""
        me = self.core.config.name
        if name == me:
            self.stats["peer_self"] += 1
            return False
        for other, other_name in list(self.peer_names.items()):
            if other_name != name:
                continue
            opener_new = me if self.peer_outgoing.get(pid) else name
            if opener_new == min(me, name):
                self.peer_writers[other].close()
                self.peer_names.pop(other, None)
            else:
                self.stats["peer_duplicate_closed"] += 1
                return False
        self.peer_names[pid] = name
        early = self.peer_traffic.pop(f"#{pid}", None)      # what was sent before its hello arrived
        if early:
            self.peer_traffic[name].update(early)
        return True


# ---------------------------------------------------------------- command line

def _prefix(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 prefix: {text!r}") from None


def _port_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        first, last = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PORT or LO-HI, got {text!r}") from None
    if not 1 <= first <= last <= 65535:
        raise argparse.ArgumentTypeError(f"bad port range {text!r}")
    return first, last


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "gnutella-booster",
        "Cluster the Gnutella overlay at a cluster's edge: impersonate remote peers, keep pings and "
        "queries inside, peer with the other clusters' boosters.",
        examples=[
            "gnutella-booster --control /run/boxd/control.sock --name edge1 --cluster 10.11.0.0/24 "
            "--peer-listen 10.100.1.2:6350 --booster 10.100.2.2:6350 --booster 10.100.3.2:6350",
            "gnutella-booster --control /tmp/boxd.sock --name demo --cluster 127.0.0.0/8 --port 16346",
        ])
    parser.add_argument("--control", default=os.environ.get("BOXD_CONTROL", "/run/boxd/control.sock"),
                        help="boxd's control socket")
    parser.add_argument("--name", required=True, help="this booster's name (unique among boosters)")
    parser.add_argument("--cluster", type=_prefix, action="append", default=[],
                        help="a prefix of the local cluster (repeatable); intercepts connections from it")
    parser.add_argument("--port", type=_port_range, action="append", default=[],
                        help="Gnutella port (or LO-HI range) to intercept; default 6346. Connections whose "
                             "first bytes are not a Gnutella connect are passed on untouched")
    parser.add_argument("--peer-listen", type=host_port, default=None, help="where other boosters connect")
    parser.add_argument("--booster", type=host_port, action="append", default=[],
                        help="another cluster's booster to peer with (repeatable)")
    parser.add_argument("--peer-secret-file", type=Path, default=None,
                        help="file holding the secret shared by the boosters (at least 16 bytes, readable by "
                             "its owner only): peers prove they hold it (HMAC challenge-response, both ways) "
                             "before anything is sent or processed; needed with --peer-listen/--booster")
    parser.add_argument("--peer-allow-unauthenticated", action="store_true",
                        help="peer without a secret: any TCP client of --peer-listen becomes a booster peer "
                             "(it gets the cluster's keyword table and may flood queries into the cluster); "
                             "only on a network where nothing else can reach --peer-listen")
    parser.add_argument("--idle-timeout", type=non_negative_float, default=IDLE_TIMEOUT,
                        help="close a servent link (local or upstream) silent this many seconds (0: never)")
    parser.add_argument("--max-peer-connections", type=positive_int, default=MAX_PEER_CONNECTIONS,
                        help="booster peer connections at once (more are closed at accept)")
    parser.add_argument("--sightings", type=int, default=6,
                        help="forward a local query outside after this many local copies (0: only by time)")
    parser.add_argument("--local-wait", type=non_negative_float, default=0.3,
                        help="... or after this many seconds without enough local hits")
    parser.add_argument("--enough-local-hits", type=positive_int, default=1,
                        help="local hits that keep a query inside the cluster")
    parser.add_argument("--trust-tables", action="store_true",
                        help="with --forward wait: still forward at once when every local servent sent a QRP "
                             "table and none may have it (adaptive does this anyway)")
    parser.add_argument("--forward", choices=["adaptive", "wait"], default="adaptive",
                        help="adaptive: a query no local table may answer goes out at once, the others after the "
                             "local attempt took longer than local hits recently take (at most --local-wait); "
                             "wait: every local query waits --local-wait or --sightings (the paper's rule)")
    parser.add_argument("--max-per-client", type=positive_int, default=1,
                        help="intercepted connections accepted per local servent (more are steered to local peers)")
    parser.add_argument("--remote-ttl", type=positive_int, default=2, help="TTL of queries from other clusters")
    parser.add_argument("--max-queries", type=positive_int, default=20000, help="bounded query routing table")
    parser.add_argument("--max-splices", type=positive_int, default=256,
                        help="non-Gnutella connections passed on at once (more are refused)")
    parser.add_argument("--max-payload", type=positive_int, default=DEFAULT_MAX_PAYLOAD,
                        help="largest message payload accepted from a servent (bytes)")
    parser.add_argument("--max-relays", type=positive_int, default=1024,
                        help="opaque mode: relay ports opened on the box towards remote sources (past it, hits "
                             "from other clusters are dropped rather than leaked)")
    parser.add_argument("--no-compression", action="store_true",
                        help="neither offer nor accept deflate on links with servents")
    parser.add_argument("--secret", default=None, help="seed of the impersonated identities (default: random)")
    parser.add_argument("--upstream", type=int, default=0, metavar="N",
                        help="also peer the conventional way with up to N of the outside servents that local "
                             "servents dial (for clusters without a booster); 0: boosters only")
    return parser


def read_peer_secret(path: Path) -> bytes:
    """The boosters' shared secret from ``path``: at least 16 bytes (surrounding whitespace
    ignored), in a file no one but its owner may read."""
    try:
        mode = path.stat().st_mode
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the peer secret file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ConfigError(f"peer secret file {path} is readable by others (mode {mode & 0o777:o}): chmod 600 it")
    if len(secret) < b2b.MIN_SECRET_BYTES:
        raise ConfigError(f"peer secret in {path} has {len(secret)} bytes, at least {b2b.MIN_SECRET_BYTES} needed")
    return secret


def adapter_options(args) -> dict:
    """The adapter's keyword arguments from the command line: ``GnutellaBooster(core, stats, splice,
    **adapter_options(args))``."""
    peering = args.peer_listen is not None or bool(args.booster)
    if peering and args.peer_secret_file is None and not args.peer_allow_unauthenticated:
        raise ConfigError("--peer-listen/--booster need --peer-secret-file (or, on a closed network, "
                          "--peer-allow-unauthenticated)")
    secret = read_peer_secret(args.peer_secret_file) if args.peer_secret_file is not None else None
    return {"upstream": args.upstream, "max_splices": args.max_splices, "max_payload": args.max_payload,
            "compress": not args.no_compression, "max_relays": args.max_relays, "peer_secret": secret,
            "unauthenticated_peers": args.peer_allow_unauthenticated,
            "max_peer_connections": args.max_peer_connections, "idle_timeout": args.idle_timeout or None}


def config_from_args(args) -> BoosterConfig:
    """The core's configuration from the command line (what ``amain`` builds the core with)."""
    if args.sightings < 0:
        raise ConfigError("--sightings must be >= 0")
    return BoosterConfig(args.name, tuple(args.cluster), args.sightings, args.local_wait, args.enough_local_hits,
                         args.max_queries, args.remote_ttl, args.max_per_client, trust_tables=args.trust_tables,
                         forward=args.forward)


async def amain(args, ctx: RunContext) -> int:
    import contextlib

    from boxcore.booster import Subscription, run_booster
    from boxcore.rules import Match

    if args.upstream < 0:
        raise ConfigError("--upstream must be >= 0")
    ports = args.port or [(6346, 6346)]
    config = config_from_args(args)
    options = adapter_options(args)      # configuration errors before boxd is involved
    secret = args.secret.encode() if args.secret else os.urandom(16)
    core = BoosterCore(config, secret, stats=ctx.stats)
    interceptions: dict[int, Subscription] = {}

    async def splice(conn: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        # onward as the subscription that intercepted the connection does it; the adapter's own
        # upstream links (no cookie) leave past any of them, so they are never intercepted either
        sub = interceptions.get(getattr(conn, "cookie", None))
        if sub is not None:
            return await sub.connect_onward(conn, timeout=HANDSHAKE_TIMEOUT)
        return await next(iter(interceptions.values())).connect_onward(tuple(conn.original_dst),
                                                                        timeout=HANDSHAKE_TIMEOUT)

    @contextlib.asynccontextmanager
    async def serve(booster):
        adapter = GnutellaBooster(core, ctx.stats, splice, **options)
        ctx.stats.providers["booster"] = adapter.snapshot
        ctx.stats.providers["boundary"] = adapter.boundary
        for lo, hi in ports:
            for prefix in args.cluster or [None]:
                match = Match(proto="tcp", src=prefix, dst_port=lo if lo == hi else (lo, hi))
                sub = await booster.intercept_tcp(match, adapter.on_intercepted)
                interceptions[sub.cookie] = sub
        try:
            await adapter.start(args.peer_listen, args.booster)
        except OSError as exc:
            raise ConfigError(f"cannot listen for boosters on {args.peer_listen}: {exc.strerror}") from None
        # a critical task of the adapter that dies is a critical failure of the booster: exit 1
        booster.spawn(adapter.raise_on_failure(), name="gnutella adapter")
        from boxcore.panels import publish_panel_every
        from .panel import OverlayPanel
        publish_panel_every(booster, OverlayPanel(adapter).build)
        log.info("booster %s ready on engine %s: cluster %s, ports %s, peers %s", args.name, booster.engine,
                 ",".join(args.cluster) or "any", ports, args.booster)
        try:
            yield
        finally:
            await adapter.stop()

    return await run_booster("gnutella-booster", serve, control=args.control, stop=ctx.stop)


def main(argv: list[str] | None = None) -> int:
    return run_async(build_parser(), amain, argv)


if __name__ == "__main__":
    sys.exit(main())
