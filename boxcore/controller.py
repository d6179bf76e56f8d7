"""The booster box controller: sessions, policy, arbitration, ownership, lifecycle.

One :class:`Controller` per box.  Boosters connect to its Unix control socket
(:mod:`boxcore.wire`).  Every request is parsed into a typed request
(:data:`OPERATIONS`: one frozen dataclass per operation) and served by one
handler, which answers with a typed response or raises :class:`OpError`
(a status and a reason): the only error path, turned into the error reply in
one place (:meth:`ControlSession._serve`).  A rule request goes:

1. the match is parsed strictly (INVALID with the reason);
2. the policy decides (PERMISSION_DENIED with the policy's reason);
3. a request identical to one the booster already holds is answered with the
   rule it holds (idempotent);
4. arbitration: a terminating rule (REDIRECT, DROP, MULTICAST, FORWARD) that
   overlaps another booster's terminating rule is refused with CONFLICT naming
   the holder; COPY rules may overlap anything;
5. the engine installs it and answers with a Delivery, which goes back to the
   booster (descriptors by SCM_RIGHTS).

Operations on the box's table (rule, cancel, set_multicast_group: those the
operation table marks ``serialized``) are served FIFO through one asyncio lock
(asyncio locks are fair): arbitration must see a consistent table and engines
see changes one at a time.  Waiting operations are bounded
(``max_pending_ops``); beyond it a request is refused with ERROR and counted.
A booster's own requests are served one at a time, in the order it sent them.

Lifecycle: a booster that disconnects, crashes, misses ``heartbeat_misses``
heartbeats, or that the engine reports unhealthy is evicted and its rules are
removed at once (counted).  ``stop()`` removes every rule.  Every background
task (the watchdog, the teardown worker, per-session workers and directory
watches) runs under one :class:`cliruntime.supervisor.Supervisor`: the watchdog
or the teardown worker dying is critical (boxd stops loudly); a per-session
task dying closes that session with a log line.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import itertools
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Awaitable, Callable

from boxcore import transport, wire
from boxcore.directory import DirectoryUnavailable, as_async, encode_value
from boxcore.engines.base import BoosterSession, Delivery, Engine, Route
from boxcore.packet import Packet
from boxcore.policy import Policy
from boxcore.rules import Action, Match, Rule, RuleError, port_bounds
from boxcore.wire import Status, Tag, WireDecodeError
from cliruntime import Stats
from cliruntime.supervisor import Supervisor

log = logging.getLogger("boxcore.controller")


class ControlSocketError(RuntimeError):
    """boxd's control socket cannot be set up (path taken, another boxd listening, cannot bind or
    set its mode); boxd reports it as a configuration error (one line, exit status 2)."""


MAX_DATAGRAMS_PER_WAKEUP = 256
MAX_DEPARTURES = 100            # recent departures kept for the management views
MAX_EVICTION_NAMES = 1024       # booster names whose eviction count is kept (least recent dropped)


@dataclass
class ControllerConfig:
    control_path: Path | None
    heartbeat_interval: float = 1.0
    heartbeat_misses: int = 3
    max_boosters: int = 64
    max_rules_per_booster: int = 256
    max_pending_ops: int = 1024
    max_watches_per_booster: int = 32
    max_inflight_per_booster: int = 256     # requests queued per booster (served in order)
    max_frame: int = wire.DEFAULT_MAX_FRAME
    max_groups: int = 1024
    max_group_members: int = 4096
    # who may connect: the socket's mode and group (boxd --control-mode, --control-group)
    socket_mode: int = 0o660
    socket_group: int | None = None
    # hostile local users (docs/security.md)
    hello_timeout: float = 5.0              # a connection that has not said hello by then is closed
    max_connections: int = 1024             # every control connection, authenticated or not
    max_sessions_per_uid: int = 64          # connections of one uid (boosters, boxctl, pending hellos)
    max_unauthenticated_per_uid: int = 16   # of which still waiting to say hello
    max_rules_per_uid: int = 1024
    max_groups_per_uid: int = 64
    max_group_members_per_uid: int = 4096   # members over all of a uid's groups
    max_directory_bytes_per_uid: int = 16 << 20
    max_output: int = 256 << 10             # reply bytes queued for a peer that does not read
    max_reply: int = 4 << 20                # the largest reply (a bigger query answers ERROR)


# ====================================================================== operations

class OpError(Exception):
    """The one way an operation fails: the reply's status and reason (and, for CONFLICT,
    who holds what was asked for)."""

    def __init__(self, status: Status, reason: str, *, holder: str | None = None,
                 counter: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.holder = holder
        self.counter = counter      # the controller's event counter this refusal bumps


def invalid(reason: str) -> OpError:
    return OpError(Status.INVALID, reason)


@dataclass(frozen=True)
class Response:
    """What an operation answers: ``result`` (msgpack-able, None for nothing) and the
    descriptors that go beside the reply.  With ``owns_fds`` the connection closes them
    once sent (they were made for this reply)."""

    result: Any = None
    fds: tuple[int, ...] = ()
    owns_fds: bool = False


# ---------------------------------------------------------------- typed requests

@dataclass(frozen=True)
class Hello:
    name: str
    version: int
    observer: bool = False                  # boxctl: a read-only session, no booster
    features: frozenset[str] = frozenset()  # optional protocol features the booster speaks

    @classmethod
    def parse(cls, msg: dict) -> "Hello":
        name = msg["name"]
        if not name or len(name) > 64 or not name.isprintable():
            raise invalid("booster name must be 1..64 printable characters")
        if msg["version"] != wire.PROTOCOL_VERSION:
            raise invalid(f"protocol version {msg['version']} unsupported "
                          f"(boxd speaks {wire.PROTOCOL_VERSION})")
        features = msg.get("features") or ()
        return cls(name, msg["version"], bool(msg.get("observer")), frozenset(map(str, features)))


class FieldsOfMessage:
    """A request whose fields are the message's fields of the same names (boxcore.wire has
    already checked their types)."""

    @classmethod
    def parse(cls, msg: dict):
        return cls(*(msg[f.name] for f in fields(cls)))


@dataclass(frozen=True)
class RuleRequest:
    match: Match
    action: Action
    priority: int
    group: int | None
    tcp: bool

    @classmethod
    def parse(cls, msg: dict) -> "RuleRequest":
        try:
            match = Match.from_dict(msg["match"])
            action = Action.parse(msg["action"])
        except RuleError as exc:
            raise invalid(str(exc)) from None
        priority = msg.get("priority")
        tcp = bool(msg.get("tcp"))
        if tcp and action is not Action.REDIRECT:
            raise invalid("tcp interception needs a redirect")
        if tcp and match.proto not in (None, 6):
            raise invalid("tcp interception of a non-TCP match")
        if tcp:
            match = Match(proto=6, src=match.src, dst=match.dst, src_port=match.src_port,
                          dst_port=match.dst_port, payload=match.payload)
        request = cls(match, action, 100 if priority is None else priority, msg.get("group"), tcp)
        request.rule(owner="?", cookie=0)  # the rule's own checks (group, priority) answer INVALID here
        return request

    def rule(self, *, owner: str, cookie: int) -> Rule:
        try:
            return Rule(match=self.match, action=self.action, priority=self.priority, owner=owner,
                        cookie=cookie, group=self.group)
        except RuleError as exc:
            raise invalid(str(exc)) from None

    @property
    def key(self) -> tuple:
        """Two requests with the same key are the same request (idempotence)."""
        return (self.match, self.action, self.priority, self.group, self.tcp)


@dataclass(frozen=True)
class Cancel(FieldsOfMessage):
    cookie: int


@dataclass(frozen=True)
class SetMulticastGroup:
    group: int
    members: tuple[tuple[str, int], ...]

    @classmethod
    def parse(cls, msg: dict) -> "SetMulticastGroup":
        members = tuple((str(h), int(p)) for h, p in msg["members"])
        for host, _ in members:
            if not _is_ip_address(host):
                raise invalid(f"bad member address {host!r}")
        if len(set(members)) != len(members):  # one datagram in must not become many to one address
            raise invalid("a member is listed twice")
        return cls(msg["group"], members)


@dataclass(frozen=True)
class Send:
    packet: Packet

    @classmethod
    def parse(cls, msg: dict) -> "Send":
        try:
            return cls(wire.packet_from_wire(msg["packet"]))
        except WireDecodeError as exc:
            raise invalid(str(exc)) from None


@dataclass(frozen=True)
class Query(FieldsOfMessage):
    what: str


@dataclass(frozen=True)
class DirKey(FieldsOfMessage):
    key: str


@dataclass(frozen=True)
class DirPut(FieldsOfMessage):
    key: str
    value: Any


@dataclass(frozen=True)
class DirPrefix(FieldsOfMessage):
    prefix: str


@dataclass(frozen=True)
class DirUnwatch(FieldsOfMessage):
    watch: int


@dataclass(frozen=True)
class Operation:
    """One row of :data:`OPERATIONS`: how a request type is parsed and who serves it."""

    request: type
    handler: str            # the Controller method: async (session, request) -> Response
    before_hello: bool = False
    serialized: bool = False  # served through the box-wide FIFO (the table lock)


OPERATIONS: dict[str, Operation] = {
    "hello": Operation(Hello, "op_hello", before_hello=True),
    "rule": Operation(RuleRequest, "op_rule", serialized=True),
    "cancel": Operation(Cancel, "op_cancel", serialized=True),
    "set_multicast_group": Operation(SetMulticastGroup, "op_set_multicast_group", serialized=True),
    "send": Operation(Send, "op_send"),
    "query": Operation(Query, "op_query", before_hello=True),
    "dir_get": Operation(DirKey, "op_dir_get"),
    "dir_put": Operation(DirPut, "op_dir_put"),
    "dir_delete": Operation(DirKey, "op_dir_delete"),
    "dir_items": Operation(DirPrefix, "op_dir_items"),
    "dir_watch": Operation(DirPrefix, "op_dir_watch"),
    "dir_unwatch": Operation(DirUnwatch, "op_dir_unwatch"),
}
assert set(OPERATIONS) == set(wire.REQUESTS), "every wire request has exactly one operation"


# ====================================================================== sessions

@dataclass
class InstalledRule:
    rule: Rule
    session: "ControlSession"
    delivery: Delivery
    request_key: tuple
    installed_at: float = field(default_factory=time.time)
    region: Match = field(init=False)   # the rule's headers (no payload): what its owner may send

    def __post_init__(self) -> None:
        m = self.rule.match
        self.region = Match(proto=m.proto, src=m.src, dst=m.dst, src_port=m.src_port, dst_port=m.dst_port)


class ControlSession:
    """boxd's state for one control connection (a booster once it said hello)."""

    def __init__(self, controller: "Controller", sock: socket.socket, pid: int, uid: int, gid: int):
        self.controller = controller
        self.pid, self.uid, self.gid = pid, uid, gid
        self.booster: BoosterSession | None = None
        self.observer = False               # said hello as boxctl: may only query
        config = controller.config
        self.conn = transport.FramedConnection(sock, self._on_message, self._on_close,
                                               max_frame=config.max_frame, accept_fds=False,
                                               max_output=config.max_output, max_reply=config.max_reply)
        self.rules: dict[int, InstalledRule] = {}
        self.watches: dict[int, tuple[Any, asyncio.Task]] = {}
        self.watch_ids = itertools.count(1)
        self.groups: set[int] = set()
        self.last_seen = self.opened = time.monotonic()
        self.connected_at = time.time()
        self.send_checks: dict[tuple, str | None] = {}   # (proto, src, sport, dst, dport) -> refusal
        self.reported: dict[int, tuple[int, int]] = {}
        self.handler_errors = 0
        self.evicted: str | None = None     # why boxd evicted it (None: it left, or is here)
        self.closed = False
        # A booster's messages are served one at a time, in the order sent.  When too many
        # wait, boxd stops reading this connection (its sender blocks): no reply is built for
        # a flood, and the frames of one chunk are the most that can wait beyond the limit.
        self.inbox: collections.deque = collections.deque()
        self.inbox_ready = asyncio.Event()
        self.max_inbox = config.max_inflight_per_booster
        self.worker: asyncio.Task | None = None

    @property
    def name(self) -> str:
        return self.booster.name if self.booster else f"<unregistered pid {self.pid}>"

    @property
    def authenticated(self) -> bool:
        return self.booster is not None or self.observer

    # ---------------------------------------------------------- input
    def _on_message(self, msg: Any, fds: list[int]) -> None:
        self.last_seen = time.monotonic()
        ctl = self.controller
        if isinstance(msg, dict) and msg.get("t") == "heartbeat" and self.booster is not None:
            try:  # liveness and counters skip the queue
                self._on_heartbeat(wire.validate(msg))
                return
            except WireDecodeError:
                pass  # answered in order below
        self.inbox.append(msg)
        self.inbox_ready.set()
        if len(self.inbox) >= self.max_inbox and self.conn.reading:
            ctl.stats["control_reads_paused"] += 1
            self.conn.pause_reading()
        if self.worker is None:
            self.worker = ctl.tasks.spawn(self._work(), name=f"session-{self.pid}", critical=False)

    async def _work(self) -> None:
        try:
            while not self.closed:
                if not self.inbox:
                    self.inbox_ready.clear()
                    await self.inbox_ready.wait()
                    continue
                await self._handle(self.inbox.popleft())
                if not self.conn.reading and len(self.inbox) <= self.max_inbox // 2:
                    self.conn.resume_reading()
                await asyncio.sleep(0)  # one frame per turn: every other connection gets its turn
        except Exception:
            # logged and counted by the supervisor; the session it served goes
            self.close("internal error serving this session")
            raise

    async def _handle(self, msg: Any) -> None:
        ctl = self.controller
        if isinstance(msg, WireDecodeError):  # an undecodable frame: nothing to answer
            ctl.stats["control_malformed"] += 1
            log.debug("%s: malformed frame: %s", self.name, msg)
            return
        try:
            wire.validate(msg)
        except WireDecodeError as exc:
            ctl.stats["control_malformed"] += 1
            self.reply_error(wire.request_id(msg), Status.INVALID, str(exc))
            return
        kind = msg["t"]
        operation = OPERATIONS.get(kind)
        if not self.authenticated and kind != "hello":
            ctl.stats["refused_before_hello"] += 1
            self.reply_error(wire.request_id(msg), Status.PERMISSION_DENIED, "say hello first")
            return
        if kind == "heartbeat":
            self._on_heartbeat(msg)
        elif kind == "bye":
            self.close("said goodbye")
        elif operation is None:
            ctl.stats["control_malformed"] += 1
            self.reply_error(wire.request_id(msg), Status.INVALID, f"{kind} is not a request")
        else:
            await self._serve(msg["id"], operation, msg)

    def _on_heartbeat(self, msg: dict) -> None:
        for cookie, packets, nbytes in msg.get("counters") or ():
            if cookie in self.rules:
                self.reported[cookie] = (packets, nbytes)
        self.handler_errors = msg.get("handler_errors") or self.handler_errors

    async def _serve(self, rid: int, operation: Operation, msg: dict) -> None:
        """Run one operation; the one place a reply (or an error reply) is built."""
        ctl = self.controller
        try:
            request = operation.request.parse(msg)
            response = await ctl.perform(self, operation, request)
        except OpError as exc:
            if exc.counter:
                ctl.stats[exc.counter] += 1
            self._reply(rid, exc.status, reason=exc.reason, holder=exc.holder)
            return
        except Exception as exc:  # one bad request must never take boxd down
            log.exception("%s: %s failed", self.name, msg["t"])
            ctl.stats["op_errors"] += 1
            self._reply(rid, Status.ERROR, reason=f"{type(exc).__name__}: {exc}")
            return
        self._reply(rid, Status.OK, result=response.result, fds=response.fds, owns_fds=response.owns_fds)

    def _reply(self, rid: int, status: Status, *, result: Any = None, reason: str | None = None,
               holder: str | None = None, fds: tuple[int, ...] = (), owns_fds: bool = False) -> None:
        self.controller.stats[f"replies_{status.value.lower()}"] += 1
        reply: dict[str, Any] = {"t": "reply", "id": rid, "status": status.value}
        if reason is not None:
            reply["reason"] = reason
        if holder is not None:
            reply["holder"] = holder
        if result is not None:
            reply["result"] = result
        try:
            self.conn.send(reply, fds, close_fds=owns_fds)
        except transport.ReplyTooLarge as exc:
            self.controller.stats["replies_too_large"] += 1
            self._reply(rid, Status.ERROR, reason=str(exc))
        except WireDecodeError:
            log.exception("%s: refusing to send an invalid message", self.name)

    def send(self, msg: dict, fds=(), *, close_fds: bool = False) -> bool:
        try:
            return self.conn.send(msg, fds, close_fds=close_fds)
        except WireDecodeError:
            log.exception("%s: refusing to send an invalid message", self.name)
            return False

    def reply_error(self, rid: int | None, status: Status, reason: str) -> None:
        if rid is None:  # no id to answer: an unanswerable bad frame is only counted and logged
            log.debug("%s: malformed frame: %s", self.name, reason)
            return
        self._reply(rid, status, reason=reason)

    # ---------------------------------------------------------- teardown
    def _on_close(self, reason: str) -> None:
        self.closed = True
        if self.conn.closed_not_reading:
            self.controller.stats["clients_closed_not_reading"] += 1
        self.controller._session_closed(self, reason)

    def close(self, reason: str) -> None:
        if not self.conn.closed:
            self.conn.close(reason)


# ====================================================================== the controller

class Controller:
    """boxd's core: owns sessions, rules, groups, routes, the directory and the engine."""

    def __init__(self, engine: Engine, config: ControllerConfig, *, policy: Any = None,
                 directory: Any = None, stats: Stats | None = None) -> None:
        self.engine = engine
        self.config = config
        self.policy: Policy = policy if policy is not None else Policy.allow_all()
        self.directory = directory
        self.store = as_async(directory)      # the directory's async interface (SQLite or Redis)
        self._names: dict[str, int] = {}      # name -> uid, when there is no directory to persist them
        self.stats = stats if stats is not None else Stats()
        self.sessions: dict[int, ControlSession] = {}
        self.connections: set[ControlSession] = set()
        self.rules: dict[int, InstalledRule] = {}
        self.groups: dict[int, tuple[ControlSession, list[tuple[str, int]]]] = {}
        self.routes: list[Route] = []
        # who left and why, newest last (bounded), and how often each name was evicted
        self.departures: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_DEPARTURES)
        self.evictions: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.started_at = time.time()
        self._sids = itertools.count(1)
        self._cookies = itertools.count(1)
        self._table_lock = asyncio.Lock()
        self._pending_ops = 0
        self._listener: socket.socket | None = None
        self._teardowns: asyncio.Queue = asyncio.Queue()
        self.tasks = Supervisor("boxd", logger=log)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False
        self.engine_started = False

    # ================================================================ lifecycle
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.engine_started = True
        await self.engine.start()
        await self.engine.set_forwarding(self.routes)
        if self.config.control_path is not None:
            self._listener = self._bind(self.config.control_path)
            self.loop.add_reader(self._listener.fileno(), self._accept)
        self.tasks.spawn(self._watchdog(), name="watchdog", critical=True)
        self.tasks.spawn(self._teardown_worker(), name="teardown", critical=True)
        log.info("boxd listening on %s (engine %s)", self.config.control_path, self.engine.name)

    async def wait_failed(self) -> BaseException:
        """Returns when a critical task (the watchdog, the teardown worker) died."""
        return await self.tasks.wait_failed()

    def _bind(self, path: Path) -> socket.socket:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ControlSocketError(f"cannot create {path.parent}: {exc}") from None
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ControlSocketError(f"--control {path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # left by a crashed boxd
                self.stats["stale_control_socket_removed"] += 1
            else:
                raise ControlSocketError(f"another boxd is already listening on {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        umask = os.umask(0o177)   # nobody but boxd can connect until the mode and group are set
        try:
            sock.bind(str(path))
        except OSError as exc:
            sock.close()
            raise ControlSocketError(f"cannot bind control socket {path}: {exc}") from None
        finally:
            os.umask(umask)
        try:
            if self.config.socket_group is not None:
                os.chown(path, -1, self.config.socket_group)
            os.chmod(path, self.config.socket_mode)
        except OSError as exc:
            sock.close()
            raise ControlSocketError(f"cannot set the mode or group of {path}: {exc}") from None
        sock.listen(128)
        sock.setblocking(False)
        return sock

    async def stop(self) -> None:
        """Remove every rule, say goodbye to every booster, stop the engine."""
        if not self.engine_started or self.stopping:
            return
        self.stopping = True
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.config.control_path)
        for sess in list(self.connections):
            sess.send({"t": "evicted", "reason": "boxd is shutting down"})
            sess.close("boxd shutting down")
        if self.tasks.failed is None:  # let the teardown worker finish what is queued
            await self._teardowns.join()
        await self.tasks.aclose()
        async with self._table_lock:
            for installed in list(self.rules.values()):
                await self._engine_remove(installed.rule)
            self.rules.clear()
        await self.engine.stop()
        log.info("boxd stopped: all rules removed")

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            self.adopt(sock)

    def adopt(self, sock: socket.socket) -> ControlSession | None:
        """Serve a connected control socket (accepted, or one end of a socketpair in tests)."""
        config = self.config
        try:
            pid, uid, gid = transport.peer_credentials(sock)
        except OSError:
            sock.close()
            return None
        refusal = None
        if len(self.connections) >= config.max_connections:
            refusal = "connections_refused"
        else:
            mine = [s for s in self.connections if s.uid == uid]
            if len(mine) >= config.max_sessions_per_uid:
                refusal = "connections_refused_uid_limit"
            elif sum(not s.authenticated for s in mine) >= config.max_unauthenticated_per_uid:
                refusal = "connections_refused_unauthenticated"
        if refusal:
            # one uid's connections never lock out another uid's boosters
            self.stats[refusal] += 1
            log.debug("refusing a control connection of uid %d: %s", uid, refusal)
            sock.close()
            return None
        self.stats["connections"] += 1
        sess = ControlSession(self, sock, pid, uid, gid)
        self.connections.add(sess)
        return sess

    async def _watchdog(self) -> None:
        interval = self.config.heartbeat_interval
        deadline = interval * self.config.heartbeat_misses
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for sess in list(self.connections):
                if sess.closed:
                    continue
                if not sess.authenticated:
                    if now - sess.opened > self.config.hello_timeout:
                        self.stats["sessions_expired_before_hello"] += 1
                        sess.close(f"no hello within {self.config.hello_timeout}s")
                    continue
                if now - sess.last_seen > deadline:
                    self.evict(sess, f"missed heartbeats for {now - sess.last_seen:.1f}s")
                    continue
                if sess.booster is not None:
                    try:
                        reason = self.engine.health(sess.booster)
                    except Exception as exc:
                        log.exception("engine health check failed")
                        reason = f"health check failed: {exc}"
                    if reason:
                        self.evict(sess, f"unhealthy: {reason}")

    def evict(self, sess: ControlSession, reason: str) -> None:
        if sess.booster is not None:
            log.warning("evicting booster %s (pid %d): %s", sess.name, sess.pid, reason)
            self.stats["boosters_evicted"] += 1
            sess.evicted = reason
        else:
            log.info("closing observer session of pid %d: %s", sess.pid, reason)
            self.stats["observers_evicted"] += 1
        sess.send({"t": "evicted", "reason": reason})
        sess.close(reason)

    def _session_closed(self, sess: ControlSession, reason: str) -> None:
        """Remove everything the booster held, at once."""
        self.connections.discard(sess)
        if sess.worker is not None:
            sess.worker.cancel()
        for watch, task in sess.watches.values():
            task.cancel()
            with contextlib.suppress(Exception):
                watch.close()
        sess.watches.clear()
        if sess.booster is None:
            return
        log.info("booster %s (pid %d) left: %s", sess.name, sess.pid, reason)
        self.stats["boosters_left"] += 1
        self._note_departure(sess, reason)
        self.sessions.pop(sess.booster.sid, None)
        channel = sess.booster.channel
        if channel is not None:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(channel.fileno())
        for group in list(sess.groups):
            self.groups.pop(group, None)
        owned = list(sess.rules.values())
        for installed in owned:
            self.rules.pop(installed.rule.cookie, None)
        sess.rules.clear()
        if owned:
            self.stats["rules_removed_on_leave"] += len(owned)
        self._teardowns.put_nowait((sess, owned))

    def _note_departure(self, sess: ControlSession, reason: str) -> None:
        name = sess.booster.name
        if sess.evicted is not None:
            reason = sess.evicted
            self.evictions[name] = self.evictions.pop(name, 0) + 1
            while len(self.evictions) > MAX_EVICTION_NAMES:
                self.evictions.popitem(last=False)
                self.stats["eviction_counts_dropped"] += 1
        self.departures.append({"name": name, "sid": sess.booster.sid, "pid": sess.pid, "uid": sess.uid,
                                "reason": reason, "evicted": sess.evicted is not None,
                                "time": round(time.time(), 3)})

    async def _teardown_worker(self) -> None:
        # Removal jumps the FIFO queue on purpose: a dead booster's rules must go at once,
        # and they are already out of the controller's table so arbitration is consistent.
        while True:
            sess, owned = await self._teardowns.get()
            try:
                for installed in owned:
                    await self._engine_remove(installed.rule)
                for group in list(sess.groups):
                    with contextlib.suppress(Exception):
                        await self.engine.set_multicast_group(group, [])
                with contextlib.suppress(Exception):
                    await self.engine.detach(sess.booster)
                if sess.booster.channel is not None:
                    sess.booster.channel.close()
            finally:
                self._teardowns.task_done()

    async def _engine_remove(self, rule: Rule) -> None:
        try:
            await self.engine.remove(rule)
        except Exception:
            log.exception("engine failed to remove rule %d", rule.cookie)
            self.stats["engine_remove_errors"] += 1

    # ================================================================ operations
    async def perform(self, sess: ControlSession, operation: Operation, request: Any) -> Response:
        """Serve one parsed request: through the box-wide FIFO when it changes the table."""
        handler: Callable[[ControlSession, Any], Awaitable[Response]] = getattr(self, operation.handler)
        if sess.observer and operation.request is not Query:
            raise OpError(Status.PERMISSION_DENIED, "a read-only (observer) session may only query",
                          counter="permission_denied")
        if not operation.serialized:
            return await handler(sess, request)
        if self._pending_ops >= self.config.max_pending_ops:
            raise OpError(Status.ERROR, "busy: too many pending operations", counter="ops_refused_busy")
        self._pending_ops += 1
        try:
            async with self._table_lock:
                if sess.closed:
                    raise OpError(Status.ERROR, "booster left")
                return await handler(sess, request)
        finally:
            self._pending_ops -= 1

    async def op_hello(self, sess: ControlSession, req: Hello) -> Response:
        if sess.authenticated:
            raise invalid("already registered")
        if req.observer:
            self._check(self.policy.may_query(sess.uid))
            sess.observer = True
            self.stats["observers"] += 1
            return Response({"sid": 0, "engine": self.engine.name, "heartbeat": self.config.heartbeat_interval})
        self._check(self.policy.may_use_name(req.name, sess.uid), counter="names_refused")
        bound = await self._bind_name(req.name, sess.uid)
        if bound is not None:
            raise OpError(Status.PERMISSION_DENIED,
                          f"booster name {req.name!r} is bound to uid {bound}, not uid {sess.uid}",
                          counter="names_refused")
        if len(self.sessions) >= self.config.max_boosters:
            raise OpError(Status.ERROR, f"limit: {self.config.max_boosters} boosters already connected",
                          counter="boosters_refused")
        for other in self.sessions.values():
            if other.booster.name == req.name:
                raise OpError(Status.CONFLICT, f"a booster named {req.name!r} is connected",
                              holder=f"{req.name} (pid {other.pid})", counter="boosters_refused")
        boxd_end, booster_end = transport.socketpair_dgram()
        booster = BoosterSession(sid=next(self._sids), name=req.name, uid=sess.uid, pid=sess.pid,
                                 gid=sess.gid, channel=boxd_end, features=req.features)
        booster.send_event = sess.send
        sess.booster = booster
        self.sessions[booster.sid] = sess
        self.loop.add_reader(boxd_end.fileno(), self._on_channel, sess)
        await self.engine.attach(booster)
        self.stats["boosters_registered"] += 1
        log.info("booster %s registered (pid %d uid %d)", req.name, sess.pid, sess.uid)
        result = {"sid": booster.sid, "engine": self.engine.name,
                  "heartbeat": self.config.heartbeat_interval}
        # the booster end goes with the reply; the connection closes our copy once sent
        return Response(result, (booster_end.detach(),), owns_fds=True)

    def _check(self, refusal: str | None, counter: str = "permission_denied") -> None:
        """A policy's refusal (a reason, or None) as the operation's error."""
        if refusal:
            raise OpError(Status.PERMISSION_DENIED, refusal, counter=counter)

    async def _bind_name(self, name: str, uid: int) -> int | None:
        """Bind ``name`` to ``uid`` for good (persisted in the directory); the uid it is bound
        to if that is another one."""
        if self.store is not None:
            with self._directory_refusals():
                return await self.store.bind_name(name, uid)
        bound = self._names.setdefault(name, uid)
        return None if bound == uid else bound

    def _uid_sessions(self, uid: int) -> list[ControlSession]:
        return [s for s in self.sessions.values() if s.uid == uid]

    async def op_rule(self, sess: ControlSession, req: RuleRequest) -> Response:
        candidate = req.rule(owner=sess.name, cookie=0)
        self._check_policy(sess, candidate)
        for installed in sess.rules.values():
            if installed.request_key == req.key:
                self.stats["idempotent_requests"] += 1
                return Response(self._rule_result(installed, existing=True))
        self._arbitrate(sess, candidate)
        if len(sess.rules) >= self.config.max_rules_per_booster:
            raise OpError(Status.ERROR, f"limit: {self.config.max_rules_per_booster} rules per booster",
                          counter="rules_refused_limit")
        if sum(len(s.rules) for s in self._uid_sessions(sess.uid)) >= self.config.max_rules_per_uid:
            raise OpError(Status.ERROR, f"limit: {self.config.max_rules_per_uid} rules per uid",
                          counter="rules_refused_limit")
        rule = req.rule(owner=sess.name, cookie=next(self._cookies))
        try:
            if req.tcp:
                delivery = await self.engine.install_tcp(rule, sess.booster)
            else:
                delivery = await self.engine.install(rule, sess.booster)
        except (ValueError, NotImplementedError) as exc:
            raise OpError(Status.INVALID, f"engine {self.engine.name}: {exc}", counter="engine_refused") from None
        if sess.closed:  # it left while the engine worked: undo
            await self._engine_remove(rule)
            raise OpError(Status.ERROR, "booster left")
        installed = InstalledRule(rule=rule, session=sess, delivery=delivery, request_key=req.key)
        self.rules[rule.cookie] = installed
        sess.rules[rule.cookie] = installed
        sess.send_checks.clear()
        self.stats["rules_installed"] += 1
        log.info("%s: %s %s -> cookie %d (%s)", sess.name, rule.action.value, rule.match.describe(),
                 rule.cookie, delivery.kind)
        return Response(self._rule_result(installed), tuple(delivery.fds))

    def _check_policy(self, sess: ControlSession, candidate: Rule) -> None:
        self._check(self.policy.check(sess.name, sess.uid, candidate))
        if candidate.action is Action.COPY:
            # whose traffic may be copied: a booster of another uid's (docs/security.md)
            for installed in self.rules.values():
                if (installed.session.uid != sess.uid and installed.rule.action.terminal
                        and installed.rule.match.overlaps(candidate.match)):
                    self._check(self.policy.may_copy_foreign(sess.name, sess.uid, candidate))
                    break

    def _arbitrate(self, sess: ControlSession, candidate: Rule) -> None:
        if candidate.action.terminal:
            for installed in self.rules.values():
                other = installed.rule
                if (installed.session is not sess and other.action.terminal
                        and other.match.overlaps(candidate.match)):
                    raise OpError(Status.CONFLICT,
                                  f"{candidate.action.value} {candidate.match.describe()} overlaps "
                                  f"{other.action.value} {other.match.describe()} held by {other.owner}",
                                  holder=other.owner, counter="conflicts")
        if candidate.action is Action.MULTICAST:
            self._check_group_holder(sess, candidate.group)

    def _check_group_holder(self, sess: ControlSession, group: int | None) -> None:
        holder = self.groups.get(group)
        if holder is not None and holder[0] is not sess:
            raise OpError(Status.CONFLICT, f"multicast group {group} belongs to {holder[0].name}",
                          holder=holder[0].name, counter="conflicts")

    @staticmethod
    def _rule_result(installed: InstalledRule, existing: bool = False) -> dict:
        return {"cookie": installed.rule.cookie, "rule": installed.rule.to_dict(),
                "delivery": installed.delivery.to_wire(), "existing": existing}

    async def op_cancel(self, sess: ControlSession, req: Cancel) -> Response:
        installed = sess.rules.pop(req.cookie, None)
        if installed is None:
            raise invalid(f"no rule {req.cookie} held by {sess.name}")
        self.rules.pop(req.cookie, None)
        sess.reported.pop(req.cookie, None)
        sess.send_checks.clear()
        await self._engine_remove(installed.rule)
        self.stats["rules_cancelled"] += 1
        return Response({"cookie": req.cookie})

    async def op_set_multicast_group(self, sess: ControlSession, req: SetMulticastGroup) -> Response:
        group, members = req.group, list(req.members)
        config = self.config
        self._check_group_holder(sess, group)
        if members:
            self._check(self.policy.check_group(sess.name, sess.uid, members))
        if len(members) > config.max_group_members:
            raise OpError(Status.ERROR, f"limit: {config.max_group_members} members per group",
                          counter="groups_refused_limit")
        if group not in self.groups and members:
            if len(self.groups) >= config.max_groups:
                raise OpError(Status.ERROR, f"limit: {config.max_groups} groups", counter="groups_refused_limit")
            if sum(len(s.groups) for s in self._uid_sessions(sess.uid)) >= config.max_groups_per_uid:
                raise OpError(Status.ERROR, f"limit: {config.max_groups_per_uid} groups per uid",
                              counter="groups_refused_limit")
        others = sum(len(m) for g, (owner, m) in self.groups.items() if owner.uid == sess.uid and g != group)
        if others + len(members) > config.max_group_members_per_uid:
            raise OpError(Status.ERROR, f"limit: {config.max_group_members_per_uid} group members per uid",
                          counter="groups_refused_limit")
        try:
            await self.engine.set_multicast_group(group, members)
        except (ValueError, NotImplementedError) as exc:   # what this engine cannot do (xdp: > 256)
            raise invalid(f"engine {self.engine.name}: {exc}") from None
        if members:
            self.groups[group] = (sess, members)
            sess.groups.add(group)
        else:
            self.groups.pop(group, None)
            sess.groups.discard(group)
        return Response({"group": group, "members": len(members)})

    async def op_send(self, sess: ControlSession, req: Send) -> Response:
        pkt = req.packet
        self._check(self.send_refusal(sess, pkt.proto, pkt.src, pkt.sport, pkt.dst, pkt.dport),
                    counter="send_refused")
        try:
            self.engine.inject(req.packet, sess.booster)
        except (ValueError, NotImplementedError) as exc:
            raise invalid(f"engine {self.engine.name}: {exc}") from None
        self.stats["packets_injected"] += 1
        return Response()

    async def op_query(self, sess: ControlSession, req: Query) -> Response:
        self._check(self.policy.may_query(sess.uid))
        return Response(await self.query(req.what))

    # ---------------------------------------------------------- what a booster may send
    def send_refusal(self, sess: ControlSession, proto: int, src: str, sport: int, dst: str,
                     dport: int) -> str | None:
        """None if ``sess`` may inject this packet: it lies in (or answers) traffic one of its
        rules holds, or a grant with ``send`` covers it.  Cached per session until its rules change."""
        key = (proto, src, sport, dst, dport)
        cached = sess.send_checks.get(key, False)
        if cached is not False:
            return cached
        forward = Packet(proto, src, sport, dst, dport, b"")
        backward = Packet(proto, dst, dport, src, sport, b"")
        if any(r.region.matches(forward) or r.region.matches(backward) for r in sess.rules.values()):
            refusal = None
        else:
            refusal = self.policy.may_send(sess.name, sess.uid, proto, src, sport, dst, dport)
        if len(sess.send_checks) >= 1024:
            sess.send_checks.clear()
        sess.send_checks[key] = refusal
        return refusal

    def port_refusal(self, sess: ControlSession, src_port: int) -> str | None:
        """None if ``sess`` may fan out from UDP ``src_port`` (0: an ephemeral port; else a port
        one of its rules holds, or one a grant with ``send`` covers)."""
        if src_port == 0:
            return None
        for installed in sess.rules.values():
            region = installed.region
            lo, hi = port_bounds(region.dst_port)
            if region.proto in (None, 17) and lo <= src_port <= hi and region.dst_port is not None:
                return None
        return self.policy.may_send(sess.name, sess.uid, 17, None, src_port, None, None)

    async def query(self, what: str) -> Any:
        """The management views by name (boxctl over --control, and HTTP)."""
        if what == "status":
            return self.status()
        if what == "boosters":
            return self.boosters_view()
        if what == "rules":
            return self.rules_view()
        if what == "counters":
            return {"rules": {str(c): list(v) for c, v in sorted(self.rule_counters().items())},
                    "events": dict(self.stats),
                    "engine": self.engine.status().get("counters", {})}
        if what == "directory":
            return await self.directory_view()
        raise invalid(f"unknown query {what!r}")

    # ---------------------------------------------------------- directory
    def _need_directory(self):
        if self.store is None:
            raise OpError(Status.ERROR, "this boxd has no directory (no --state)")
        return self.store

    @contextlib.contextmanager
    def _directory_refusals(self):
        """A refused directory operation (DirectoryError, a ValueError) answers INVALID."""
        try:
            yield
        except ValueError as exc:
            raise OpError(Status.INVALID, str(exc), counter="directory_refused") from None
        except DirectoryUnavailable as exc:       # a fleet directory's Redis is away: try later
            raise OpError(Status.ERROR, str(exc), counter="directory_unavailable") from None

    async def op_dir_get(self, sess: ControlSession, req: DirKey) -> Response:
        with self._directory_refusals():
            value = await self._need_directory().get(sess.name, req.key)
        return Response({"value": value, "found": value is not None})

    async def op_dir_put(self, sess: ControlSession, req: DirPut) -> Response:
        with self._directory_refusals():
            await self._need_directory().put(sess.name, req.key, req.value, uid=sess.uid,
                                             max_uid_bytes=self.config.max_directory_bytes_per_uid)
        return Response()

    async def op_dir_delete(self, sess: ControlSession, req: DirKey) -> Response:
        with self._directory_refusals():
            existed = await self._need_directory().delete(sess.name, req.key)
        return Response({"deleted": bool(existed)})

    async def op_dir_items(self, sess: ControlSession, req: DirPrefix) -> Response:
        with self._directory_refusals():
            items = await self._need_directory().items(sess.name, req.prefix)
        return Response({"items": [[k, v] for k, v in items]})

    async def op_dir_watch(self, sess: ControlSession, req: DirPrefix) -> Response:
        if len(sess.watches) >= self.config.max_watches_per_booster:
            raise OpError(Status.ERROR, f"limit: {self.config.max_watches_per_booster} watches")
        with self._directory_refusals():
            watch = self._need_directory().watch(sess.name, req.prefix)
            try:
                await watch.ready()          # live before the reply: the booster's next change is seen
            except BaseException:
                watch.close()
                raise
        wid = next(sess.watch_ids)
        task = self.tasks.spawn(self._pump_watch(sess, wid, watch), name=f"watch-{sess.name}-{wid}",
                                critical=False)
        sess.watches[wid] = (watch, task)
        return Response({"watch": wid})

    async def _pump_watch(self, sess: ControlSession, wid: int, watch: Any) -> None:
        try:
            async for key, value in watch.events():
                sess.send({"t": "dir_event", "watch": wid, "key": key, "value": value,
                           "deleted": value is None})
        except Exception:
            sess.close("internal error watching the directory")
            raise

    async def op_dir_unwatch(self, sess: ControlSession, req: DirUnwatch) -> Response:
        entry = sess.watches.pop(req.watch, None)
        if entry is None:
            raise invalid(f"no watch {req.watch}")
        watch, task = entry
        task.cancel()
        with contextlib.suppress(Exception):
            watch.close()
        return Response()

    # ================================================================ data channel
    def _on_channel(self, sess: ControlSession) -> None:
        booster = sess.booster
        channel = booster.channel
        engine = self.engine
        for _ in range(MAX_DATAGRAMS_PER_WAKEUP):
            try:
                data = channel.recv(wire.MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not data:
                return
            try:
                tag, fields = wire.unpack_datagram(data)
                if tag is Tag.VERDICTS:
                    for token, code, payload in fields:
                        engine.verdict(booster, token, code, payload)
                elif tag is Tag.VERDICT:
                    engine.verdict(booster, fields[0], fields[1], fields[2])
                elif tag is Tag.SEND:
                    if self.send_refusal(sess, *fields[:5]) is not None:
                        self.stats["send_refused"] += 1
                        continue
                    engine.inject(Packet(*fields[:5], payload=bytes(fields[5])), booster)
                    self.stats["packets_injected"] += 1
                elif tag is Tag.MULTICAST:
                    group = self.groups.get(fields[0])
                    if group is None or group[0] is not sess or self.port_refusal(sess, fields[1]):
                        self.stats["multicast_refused"] += 1
                        continue
                    engine.send_multicast(fields[0], bytes(fields[2]), fields[1], booster)
                    self.stats["multicast_sent"] += 1
                else:
                    raise WireDecodeError(f"{tag.name} is not sent by boosters")
            except WireDecodeError as exc:
                self.stats["channel_malformed"] += 1
                log.debug("%s: bad datagram: %s", sess.name, exc)
            except (ValueError, NotImplementedError) as exc:
                self.stats["channel_refused"] += 1
                log.debug("%s: datagram refused: %s", sess.name, exc)

    # ================================================================ views (HTTP, boxctl)
    def rule_counters(self) -> dict[int, tuple[int, int]]:
        counters = dict(self.engine.counters())
        for sess in self.sessions.values():
            for cookie, (packets, nbytes) in sess.reported.items():
                base = counters.get(cookie, (0, 0))
                counters[cookie] = (base[0] + packets, base[1] + nbytes)
        return counters

    def status(self) -> dict[str, Any]:
        return {
            "engine": self.engine.name,
            "uptime_s": round(time.time() - self.started_at, 3),
            "boosters": len(self.sessions),
            "rules": len(self.rules),
            "groups": len(self.groups),
            "control": str(self.config.control_path),
            "routes": [r.to_dict() for r in self.routes],
            "counters": dict(self.stats),
            "engine_status": self.engine.status(),
        }

    def boosters_view(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        out = []
        for sess in self.sessions.values():
            b = sess.booster
            out.append({
                "sid": b.sid, "name": b.name, "pid": b.pid, "uid": b.uid,
                "rules": sorted(sess.rules), "groups": sorted(sess.groups),
                "connected_s": round(time.time() - sess.connected_at, 3),
                "last_heartbeat_s": round(now - sess.last_seen, 3),
                "handler_errors": sess.handler_errors,
                "channel_sent": b.channel_sent, "channel_dropped": b.channel_dropped,
                "evictions": self.evictions.get(b.name, 0),
            })
        return out

    def departures_view(self) -> list[dict[str, Any]]:
        """The last :data:`MAX_DEPARTURES` boosters that left, oldest first: name, sid, pid, uid,
        reason (boxd's eviction reason when ``evicted``), time (Unix seconds)."""
        return [dict(d) for d in self.departures]

    def rules_view(self) -> list[dict[str, Any]]:
        counters = self.rule_counters()
        out = []
        for cookie, installed in sorted(self.rules.items()):
            rule = installed.rule
            packets, nbytes = counters.get(cookie, (0, 0))
            out.append({
                "cookie": cookie, "owner": rule.owner, "action": rule.action.value,
                "priority": rule.priority, "match": rule.match.to_dict(),
                "match_text": rule.match.describe(), "group": rule.group,
                "delivery": installed.delivery.kind, "packets": packets, "bytes": nbytes,
            })
        return out

    async def directory_view(self, booster: str | None = None, prefix: str = "") -> dict[str, Any]:
        """Every booster's items (or one booster's), as long as they fit in one reply: a bigger
        directory is an ERROR saying where to read it page by page (never a silent close)."""
        if self.store is None:
            return {}
        budget = self.config.max_reply // 2   # values grow a little as msgpack maps
        names = [booster] if booster else sorted(self.store.boosters())
        out: dict[str, Any] = {}
        for name in names:
            with self._directory_refusals():
                items, more = await self.store.page(name, prefix, limit=budget, max_bytes=budget)
            budget -= sum(len(k) + len(encode_value(v)) for k, v in items)
            if more is not None or budget < 0:
                raise OpError(Status.ERROR, f"the directory holds more than one reply may carry "
                              f"({self.config.max_reply} bytes): read it page by page from the HTTP API, "
                              "/api/directory?booster=NAME&after=KEY", counter="replies_too_large")
            out[name] = dict(items)
        return out


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
