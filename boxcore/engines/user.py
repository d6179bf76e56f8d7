"""The ``user`` engine: no privileges, opaque mode, the embedded default.

The box is an addressable endpoint: boxd binds the configured UDP and TCP
listen sockets (``--listen udp:HOST:PORT=DSTHOST:DSTPORT``).  Each datagram or
connection is classified with the reference classifier as a packet headed for
the listener's relay destination (so ``dst``/``dport`` are the same as on a
transparent engine); what no booster claims is relayed there:

* UDP: one upstream socket per client (a bounded LRU flow table with idle
  expiry), so the server's replies - classified too - go back to the right
  client from the box's own address;
* TCP: streams spliced between the client and the destination (bounded).

Deliveries:

* ``socket``: a UDP REDIRECT covering a whole listening port, with nothing
  else overlapping it, gets the bound socket itself (the fast path; boxd stops
  reading it until the rule goes, or until another rule comes to overlap the
  port: then boxd takes it back (``undelegate``) and the holder continues on its
  channel; once the overlapping rules are gone the socket is given back
  (``delegate``) to a booster whose hello listed the feature ``delegate``);
* ``channel``: everything else - boxd pushes packets on the booster's data
  channel; REDIRECTs wait for a verdict (bounded, with a timeout after which
  the packet passes: the box fails open);
* ``stream``: TCP interception - each accepted socket is handed over.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

from boxcore import wire
from boxcore.classifier import Classifier
from boxcore.engines.base import BoosterSession, Delivery, EngineSetupError, Route, TablesInBoxd
from boxcore.packet import Packet
from boxcore.rules import Action, Match, Rule
from boxcore.splice import splice
from boxcore.wire import Tag, VerdictCode
from cliruntime import positive_int, non_negative_float
from cliruntime.supervisor import Supervisor, within

log = logging.getLogger("boxcore.engines.user")

UDP, TCP = 17, 6
READS_PER_WAKEUP = 256
TCP_CONNECT_TIMEOUT = 10.0  # seconds for the relay's onward connection
FLOW_SWEEP_INTERVAL = 1.0   # seconds between idle-flow checks, while there are flows


@dataclass(frozen=True)
class ListenSpec:
    proto: int
    host: str
    port: int
    dst_host: str
    dst_port: int

    @classmethod
    def parse(cls, text: str) -> "ListenSpec":
        """``udp:HOST:PORT=DSTHOST:DSTPORT`` (or ``tcp:...``)."""
        proto_name, sep, rest = text.partition(":")
        local, eq, remote = rest.partition("=")
        if not sep or not eq or proto_name not in ("udp", "tcp"):
            raise ValueError(f"expected udp:HOST:PORT=DSTHOST:DSTPORT or tcp:..., got {text!r}")
        host, port = _split_host_port(local, text)
        dst_host, dst_port = _split_host_port(remote, text)
        if dst_port == 0:
            raise ValueError(f"destination port 0 in {text!r}")
        return cls(UDP if proto_name == "udp" else TCP, host, port, dst_host, dst_port)

    def __str__(self) -> str:
        name = "udp" if self.proto == UDP else "tcp"
        return f"{name}:{self.host}:{self.port}={self.dst_host}:{self.dst_port}"


def _split_host_port(text: str, whole: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"missing port in {whole!r}")
    try:
        host = str(ipaddress.IPv4Address(host))
    except ValueError:
        raise ValueError(f"{host!r} in {whole!r} is not an IPv4 address") from None
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"bad port {port!r} in {whole!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} out of range in {whole!r}")
    return host, number


def listen_spec(text: str) -> ListenSpec:
    try:
        return ListenSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Flow:
    __slots__ = ("sock", "client", "listener", "last_used")

    def __init__(self, sock: socket.socket, client: tuple[str, int], listener: "_UdpListener") -> None:
        self.sock = sock
        self.client = client
        self.listener = listener
        self.last_used = time.monotonic()


class _UdpListener:
    def __init__(self, spec: ListenSpec, sock: socket.socket) -> None:
        self.spec = spec
        self.sock = sock
        self.delegated: int | None = None      # cookie of the rule holding the socket
        self.taken_from: int | None = None     # cookie of the rule the socket was taken back from
        self.whole_port = Match(proto=UDP, dst=spec.dst_host, dst_port=spec.dst_port)


def _release(per_source: collections.Counter, source: str) -> None:
    """One less for ``source``; an address that holds nothing more leaves the table."""
    per_source[source] -= 1
    if per_source[source] <= 0:
        del per_source[source]


class _TcpListener:
    def __init__(self, spec: ListenSpec, sock: socket.socket) -> None:
        self.spec = spec
        self.sock = sock


class UserEngine(TablesInBoxd):
    name = "user"

    def __init__(self, listens: list[ListenSpec] = (), *, max_flows: int = 1024, max_flows_per_source: int = 64,
                 flow_idle: float = 60.0, verdict_timeout: float = 0.5, max_pending: int = 4096,
                 max_tcp: int = 256, max_tcp_per_source: int = 32, tcp_idle: float = 300.0,
                 max_rules: int = 10_000, max_multicast_sockets: int = 64) -> None:
        self.specs = list(listens)
        seen = set()
        for spec in self.specs:
            key = (spec.proto, spec.host, spec.port)
            if key in seen:
                raise EngineSetupError(f"--listen {spec} given twice")
            seen.add(key)
            if spec.dst_port == spec.port and (spec.dst_host == spec.host
                                               or "0.0.0.0" in (spec.host, spec.dst_host)):
                raise EngineSetupError(f"--listen {spec} relays to itself")
        self.max_flows = max_flows
        self.max_flows_per_source = max_flows_per_source
        self._flows_per_source: collections.Counter[str] = collections.Counter()   # by client address
        self.flow_idle = flow_idle
        self.verdict_timeout = verdict_timeout
        self.max_pending = max_pending
        self.max_tcp = max_tcp
        self.max_tcp_per_source = max_tcp_per_source
        self.tcp_idle = tcp_idle
        self._tcp_per_source: collections.Counter[str] = collections.Counter()   # relays by client address
        self.max_multicast_sockets = max_multicast_sockets
        self.classifier = Classifier(max_rules)
        self.owners: dict[int, BoosterSession] = {}
        self.deliveries: dict[int, Delivery] = {}   # socket deliveries, by cookie
        self._outbox: dict[BoosterSession, list[list]] = {}   # packets batched per booster
        self._outbox_bytes: dict[BoosterSession, int] = {}
        self.udp: list[_UdpListener] = []
        self.tcp: list[_TcpListener] = []
        self.flows: collections.OrderedDict[tuple[int, tuple[str, int]], _Flow] = collections.OrderedDict()
        self.pending: collections.OrderedDict[int, tuple[float, Callable[[bytes], None], bytes, BoosterSession]] = \
            collections.OrderedDict()
        self.groups: dict[int, list[tuple[str, int]]] = {}
        self.routes: list[Route] = []      # opaque mode: the --listen relays are the forwarding; kept for status
        self.stats: collections.Counter = collections.Counter()
        self._token = 0
        self._tcp_tasks = Supervisor("user engine tcp relays", logger=log)   # one per relayed connection
        self._mcast_socks: collections.OrderedDict[int, socket.socket] = collections.OrderedDict()
        self._inject_sock: socket.socket | None = None
        self._health: dict[int, tuple[int, int]] = {}
        # Timers run only while there is something to expire: an idle box wakes up for nothing.
        self._verdict_timer: asyncio.TimerHandle | None = None
        self._flow_timer: asyncio.TimerHandle | None = None
        self._verdict_tick = min(0.05, verdict_timeout / 2 or 0.05)
        self.loop: asyncio.AbstractEventLoop | None = None

    # ---------------------------------------------------------- construction
    @classmethod
    def add_options(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--listen", action="append", type=listen_spec, default=[],
                           metavar="udp|tcp:HOST:PORT=DSTHOST:DSTPORT",
                           help="user engine: a box address and where its unclaimed traffic is relayed "
                                "(repeatable)")
        group.add_argument("--user-max-flows", type=positive_int, default=1024,
                           help="user engine: UDP relay flow table size (LRU)")
        group.add_argument("--user-max-flows-per-source", type=positive_int, default=64,
                           help="user engine: UDP relay flows of one client address; beyond, its own "
                                "least recently used flow makes room (one host cannot churn the others')")
        group.add_argument("--user-flow-idle", type=non_negative_float, default=60.0,
                           help="user engine: seconds before an idle UDP flow is dropped")
        group.add_argument("--user-verdict-timeout", type=non_negative_float, default=0.5,
                           help="user engine: seconds to wait for a verdict before passing the packet")
        group.add_argument("--user-max-pending", type=positive_int, default=4096,
                           help="user engine: packets waiting for verdicts")
        group.add_argument("--user-max-tcp", type=positive_int, default=256,
                           help="user engine: concurrent relayed TCP connections")
        group.add_argument("--user-max-tcp-per-source", type=positive_int, default=32,
                           help="user engine: concurrent relayed TCP connections from one client address "
                                "(one host cannot take them all)")
        group.add_argument("--user-tcp-idle", type=non_negative_float, default=300.0,
                           help="user engine: seconds without a byte either way before a relayed TCP "
                                "connection is closed (also the bound on a peer not reading); 0: none")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "UserEngine":
        return cls(getattr(args, "listen", []) or [],
                   max_flows=getattr(args, "user_max_flows", 1024),
                   max_flows_per_source=getattr(args, "user_max_flows_per_source", 64),
                   flow_idle=getattr(args, "user_flow_idle", 60.0),
                   verdict_timeout=getattr(args, "user_verdict_timeout", 0.5),
                   max_pending=getattr(args, "user_max_pending", 4096),
                   max_tcp=getattr(args, "user_max_tcp", 256),
                   max_tcp_per_source=getattr(args, "user_max_tcp_per_source", 32),
                   tcp_idle=getattr(args, "user_tcp_idle", 300.0))

    # ---------------------------------------------------------- lifecycle
    async def start(self) -> None:
        # Nothing survives a crash here: the sockets died with the process.
        self.loop = asyncio.get_running_loop()
        try:
            for spec in self.specs:
                if spec.proto == UDP:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
                    sock.setblocking(False)
                    sock.bind((spec.host, spec.port))
                    listener = _UdpListener(spec, sock)
                    self.udp.append(listener)
                    self.loop.add_reader(sock.fileno(), self._on_udp, listener)
                else:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.setblocking(False)
                    sock.bind((spec.host, spec.port))
                    sock.listen(128)
                    listener = _TcpListener(spec, sock)
                    self.tcp.append(listener)
                    self.loop.add_reader(sock.fileno(), self._on_accept, listener)
                log.info("user engine: %s", spec)
        except OSError as exc:
            await self.stop()
            raise EngineSetupError(f"cannot bind {spec}: {exc.strerror or exc}") from None
        self._inject_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._inject_sock.setblocking(False)

    async def stop(self) -> None:
        for timer in (self._verdict_timer, self._flow_timer):
            if timer is not None:
                timer.cancel()
        self._verdict_timer = self._flow_timer = None
        await self._tcp_tasks.aclose()
        for listener in self.udp + self.tcp:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(listener.sock.fileno())
            listener.sock.close()
        self.udp.clear()
        self.tcp.clear()
        for key in list(self.flows):
            self._close_flow(key)
        for sock in self._mcast_socks.values():
            sock.close()
        self._mcast_socks.clear()
        if self._inject_sock is not None:
            self._inject_sock.close()
        self.classifier.clear()
        self.owners.clear()
        self.pending.clear()

    # ---------------------------------------------------------- rules
    async def install(self, rule: Rule, session: BoosterSession) -> Delivery:
        for listener in self.udp:
            if listener.delegated is not None and rule.match.overlaps(listener.whole_port):
                self._undelegate(listener)
        delegate = self._delegation_target(rule)
        self.classifier.add(rule)
        self.owners[rule.cookie] = session
        if delegate is not None:
            delegate.delegated = rule.cookie
            self.loop.remove_reader(delegate.sock.fileno())
            self.stats["sockets_delegated"] += 1
            delivery = Delivery("socket", {"dst": delegate.spec.dst_host, "dport": delegate.spec.dst_port,
                                           "box": [delegate.spec.host, delegate.spec.port]},
                                [delegate.sock.fileno()])
            self.deliveries[rule.cookie] = delivery
            return delivery
        return Delivery("channel", {})

    def _undelegate(self, listener: _UdpListener) -> None:
        """Take a delegated socket back so boxd classifies the port again (another rule
        now shares it); the holder's receiver switches to the data channel."""
        cookie = listener.delegated
        listener.delegated = None
        listener.taken_from = cookie
        self.loop.add_reader(listener.sock.fileno(), self._on_udp, listener)
        self.stats["sockets_undelegated"] += 1
        delivery = self.deliveries.get(cookie)
        if delivery is not None:  # the controller's record shows the new delivery
            delivery.kind, delivery.fds = "channel", []
        session = self.owners.get(cookie)
        if session is not None and session.send_event is not None:
            session.send_event({"t": "undelegate", "cookie": cookie})

    async def install_tcp(self, rule: Rule, session: BoosterSession) -> Delivery:
        self.classifier.add(rule)
        self.owners[rule.cookie] = session
        return Delivery("stream", {})

    def _delegation_target(self, rule: Rule) -> _UdpListener | None:
        """The listener whose whole port this REDIRECT covers, if it can take the socket."""
        if rule.action is not Action.REDIRECT or rule.match.proto != UDP:
            return None
        for listener in self.udp:
            if listener.delegated is not None or not rule.match.covers(listener.whole_port):
                continue
            if any(other.match.overlaps(listener.whole_port) for other in self.classifier.rules()):
                continue
            if any(other is not listener and rule.match.overlaps(other.whole_port) for other in self.udp):
                continue  # the rule also claims another port: only a channel serves both
            return listener
        return None

    def _give_back(self, listener: _UdpListener) -> None:
        """The rules that shared a taken-back port are gone: hand the socket to its first holder
        again (``delegate``), if its booster said it takes one back; else it stays on its channel."""
        cookie = listener.taken_from
        session = self.owners.get(cookie)
        delivery = self.deliveries.get(cookie)
        if session is None or delivery is None:
            listener.taken_from = None
            return
        if any(r.cookie != cookie and r.match.overlaps(listener.whole_port) for r in self.classifier.rules()):
            return  # still shared
        listener.taken_from = None
        if "delegate" not in session.features or session.send_event is None:
            self.stats["sockets_kept_on_channel"] += 1
            return
        self.loop.remove_reader(listener.sock.fileno())
        listener.delegated = cookie
        delivery.kind, delivery.fds = "socket", [listener.sock.fileno()]
        self.stats["sockets_redelegated"] += 1
        session.send_event({"t": "delegate", "cookie": cookie, "delivery": delivery.to_wire()},
                           [listener.sock.fileno()])

    async def remove(self, rule: Rule) -> None:
        self.classifier.remove(rule.cookie)
        self.owners.pop(rule.cookie, None)
        self.deliveries.pop(rule.cookie, None)
        for listener in self.udp:
            if listener.delegated == rule.cookie:
                listener.delegated = None
                self.loop.add_reader(listener.sock.fileno(), self._on_udp, listener)
            if listener.taken_from == rule.cookie:
                listener.taken_from = None
            elif listener.taken_from is not None and listener.delegated is None:
                self._give_back(listener)

    def health(self, session: BoosterSession) -> str | None:
        state = session.engine_state
        timeouts, verdicts = state.get("verdict_timeouts", 0), state.get("verdicts", 0)
        before = self._health.get(session.sid, (0, 0))
        self._health[session.sid] = (timeouts, verdicts)
        if timeouts - before[0] >= 3 and verdicts == before[1]:
            return f"{timeouts - before[0]} packets waited in vain for a verdict"
        return None

    async def detach(self, session: BoosterSession) -> None:
        self._health.pop(session.sid, None)
        for token, entry in list(self.pending.items()):
            if entry[3] is session:  # fail open: its packets go on
                del self.pending[token]
                entry[1](entry[2])
                self.stats["verdicts_abandoned"] += 1

    def status(self) -> dict[str, Any]:
        return {
            "listen": [str(s) for s in self.specs],
            "delegated": {str(l.spec): l.delegated for l in self.udp if l.delegated is not None},
            "flows": len(self.flows), "pending_verdicts": len(self.pending),
            "tcp_relays": self._tcp_tasks.active, "tcp_sources": len(self._tcp_per_source), "groups": len(self.groups),
            "counters": dict(self.stats),
            "classifier": dict(self.classifier.stats),
        }

    # ---------------------------------------------------------- UDP data path
    def _on_udp(self, listener: _UdpListener) -> None:
        recvfrom = listener.sock.recvfrom
        dst, dport = listener.spec.dst_host, listener.spec.dst_port
        classifier = self.classifier
        for _ in range(READS_PER_WAKEUP):
            try:
                data, client = recvfrom(65535)
            except OSError:  # BlockingIOError: drained
                break
            if not classifier:  # no rules at all: nothing to decide, just relay
                self._relay_up(listener, client, data)
                continue
            pkt = Packet(UDP, client[0], client[1], dst, dport, data)
            self._process(pkt, listener, lambda payload, l=listener, c=client: self._relay_up(l, c, payload))
        if self._outbox:
            self._flush()

    def _on_flow(self, key: tuple[int, tuple[str, int]]) -> None:
        flow = self.flows.get(key)
        if flow is None:
            return
        listener = flow.listener
        client = flow.client
        send_down = lambda payload: self._send(listener.sock, payload, client)  # noqa: E731
        server = (listener.spec.dst_host, listener.spec.dst_port)
        recv = flow.sock.recv
        for _ in range(READS_PER_WAKEUP):
            try:
                data = recv(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ICMP port unreachable from the destination: keep the flow
                self.stats["relay_errors"] += 1
                continue
            if not self.classifier:
                self._send(listener.sock, data, client)
                continue
            pkt = Packet(UDP, server[0], server[1], client[0], client[1], data)
            self._process(pkt, listener, send_down)
        flow.last_used = time.monotonic()
        if self._outbox:
            self._flush()

    def _process(self, pkt: Packet, listener: _UdpListener, out: Callable[[bytes], None]) -> None:
        """Classify one packet and carry out the decision; ``out`` forwards a payload."""
        decision = self.classifier.lookup(pkt)
        for rule in decision.copies:
            session = self.owners.get(rule.cookie)
            if session is not None:
                self._push(session, rule.cookie, 0, pkt, False)
        rule = decision.terminal
        if rule is None or rule.action is Action.FORWARD:
            out(pkt.payload)
            return
        action = rule.action
        if action is Action.REDIRECT:
            session = self.owners.get(rule.cookie)
            if session is None:
                out(pkt.payload)
                return
            if len(self.pending) >= self.max_pending:
                self.stats["verdict_queue_full_passed"] += 1
                out(pkt.payload)
                return
            self._token = token = (self._token + 1) & 0xFFFFFFFF
            self.pending[token] = (time.monotonic() + self.verdict_timeout, out, pkt.payload, session)
            if self._verdict_timer is None:
                self._verdict_timer = self.loop.call_later(self.verdict_timeout, self._expire_verdicts)
            self._push(session, rule.cookie, token, pkt, True)
        elif action is Action.DROP:
            self.stats["dropped"] += 1
        elif action is Action.MULTICAST:
            members = self.groups.get(rule.group, ())
            for member in members:
                self._send(listener.sock, pkt.payload, member)
            self.stats["multicast_fanout"] += len(members)

    def _push(self, session: BoosterSession, cookie: int, token: int, pkt: Packet, want: bool) -> None:
        """Queue a packet for a booster; the batch goes out at the end of the read burst
        (or when full).  A REDIRECT's pending entry must exist before: a failed send
        passes it at once (fail open)."""
        size = len(pkt.payload) + 64
        batch = self._outbox.get(session)
        if batch is not None and (len(batch) >= wire.MAX_BATCH
                                  or self._outbox_bytes[session] + size > wire.BATCH_BYTES):
            self._flush_session(session)
            batch = None
        if batch is None:
            batch = self._outbox[session] = []
            self._outbox_bytes[session] = 0
        batch.append([cookie, token, pkt.proto, pkt.src, pkt.sport, pkt.dst, pkt.dport, pkt.payload, want])
        self._outbox_bytes[session] += size

    def _flush(self) -> None:
        for session in list(self._outbox):
            self._flush_session(session)

    def _flush_session(self, session: BoosterSession) -> None:
        batch = self._outbox.pop(session, None)
        self._outbox_bytes.pop(session, None)
        if not batch:
            return
        if len(batch) == 1:
            data = wire.pack_datagram(Tag.PACKET, *batch[0])
        else:
            data = wire.pack_batch(Tag.PACKETS, batch)
        if session.send_datagram(data):
            self.stats["delivered"] += len(batch)
            return
        self.stats["delivery_dropped"] += len(batch)
        for record in batch:  # the booster cannot take them: redirected packets pass (fail open)
            if record[8]:
                entry = self.pending.pop(record[1], None)
                if entry is not None:
                    self.stats["channel_full_passed"] += 1
                    entry[1](entry[2])

    def verdict(self, session: BoosterSession, token: int, verdict: int, payload: bytes | None) -> None:
        entry = self.pending.get(token)
        if entry is None or entry[3] is not session:
            self.stats["verdicts_late"] += 1
            return
        del self.pending[token]
        self.stats["verdicts"] += 1
        session.engine_state["verdicts"] = session.engine_state.get("verdicts", 0) + 1
        if verdict == VerdictCode.PASS:
            entry[1](entry[2])
        elif verdict == VerdictCode.MODIFY and payload is not None:
            entry[1](bytes(payload))
            self.stats["modified"] += 1
        else:
            self.stats["consumed"] += 1

    def _relay_up(self, listener: _UdpListener, client: tuple[str, int], payload: bytes) -> None:
        key = (listener.spec.port, client)
        flow = self.flows.get(key)
        if flow is None:
            flow = self._open_flow(key, listener, client)
            if flow is None:
                return
        else:
            now = time.monotonic()
            if now - flow.last_used > 0.5:  # LRU order needs no per-packet update
                self.flows.move_to_end(key)
                flow.last_used = now
        try:
            flow.sock.send(payload)  # connected to the relay destination
            self.stats["relayed_up"] += 1
        except (BlockingIOError, InterruptedError):
            self.stats["send_dropped"] += 1
        except OSError as exc:  # e.g. ECONNREFUSED from an earlier datagram's ICMP
            self.stats["send_errors"] += 1
            log.debug("relay to %s:%d failed: %s", listener.spec.dst_host, listener.spec.dst_port, exc)

    def _open_flow(self, key, listener: _UdpListener, client: tuple[str, int]) -> _Flow | None:
        if self._flows_per_source[client[0]] >= self.max_flows_per_source:
            # this host's own least recently used flow makes room, not another host's
            self._close_flow(next(k for k in self.flows if k[1][0] == client[0]))
            self.stats["flows_evicted_per_source"] += 1
        while len(self.flows) >= self.max_flows:
            oldest = next(iter(self.flows))
            self._close_flow(oldest)
            self.stats["flows_evicted"] += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.bind((listener.spec.host, 0))
            # connected: cheaper sends, and only the relay destination can answer on it
            sock.connect((listener.spec.dst_host, listener.spec.dst_port))
        except OSError as exc:
            sock.close()
            self.stats["flow_errors"] += 1
            log.warning("cannot open a relay flow: %s", exc)
            return None
        flow = _Flow(sock, client, listener)
        self.flows[key] = flow
        self._flows_per_source[client[0]] += 1
        self.loop.add_reader(sock.fileno(), self._on_flow, key)
        self.stats["flows_opened"] += 1
        if self._flow_timer is None:
            self._flow_timer = self.loop.call_later(FLOW_SWEEP_INTERVAL, self._expire_flows)
        return flow

    def _close_flow(self, key) -> None:
        flow = self.flows.pop(key, None)
        if flow is None:
            return
        _release(self._flows_per_source, key[1][0])
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(flow.sock.fileno())
        flow.sock.close()

    def _send(self, sock: socket.socket, payload: bytes, addr: tuple[str, int]) -> None:
        try:
            sock.sendto(payload, addr)
        except (BlockingIOError, InterruptedError):
            self.stats["send_dropped"] += 1
        except OSError as exc:
            self.stats["send_errors"] += 1
            log.debug("send to %s failed: %s", addr, exc)

    def _expire_verdicts(self) -> None:
        """Pass the packets whose verdict is overdue (fail open); armed only while verdicts wait."""
        self._verdict_timer = None
        now = time.monotonic()
        pending = self.pending
        while pending:
            token, entry = next(iter(pending.items()))
            if entry[0] > now:
                break
            del pending[token]
            self.stats["verdict_timeouts"] += 1
            state = entry[3].engine_state
            state["verdict_timeouts"] = state.get("verdict_timeouts", 0) + 1
            entry[1](entry[2])
        if pending:
            # entries are in deadline order (one timeout for all); no closer than a tick apart
            first_deadline = next(iter(pending.values()))[0]
            self._verdict_timer = self.loop.call_later(max(first_deadline - now, self._verdict_tick),
                                                       self._expire_verdicts)

    def _expire_flows(self) -> None:
        """Close idle relay flows; armed only while flows exist."""
        self._flow_timer = None
        now = time.monotonic()
        for key, flow in list(self.flows.items()):
            if now - flow.last_used > self.flow_idle:
                self._close_flow(key)
                self.stats["flows_expired"] += 1
        if self.flows:
            self._flow_timer = self.loop.call_later(FLOW_SWEEP_INTERVAL, self._expire_flows)

    # ---------------------------------------------------------- packets from boosters
    def inject(self, pkt: Packet, session: BoosterSession) -> None:
        if pkt.proto != UDP:
            raise ValueError("the user engine injects UDP packets only")
        self.stats["injected"] += 1
        src, dst = (pkt.src, pkt.sport), (pkt.dst, pkt.dport)
        for listener in self.udp:
            spec = listener.spec
            if src == (spec.dst_host, spec.dst_port) or src == (spec.host, spec.port):
                # as if from the relay destination (or the box itself): to the client, from the box
                self._send(listener.sock, pkt.payload, dst)
                return
        for listener in self.udp:
            spec = listener.spec
            if dst == (spec.dst_host, spec.dst_port):
                # as if from a client: relayed upstream on that client's flow
                self._relay_up(listener, src, pkt.payload)
                return
        for listener in self.udp:
            if pkt.sport == listener.spec.port:
                self._send(listener.sock, pkt.payload, dst)
                return
        self._send(self._inject_sock, pkt.payload, dst)

    def send_multicast(self, group: int, payload: bytes, src_port: int,
                       session: BoosterSession) -> None:
        members = self.groups.get(group)
        if not members:
            raise ValueError(f"no multicast group {group}")
        sock = self._multicast_socket(src_port)
        for member in members:
            self._send(sock, payload, member)
        self.stats["multicast_fanout"] += len(members)

    def _multicast_socket(self, src_port: int) -> socket.socket:
        if src_port == 0:
            return self._inject_sock
        for listener in self.udp:
            if listener.spec.port == src_port:
                return listener.sock
        sock = self._mcast_socks.get(src_port)
        if sock is not None:
            self._mcast_socks.move_to_end(src_port)
            return sock
        if len(self._mcast_socks) >= self.max_multicast_sockets:
            _, old = self._mcast_socks.popitem(last=False)
            old.close()
            self.stats["multicast_sockets_evicted"] += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        host = self.udp[0].spec.host if self.udp else "127.0.0.1"
        try:
            sock.bind((host, src_port))
        except OSError as exc:
            sock.close()
            raise ValueError(f"cannot send from port {src_port}: {exc.strerror}") from None
        self._mcast_socks[src_port] = sock
        return sock

    # ---------------------------------------------------------- TCP
    def _on_accept(self, listener: _TcpListener) -> None:
        for _ in range(64):
            try:
                conn, client = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept on %s failed: %s", listener.spec, exc)
                return
            spec = listener.spec
            pkt = Packet(TCP, client[0], client[1], spec.dst_host, spec.dst_port, b"")
            decision = self.classifier.lookup(pkt)
            rule = decision.terminal
            session = self.owners.get(rule.cookie) if rule is not None else None
            if rule is not None and rule.action is Action.REDIRECT and session is not None \
                    and session.send_event is not None:
                self.stats["tcp_intercepted"] += 1
                session.send_event({"t": "stream", "cookie": rule.cookie,
                                    "client": [client[0], client[1]],
                                    "original_dst": [spec.dst_host, spec.dst_port]},
                                   [conn.detach()], close_fds=True)
            elif rule is not None and rule.action is Action.DROP:
                self.stats["tcp_dropped"] += 1
                conn.close()
            elif self._tcp_tasks.active >= self.max_tcp:
                self.stats["tcp_refused"] += 1
                conn.close()
            elif self._tcp_per_source[client[0]] >= self.max_tcp_per_source:
                self.stats["tcp_refused_per_source"] += 1
                conn.close()
            else:
                self._tcp_per_source[client[0]] += 1
                self._tcp_tasks.spawn(self._relay(conn, client[0], spec), name="tcp relay", critical=False)

    async def _relay(self, conn: socket.socket, source: str, spec: ListenSpec) -> None:
        try:
            await self._splice(conn, spec)
        finally:
            _release(self._tcp_per_source, source)

    async def _splice(self, conn: socket.socket, spec: ListenSpec) -> None:
        conn.setblocking(False)
        try:
            c_reader, c_writer = await asyncio.open_connection(sock=conn)
        except OSError:
            conn.close()
            return
        try:
            s_reader, s_writer = await within(asyncio.open_connection(spec.dst_host, spec.dst_port),
                                              TCP_CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            self.stats["tcp_connect_errors"] += 1
            log.debug("relay to %s:%d failed: %r", spec.dst_host, spec.dst_port, exc)
            c_writer.close()
            return
        self.stats["tcp_relayed"] += 1
        try:
            await splice((c_reader, c_writer), (s_reader, s_writer), self.stats,
                         idle=self.tcp_idle or None, stall=self.tcp_idle or None)
        finally:
            for writer in (c_writer, s_writer):
                writer.close()
