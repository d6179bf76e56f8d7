"""``gnutella-servent``: a Gnutella 0.6 servent on asyncio (the I/O around :mod:`gnutella.node`).

One TCP port carries everything, as in real servents: ``GNUTELLA CONNECT``
opens an overlay connection, ``GET``/``HEAD`` is an HTTP download, ``GIV``
is a pushed connection coming back for one of our downloads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import ssl
import sys
import time
import urllib.parse
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cliruntime.supervisor import Supervisor, first_of, within
from cliruntime import (ConfigError, RunContext, host_port, ip_address, make_parser,
                             non_negative_float, positive_int, run_async)

from . import http as ghttp
from .channel import Channel, TlsContexts, tls_contexts
from .handshake import (ConnectRequest, Established, Handshake, HandshakeError, Headers, Identity, LinkOptions,
                        Negotiated, Refused, Response, SlotState, answer_headers, check_outgoing, decide_incoming,
                        final_headers, identity_headers, listen_address, negotiated, offer_headers, parse_address,
                        remote_guid, try_addresses)
from .node import (Close, Node, NodeConfig, PushRequested, SearchHit, Send, needs_push)
from .share import ShareIndex
from .stream import MessageStream, pump_messages
from .wire import DEFAULT_MAX_PAYLOAD, Bye, Message, new_guid

log = logging.getLogger("gnutella.servent")

HANDSHAKE_TIMEOUT = 10.0
RETRY_AFTER = 30.0          # seconds before dialing a refused address again
CONNECT_BACKOFF = 2.0       # first retry of an address that did not answer (doubling up to RETRY_AFTER)
BAN_BACKOFF = 300.0         # after a 429 (gtk-gnutella's reconnect ban)
MAX_RETRY_ENTRIES = 4096
MAX_TRAFFIC_ENTRIES = 4096
MAX_TLS_HOSTS = 4096
# PUSH answers are TCP connects to an address a stranger chose: bounded so we reflect little.
MAX_PUSH_ANSWERS = 8        # at once
MAX_PUSH_PER_IP = 2         # at once towards one address
PUSH_REPEAT_WINDOW = 30.0   # the same (ip, port, index) is answered once in this window
MAX_PUSH_REMEMBERED = 1024
MAX_FIRST_LINE = 4096       # a request line, a CONNECT line or a GIV line
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_IDLE_TIMEOUT = 120.0   # alive pings every 15 s keep a healthy link far from this
STOP_TIMEOUT = 10.0            # tasks cancelled by stop() must have ended by then


@dataclass
class Hit:
    """One result of one of our searches, as printed by ``search``."""
    query: str
    ip: str
    port: int
    index: int
    name: str
    size: int
    sha1: str | None
    servent_guid: str
    hops: int
    ms: float
    push: bool

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _hits_of(query: str, event: SearchHit, started: float) -> list[Hit]:
    hit = event.hit
    return [Hit(query, hit.ip, hit.port, r.index, r.name, r.size, r.sha1, hit.servent_guid.hex(),
                event.hops, round((event.at - started) * 1000, 2), needs_push(hit)) for r in hit.results]


@dataclass
class _Link:
    cid: int
    stream: MessageStream
    remote_ip: str
    traffic: Counter
    stats: Counter

    def send(self, msg: Message) -> None:
        if self.stream.is_closing():
            return
        if self.stream.backlogged():
            self.stats["tx_dropped_backlog"] += 1      # bounded: a stalled peer loses messages
            return
        self.traffic["msgs_out"] += 1
        self.traffic["bytes_out"] += self.stream.send(msg)
        self.stats[f"tx_{msg.type_name}"] += 1


class UnsafeFileName(ValueError):
    """A remote file name that cannot name a file inside the download directory."""


MAX_NAME_BYTES = 255        # NAME_MAX of Linux file systems
MAX_SAME_NAME = 1000


def download_destination(dest_dir: Path, name: str) -> Path:
    """Where a download named ``name`` by a remote QueryHit goes: a plain file name inside
    ``dest_dir`` (no separators, not ``.``/``..``, no NUL or control characters), never an
    existing file (``name (1).ext``, ``name (2).ext``, ... instead; the download then opens it
    exclusively)."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name
            or any(ord(c) < 0x20 or c == "\x7f" for c in name)):
        raise UnsafeFileName(f"remote file name {name!r} is not a plain file name")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise UnsafeFileName(f"remote file name of more than {MAX_NAME_BYTES} bytes")
    base = dest_dir.resolve()
    stem, suffix = Path(name).stem, Path(name).suffix
    for n in range(MAX_SAME_NAME):
        candidate = base / (name if n == 0 else f"{stem} ({n}){suffix}")
        if candidate.parent != base:      # belt and braces: the name added no directory
            raise UnsafeFileName(f"remote file name {name!r} leaves {base}")
        if not candidate.exists() and not candidate.is_symlink():
            return candidate
    raise UnsafeFileName(f"{MAX_SAME_NAME} files named like {name!r} already in {base}")


class Servent:
    def __init__(self, *, listen: tuple[str, int], shares: ShareIndex, advertise_ip: str | None = None,
                 ultrapeer: bool = True, config: NodeConfig | None = None, peers: list[tuple[str, int]] = (),
                 target_peers: int = 4, max_peers: int = 8, max_leaves: int = 30, max_ultrapeers: int = 3,
                 stats: Counter | None = None, seed: int | None = None, user_agent: str = "booster-boxes/0.1",
                 allow_04: bool = True, tick: float = 1.0, connect_version: str = "0.6",
                 max_payload: int = DEFAULT_MAX_PAYLOAD, tls: bool = True, compress: bool = True,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.listen = listen
        # TLS (offered and accepted on links and downloads) with a certificate made now; None: off
        self.tls: TlsContexts | None = tls_contexts() if tls else None
        self.compress = compress                   # offer and accept deflate on links
        self.advertise_ip = advertise_ip or (listen[0] if listen[0] not in ("0.0.0.0", "") else "127.0.0.1")
        self.shares = shares
        self.config = config or NodeConfig(ultrapeer=ultrapeer)
        self.config.ultrapeer = ultrapeer
        self.config.tls = tls
        self.bootstrap = list(peers)
        self.target_peers = target_peers
        self.max_peers = max_peers
        self.max_leaves = max_leaves
        self.max_ultrapeers = max_ultrapeers
        self.stats: Counter = stats if stats is not None else Counter()
        self.rng = random.Random(seed)
        self.user_agent = user_agent
        self.allow_04 = allow_04
        self.connect_version = connect_version     # "0.4" to act as an old servent
        self.max_payload = max_payload             # larger messages end the connection (framing_errors)
        self.tick_interval = tick
        self.guid = new_guid(self.rng.randbytes(16))
        self.node: Node | None = None
        self.links: dict[int, _Link] = {}
        self.traffic: dict[str, Counter] = defaultdict(Counter)   # per remote IP
        self.dialed: Counter = Counter()       # connections we opened (links, downloads, GIV), per remote IP
        self._next_cid = 1
        self._server: asyncio.AbstractServer | None = None
        self.supervisor = Supervisor("gnutella-servent", logger=log)
        self.max_connections = max_connections     # accepted connections at once (links, HTTP, GIV)
        self.idle_timeout = idle_timeout           # a link silent this long is closed (alive pings keep it busy)
        # the first line, a whole handshake, an HTTP request head or a GIV must arrive within this (slowloris)
        self.handshake_timeout = handshake_timeout
        self.link_options = LinkOptions(compress=compress, tls=tls)
        self.tls_hosts: OrderedDict[tuple[str, int], None] = OrderedDict()   # peers known to speak TLS
        self._accepting = 0
        self._connecting: set[tuple[str, int]] = set()
        self._connected_addrs: dict[int, tuple[str, int]] = {}
        self._retry_after: dict[tuple[str, int], float] = {}
        self._connect_failures: dict[tuple[str, int], int] = {}
        self._search_listeners: dict[bytes, Callable[[SearchHit], None]] = {}
        self._giv_waiters: dict[tuple[bytes, int], asyncio.Future] = {}
        self.max_push_answers = MAX_PUSH_ANSWERS
        self._push_answering: Counter = Counter()          # target ip -> answers in flight
        self._push_answered: OrderedDict[tuple[str, int, int], float] = OrderedDict()
        self.established = asyncio.Event()
        self.port = listen[1]

    # ---------------------------------------------------------------- lifecycle

    @property
    def identity(self) -> Identity:
        return Identity(self.guid, self.advertise_ip, self.port, self.config.ultrapeer, self.user_agent)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.listen[0], self.listen[1], limit=1 << 16)
        self.port = self._server.sockets[0].getsockname()[1]
        self.node = Node(self.config, self.identity, self.shares, self.rng, self.stats)
        for host, port in self.bootstrap:
            self.node.learn_host(host, port)
        self.supervisor.spawn(self._ticker(), name="ticker")
        for host, port in self.bootstrap:
            self.connect(host, port)
        log.info("servent %s listening on %s:%d (%s, %d files)", self.guid.hex(), self.advertise_ip,
                 self.port, "ultrapeer" if self.config.ultrapeer else "leaf", len(self.shares))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for cid in list(self.links):
            self._close(cid, "shutting down", 200)
        try:
            await within(self.supervisor.aclose(), STOP_TIMEOUT)
        except TimeoutError:
            # a task that outlives its cancellation is a bug: say so rather than hang the caller
            raise RuntimeError(f"servent {self.guid.hex()}: {self.supervisor.active} tasks still running "
                               f"{STOP_TIMEOUT:.0f} s after they were cancelled") from None
        if self._server is not None:
            with contextlib.suppress(Exception):
                await within(self._server.wait_closed(), 2)

    def _learn_tls(self, addr: tuple[str, int]) -> None:
        self.tls_hosts[addr] = None
        self.tls_hosts.move_to_end(addr)
        while len(self.tls_hosts) > MAX_TLS_HOSTS:
            self.tls_hosts.popitem(last=False)
            self.stats["tls_hosts_evicted"] += 1

    def snapshot(self) -> dict:
        return {
            "guid": self.guid.hex(),
            "address": f"{self.advertise_ip}:{self.port}",
            "peers": {cid: f"{a[0]}:{a[1]}" for cid, a in self._connected_addrs.items()},
            "traffic": {ip: dict(c) for ip, c in self.traffic.items()},
            "dialed": dict(self.dialed),
        }

    # ---------------------------------------------------------------- connections

    async def run_until(self, stop: asyncio.Event, duration: float | None = None) -> BaseException | None:
        """Serve until ``stop`` is set or ``duration`` passes (None), or until a critical task
        (the ticker, the scripted queries) dies: that failure is returned, never run past."""
        with contextlib.suppress(asyncio.TimeoutError):
            await within(first_of(stop.wait(), self.supervisor.wait_failed()), duration)
        return self.supervisor.failed

    def _source(self) -> tuple[str, int] | None:
        # leave from our own address: a host may carry several servents, one per address
        return (self.listen[0], 0) if self.listen[0] not in ("0.0.0.0", "") else None

    def connect(self, host: str, port: int) -> None:
        addr = (host, port)
        if addr in self._connecting or addr in self._connected_addrs.values():
            return
        if (host, port) == (self.advertise_ip, self.port):
            return
        self._connecting.add(addr)
        self.supervisor.spawn(self._connect(addr), name="connect", critical=False)

    def _dial(self, ip: str) -> None:
        if ip in self.dialed or len(self.dialed) < MAX_TRAFFIC_ENTRIES:
            self.dialed[ip] += 1
        else:
            self.stats["dialed_untracked"] += 1

    async def _connect(self, addr: tuple[str, int]) -> None:
        try:
            await self._dial_and_run(addr)
        finally:   # whatever ends the attempt, the address may be dialled again (``wanted`` counts it)
            self._connecting.discard(addr)

    async def _dial_and_run(self, addr: tuple[str, int]) -> None:
        self._dial(addr[0])
        try:
            reader, writer = await within(
                asyncio.open_connection(*addr, limit=1 << 16, local_addr=self._source()), HANDSHAKE_TIMEOUT)
        except (OSError, asyncio.TimeoutError, OverflowError, ValueError) as exc:
            # OverflowError/ValueError: an address no socket takes (it should never have been learned)
            self.stats["connect_failed"] += 1
            # not up yet (servents start together) or gone: retry soon, then less and less often
            failures = self._connect_failures[addr] = self._connect_failures.get(addr, 0) + 1
            self._retry_after[addr] = time.monotonic() + min(RETRY_AFTER, CONNECT_BACKOFF * 2 ** (failures - 1))
            log.debug("connect to %s:%d failed: %r", *addr, exc)
            return
        if writer.get_extra_info("sockname") == writer.get_extra_info("peername"):
            # a port nothing listens on, dialled from that same ephemeral port: TCP connects the socket
            # to itself and our ClientHello comes back as the "answer" (SSL UNEXPECTED_MESSAGE): the
            # peer is down, not a peer without TLS
            self.stats["connect_self"] += 1
            writer.close()
            self._retry_after[addr] = time.monotonic() + RETRY_AFTER
            return
        self.stats["connect_out"] += 1
        self._connect_failures.pop(addr, None)
        channel = Channel(reader, writer)
        if self.tls is not None and (addr in self.tls_hosts or addr in self.node.tls_hosts):
            # a peer known to speak TLS is dialled in TLS from the first byte
            try:
                await within(channel.start_tls(self.tls.client, server_side=False), HANDSHAKE_TIMEOUT)
            except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
                self.stats["tls_direct_failed"] += 1
                self.tls_hosts.pop(addr, None)
                self.node.tls_hosts.pop(addr, None)
                log.info("TLS to %s:%d failed (%r); it will be dialled in clear", *addr, exc)
                channel.close()
                return
            self.stats["tls_direct_out"] += 1
        await self._session(channel, outgoing=True, initial=b"", dial=addr)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._accepting >= self.max_connections:
            self.stats["accept_refused_cap"] += 1      # bounded: past the cap a connection is closed at once
            writer.close()
            return
        self._accepting += 1
        self.supervisor.spawn(self._accepted(Channel(reader, writer)), name="incoming", critical=False)

    async def _accepted(self, channel: Channel) -> None:
        try:
            await self._accept_inner(channel)
        finally:
            self._accepting -= 1
            channel.close()

    async def _first_bytes(self, channel: Channel) -> bytes:
        """What arrived up to the end of the first line; a TLS ClientHello first switches to TLS."""
        data = await channel.read()
        if data[:1] == b"\x16" and self.tls is not None:
            await channel.start_tls(self.tls.server, server_side=True, leftover=data)
            self.stats["tls_direct_in"] += 1
            data = b""
        while b"\n" not in data:
            if len(data) > MAX_FIRST_LINE:
                raise ValueError("first line too long")
            more = await channel.read()
            if not more:
                raise ConnectionResetError("closed before the first line")
            data += more
        return data

    async def _accept_inner(self, channel: Channel) -> None:
        try:
            try:
                first = await within(self._first_bytes(channel), self.handshake_timeout)
            except (asyncio.TimeoutError, OSError, ValueError, ssl.SSLError):
                self.stats["accept_no_request"] += 1
                return
            if first.startswith(b"GNUTELLA CONNECT/"):
                self.stats["connect_in"] += 1
                await self._session(channel, outgoing=False, initial=first, dial=None)
            elif first.startswith((b"GET ", b"HEAD ")):
                await ghttp.serve_upload(channel, self.shares, first, self.user_agent, self.stats, self.tls,
                                         header_timeout=self.handshake_timeout)
            elif first.startswith(b"GIV "):
                await self._on_giv(first, channel)
            else:
                self.stats["accept_unknown_protocol"] += 1
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            log.debug("incoming connection failed: %r", exc)

    def slot_state(self) -> SlotState:
        assert self.node is not None
        peers, leaves, ultrapeers = self.node.slot_counts()
        return SlotState(self.config.ultrapeer, self.guid, peers, self.max_peers, leaves, self.max_leaves,
                         ultrapeers, self.max_ultrapeers, self.node.connected_guids(), self.allow_04)

    def _try_header(self) -> str:
        assert self.node is not None
        return ",".join(f"{h}:{p}" for h, p in self.node.hosts()[:10])

    async def _handshake(self, channel: Channel, outgoing: bool, initial: bytes, remote_ip: str,
                         dial: tuple[str, int] | None = None):
        """Run the handshake; return (Established, our_leaf, Negotiated) or None."""
        hs = Handshake("client" if outgoing else "server", version=self.connect_version if outgoing else "0.6")
        me = self.identity
        options = self.link_options if self.connect_version == "0.6" or not outgoing else LinkOptions(False, False)
        if channel.tls:           # dialled in TLS from the first byte: nothing to upgrade
            options = LinkOptions(compress=options.compress, tls=False)
        if outgoing:
            channel.write(hs.connect(offer_headers(identity_headers(me, remote_ip), options)))
        data = initial
        our_leaf = False
        sent = Headers()
        who = f"{dial[0]}:{dial[1]}" if dial else remote_ip
        async with asyncio.timeout(self.handshake_timeout):     # every read and drain of the handshake
            while True:
                for event in hs.receive_data(data):
                    if isinstance(event, ConnectRequest):
                        decision = decide_incoming(event, self.slot_state())
                        headers = identity_headers(me, remote_ip)
                        headers["X-Try-Ultrapeers"] = self._try_header()
                        if decision.accepted and event.version == "0.6":
                            answer_headers(headers, event.headers, options)
                        sent = headers
                        out, est = hs.respond(decision.code, decision.reason, headers)
                        channel.write(out)
                        if not decision.accepted:
                            self.stats[f"refused_in_{decision.code}"] += 1
                            log.info("refused %s: GNUTELLA/0.6 %d %s", who, decision.code, decision.reason)
                            await channel.drain()
                            return None
                        our_leaf = decision.as_leaf
                        if est is not None:
                            return est, our_leaf, Negotiated()
                    elif isinstance(event, Response):
                        decision = check_outgoing(event, me)
                        if not decision.accepted:
                            channel.write(hs.refuse_final(decision.code, decision.reason))
                            self.stats[f"refused_out_{decision.code}"] += 1
                            log.info("declined %s after its answer: GNUTELLA/0.6 %d %s", who, decision.code,
                                     decision.reason)
                            await channel.drain()
                            return None
                        final = final_headers(event.headers, options, offered_tls=options.tls)
                        out, est = hs.confirm(final)
                        channel.write(out)
                        return est, decision.as_leaf, negotiated("client", final, event.headers)
                    elif isinstance(event, Refused):
                        self.stats[f"refused_by_peer_{event.code}"] += 1
                        # a busy peer (503, with hosts to try) is routine; anything else is worth a warning
                        log.log(logging.INFO if event.code == 503 else logging.WARNING,
                                "%s refused the connection: GNUTELLA/0.6 %d %s", who, event.code, event.reason)
                        if event.code == 429 and dial is not None:
                            self._retry_after[dial] = time.monotonic() + BAN_BACKOFF
                        self._learn_try(event.headers)
                        return None
                    elif isinstance(event, Established):
                        return event, our_leaf, (negotiated("server", sent, event.headers) if event.version == "0.6"
                                                 else Negotiated())
                await channel.drain()
                data = await channel.read()
                if not data:
                    return None

    def _learn_try(self, headers: Headers) -> None:
        assert self.node is not None
        hosts, refused = try_addresses(headers)
        self.stats["try_hosts_refused"] += refused
        for host, port in hosts:
            self.node.learn_host(host, port)

    async def _session(self, channel: Channel, outgoing: bool, initial: bytes,
                       dial: tuple[str, int] | None) -> None:
        assert self.node is not None
        peername = channel.peername() or ("0.0.0.0", 0)
        remote_ip = peername[0]
        try:
            result = await self._handshake(channel, outgoing, initial, remote_ip, dial)
            if result is not None and result[2].tls:
                est, _, _ = result
                await within(channel.start_tls(self.tls.client if outgoing else self.tls.server,
                                             server_side=not outgoing, leftover=est.leftover),
                             HANDSHAKE_TIMEOUT)
                result = (Established(est.version, est.headers, b""), result[1], result[2])
                self.stats["tls_upgrades"] += 1
        except (HandshakeError, asyncio.TimeoutError, OSError, RuntimeError, ssl.SSLError) as exc:
            self.stats["handshake_failed"] += 1
            log.debug("handshake with %s failed: %r", remote_ip, exc)
            if dial:
                self._retry_after[dial] = time.monotonic() + RETRY_AFTER
            channel.close()
            return
        if result is None:
            if dial:
                # gtk-gnutella bans quick reconnects (429) for 5 minutes: respect that
                self._retry_after[dial] = max(time.monotonic() + RETRY_AFTER, self._retry_after.get(dial, 0.0))
            channel.close()
            return
        est, our_leaf, settled = result
        if settled.deflate_out or settled.inflate_in:
            self.stats["links_compressed"] += 1
        self._learn_try(est.headers)
        listen = listen_address(est.headers) or dial or (remote_ip, 0)
        if dial is not None:
            listen = dial
        remote_up = est.headers.flag("X-Ultrapeer")
        cid = self._next_cid
        self._next_cid += 1
        if settled.tls:
            self._learn_tls(listen)
        link = _Link(cid, MessageStream(channel, settled, stats=self.stats), remote_ip, self._traffic_of(remote_ip), self.stats)
        self.links[cid] = link
        self._connected_addrs[cid] = listen
        now = time.monotonic()
        self._perform(self.node.peer_up(cid, now, listen[0], listen[1], remote_guid(est.headers), est.version,
                                        remote_up is not False, our_leaf, est.headers.get("User-Agent") or "",
                                        remote_qrp="X-Ultrapeer-Query-Routing" in est.headers))
        self.established.set()
        log.debug("peer %d up: %s:%d (%s)", cid, *listen, "our leaf" if our_leaf else "peer")
        try:
            await pump_messages(
                link.stream, est.leftover, self.max_payload, self.stats,
                lambda msg, now: self._perform(self.node.receive(cid, msg, now)),
                keep_going=lambda: cid in self.links, traffic=link.traffic, label=f"peer {cid}",
                idle_timeout=self.idle_timeout)
        finally:
            self._drop(cid)

    def _traffic_of(self, remote_ip: str) -> Counter:
        """Per-remote-IP counters, bounded: past the limit new addresses share one "other" entry."""
        if remote_ip not in self.traffic and len(self.traffic) >= MAX_TRAFFIC_ENTRIES:
            self.stats["traffic_entries_refused"] += 1
            remote_ip = "other"
        return self.traffic[remote_ip]

    def _drop(self, cid: int) -> None:
        link = self.links.pop(cid, None)
        self._connected_addrs.pop(cid, None)
        if self.node is not None:
            self.node.peer_down(cid)
        if link is not None:
            link.stream.close()

    def _close(self, cid: int, reason: str, bye_code: int | None) -> None:
        link = self.links.get(cid)
        if link is None:
            return
        if bye_code is not None:
            link.send(Message(new_guid(self.rng.randbytes(16)), 1, 0, Bye(bye_code, reason)))
        self._drop(cid)

    def _perform(self, actions: list) -> None:
        for action in actions:
            if isinstance(action, Send):
                link = self.links.get(action.cid)
                if link is not None:
                    link.send(action.message)
            elif isinstance(action, Close):
                self._close(action.cid, action.reason, action.bye_code)
            elif isinstance(action, SearchHit):
                listener = self._search_listeners.get(action.query_guid)
                if listener is not None:
                    listener(action)
            elif isinstance(action, PushRequested) and self._push_allowed(action):
                self._push_answering[action.push.ip] += 1
                self.supervisor.spawn(self._answer_push(action), name="push", critical=False)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            assert self.node is not None
            now = time.monotonic()
            self._perform(self.node.tick(now))
            if len(self._retry_after) > MAX_RETRY_ENTRIES:
                self._retry_after = {a: t for a, t in self._retry_after.items() if t > now}
            if len(self._connect_failures) > MAX_RETRY_ENTRIES:
                self._connect_failures.clear()
            # keep the wanted number of connections from the host cache
            wanted = self.target_peers - len(self.links) - len(self._connecting)
            if wanted > 0:
                connected = set(self._connected_addrs.values())
                for host in self.node.hosts():
                    if wanted <= 0:
                        break
                    if host in connected or host in self._connecting or self._retry_after.get(host, 0) > now:
                        continue
                    self.connect(*host)
                    wanted -= 1

    # ---------------------------------------------------------------- searching

    def start_search(self, criteria: str, on_hit: Callable[[SearchHit], None],
                     urns: tuple[str, ...] = (), ttl: int | None = None) -> bytes:
        assert self.node is not None
        guid, actions = self.node.search(criteria, time.monotonic(), urns, ttl)
        self._search_listeners[guid] = on_hit
        while len(self._search_listeners) > 1000:
            self._search_listeners.pop(next(iter(self._search_listeners)))
        self._perform(actions)
        return guid

    def end_search(self, guid: bytes) -> None:
        self._search_listeners.pop(guid, None)

    async def search(self, criteria: str, timeout: float, max_hits: int = 1000,
                     on_hit: Callable[[Hit, SearchHit], None] | None = None) -> list[tuple[Hit, SearchHit]]:
        """Search, collecting hits until ``timeout`` or ``max_hits``."""
        started = time.monotonic()
        found: list[tuple[Hit, SearchHit]] = []
        seen: set[tuple] = set()
        enough = asyncio.Event()

        def collect(event: SearchHit) -> None:
            for hit in _hits_of(criteria, event, started):
                if len(found) >= max_hits:
                    break
                key = (hit.ip, hit.port, hit.index, hit.servent_guid)
                if key in seen:          # the same result by two paths
                    self.stats["hits_duplicate"] += 1
                    continue
                seen.add(key)
                found.append((hit, event))
                if on_hit is not None:
                    on_hit(hit, event)
            if len(found) >= max_hits:
                enough.set()

        guid = self.start_search(criteria, collect)
        with contextlib.suppress(asyncio.TimeoutError):
            await within(enough.wait(), timeout)
        self.end_search(guid)
        return found

    # ---------------------------------------------------------------- downloading

    async def download(self, hit: Hit, event: SearchHit | None, dest_dir: Path | None,
                       timeout: float = 30.0, max_bytes: int = 1 << 30) -> ghttp.DownloadResult:
        """Fetch a hit: directly, or by PUSH when the source is firewalled or unreachable.  The
        file lands in ``dest_dir`` under the hit's name made safe (:func:`download_destination`)."""
        dest = None
        if dest_dir is not None:
            try:
                dest = download_destination(dest_dir, hit.name)
            except UnsafeFileName as exc:
                self.stats["downloads_unsafe_name"] += 1
                log.warning("download refused: %s", exc)
                return ghttp.DownloadResult(False, 0, 0, None, None, str(exc))
        path = f"/uri-res/N2R?urn:sha1:{hit.sha1}" if hit.sha1 else f"/get/{hit.index}/{urllib.parse.quote(hit.name)}"
        if not hit.push:
            self._dial(hit.ip)
            result = await ghttp.download(hit.ip, hit.port, path, dest, hit.sha1, max_bytes, timeout, tls=self.tls,
                                          local_addr=self._source())
            if result.ok or event is None:
                self.stats["downloads_ok" if result.ok else "downloads_failed"] += 1
                return result
            self.stats["download_direct_failed"] += 1
        if event is None:
            return ghttp.DownloadResult(False, 0, 0, None, None, "source needs a push and no route is known")
        result = await self._download_by_push(hit, event, path, dest, timeout, max_bytes)
        self.stats["downloads_ok" if result.ok else "downloads_failed"] += 1
        return result

    async def _download_by_push(self, hit: Hit, event: SearchHit, path: str, dest: Path | None,
                                timeout: float, max_bytes: int) -> ghttp.DownloadResult:
        assert self.node is not None
        result = next((r for r in event.hit.results if r.index == hit.index), None)
        if result is None:
            return ghttp.DownloadResult(False, 0, 0, None, None, "result not in hit")
        key = (event.hit.servent_guid, hit.index)
        waiter = asyncio.get_running_loop().create_future()
        self._giv_waiters[key] = waiter
        actions = self.node.push_for(event.hit, result, self.advertise_ip, self.port)
        if not actions:
            self._giv_waiters.pop(key, None)
            return ghttp.DownloadResult(False, 0, 0, None, None, "no route for the push")
        self.stats["pushes_sent"] += 1
        self._perform(actions)
        try:
            channel, giv_done = await within(waiter, timeout)
        except asyncio.TimeoutError:
            return ghttp.DownloadResult(False, 0, 0, None, None, "no GIV came back")
        finally:
            self._giv_waiters.pop(key, None)
        try:
            return await within(
                ghttp.fetch(channel, path, f"{hit.ip}:{hit.port}", dest, hit.sha1, max_bytes, tls=self.tls), timeout)
        except (OSError, asyncio.TimeoutError, ghttp.HttpError, ssl.SSLError) as exc:
            return ghttp.DownloadResult(False, 0, 0, None, None, f"pushed download failed: {exc!r}")
        finally:
            channel.close()
            giv_done.set()

    async def _on_giv(self, first: bytes, channel: Channel) -> None:
        try:
            while b"\n\n" not in first:
                more = await within(channel.read(), self.handshake_timeout)
                if not more or len(first) > 1024:
                    self.stats["giv_malformed"] += 1
                    return
                first += more
            giv = ghttp.parse_giv(first.decode("utf-8", "replace").splitlines()[0])
        except (ghttp.HttpError, asyncio.TimeoutError):
            self.stats["giv_malformed"] += 1
            return
        waiter = self._giv_waiters.get((giv.servent_guid, giv.index))
        if waiter is None or waiter.done():
            self.stats["giv_unexpected"] += 1
            return
        self.stats["giv_received"] += 1
        done = asyncio.Event()
        waiter.set_result((channel, done))
        await done.wait()         # the downloader owns the connection now; it sets this when finished

    def _push_allowed(self, action: PushRequested) -> bool:
        """Whether to dial back for this PUSH: a dialable address, a file we share, not the same
        request again within :data:`PUSH_REPEAT_WINDOW`, and room under the caps (each refusal
        counted)."""
        push = action.push
        now = time.monotonic()
        if parse_address(f"{push.ip}:{push.port}") != (push.ip, push.port):
            self.stats["push_refused_address"] += 1
            return False
        if self.shares.get(push.file_index) is None:
            self.stats["push_unknown_file"] += 1
            return False
        key = (push.ip, push.port, push.file_index)
        while self._push_answered and (len(self._push_answered) > MAX_PUSH_REMEMBERED
                                       or now - next(iter(self._push_answered.values())) > PUSH_REPEAT_WINDOW):
            self._push_answered.popitem(last=False)
        if key in self._push_answered:
            self.stats["push_duplicate"] += 1
            return False
        if (sum(self._push_answering.values()) >= self.max_push_answers
                or self._push_answering[push.ip] >= MAX_PUSH_PER_IP):
            self.stats["push_refused_busy"] += 1
            return False
        self._push_answered[key] = now
        return True

    async def _answer_push(self, action: PushRequested) -> None:
        try:
            await self._push_upload(action.push)
        finally:
            self._push_answering[action.push.ip] -= 1
            if self._push_answering[action.push.ip] <= 0:
                del self._push_answering[action.push.ip]

    async def _push_upload(self, push) -> None:
        shared = self.shares.get(push.file_index)
        if shared is None:
            self.stats["push_unknown_file"] += 1
            return
        self._dial(push.ip)
        try:
            reader, writer = await within(
                asyncio.open_connection(push.ip, push.port, local_addr=self._source()), HANDSHAKE_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            self.stats["push_connect_failed"] += 1
            return
        channel = Channel(reader, writer)
        try:
            channel.write(ghttp.format_giv(shared.index, self.guid, shared.name))
            await channel.drain()
            await ghttp.serve_upload(channel, self.shares, b"", self.user_agent, self.stats, self.tls)
            self.stats["push_uploads"] += 1
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            self.stats["push_upload_failed"] += 1
        finally:
            channel.close()


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "gnutella-servent", "A Gnutella 0.6 servent: share a directory, search, download.",
        examples=[
            "gnutella-servent serve --listen 127.0.0.1:6346 --share ./music",
            "gnutella-servent serve --listen 127.0.0.1:6347 --share ./more --peer 127.0.0.1:6346 --leaf",
            "gnutella-servent search --peer 127.0.0.1:6346 --query 'free software song'",
            "gnutella-servent download --peer 127.0.0.1:6346 --query 'free software song' --out ./got",
        ])
    sub = parser.add_subparsers(dest="mode", required=True, metavar="MODE")

    def common(p: argparse.ArgumentParser, listen_default: str) -> None:
        # the suite's options also after the mode; SUPPRESS keeps a value given before it
        p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=argparse.SUPPRESS,
                       help="logging verbosity (logs go to stderr)")
        p.add_argument("--stats-json", metavar="FILE", type=Path, default=argparse.SUPPRESS,
                       help="write the final counters to FILE as JSON on exit")
        p.add_argument("--listen", type=host_port, default=host_port(listen_default),
                       help="address to listen on (Gnutella and HTTP on one port; port 0 picks one)")
        p.add_argument("--advertise", type=ip_address, default=None,
                       help="IP put in pongs, hits and handshakes (default: the listen address)")
        p.add_argument("--peer", type=host_port, action="append", default=[],
                       help="a servent to connect to (repeatable)")
        p.add_argument("--share", type=Path, default=None, help="directory whose files are shared")
        p.add_argument("--leaf", action="store_true", help="run as a leaf (default: ultrapeer)")
        p.add_argument("--connections", type=positive_int, default=4, help="outgoing connections to keep")
        p.add_argument("--max-peers", type=positive_int, default=8, help="ultrapeer connections accepted")
        p.add_argument("--max-leaves", type=positive_int, default=30, help="leaves accepted as an ultrapeer")
        p.add_argument("--ttl", type=positive_int, default=4, help="TTL of our queries")
        p.add_argument("--firewalled", action="store_true",
                       help="advertise the push flag in hits: downloaders must push (GIV)")
        p.add_argument("--seed", type=int, default=None, help="seed for GUIDs and choices")
        p.add_argument("--route-entries", type=positive_int, default=10000,
                       help="bounded routing table size (GUID entries)")
        p.add_argument("--handshake", choices=["0.6", "0.4"], default="0.6",
                       help="handshake used when connecting out (0.4: act as an old servent)")
        p.add_argument("--no-04", action="store_true", help="refuse incoming 0.4 handshakes")
        p.add_argument("--max-payload", type=positive_int, default=DEFAULT_MAX_PAYLOAD,
                       help="largest message payload accepted (bytes); a larger one closes the connection")
        p.add_argument("--max-connections", type=positive_int, default=DEFAULT_MAX_CONNECTIONS,
                       help="incoming connections handled at once (links, downloads, GIV); more are closed")
        p.add_argument("--handshake-timeout", type=non_negative_float, default=HANDSHAKE_TIMEOUT,
                       help="seconds for a connection's first line, its handshake or HTTP request head")
        p.add_argument("--idle-timeout", type=non_negative_float, default=DEFAULT_IDLE_TIMEOUT,
                       help="close a link silent for this many seconds (0: never)")
        p.add_argument("--no-tls", action="store_true",
                       help="neither offer nor accept the TLS upgrade (links and downloads stay in clear)")
        p.add_argument("--no-compression", action="store_true",
                       help="neither offer nor accept deflate stream compression on links")

    serve = sub.add_parser("serve", help="run a servent until stopped")
    common(serve, "127.0.0.1:6346")
    serve.add_argument("--duration", type=non_negative_float, default=0, help="stop after N seconds (0: run until signalled)")
    serve.add_argument("--queries", type=Path, default=None,
                       help='JSON lines {"at": s, "query": text, "download": bool} to issue while serving')
    serve.add_argument("--results", type=Path, default=None, help="JSON lines: one per query issued")
    serve.add_argument("--wait-hits", type=non_negative_float, default=5.0,
                       help="seconds a scripted query collects hits")
    serve.add_argument("--downloads", type=Path, default=None, help="where scripted downloads are stored")

    search = sub.add_parser("search", help="search and print hits as JSON lines")
    common(search, "127.0.0.1:0")
    search.add_argument("--query", required=True)
    search.add_argument("--timeout", type=non_negative_float, default=5.0)
    search.add_argument("--max-hits", type=positive_int, default=100)

    download = sub.add_parser("download", help="search, download the first hit, verify its SHA-1")
    common(download, "127.0.0.1:0")
    download.add_argument("--query", required=True)
    download.add_argument("--sha1", default=None, help="only a hit with this SHA-1 (base32)")
    download.add_argument("--out", type=Path, required=True, help="directory for the file")
    download.add_argument("--timeout", type=non_negative_float, default=10.0)
    return parser


def servent_from_args(args, stats: Counter) -> Servent:
    try:
        shares = ShareIndex.scan(args.share)
    except NotADirectoryError as exc:
        raise ConfigError(str(exc)) from None
    if args.mode != "serve" and not args.peer:
        raise ConfigError(f"{args.mode} needs at least one --peer")
    config = NodeConfig(ultrapeer=not args.leaf, query_ttl=args.ttl, firewalled=args.firewalled,
                        route_entries=args.route_entries)
    return Servent(listen=args.listen, shares=shares, advertise_ip=args.advertise, ultrapeer=not args.leaf,
                   config=config, peers=args.peer, target_peers=args.connections, max_peers=args.max_peers,
                   max_leaves=args.max_leaves, stats=stats, seed=args.seed, allow_04=not args.no_04,
                   connect_version=args.handshake, max_payload=args.max_payload, tls=not args.no_tls,
                   compress=not args.no_compression, max_connections=args.max_connections,
                   idle_timeout=args.idle_timeout or None, handshake_timeout=args.handshake_timeout)


def _print(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


async def _wait_connected(servent: Servent, timeout: float) -> bool:
    try:
        await within(servent.established.wait(), timeout)
        return True
    except asyncio.TimeoutError:
        return False


async def _scripted(servent: Servent, args, ctx: RunContext, started: float) -> None:
    lines = [json.loads(line) for line in args.queries.read_text().splitlines() if line.strip()]
    results = args.results.open("a") if args.results else None
    try:
        for item in sorted(lines, key=lambda x: x.get("at", 0)):
            delay = started + float(item.get("at", 0)) - time.monotonic()
            if delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await within(ctx.stop.wait(), delay)
            if ctx.stop.is_set():
                return
            query = str(item["query"])
            hits = await servent.search(query, args.wait_hits)
            record = {"query": query, "at": item.get("at", 0), "hits": len(hits),
                      "first_hit_ms": min((h.ms for h, _ in hits), default=None),
                      "sources": sorted({f"{h.ip}:{h.port}" for h, _ in hits}),
                      "download": None}
            if item.get("download") and hits:
                wanted = item.get("sha1")
                choice = next(((h, e) for h, e in hits if not wanted or h.sha1 == wanted), None)
                if choice is not None:
                    result = await servent.download(choice[0], choice[1], args.downloads, timeout=15.0)
                    record["download"] = {**result.as_dict(), "source": f"{choice[0].ip}:{choice[0].port}"}
            ctx.stats["scripted_queries"] += 1
            if results is not None:
                results.write(json.dumps(record, sort_keys=True) + "\n")
                results.flush()
    finally:
        if results is not None:
            results.close()


async def amain(args, ctx: RunContext) -> int:
    servent = servent_from_args(args, ctx.stats)
    ctx.stats.providers["servent"] = servent.snapshot
    try:
        await servent.start()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.listen[0]}:{args.listen[1]}: {exc.strerror}") from None
    try:
        if args.mode == "serve":
            started = time.monotonic()
            script = (servent.supervisor.spawn(_scripted(servent, args, ctx, started), name="scripted queries")
                      if args.queries else None)
            failed = await servent.run_until(ctx.stop, args.duration or None)
            if script is not None:
                script.cancel()
                with contextlib.suppress(BaseException):
                    await script
            if failed is not None:
                log.error("stopping because a critical task failed: %s", failed)
                return 1
            return 0
        if not await _wait_connected(servent, 10.0):
            print(f"{args.mode}: no peer accepted a connection", file=sys.stderr)
            return 1
        await asyncio.sleep(0.2)   # let the QRP table reach the ultrapeer before querying
        if args.mode == "search":
            hits = await servent.search(args.query, args.timeout, args.max_hits,
                                        on_hit=lambda hit, _event: _print(hit.as_dict()))
            return 0 if hits else 1
        args.out.mkdir(parents=True, exist_ok=True)
        hits = await servent.search(args.query, args.timeout, 1 if not args.sha1 else 1000)
        choice = next(((h, e) for h, e in hits if not args.sha1 or h.sha1 == args.sha1.upper()), None)
        if choice is None:
            _print({"ok": False, "error": "no hit", "query": args.query})
            return 1
        result = await servent.download(choice[0], choice[1], args.out, timeout=args.timeout)
        _print({**result.as_dict(), "name": choice[0].name, "source": f"{choice[0].ip}:{choice[0].port}"})
        return 0 if result.ok else 1
    finally:
        await servent.stop()


def main(argv: list[str] | None = None) -> int:
    return run_async(build_parser(), amain, argv)


if __name__ == "__main__":
    sys.exit(main())
