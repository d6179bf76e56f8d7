"""The booster box controller: sessions, policy, arbitration, ownership, lifecycle.

One :class:`Controller` per box.  Boosters connect to its Unix control socket
(:mod:`boxcore.wire`).  Every rule request passes through here:

1. the match is parsed strictly (INVALID with the reason);
2. the policy decides (PERMISSION_DENIED with the policy's reason);
3. a request identical to one the booster already holds is answered with the
   rule it holds (idempotent);
4. arbitration: a terminating rule (REDIRECT, DROP, MULTICAST, FORWARD) that
   overlaps another booster's terminating rule is refused with CONFLICT naming
   the holder; COPY rules may overlap anything;
5. the engine installs it and answers with a Delivery, which goes back to the
   booster (descriptors by SCM_RIGHTS).

Rule operations are served FIFO through one asyncio lock (asyncio locks are
fair): the resource they compete for is the box's classifier table, and
arbitration must see a consistent table.  Waiting operations are bounded
(``max_pending_ops``); beyond it a request is refused with ERROR and counted.

Lifecycle: a booster that disconnects, crashes, misses ``heartbeat_misses``
heartbeats, or that the engine reports unhealthy is evicted and its rules are
removed at once (counted).  ``stop()`` removes every rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boxcore import transport, wire
from boxcore.engines.base import BoosterSession, Delivery, Engine, Route
from boxcore.rules import Action, Match, Rule, RuleError
from cliruntime import ConfigError, Stats
from boxcore.wire import Status, Tag, WireDecodeError

log = logging.getLogger("boxcore.controller")

MAX_DATAGRAMS_PER_WAKEUP = 256


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
    socket_mode: int = 0o666


@dataclass
class InstalledRule:
    rule: Rule
    session: "ControlSession"
    delivery: Delivery
    request_key: tuple
    installed_at: float = field(default_factory=time.time)


class ControlSession:
    """boxd's state for one control connection (a booster once it said hello)."""

    def __init__(self, controller: "Controller", sock: socket.socket, pid: int, uid: int, gid: int):
        self.controller = controller
        self.pid, self.uid, self.gid = pid, uid, gid
        self.booster: BoosterSession | None = None
        self.conn = transport.FramedConnection(sock, self._on_message, self._on_close,
                                          max_frame=controller.config.max_frame, accept_fds=False)
        self.rules: dict[int, InstalledRule] = {}
        self.watches: dict[int, tuple[Any, asyncio.Task]] = {}
        self.watch_ids = itertools.count(1)
        self.groups: set[int] = set()
        self.last_seen = time.monotonic()
        self.connected_at = time.time()
        self.reported: dict[int, tuple[int, int]] = {}
        self.handler_errors = 0
        self.closed = False
        self.tasks: set[asyncio.Task] = set()
        self.inbox: asyncio.Queue = asyncio.Queue(controller.config.max_inflight_per_booster)
        self.worker: asyncio.Task | None = None

    @property
    def name(self) -> str:
        return self.booster.name if self.booster else f"<unregistered pid {self.pid}>"

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
        # A booster's messages are served one at a time, in the order sent.
        try:
            self.inbox.put_nowait(msg)
        except asyncio.QueueFull:
            ctl.stats["ops_refused_busy"] += 1
            self.reply_error(wire.request_id(msg), Status.ERROR, "busy: too many requests queued")
            return
        if self.worker is None:
            self.worker = asyncio.get_running_loop().create_task(self._work())
            self.tasks.add(self.worker)

    async def _work(self) -> None:
        while not self.closed:
            msg = await self.inbox.get()
            await self._handle(msg)

    async def _handle(self, msg: Any) -> None:
        ctl = self.controller
        if isinstance(msg, wire.BadFrame):
            ctl.stats["control_malformed"] += 1
            self.reply_error(None, Status.INVALID, msg.reason)
            return
        try:
            wire.validate(msg)
        except WireDecodeError as exc:
            ctl.stats["control_malformed"] += 1
            self.reply_error(wire.request_id(msg), Status.INVALID, str(exc))
            return
        kind = msg["t"]
        if self.booster is None and kind not in ("hello", "query"):
            ctl.stats["control_malformed"] += 1
            self.reply_error(wire.request_id(msg), Status.INVALID, "say hello first")
            return
        if kind == "heartbeat":
            self._on_heartbeat(msg)
            return
        if kind == "bye":
            self.close("said goodbye")
            return
        if kind not in wire.REQUESTS:
            ctl.stats["control_malformed"] += 1
            self.reply_error(wire.request_id(msg), Status.INVALID, f"{kind} is not a request")
            return
        await self._serve(msg)

    def _on_heartbeat(self, msg: dict) -> None:
        for cookie, packets, nbytes in msg.get("counters") or ():
            if cookie in self.rules:
                self.reported[cookie] = (packets, nbytes)
        self.handler_errors = msg.get("handler_errors") or self.handler_errors

    async def _serve(self, msg: dict) -> None:
        ctl = self.controller
        rid = msg["id"]
        handler = getattr(ctl, f"_op_{msg['t']}")
        try:
            status, result, fds, extra = await handler(self, msg)
        except RuleError as exc:
            status, result, fds, extra = Status.INVALID, None, (), {"reason": str(exc)}
        except (WireDecodeError, ValueError) as exc:  # includes DirectoryError
            status, result, fds, extra = Status.INVALID, None, (), {"reason": str(exc)}
        except Exception as exc:  # one bad request must never take boxd down
            log.exception("%s: %s failed", self.name, msg["t"])
            ctl.stats["op_errors"] += 1
            status, result, fds, extra = Status.ERROR, None, (), {"reason": f"{type(exc).__name__}: {exc}"}
        ctl.stats[f"replies_{status.value.lower()}"] += 1
        close_fds = bool(extra.pop("_close_fds", False))
        reply: dict[str, Any] = {"t": "reply", "id": rid, "status": status.value, **extra}
        if result is not None:
            reply["result"] = result
        self.send(reply, fds, close_fds=close_fds)

    def send(self, msg: dict, fds=(), *, close_fds: bool = False) -> bool:
        try:
            return self.conn.send(msg, fds, close_fds=close_fds)
        except WireDecodeError:
            log.exception("%s: refusing to send an invalid message", self.name)
            return False

    def reply_error(self, rid: int | None, status: Status, reason: str) -> None:
        if rid is None:
            # no id to answer: tell it once as an eviction-free event would be ambiguous;
            # an unanswerable bad frame is only counted and logged.
            log.debug("%s: malformed frame: %s", self.name, reason)
            return
        self.send({"t": "reply", "id": rid, "status": status.value, "reason": reason})

    # ---------------------------------------------------------- teardown
    def _on_close(self, reason: str) -> None:
        self.closed = True
        self.controller._session_closed(self, reason)

    def close(self, reason: str) -> None:
        if not self.conn.closed:
            self.conn.close(reason)


class Controller:
    """boxd's core: owns sessions, rules, groups, routes, the directory and the engine."""

    def __init__(self, engine: Engine, config: ControllerConfig, *, policy: Any = None,
                 directory: Any = None, stats: Stats | None = None) -> None:
        self.engine = engine
        self.config = config
        self.policy = policy
        self.directory = directory
        self.stats = stats if stats is not None else Stats()
        self.sessions: dict[int, ControlSession] = {}
        self.connections: set[ControlSession] = set()
        self.rules: dict[int, InstalledRule] = {}
        self.groups: dict[int, tuple[ControlSession, list[tuple[str, int]]]] = {}
        self.routes: list[Route] = []
        self.started_at = time.time()
        self._sids = itertools.count(1)
        self._cookies = itertools.count(1)
        self._table_lock = asyncio.Lock()
        self._pending_ops = 0
        self._listener: socket.socket | None = None
        self._checker: asyncio.Task | None = None
        self._removals: set[asyncio.Task] = set()
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
        self._checker = self.loop.create_task(self._check_sessions())
        log.info("boxd listening on %s (engine %s)", self.config.control_path, self.engine.name)

    def _bind(self, path: Path) -> socket.socket:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {path.parent}: {exc}") from None
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ConfigError(f"--control {path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # left by a crashed boxd
                self.stats["stale_control_socket_removed"] += 1
            else:
                raise ConfigError(f"another boxd is already listening on {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot bind control socket {path}: {exc}") from None
        os.chmod(path, self.config.socket_mode)
        sock.listen(128)
        sock.setblocking(False)
        return sock

    async def stop(self) -> None:
        """Remove every rule, say goodbye to every booster, stop the engine."""
        if not self.engine_started or self.stopping:
            return
        self.stopping = True
        if self._checker:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.config.control_path)
        for sess in list(self.connections):
            sess.send({"t": "evicted", "reason": "boxd is shutting down"})
            sess.close("boxd shutting down")
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)
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
        if len(self.connections) >= self.config.max_boosters + 16:  # room for boxctl queries
            self.stats["connections_refused"] += 1
            sock.close()
            return None
        try:
            pid, uid, gid = transport.peer_credentials(sock)
        except OSError:
            sock.close()
            return None
        self.stats["connections"] += 1
        sess = ControlSession(self, sock, pid, uid, gid)
        self.connections.add(sess)
        return sess

    async def _check_sessions(self) -> None:
        interval = self.config.heartbeat_interval
        deadline = interval * self.config.heartbeat_misses
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for sess in list(self.connections):
                if sess.closed:
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
        log.warning("evicting booster %s (pid %d): %s", sess.name, sess.pid, reason)
        self.stats["boosters_evicted"] += 1
        sess.send({"t": "evicted", "reason": reason})
        sess.close(reason)

    def _session_closed(self, sess: ControlSession, reason: str) -> None:
        """Remove everything the booster held, at once."""
        self.connections.discard(sess)
        for task in list(sess.tasks):
            task.cancel()
        for watch, task in sess.watches.values():
            task.cancel()
            with contextlib.suppress(Exception):
                watch.close()
        sess.watches.clear()
        if sess.booster is None:
            return
        log.info("booster %s (pid %d) left: %s", sess.name, sess.pid, reason)
        self.stats["boosters_left"] += 1
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
        task = self.loop.create_task(self._teardown(sess, owned))
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)

    async def _teardown(self, sess: ControlSession, owned: list[InstalledRule]) -> None:
        # Removal jumps the FIFO queue on purpose: a dead booster's rules must go at once,
        # and they are already out of the controller's table so arbitration is consistent.
        for installed in owned:
            await self._engine_remove(installed.rule)
        for group in list(sess.groups):
            with contextlib.suppress(Exception):
                await self.engine.set_multicast_group(group, [])
        with contextlib.suppress(Exception):
            await self.engine.detach(sess.booster)
        if sess.booster.channel is not None:
            sess.booster.channel.close()

    async def _engine_remove(self, rule: Rule) -> None:
        try:
            await self.engine.remove(rule)
        except Exception:
            log.exception("engine failed to remove rule %d", rule.cookie)
            self.stats["engine_remove_errors"] += 1

    # ================================================================ operations
    async def _op_hello(self, sess: ControlSession, msg: dict):
        if sess.booster is not None:
            return Status.INVALID, None, (), {"reason": "already registered"}
        name = msg["name"]
        if not name or len(name) > 64 or not name.isprintable():
            return Status.INVALID, None, (), {"reason": "booster name must be 1..64 printable characters"}
        if msg["version"] != wire.PROTOCOL_VERSION:
            return Status.INVALID, None, (), {
                "reason": f"protocol version {msg['version']} unsupported (boxd speaks {wire.PROTOCOL_VERSION})"}
        if len(self.sessions) >= self.config.max_boosters:
            self.stats["boosters_refused"] += 1
            return Status.ERROR, None, (), {"reason": f"limit: {self.config.max_boosters} boosters already connected"}
        for other in self.sessions.values():
            if other.booster.name == name:
                self.stats["boosters_refused"] += 1
                return Status.CONFLICT, None, (), {"reason": f"a booster named {name!r} is connected",
                                                   "holder": f"{name} (pid {other.pid})"}
        boxd_end, booster_end = transport.socketpair_dgram()
        booster = BoosterSession(sid=next(self._sids), name=name, uid=sess.uid, pid=sess.pid,
                                 gid=sess.gid, channel=boxd_end)
        booster.send_event = sess.send
        sess.booster = booster
        self.sessions[booster.sid] = sess
        self.loop.add_reader(boxd_end.fileno(), self._on_channel, sess)
        await self.engine.attach(booster)
        self.stats["boosters_registered"] += 1
        log.info("booster %s registered (pid %d uid %d)", name, sess.pid, sess.uid)
        result = {"sid": booster.sid, "engine": self.engine.name,
                  "heartbeat": self.config.heartbeat_interval}
        # the booster end goes with the reply; the connection closes our copy once sent
        return Status.OK, result, (booster_end.detach(),), {"_close_fds": True}

    async def _op_rule(self, sess: ControlSession, msg: dict):
        match = Match.from_dict(msg["match"])
        action = Action.parse(msg["action"])
        priority = msg.get("priority")
        priority = 100 if priority is None else priority
        group = msg.get("group")
        tcp = bool(msg.get("tcp"))
        if tcp and action is not Action.REDIRECT:
            return Status.INVALID, None, (), {"reason": "tcp interception needs a redirect"}
        if tcp and match.proto not in (None, 6):
            return Status.INVALID, None, (), {"reason": "tcp interception of a non-TCP match"}
        if tcp:
            match = Match(proto=6, src=match.src, dst=match.dst, src_port=match.src_port,
                          dst_port=match.dst_port, payload=match.payload)
        candidate = Rule(match=match, action=action, priority=priority, owner=sess.name,
                         cookie=0, group=group)
        if self.policy is not None:
            reason = self.policy.check(sess.name, sess.uid, candidate)
            if reason:
                self.stats["permission_denied"] += 1
                return Status.PERMISSION_DENIED, None, (), {"reason": reason}
        if self._pending_ops >= self.config.max_pending_ops:
            self.stats["ops_refused_busy"] += 1
            return Status.ERROR, None, (), {"reason": "busy: too many pending operations"}
        key = (match, action, priority, group, tcp)
        self._pending_ops += 1
        try:
            async with self._table_lock:
                return await self._install_locked(sess, candidate, key, tcp)
        finally:
            self._pending_ops -= 1

    async def _install_locked(self, sess: ControlSession, candidate: Rule, key: tuple, tcp: bool):
        if sess.closed:
            return Status.ERROR, None, (), {"reason": "booster left"}
        for installed in sess.rules.values():
            if installed.request_key == key:
                self.stats["idempotent_requests"] += 1
                return Status.OK, self._rule_result(installed, existing=True), (), {}
        if candidate.action.terminal:
            for installed in self.rules.values():
                other = installed.rule
                if (installed.session is not sess and other.action.terminal
                        and other.match.overlaps(candidate.match)):
                    self.stats["conflicts"] += 1
                    return Status.CONFLICT, None, (), {
                        "reason": f"{candidate.action.value} {candidate.match.describe()} overlaps "
                                  f"{other.action.value} {other.match.describe()} held by {other.owner}",
                        "holder": other.owner}
        if candidate.action is Action.MULTICAST:
            holder = self.groups.get(candidate.group)
            if holder is not None and holder[0] is not sess:
                self.stats["conflicts"] += 1
                return Status.CONFLICT, None, (), {
                    "reason": f"multicast group {candidate.group} belongs to {holder[0].name}",
                    "holder": holder[0].name}
        if len(sess.rules) >= self.config.max_rules_per_booster:
            self.stats["rules_refused_limit"] += 1
            return Status.ERROR, None, (), {
                "reason": f"limit: {self.config.max_rules_per_booster} rules per booster"}
        rule = Rule(match=candidate.match, action=candidate.action, priority=candidate.priority,
                    owner=candidate.owner, cookie=next(self._cookies), group=candidate.group)
        try:
            delivery = await self.engine.install(rule, sess.booster) if not tcp else \
                await self._install_tcp(rule, sess.booster)
        except (ValueError, NotImplementedError) as exc:
            self.stats["engine_refused"] += 1
            return Status.INVALID, None, (), {"reason": f"engine {self.engine.name}: {exc}"}
        if sess.closed:  # it left while the engine worked: undo
            await self._engine_remove(rule)
            return Status.ERROR, None, (), {"reason": "booster left"}
        installed = InstalledRule(rule=rule, session=sess, delivery=delivery, request_key=key)
        self.rules[rule.cookie] = installed
        sess.rules[rule.cookie] = installed
        self.stats["rules_installed"] += 1
        log.info("%s: %s %s -> cookie %d (%s)", sess.name, rule.action.value, rule.match.describe(),
                 rule.cookie, delivery.kind)
        return Status.OK, self._rule_result(installed), tuple(delivery.fds), {}

    async def _install_tcp(self, rule: Rule, booster: BoosterSession) -> Delivery:
        install_tcp = getattr(self.engine, "install_tcp", None)
        if install_tcp is None:
            return await self.engine.install(rule, booster)
        return await install_tcp(rule, booster)

    @staticmethod
    def _rule_result(installed: InstalledRule, existing: bool = False) -> dict:
        return {"cookie": installed.rule.cookie, "rule": installed.rule.to_dict(),
                "delivery": installed.delivery.to_wire(), "existing": existing}

    async def _op_cancel(self, sess: ControlSession, msg: dict):
        cookie = msg["cookie"]
        self._pending_ops += 1
        try:
            async with self._table_lock:
                installed = sess.rules.pop(cookie, None)
                if installed is None:
                    return Status.INVALID, None, (), {"reason": f"no rule {cookie} held by {sess.name}"}
                self.rules.pop(cookie, None)
                sess.reported.pop(cookie, None)
                await self._engine_remove(installed.rule)
        finally:
            self._pending_ops -= 1
        self.stats["rules_cancelled"] += 1
        return Status.OK, {"cookie": cookie}, (), {}

    async def _op_set_multicast_group(self, sess: ControlSession, msg: dict):
        group, members = msg["group"], [(str(h), int(p)) for h, p in msg["members"]]
        holder = self.groups.get(group)
        if holder is not None and holder[0] is not sess:
            self.stats["conflicts"] += 1
            return Status.CONFLICT, None, (), {"reason": f"multicast group {group} belongs to {holder[0].name}",
                                               "holder": holder[0].name}
        if len(members) > self.config.max_group_members:
            return Status.ERROR, None, (), {"reason": f"limit: {self.config.max_group_members} members per group"}
        if holder is None and members and len(self.groups) >= self.config.max_groups:
            return Status.ERROR, None, (), {"reason": f"limit: {self.config.max_groups} groups"}
        for host, port in members:
            if wire_address_error(host):
                return Status.INVALID, None, (), {"reason": f"bad member address {host!r}"}
        await self.engine.set_multicast_group(group, members)
        if members:
            self.groups[group] = (sess, members)
            sess.groups.add(group)
        else:
            self.groups.pop(group, None)
            sess.groups.discard(group)
        return Status.OK, {"group": group, "members": len(members)}, (), {}

    async def _op_send(self, sess: ControlSession, msg: dict):
        pkt = wire.packet_from_wire(msg["packet"])
        self.engine.inject(pkt, sess.booster)
        self.stats["packets_injected"] += 1
        return Status.OK, None, (), {}

    async def _op_query(self, sess: ControlSession, msg: dict):
        return Status.OK, self.query(msg["what"]), (), {}

    def query(self, what: str) -> Any:
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
            return self.directory_view()
        raise ValueError(f"unknown query {what!r}")

    # ---------------------------------------------------------- directory
    def _need_directory(self):
        if self.directory is None:
            raise RuntimeError("this boxd has no directory (no --state)")
        return self.directory

    async def _op_dir_get(self, sess, msg):
        value = self._need_directory().get(sess.name, msg["key"])
        return Status.OK, {"value": value, "found": value is not None}, (), {}

    async def _op_dir_put(self, sess, msg):
        try:
            self._need_directory().put(sess.name, msg["key"], msg["value"])
        except ValueError as exc:
            self.stats["directory_refused"] += 1
            return Status.INVALID, None, (), {"reason": str(exc)}
        return Status.OK, None, (), {}

    async def _op_dir_delete(self, sess, msg):
        existed = self._need_directory().delete(sess.name, msg["key"])
        return Status.OK, {"deleted": bool(existed)}, (), {}

    async def _op_dir_items(self, sess, msg):
        items = self._need_directory().items(sess.name, msg["prefix"])
        return Status.OK, {"items": [[k, v] for k, v in items]}, (), {}

    async def _op_dir_watch(self, sess, msg):
        if len(sess.watches) >= self.config.max_watches_per_booster:
            return Status.ERROR, None, (), {"reason": f"limit: {self.config.max_watches_per_booster} watches"}
        watch = self._need_directory().watch(sess.name, msg["prefix"])
        wid = next(sess.watch_ids)
        task = self.loop.create_task(self._pump_watch(sess, wid, watch))
        sess.watches[wid] = (watch, task)
        return Status.OK, {"watch": wid}, (), {}

    async def _pump_watch(self, sess: ControlSession, wid: int, watch: Any) -> None:
        try:
            async for key, value in watch.events():
                sess.send({"t": "dir_event", "watch": wid, "key": key, "value": value,
                           "deleted": value is None})
        except asyncio.CancelledError:
            pass

    async def _op_dir_unwatch(self, sess, msg):
        entry = sess.watches.pop(msg["watch"], None)
        if entry is None:
            return Status.INVALID, None, (), {"reason": f"no watch {msg['watch']}"}
        watch, task = entry
        task.cancel()
        with contextlib.suppress(Exception):
            watch.close()
        return Status.OK, None, (), {}

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
                    from boxcore.packet import Packet
                    engine.inject(Packet(*fields[:5], payload=bytes(fields[5])), booster)
                    self.stats["packets_injected"] += 1
                elif tag is Tag.MULTICAST:
                    group = self.groups.get(fields[0])
                    if group is None or group[0] is not sess:
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
            })
        return out

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

    def directory_view(self, booster: str | None = None, prefix: str = "") -> dict[str, Any]:
        if self.directory is None:
            return {}
        names = [booster] if booster else self.directory.boosters()
        return {name: dict(self.directory.items(name, prefix)) for name in names}


def wire_address_error(host: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False
