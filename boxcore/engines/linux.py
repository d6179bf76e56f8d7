"""The ``linux`` engine: transparent mode on a Linux router, fail-open (paper II-A, II-C).

boxd runs on the box (a router on the path; in the lab, inside the box's namespace) and maps
each booster rule onto netfilter in chains of its own (see :mod:`boxcore.iptables`):

==============  ==========================================================  =================
rule            kernel                                                      delivery
==============  ==========================================================  =================
REDIRECT        ``NFQUEUE --queue-num N --queue-bypass`` (FORWARD, INPUT)   ``nfqueue`` {queue}
REDIRECT (tcp)  ``TPROXY --on-port P`` in mangle PREROUTING + fwmark rule  ``tproxy`` {port}
COPY            ``NFLOG --nflog-group G`` (non-terminating)                 ``nflog`` {group}
DROP            ``DROP``                                                    (none)
FORWARD         ``RETURN`` (skips lower-priority booster rules)             (none)
MULTICAST       ``NFQUEUE`` read by boxd itself: one copy per group member  (none)
==============  ==========================================================  =================

Every change is one ``iptables-restore --noflush`` transaction.  Fail-open holds in every
failure: no listener on a queue (booster dead or not started) means packets pass
(``--queue-bypass``); a full queue passes packets (the receiver sets the queue's fail-open
flag); a booster that stops reading is caught by :meth:`LinuxEngine.health` (packets waiting
and no verdict for ``--linux-stall`` seconds) and boxd removes its rules; rules left by a
SIGKILLed boxd keep failing open and are removed by the next boxd's :meth:`start`.

The forwarding table becomes kernel routes tagged with protocol :data:`RT_PROTO_BOOSTER`;
injected packets (``booster.send``, multicast copies) leave through a raw socket carrying
:data:`MARK_INJECTED`, which the booster chains skip.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

from boxcore import iptables as nf
from boxcore.engines.base import (BoosterSession, Delivery, Engine, EngineRefused, EngineSetupError, Route,
                                  checked_group_members)
from boxcore.packet import Packet, PacketDecodeError, PacketError
from boxcore.rules import Action, Rule
from cliruntime.supervisor import Supervisor

log = logging.getLogger("boxcore.engines.linux")

VALID_HOOKS = ("forward", "input", "output")
MAX_MULTICAST_MEMBERS = 1024


def parse_range(text: str, what: str, lo: int, hi: int) -> range:
    """``"100-199"`` -> range(100, 200), validated against [lo, hi]."""
    first, sep, last = str(text).partition("-")
    try:
        start, end = int(first), int(last if sep else first)
    except ValueError:
        raise EngineSetupError(f"{what}: expected N or N-M, got {text!r}") from None
    if not lo <= start <= end <= hi:
        raise EngineSetupError(f"{what}: {text!r} must lie within {lo}-{hi} with N <= M")
    return range(start, end + 1)


class Pool:
    """Numbers handed out from a range; refuses (and counts) when exhausted."""

    def __init__(self, numbers: range, what: str) -> None:
        self.free = list(numbers)
        self.what = what
        self.refused = 0

    def take(self) -> int:
        if not self.free:
            self.refused += 1
            raise EngineRefused(f"no free {self.what} left ({self.refused} refused so far)")
        return self.free.pop(0)

    def give(self, number: int) -> None:
        if number not in self.free:
            self.free.append(number)
            self.free.sort()


@dataclass
class QueueWatch:
    """What the watchdog remembers of one queue between looks."""

    id_sequence: int = 0
    total: int = 0
    last_progress: float = 0.0


class LinuxEngine(Engine):
    name = "linux"

    def __init__(self, *, hooks: tuple[str, ...] = ("forward", "input"), queues: range = range(100, 200),
                 nflog_groups: range = range(100, 200), tproxy_ports: range = range(15001, 15101),
                 stall: float = 1.0, queue_len: int = 4096, multicast_queue: int = 99,
                 counter_interval: float = 1.0) -> None:
        self.hooks = hooks
        self.queues = Pool(queues, "NFQUEUE numbers")
        self.nflog_groups = Pool(nflog_groups, "NFLOG groups")
        self.tproxy_ports = Pool(tproxy_ports, "TPROXY ports")
        self.stall = stall
        self.queue_len = queue_len
        self.multicast_queue = multicast_queue
        self.counter_interval = counter_interval
        self.entries: dict[int, nf.Entry] = {}
        self.sessions: dict[int, BoosterSession] = {}      # cookie -> owner
        self.groups: dict[int, list[tuple[str, int]]] = {}
        self.routes: list[Route] = []
        self.stats: dict[str, int] = {
            "rules_installed": 0, "rules_removed": 0, "restore_failures": 0, "stale_cleanups": 0,
            "injected": 0, "inject_errors": 0, "multicast_in": 0, "multicast_out": 0,
            "multicast_no_group": 0, "multicast_errors": 0, "stalls": 0,
        }
        self._counters: dict[int, tuple[int, int]] = {}
        self._watch: dict[int, QueueWatch] = {}
        self._listen_watch: dict[int, float] = {}           # tproxy port -> last time nothing waited
        self._status_cache: tuple[float, dict[int, nf.QueueStatus]] = (0.0, {})
        self._lock = asyncio.Lock()
        self._injector: socket.socket | None = None
        self._multicast_reader = None
        # background loops (the counters; the np engine's card sync): a failure is logged, counted
        # in status()["tasks"] and the loop restarted
        self._tasks = Supervisor(f"{self.name} engine", logger=log)
        self._sources = SourceAddresses()
        self._started = False

    # -- construction ----------------------------------------------------------------
    @classmethod
    def add_options(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--linux-hooks", default="forward,input",
                           help="built-in chains whose traffic boosters may claim (forward,input,output); "
                                "output also catches the box's own traffic")
        group.add_argument("--linux-queues", default="100-199", help="NFQUEUE numbers boxd hands out")
        group.add_argument("--linux-nflog-groups", default="100-199", help="NFLOG groups boxd hands out")
        group.add_argument("--linux-tproxy-ports", default="15001-15100",
                           help="local ports boosters listen on for TPROXY'd connections")
        group.add_argument("--linux-stall", type=float, default=1.0,
                           help="watchdog bound (s): packets waiting in a booster's queue with no verdict "
                                "for this long make boxd remove its rules")
        group.add_argument("--linux-queue-len", type=int, default=4096,
                           help="packets a booster's queue holds before it fails open")
        group.add_argument("--linux-multicast-queue", type=int, default=99,
                           help="NFQUEUE boxd itself reads for MULTICAST rules")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LinuxEngine":
        hooks = tuple(h.strip() for h in str(getattr(args, "linux_hooks", "forward,input")).split(",") if h.strip())
        bad = [h for h in hooks if h not in VALID_HOOKS]
        if bad or not hooks:
            raise EngineSetupError(f"--linux-hooks: choose from {', '.join(VALID_HOOKS)}, got {','.join(hooks) or 'nothing'}")
        stall = float(getattr(args, "linux_stall", 1.0))
        if not 0.05 <= stall <= 60:
            raise EngineSetupError(f"--linux-stall must be within 0.05-60 s, got {stall}")
        queue_len = int(getattr(args, "linux_queue_len", 4096))
        if not 16 <= queue_len <= 1 << 20:
            raise EngineSetupError(f"--linux-queue-len must be within 16-1048576, got {queue_len}")
        queues = parse_range(getattr(args, "linux_queues", "100-199"), "--linux-queues", 0, 65535)
        mq = int(getattr(args, "linux_multicast_queue", 99))
        if mq in queues or not 0 <= mq <= 65535:
            raise EngineSetupError(f"--linux-multicast-queue {mq} must be a queue number outside --linux-queues")
        return cls(hooks=hooks, queues=queues,
                   nflog_groups=parse_range(getattr(args, "linux_nflog_groups", "100-199"),
                                            "--linux-nflog-groups", 1, 65535),
                   tproxy_ports=parse_range(getattr(args, "linux_tproxy_ports", "15001-15100"),
                                            "--linux-tproxy-ports", 1, 65535),
                   stall=stall, queue_len=queue_len, multicast_queue=mq)

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        problem = nf.missing_privilege()
        if problem:
            raise EngineSetupError(problem)
        try:
            saved = await nf.save()
        except (nf.NetfilterError, OSError) as exc:
            raise EngineSetupError(f"iptables does not work here: {exc}") from None
        cleanup = nf.render_cleanup(saved)
        if cleanup:
            await nf.restore(cleanup)
            self.stats["stale_cleanups"] += 1
            log.warning("removed booster chains left behind by an earlier boxd")
        await asyncio.to_thread(clean_kernel_routing)
        await nf.restore(nf.render_setup(self.hooks))
        await asyncio.to_thread(self._setup_tproxy_routing)
        self._injector = nf.raw_injector()
        self._started = True
        self._tasks.spawn_restarting(self._refresh_counters, name="counters")
        log.info("linux engine ready: hooks %s, queues %d-%d, watchdog %.2fs", ",".join(self.hooks),
                 self.queues.free[0] if self.queues.free else -1,
                 self.queues.free[-1] if self.queues.free else -1, self.stall)

    async def stop(self) -> None:
        await self._tasks.aclose()
        if self._multicast_reader is not None:
            self._multicast_reader.close()
            self._multicast_reader = None
        if self._started:
            with contextlib.suppress(nf.NetfilterError, OSError):
                cleanup = nf.render_cleanup(await nf.save())
                if cleanup:
                    await nf.restore(cleanup)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(clean_kernel_routing)
        if self._injector is not None:
            self._injector.close()
            self._injector = None
        self.entries.clear()
        self.sessions.clear()
        self._started = False

    # -- rules -----------------------------------------------------------------------
    async def install(self, rule: Rule, session: BoosterSession) -> Delivery:
        return await self._install(rule, session, tcp=False)

    async def install_tcp(self, rule: Rule, session: BoosterSession) -> Delivery:
        """Transparent TCP interception (``booster.intercept_tcp``): TPROXY to a local port."""
        return await self._install(rule, session, tcp=True)

    async def _install(self, rule: Rule, session: BoosterSession, *, tcp: bool) -> Delivery:
        async with self._lock:
            if rule.cookie in self.entries:
                await self._remove_locked(rule.cookie)
            release = None
            if tcp:
                if rule.match.proto not in (None, nf.PROTO_TCP):
                    raise EngineRefused("TCP interception needs a TCP match")
                port = self.tproxy_ports.take()
                target, delivery = nf.Target("tproxy", port), Delivery("tproxy", {"port": port})
                release = (self.tproxy_ports, port)
                self._listen_watch[port] = time.monotonic()
                session.engine_state.setdefault("tproxy_ports", set()).add(port)
            elif rule.action is Action.REDIRECT:
                queue = self.queues.take()
                target = nf.Target("nfqueue", queue)
                delivery = Delivery("nfqueue", {"queue": queue, "max_len": self.queue_len, "fail_open": True})
                release = (self.queues, queue)
                self._watch[queue] = QueueWatch(last_progress=time.monotonic())
                session.engine_state.setdefault("queues", set()).add(queue)
            elif rule.action is Action.COPY:
                group = self.nflog_groups.take()
                target, delivery = nf.Target("nflog", group), Delivery("nflog", {"group": group})
                release = (self.nflog_groups, group)
            elif rule.action is Action.DROP:
                target, delivery = nf.Target("drop"), Delivery("channel", {"data_path": "kernel"})
            elif rule.action is Action.FORWARD:
                target, delivery = nf.Target("return"), Delivery("channel", {"data_path": "kernel"})
            elif rule.action is Action.MULTICAST:
                try:
                    self._ensure_multicast_reader()
                except OSError as exc:
                    raise EngineRefused(f"cannot bind the multicast queue {self.multicast_queue}: {exc}") from None
                target = nf.Target("nfqueue", self.multicast_queue)
                delivery = Delivery("channel", {"data_path": "kernel"})
            else:  # pragma: no cover - Action is closed
                raise EngineRefused(f"unsupported action {rule.action}")
            entry = nf.Entry(rule, target, self.hooks)
            self.entries[rule.cookie] = entry
            try:
                await nf.restore(nf.render(self.entries.values(), new=[rule.cookie], hooks=self.hooks))
            except (nf.NetfilterError, OSError) as exc:
                self.stats["restore_failures"] += 1
                del self.entries[rule.cookie]
                if release:
                    release[0].give(release[1])
                self._forget_queue(target, session)
                raise EngineRefused(f"the kernel refused rule {rule.match.describe()}: {exc}") from None
            self.sessions[rule.cookie] = session
            self.stats["rules_installed"] += 1
            log.info("installed %s %s for %s -> %s %s", rule.action.name, rule.match.describe(), session.name,
                     delivery.kind, delivery.params)
            return delivery

    def _forget_queue(self, target: nf.Target, session: BoosterSession | None) -> None:
        if target.kind == "tproxy":
            self._listen_watch.pop(target.number, None)
            if session is not None:
                session.engine_state.get("tproxy_ports", set()).discard(target.number)
        if target.kind == "nfqueue" and target.number != self.multicast_queue:
            self._watch.pop(target.number, None)
            if session is not None:
                session.engine_state.get("queues", set()).discard(target.number)

    async def remove(self, rule: Rule) -> None:
        async with self._lock:
            await self._remove_locked(rule.cookie)

    async def _remove_locked(self, cookie: int) -> None:
        entry = self.entries.pop(cookie, None)
        if entry is None:
            return
        session = self.sessions.pop(cookie, None)
        try:
            await nf.restore(nf.render(self.entries.values(), gone=[cookie],
                                       gone_tables={cookie: entry.target.table}, hooks=self.hooks))
        except (nf.NetfilterError, OSError) as exc:
            self.stats["restore_failures"] += 1
            log.error("removing rule %x failed: %s", cookie, exc)
        kind, number = entry.target.kind, entry.target.number
        if kind == "nfqueue" and number != self.multicast_queue:
            self.queues.give(number)
        elif kind == "nflog":
            self.nflog_groups.give(number)
        elif kind == "tproxy":
            self.tproxy_ports.give(number)
        self._forget_queue(entry.target, session)
        self._counters.pop(cookie, None)
        self.stats["rules_removed"] += 1

    # -- counters and health -----------------------------------------------------------
    async def _refresh_counters(self) -> None:
        while True:
            try:
                if self.entries:
                    self._counters = nf.parse_counters(await nf.save(counters=True))
            except (nf.NetfilterError, OSError) as exc:
                log.debug("reading counters failed: %s", exc)
            await asyncio.sleep(self.counter_interval)

    def counters(self) -> dict[int, tuple[int, int]]:
        return {cookie: self._counters.get(cookie, (0, 0)) for cookie in self.entries}

    def _queue_status(self) -> dict[int, nf.QueueStatus]:
        now = time.monotonic()
        at, status = self._status_cache
        if now - at > 0.05:
            status = nf.read_queue_status()
            self._status_cache = (now, status)
        return status

    def health(self, session: BoosterSession) -> str | None:
        """The watchdog: a queue of ``session`` with packets waiting and no verdict given for
        longer than the stall bound makes the session unhealthy (boxd then removes its rules,
        and the packets flow past the box again)."""
        reason = self._tproxy_health(session)
        if reason:
            return reason
        queues = session.engine_state.get("queues")
        if not queues:
            return None
        status = self._queue_status()
        now = time.monotonic()
        for queue in list(queues):
            watch = self._watch.get(queue)
            if watch is None:
                continue
            current = status.get(queue)
            if current is None:              # no listener: --queue-bypass lets packets pass
                watch.last_progress = now
                continue
            enqueued = current.id_sequence - watch.id_sequence
            verdicts = enqueued - (current.total - watch.total)
            if current.total == 0 or verdicts > 0:
                watch.last_progress = now
            watch.id_sequence, watch.total = current.id_sequence, current.total
            stalled = now - watch.last_progress
            if stalled > self.stall:
                self.stats["stalls"] += 1
                return (f"queue {queue} stalled: {current.total} packets waiting, no verdict for "
                        f"{stalled:.2f}s (bound {self.stall}s)")
        return None

    def _tproxy_health(self, session: BoosterSession) -> str | None:
        """The same bound for interception: connections waiting in a booster's accept queue
        without being accepted for longer than the stall bound."""
        ports = session.engine_state.get("tproxy_ports")
        if not ports:
            return None
        backlogs = nf.read_tcp_listeners()
        now = time.monotonic()
        for port in list(ports):
            if port not in self._listen_watch:
                continue
            if backlogs.get(port, 0) == 0:
                self._listen_watch[port] = now
            elif now - self._listen_watch[port] > self.stall:
                self.stats["stalls"] += 1
                return (f"tproxy port {port} stalled: {backlogs[port]} connections waiting to be accepted "
                        f"for {now - self._listen_watch[port]:.2f}s (bound {self.stall}s)")
        return None

    # -- forwarding table --------------------------------------------------------------
    async def set_forwarding(self, routes: list[Route]) -> None:
        check_routes(routes)
        async with self._lock:
            await asyncio.to_thread(apply_kernel_routes, list(routes))
            self.routes = list(routes)

    def _setup_tproxy_routing(self) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.rule("add", table=nf.TPROXY_TABLE, priority=nf.TPROXY_RULE_PRIORITY,
                     fwmark=nf.MARK_TPROXY, fwmask=nf.MARK_TPROXY)
            ipr.route("replace", dst="0.0.0.0/0", type="local", scope="host", oif=lo, table=nf.TPROXY_TABLE,
                      proto=nf.RT_PROTO_BOOSTER)

    # -- packets from boosters -----------------------------------------------------------
    def inject(self, pkt: Packet, session: BoosterSession) -> None:
        try:
            raw = pkt.to_ip()
        except PacketError as exc:
            self.stats["inject_errors"] += 1
            log.debug("cannot inject %s: %s", pkt, exc)
            return
        self._send_raw(raw, pkt.dst, "injected", "inject_errors")

    def _send_raw(self, raw: bytes, dst: str, ok: str, failed: str) -> bool:
        if self._injector is None:
            self.stats[failed] += 1
            return False
        try:
            self._injector.sendto(raw, (dst, 0))
        except OSError as exc:
            self.stats[failed] += 1
            log.debug("raw send to %s failed: %s", dst, exc)
            return False
        self.stats[ok] += 1
        return True

    async def set_multicast_group(self, group: int, members: list[tuple[str, int]]) -> None:
        members = checked_group_members(group, members, MAX_MULTICAST_MEMBERS)
        if members:
            self.groups[group] = members
        else:
            self.groups.pop(group, None)

    def _source_for(self, dst: str) -> str:
        return self._sources.toward(dst)

    def send_multicast(self, group: int, payload: bytes, src_port: int, session: BoosterSession) -> None:
        members = self.groups.get(group)
        if not members:
            self.stats["multicast_no_group"] += 1
            return
        for host, port in members:
            try:
                raw = Packet(nf.PROTO_UDP, self._source_for(host), src_port, host, port, payload).to_ip()
            except (PacketError, OSError) as exc:
                self.stats["multicast_errors"] += 1
                log.debug("multicast to %s:%d failed: %s", host, port, exc)
                continue
            self._send_raw(raw, host, "multicast_out", "multicast_errors")

    # MULTICAST rules: boxd reads their queue and sends one copy per member, keeping the
    # original source so members answer the sender.
    def _ensure_multicast_reader(self) -> None:
        if self._multicast_reader is None:
            from boxcore.receivers.linux import QueueReader

            self._multicast_reader = QueueReader(self.multicast_queue, self._on_multicast_batch,
                                                 max_len=self.queue_len)

    def _on_multicast_batch(self, items: list) -> None:
        from boxcore.receivers.linux import NF_DROP

        decided = []
        for nfq_pkt, raw in items:
            decided.append((nfq_pkt, NF_DROP, None))
            self.stats["multicast_in"] += 1
            try:
                pkt = Packet.parse_ip(raw, verify_checksum=False)
            except PacketDecodeError:
                self.stats["multicast_errors"] += 1
                continue
            group = self._group_of(pkt)
            for host, port in self.groups.get(group, ()) if group is not None else ():
                copy = Packet(pkt.proto, pkt.src, pkt.sport, host, port, pkt.payload, max(pkt.ttl - 1, 1))
                try:
                    self._send_raw(copy.to_ip(), host, "multicast_out", "multicast_errors")
                except PacketError:
                    self.stats["multicast_errors"] += 1
        self._multicast_reader.verdicts(decided)

    def _group_of(self, pkt: Packet) -> int | None:
        for entry in nf.order(self.entries.values()):
            rule = entry.rule
            if rule.action is Action.MULTICAST and rule.match.matches(pkt):
                return rule.group
        self.stats["multicast_no_group"] += 1
        return None

    # -- management --------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        queues = self._queue_status()
        return {
            "hooks": list(self.hooks),
            "rules": len(self.entries),
            "queues": {str(q): {"waiting": s.total, "dropped": s.dropped, "user_dropped": s.user_dropped,
                                "queued_total": s.id_sequence} for q, s in queues.items()},
            "multicast_groups": {str(g): len(m) for g, m in self.groups.items()},
            "stall_bound_s": self.stall,
            "tasks": self._tasks.snapshot(),
            **self.stats,
        }


def _route_key(route: Any) -> dict[str, Any]:
    dst = route.get("dst") or "0.0.0.0"
    key: dict[str, Any] = {"dst": f"{dst}/{route['dst_len']}", "table": route.get("table"),
                           "type": route.get("type", 1), "proto": route.get("proto"),
                           "scope": route.get("scope", 0)}
    if route.get("priority") is not None:
        key["priority"] = route.get("priority")
    oif = route.get("oif")
    if oif is not None:
        key["oif"] = oif
    return key


class SourceAddresses:
    """The box's own address toward a destination (a routing lookup through a connected UDP
    socket), cached and bounded: the source of packets the box sends for boosters."""

    MAX = 4096

    def __init__(self) -> None:
        self._cache: dict[str, str] = {}

    def toward(self, dst: str) -> str:
        src = self._cache.get(dst)
        if src is None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((dst, 9))
                src = probe.getsockname()[0]
            if len(self._cache) >= self.MAX:
                self._cache.clear()
            self._cache[dst] = src
        return src


def check_routes(routes: list[Route]) -> None:
    """Refuse a forwarding table with a malformed prefix or gateway before anything is changed."""
    for route in routes:
        try:
            ipaddress.ip_network(route.prefix, strict=False)
            if route.via is not None:
                ipaddress.ip_address(route.via)
        except ValueError as exc:
            raise EngineRefused(f"bad route {route.prefix} via {route.via}: {exc}") from None


def apply_kernel_routes(routes: list[Route]) -> None:
    """The forwarding table as kernel routes tagged as ours (replacing our earlier ones)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        wanted = {}
        for route in routes:
            net = ipaddress.ip_network(route.prefix, strict=False)
            spec: dict[str, Any] = {"dst": str(net), "proto": nf.RT_PROTO_BOOSTER, "priority": route.metric}
            if route.via:
                spec["gateway"] = route.via
            if route.dev:
                found = ipr.link_lookup(ifname=route.dev)
                if not found:
                    raise EngineRefused(f"route {route.prefix}: no interface {route.dev!r} on the box")
                spec["oif"] = found[0]
            wanted[(str(net), route.metric)] = spec
        for old in ipr.get_routes(family=socket.AF_INET, proto=nf.RT_PROTO_BOOSTER):
            dst = old.get("dst") or "0.0.0.0"
            key = (f"{dst}/{old['dst_len']}", old.get("priority") or 0)
            if key not in wanted and old.get("table") != nf.TPROXY_TABLE:
                with contextlib.suppress(Exception):
                    ipr.route("del", dst=key[0], proto=nf.RT_PROTO_BOOSTER, priority=key[1] or None)
        for spec in wanted.values():
            try:
                ipr.route("replace", **{k: v for k, v in spec.items() if v is not None})
            except Exception as exc:
                raise EngineRefused(f"the kernel refused route {spec['dst']}: {exc}") from None


def clean_kernel_routing() -> None:
    """Remove our fwmark rule, the TPROXY table and routes tagged as ours."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for rule in ipr.get_rules(family=socket.AF_INET):
            if rule.get("priority") == nf.TPROXY_RULE_PRIORITY or rule.get_attr("FRA_PRIORITY") == nf.TPROXY_RULE_PRIORITY:
                with contextlib.suppress(Exception):
                    ipr.rule("del", priority=nf.TPROXY_RULE_PRIORITY, table=nf.TPROXY_TABLE)
        for table in (nf.TPROXY_TABLE, None):
            query: dict[str, Any] = {"family": socket.AF_INET, "proto": nf.RT_PROTO_BOOSTER}
            if table is not None:
                query["table"] = table
            for route in ipr.get_routes(**query):
                with contextlib.suppress(Exception):
                    ipr.route("del", **_route_key(route))
