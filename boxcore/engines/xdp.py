"""The ``xdp`` engine: the classifier and the simple actions in the kernel's fast path.

boxd loads ``boxcore/engines/bpf/boxd.bpf.o`` (built by tools/bootstrap.sh) through libbpf,
attaches its XDP program to every box interface and its tc program to their clsact ingress,
and keeps the BPF maps equal to the installed rules (:mod:`boxcore.engines.xdp_maps`).  Only
packets a booster really needs reach user space:

==============  =================================================================  ==================
rule            kernel                                                             delivery
==============  =================================================================  ==================
FORWARD / none  XDP_PASS (the kernel forwards)                                     (none)
DROP            XDP_DROP                                                           (none)
REDIRECT (UDP)  tc ``bpf_sk_assign`` to a UDP socket boxd made for the rule,       ``socket`` {dst, dport}
                + a mark policy-routed to local delivery; the booster reads it
intercept_tcp   tc ``bpf_sk_assign`` to the connection's socket or the booster's   ``tproxy`` {port}
                transparent listener (as TPROXY does)
COPY            XDP writes the packet to a BPF ring buffer; boxd sends it on the   ``channel``
                booster's data channel (the original never waits)
MULTICAST       tc clones the packet once per member, destination rewritten        (none)
==============  =================================================================  ==================

``send_multicast`` from a booster: boxd writes one frame into a veth pair of its own; the tc
program on the far end fans it out like a MULTICAST rule (the group rides in the frame's
destination MAC).

Fail-open: boxd renews a lease in the config map; if it dies, the XDP program passes
everything no live socket claims.  A booster's socket that stops draining (SIGSTOP) is found
by :meth:`XdpEngine.health` within ``--xdp-stall`` seconds and its rules leave the maps.  The
next boxd finds programs left on the interfaces by name (and pins under its bpffs directory)
and removes them; ``stop`` leaves no program, map, pin, qdisc or veth.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import socket
import struct
import subprocess
import time
from typing import Any

from boxcore import iptables as nf
from boxcore import wire
from boxcore.engines import libbpf as bpf
from boxcore.engines import xdp_maps as maps
from boxcore.engines.base import (BoosterSession, Delivery, Engine, EngineRefused, EngineSetupError, Route,
                                  checked_group_members)
from boxcore.engines.linux import (SourceAddresses, apply_kernel_routes, check_routes, clean_kernel_routing,
                                   parse_range)
from boxcore.packet import PROTO_TCP, PROTO_UDP, Packet, PacketDecodeError, PacketError
from boxcore.receivers.linux import want_original_destination
from boxcore.rules import Action, Rule
from cliruntime.supervisor import Supervisor

log = logging.getLogger("boxcore.engines.xdp")

XDP_PROG_NAME, TC_PROG_NAME = "boxd_xdp", "boxd_tc"
TC_HANDLE, TC_PRIORITY = 0xB0D, 1
MARK_ASSIGNED = 0x40000000            # skb mark of packets handed to a booster socket
ASSIGN_TABLE = 178                    # policy-routing table: everything local
ASSIGN_RULE_PRIORITY = 178
MCAST_VETH = ("bbxdpmc0", "bbxdpmc1")  # boxd writes send_multicast frames into [0]; tc on [1]
SO_MEMINFO = 55
SK_MEMINFO = struct.Struct("=9I")     # rmem_alloc, rcvbuf, wmem_alloc, sndbuf, fwd_alloc, wmem_queued, optmem, backlog, drops
SO_RCVBUFFORCE = 33
IP_TRANSPARENT = 19
REDIRECT_RCVBUF = 8 << 20
MAX_GROUP_MEMBERS = maps.MAX_MEMBERS


@dataclasses.dataclass
class SocketWatch:
    """What the watchdog remembers of a REDIRECT socket between looks."""

    rmem: int = 0
    head: int = 0                # hash of the first unread datagram (peeked)
    last_progress: float = 0.0


@dataclasses.dataclass
class Installed:
    rule: Rule
    session: BoosterSession
    delivery: Delivery
    sock: socket.socket | None = None      # boxd's copy of a REDIRECT socket
    port: int | None = None                # interception listener port


CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39


def _missing_capabilities() -> str:
    """The capabilities this process lacks for loading and attaching BPF, or ''."""
    try:
        with open("/proc/self/status") as f:
            effective = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return "" if os.geteuid() == 0 else "CAP_BPF, CAP_NET_ADMIN"
    missing = []
    if not effective >> CAP_BPF & 1 and not effective >> CAP_SYS_ADMIN & 1:
        missing.append("CAP_BPF")
    if not effective >> CAP_NET_ADMIN & 1:
        missing.append("CAP_NET_ADMIN")
    return ", ".join(missing)


def _bpffs_mounted(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path and line.split()[2] == "bpf" for line in f if len(line.split()) > 2)


class XdpEngine(Engine):
    name = "xdp"

    def __init__(self, *, interfaces: tuple[str, ...] = (), mode: str = "auto", stall: float = 1.0,
                 lease: float = 2.0, bpffs: str = "/sys/fs/bpf", tproxy_ports: range = range(15201, 15301),
                 counter_interval: float = 1.0) -> None:
        self.interfaces_wanted = interfaces
        self.mode = mode
        self.stall = stall
        self.lease = lease
        self.bpffs = bpffs
        self.tproxy_ports = list(tproxy_ports)
        self.counter_interval = counter_interval
        self.dp: maps.Datapath | None = None
        self.pin_dir = ""
        self.attached: dict[str, tuple[int, int]] = {}     # ifname -> (ifindex, xdp flags)
        self.tc_created: set[int] = set()                  # ifindexes whose clsact we made
        self.installed: dict[int, Installed] = {}
        self.groups: dict[int, list[tuple[str, int]]] = {}
        self.routes: list[Route] = []
        self.watch: dict[int, SocketWatch] = {}
        self._listen_watch: dict[int, float] = {}
        self._counters: dict[int, tuple[int, int]] = {}
        self._ring: bpf.RingBuffer | None = None
        # the lease renewal and counter refresh: a failure is logged, counted and restarted (a
        # lease left to expire would fail open: everything passes)
        self._tasks = Supervisor("xdp engine", logger=log)
        self._injector: socket.socket | None = None
        self._mcast: socket.socket | None = None
        self._mcast_src_mac = b""
        self._sources = SourceAddresses()
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats: dict[str, int] = {
            "rules_installed": 0, "rules_removed": 0, "stale_cleanups": 0, "copies_delivered": 0,
            "copies_dropped": 0, "copies_malformed": 0, "injected": 0, "inject_errors": 0,
            "multicast_sent": 0, "multicast_no_group": 0, "multicast_errors": 0, "stalls": 0,
            "lease_renewals": 0,
        }

    # -- construction ----------------------------------------------------------------
    @classmethod
    def add_options(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--xdp-interfaces", default="",
                           help="interfaces to attach to, comma-separated (default: every interface that is up, "
                                "except lo)")
        group.add_argument("--xdp-mode", choices=["auto", "native", "generic"], default="auto",
                           help="XDP attach mode: native (driver), generic (skb), auto = native, else generic")
        group.add_argument("--xdp-stall", type=float, default=1.0,
                           help="watchdog bound (s): a booster socket holding packets it does not read for this "
                                "long gets its rules removed")
        group.add_argument("--xdp-lease", type=float, default=2.0,
                           help="seconds the kernel keeps applying rules after boxd stops renewing them "
                                "(a killed boxd: then everything passes that no live socket claims)")
        group.add_argument("--xdp-bpffs", default="/sys/fs/bpf",
                           help="bpffs mount for boxd's pins (mounted by boxd when nothing is)")
        group.add_argument("--xdp-tproxy-ports", default="15201-15300",
                           help="local ports boosters listen on for intercepted TCP connections")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "XdpEngine":

        names = tuple(n.strip() for n in str(getattr(args, "xdp_interfaces", "") or "").split(",") if n.strip())
        stall = float(getattr(args, "xdp_stall", 1.0))
        if not 0.05 <= stall <= 60:
            raise EngineSetupError(f"--xdp-stall must be within 0.05-60 s, got {stall}")
        lease = float(getattr(args, "xdp_lease", 2.0))
        if not 0.2 <= lease <= 3600:
            raise EngineSetupError(f"--xdp-lease must be within 0.2-3600 s, got {lease}")
        return cls(interfaces=names, mode=getattr(args, "xdp_mode", "auto"), stall=stall, lease=lease,
                   bpffs=str(getattr(args, "xdp_bpffs", "/sys/fs/bpf")),
                   tproxy_ports=parse_range(getattr(args, "xdp_tproxy_ports", "15201-15300"),
                                            "--xdp-tproxy-ports", 1, 65535))

    # -- lifecycle -------------------------------------------------------------------
    @staticmethod
    def problem() -> str | None:
        """Why the xdp engine cannot run here, or None."""
        missing = _missing_capabilities()
        if missing:
            return (f"the xdp engine needs root ({missing} missing): run boxd as root or choose another "
                    f"engine")
        missing = bpf.available()
        if missing:
            return f"the xdp engine needs libbpf: {missing}"
        return maps.object_problem()

    async def start(self) -> None:
        problem = self.problem()
        if problem:
            raise EngineSetupError(problem)
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._mount_bpffs)
        self.pin_dir = os.path.join(self.bpffs, f"boxd-{os.stat('/proc/self/ns/net').st_ino}")
        await asyncio.to_thread(self._clean_stale)
        try:
            self.dp = maps.Datapath()
        except bpf.BpfError as exc:
            raise EngineSetupError(f"the kernel refused the xdp engine's BPF programs: {exc}") from None
        self._renew_lease()
        try:
            await asyncio.to_thread(self._setup)
        except (bpf.BpfError, OSError) as exc:
            await self.stop()
            raise EngineSetupError(f"the xdp engine could not attach: {exc}") from None
        self._ring = bpf.RingBuffer(self.dp.fds["copies"], self._on_copy)
        self._loop.add_reader(self._ring.fileno(), self._drain_copies)
        self._injector = nf.raw_injector()
        self._tasks.spawn_restarting(self._renew_forever, name="lease")
        self._tasks.spawn_restarting(self._refresh_counters, name="counters")
        log.info("xdp engine ready on %s (%s), lease %.1fs, watchdog %.2fs",
                 ",".join(f"{n}:{'native' if f & bpf.XDP_FLAGS_DRV_MODE else 'generic'}"
                          for n, (_, f) in self.attached.items()), self.pin_dir, self.lease, self.stall)

    def _mount_bpffs(self) -> None:
        if _bpffs_mounted(self.bpffs):
            return
        os.makedirs(self.bpffs, exist_ok=True)
        result = subprocess.run(["mount", "-t", "bpf", "bpf", self.bpffs], capture_output=True, text=True)
        if result.returncode != 0:
            raise EngineSetupError(f"cannot mount bpffs at {self.bpffs}: {result.stderr.strip()}")
        self._mounted_bpffs = True        # ours: unmounted again at stop when nothing else is pinned

    def _interfaces(self) -> list[tuple[str, int]]:
        found = {name: index for index, name in socket.if_nameindex()}
        if self.interfaces_wanted:
            missing = [n for n in self.interfaces_wanted if n not in found]
            if missing:
                raise EngineSetupError(f"--xdp-interfaces: no interface {', '.join(missing)} here")
            return [(n, found[n]) for n in self.interfaces_wanted]
        out = []
        for name, index in found.items():
            if name == "lo" or name in MCAST_VETH:
                continue
            try:
                with open(f"/sys/class/net/{name}/operstate") as f:
                    if f.read().strip() == "down":
                        continue
            except OSError:
                pass
            out.append((name, index))
        return out

    def _clean_stale(self) -> None:
        """Remove what an earlier boxd left: pins, programs on interfaces (by name), our clsact,
        the multicast veth, the policy-routing rule."""
        cleaned = maps.unpin(self.pin_dir)
        for index, name in socket.if_nameindex():
            with contextlib.suppress(bpf.BpfError):
                prog = bpf.xdp_query_id(index)
                if prog and bpf.prog_name_by_id(prog) == XDP_PROG_NAME:
                    bpf.xdp_detach(index)
                    cleaned += 1
            hook = bpf.tc_hook(index)
            prog = hook.query(TC_HANDLE, TC_PRIORITY)
            if prog and bpf.prog_name_by_id(prog) == TC_PROG_NAME:
                hook.detach(TC_HANDLE, TC_PRIORITY)
                hook.destroy()
                cleaned += 1
        if MCAST_VETH[0] in {n for _, n in socket.if_nameindex()}:
            subprocess.run(["ip", "link", "del", MCAST_VETH[0]], capture_output=True)
            cleaned += 1
        cleaned += self._clean_routing()
        clean_kernel_routing()     # forwarding routes of an earlier boxd (protocol-tagged)
        if cleaned:
            self.stats["stale_cleanups"] += 1
            log.warning("removed %d objects left behind by an earlier boxd", cleaned)

    def _setup(self) -> None:
        dp = self.dp
        assert dp is not None
        for name, index in self._interfaces():
            flags = self._attach_xdp(name, index)
            self.attached[name] = (index, flags)
            self._attach_tc(index)
        # send_multicast: a veth pair of our own, fanned out by the tc program on its far end
        subprocess.run(["ip", "link", "add", MCAST_VETH[0], "type", "veth", "peer", "name", MCAST_VETH[1]],
                       check=True, capture_output=True)
        for name in MCAST_VETH:
            subprocess.run(["ip", "link", "set", name, "up"], check=True, capture_output=True)
        far = socket.if_nametoindex(MCAST_VETH[1])
        self._attach_tc(far)
        self._mcast_ifindex = far
        self._mcast = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self._mcast.bind((MCAST_VETH[0], 0))
        self._mcast.setblocking(False)
        self._mcast_src_mac = self._mcast.getsockname()[4]
        self._renew_lease()
        self._setup_routing()
        dp.pin(self.pin_dir)

    def _attach_xdp(self, name: str, index: int) -> int:
        modes = {"native": [bpf.XDP_FLAGS_DRV_MODE], "generic": [bpf.XDP_FLAGS_SKB_MODE],
                 "auto": [bpf.XDP_FLAGS_DRV_MODE, bpf.XDP_FLAGS_SKB_MODE]}[self.mode]
        error: Exception | None = None
        for flags in modes:
            try:
                # never replace another program's XDP attachment (ours were removed by _clean_stale)
                bpf.xdp_attach(index, self.dp.xdp_fd, flags | bpf.XDP_FLAGS_UPDATE_IF_NOEXIST)
                return flags
            except bpf.BpfError as exc:
                error = exc
                if exc.errno == 16:          # EBUSY: something else is attached there
                    raise bpf.BpfError(exc.errno, f"{name} already carries another XDP program") from None
        raise bpf.BpfError(getattr(error, "errno", 0) or 22, f"{name}: {error}")

    def _attach_tc(self, index: int) -> None:
        hook = bpf.tc_hook(index)
        if hook.create():
            self.tc_created.add(index)
        hook.attach(self.dp.tc_fd, TC_HANDLE, TC_PRIORITY)

    def _setup_routing(self) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.rule("add", table=ASSIGN_TABLE, priority=ASSIGN_RULE_PRIORITY, fwmark=MARK_ASSIGNED,
                     fwmask=MARK_ASSIGNED)
            ipr.route("replace", dst="0.0.0.0/0", type="local", scope="host", oif=lo, table=ASSIGN_TABLE,
                      proto=nf.RT_PROTO_BOOSTER)

    def _clean_routing(self) -> int:
        from pyroute2 import IPRoute

        removed = 0
        with IPRoute() as ipr:
            for rule in ipr.get_rules(family=socket.AF_INET):
                if rule.get_attr("FRA_PRIORITY") == ASSIGN_RULE_PRIORITY:
                    with contextlib.suppress(Exception):
                        ipr.rule("del", priority=ASSIGN_RULE_PRIORITY, table=ASSIGN_TABLE)
                        removed += 1
            for route in ipr.get_routes(family=socket.AF_INET, table=ASSIGN_TABLE):
                with contextlib.suppress(Exception):
                    ipr.route("del", dst="0.0.0.0/0", type="local", table=ASSIGN_TABLE,
                              oif=route.get_attr("RTA_OIF"))
                    removed += 1
        return removed

    async def stop(self) -> None:
        await self._tasks.aclose()
        if self._ring is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._ring.fileno())
            self._ring.close()
            self._ring = None
        for entry in self.installed.values():
            if entry.sock is not None:
                entry.sock.close()
        self.installed.clear()
        await asyncio.to_thread(self._teardown)
        for sock in (self._injector, self._mcast):
            if sock is not None:
                sock.close()
        self._injector = self._mcast = None
        if self.dp is not None:
            self.dp.close()
            self.dp = None

    def _teardown(self) -> None:
        for name, (index, flags) in self.attached.items():
            with contextlib.suppress(bpf.BpfError):
                bpf.xdp_detach(index, flags)
        for index in {i for i, _ in self.attached.values()} | set(self.tc_created):
            hook = bpf.tc_hook(index)
            hook.detach(TC_HANDLE, TC_PRIORITY)
            if index in self.tc_created:
                with contextlib.suppress(bpf.BpfError):
                    hook.destroy()
        self.attached.clear()
        self.tc_created.clear()
        subprocess.run(["ip", "link", "del", MCAST_VETH[0]], capture_output=True)
        with contextlib.suppress(Exception):
            self._clean_routing()
        with contextlib.suppress(Exception):
            if self.routes:
                clean_kernel_routing()
        if self.pin_dir:
            maps.unpin(self.pin_dir)
        if getattr(self, "_mounted_bpffs", False):
            leftovers = [n for n in os.listdir(self.bpffs) if not n.endswith(".debug")]
            if not leftovers:
                subprocess.run(["umount", self.bpffs], capture_output=True)
            self._mounted_bpffs = False

    # -- the lease ---------------------------------------------------------------------
    def _renew_lease(self) -> None:
        if self.dp is not None:
            # replies to spoofing onward connections are looked up only while TCP is intercepted
            intercepting = any(entry.port is not None for entry in self.installed.values())
            self.dp.set_config(time.monotonic_ns() + int(self.lease * 1e9), MARK_ASSIGNED,
                               getattr(self, "_mcast_ifindex", 0), steer_replies=intercepting)
            self.stats["lease_renewals"] += 1

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 4)
            self._renew_lease()

    # -- rules -------------------------------------------------------------------------
    async def install(self, rule: Rule, session: BoosterSession) -> Delivery:
        return await self._install(rule, session, tcp=False)

    async def install_tcp(self, rule: Rule, session: BoosterSession) -> Delivery:
        """Transparent TCP interception (``booster.intercept_tcp``): sk_assign to the booster's
        transparent listener, as TPROXY does."""
        return await self._install(rule, session, tcp=True)

    async def _install(self, rule: Rule, session: BoosterSession, *, tcp: bool) -> Delivery:
        async with self._lock:
            if rule.cookie in self.installed:
                await self._remove_locked(rule.cookie)
            dp = self.dp
            sock = None
            port = None
            kernel_rule, action, extra = rule, None, 0
            if tcp:
                if rule.match.proto not in (None, PROTO_TCP):
                    raise EngineRefused("TCP interception needs a TCP match")
                if not self.tproxy_ports:
                    raise EngineRefused("no free interception ports left")
                port = self.tproxy_ports.pop(0)
                kernel_rule = dataclasses.replace(rule, match=dataclasses.replace(rule.match, proto=PROTO_TCP))
                action, extra = maps.A_INTERCEPT, port
                delivery = Delivery("tproxy", {"port": port})
                self._listen_watch[port] = time.monotonic()
            elif rule.action is Action.REDIRECT:
                if rule.match.proto not in (None, PROTO_UDP):
                    raise EngineRefused("the xdp engine redirects UDP to boosters; intercept TCP with intercept_tcp")
                sock = self._redirect_socket(rule)
                dst, dport = self._delivered_destination(rule)
                # orig_dst: bpf_sk_assign keeps the packet's destination, and the socket reports
                # it with each datagram read by recvmsg (IP_RECVORIGDSTADDR, set here)
                delivery = Delivery("socket", {"dst": dst, "dport": dport, "data_path": "kernel", "orig_dst": True},
                                    fds=[sock.fileno()])
            elif rule.action is Action.COPY:
                delivery = Delivery("channel", {})
            elif rule.action is Action.MULTICAST:
                extra = rule.group or 0
                delivery = Delivery("channel", {"data_path": "kernel"})
            else:
                delivery = Delivery("channel", {"data_path": "kernel"})
            try:
                dp.add(kernel_rule, action, extra)
                if sock is not None:
                    dp.set_socket(rule.cookie, sock.fileno())
            except (maps.DatapathRefused, bpf.BpfError) as exc:
                if dp.slot_of(rule.cookie) is not None:
                    dp.remove(rule.cookie)
                if sock is not None:
                    sock.close()
                if port is not None:
                    self.tproxy_ports.insert(0, port)
                    self._listen_watch.pop(port, None)
                raise EngineRefused(f"the kernel data path refused {rule.match.describe()}: {exc}") from None
            self.installed[rule.cookie] = Installed(rule, session, delivery, sock, port)
            if port is not None:
                self._renew_lease()      # steer replies to spoofing onward connections from now on
            if sock is not None:
                self.watch[rule.cookie] = SocketWatch(last_progress=time.monotonic())
            self.stats["rules_installed"] += 1
            log.info("installed %s %s for %s -> %s", rule.action.name, rule.match.describe(), session.name,
                     delivery.kind)
            return delivery

    @staticmethod
    def _redirect_socket(rule: Rule) -> socket.socket:
        """The UDP socket a REDIRECT rule's packets are assigned to.

        It must be bound (bpf_sk_assign needs a hashed socket).  It is bound where the booster
        can also answer from it, as on the user engine's delegated socket: to the rule's host and
        port when it names them (IP_TRANSPARENT: that address need not be the box's), to the
        rule's port on every address when it names only a port, else (or when that is taken) to
        a loopback port of its own that never receives anything else.
        """
        m = rule.match
        places = []
        if isinstance(m.dst_port, int) and m.dst_port:
            host = XdpEngine._delivered_destination(rule)[0]
            places.append((host, m.dst_port))
        places.append(("127.0.0.1", 0))
        last_error: OSError | None = None
        for place in places:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, REDIRECT_RCVBUF)
                if place[1]:
                    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                want_original_destination(sock)
                sock.bind(place)
                return sock
            except OSError as exc:
                sock.close()
                last_error = exc
        raise EngineRefused(f"cannot make the rule's socket: {last_error}")

    @staticmethod
    def _delivered_destination(rule: Rule) -> tuple[str, int]:
        """What the booster sees as a redirected packet's destination: the rule's host and port
        when it names exactly one (the socket API gives the source only)."""
        m = rule.match
        dst = "0.0.0.0"
        if m.dst is not None:
            net = ipaddress.ip_network(m.dst)
            if net.num_addresses == 1:
                dst = str(net.network_address)
        return dst, m.dst_port if isinstance(m.dst_port, int) else 0

    async def remove(self, rule: Rule) -> None:
        async with self._lock:
            await self._remove_locked(rule.cookie)

    async def _remove_locked(self, cookie: int) -> None:
        entry = self.installed.pop(cookie, None)
        if entry is None:
            return
        if self.dp is not None:
            with contextlib.suppress(bpf.BpfError):
                self.dp.remove(cookie)
        if entry.sock is not None:
            entry.sock.close()
        if entry.port is not None:
            self._listen_watch.pop(entry.port, None)
            self.tproxy_ports.insert(0, entry.port)
            self._renew_lease()          # the last interception gone: no more reply look-ups
        self.watch.pop(cookie, None)
        self._counters.pop(cookie, None)
        self.stats["rules_removed"] += 1

    # -- counters and health -----------------------------------------------------------
    async def _refresh_counters(self) -> None:
        while True:
            if self.dp is not None and self.installed:
                with contextlib.suppress(bpf.BpfError):
                    self._counters = self.dp.counters()
            await asyncio.sleep(self.counter_interval)

    def counters(self) -> dict[int, tuple[int, int]]:
        """Kernel counts (per-CPU maps, summed).  A REDIRECT rule delivered on a socket is counted
        by its booster (the socket receiver reports what it read with the heartbeats), so its
        kernel count is shown in :meth:`status` only: adding both would count twice."""
        if self.dp is not None:
            with contextlib.suppress(bpf.BpfError):
                self._counters = self.dp.counters()
        return {cookie: self._counters.get(cookie, (0, 0)) for cookie, entry in self.installed.items()
                if entry.delivery.kind != "socket"}

    def health(self, session: BoosterSession) -> str | None:
        """The watchdog: a REDIRECT socket of ``session`` holding unread packets, unchanged, for
        longer than the stall bound (or an interception listener with connections waiting to be
        accepted that long) makes the session unhealthy; boxd then removes its rules."""
        now = time.monotonic()
        for cookie, entry in list(self.installed.items()):
            if entry.session is not session:
                continue
            if entry.sock is not None:
                watch = self.watch.get(cookie)
                if watch is None:
                    continue
                try:
                    rmem = SK_MEMINFO.unpack(entry.sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, SK_MEMINFO.size))[0]
                    head = hash(entry.sock.recvfrom(2048, socket.MSG_PEEK | socket.MSG_DONTWAIT)) if rmem else 0
                except BlockingIOError:
                    rmem, head = 0, 0
                except OSError:
                    continue
                # the booster read something: the queue emptied, shrank, or has a new first datagram
                if rmem == 0 or rmem < watch.rmem or head != watch.head:
                    watch.last_progress = now
                watch.rmem, watch.head = rmem, head
                if now - watch.last_progress > self.stall:
                    self.stats["stalls"] += 1
                    return (f"socket of rule {cookie} stalled: {rmem} bytes unread for "
                            f"{now - watch.last_progress:.2f}s (bound {self.stall}s)")
            elif entry.port is not None and entry.port in self._listen_watch:
                backlog = nf.read_tcp_listeners().get(entry.port, 0)
                if backlog == 0:
                    self._listen_watch[entry.port] = now
                elif now - self._listen_watch[entry.port] > self.stall:
                    self.stats["stalls"] += 1
                    return (f"interception port {entry.port} stalled: {backlog} connections waiting to be "
                            f"accepted for {now - self._listen_watch[entry.port]:.2f}s (bound {self.stall}s)")
        return None

    # -- copies (ring buffer -> data channel) -------------------------------------------
    def _drain_copies(self) -> None:
        if self._ring is None:
            return
        try:
            self._ring.consume()
        except bpf.BpfError as exc:
            log.debug("ring buffer: %s", exc)

    def _on_copy(self, record: bytes) -> None:
        cookie, raw, _wire_len = maps.decode_copy(record)
        entry = self.installed.get(cookie)
        if entry is None:
            self.stats["copies_dropped"] += 1
            return
        try:
            pkt = Packet.parse_ip(raw, verify_checksum=False, allow_padding=True)
        except PacketDecodeError:
            self.stats["copies_malformed"] += 1
            return
        data = wire.pack_datagram(wire.Tag.PACKET, cookie, 0, pkt.proto, pkt.src, pkt.sport, pkt.dst, pkt.dport,
                                  bytes(pkt.payload), False)
        if entry.session.send_datagram(data):
            self.stats["copies_delivered"] += 1
        else:
            self.stats["copies_dropped"] += 1

    # -- forwarding table ----------------------------------------------------------------
    async def set_forwarding(self, routes: list[Route]) -> None:
        check_routes(routes)
        async with self._lock:
            # the same kernel routes as the linux engine (protocol-tagged, replaced as a set)
            await asyncio.to_thread(apply_kernel_routes, list(routes))
            self.routes = list(routes)

    # -- packets from boosters -------------------------------------------------------------
    def inject(self, pkt: Packet, session: BoosterSession) -> None:
        pkt = self._restore_destination(pkt)
        if pkt is None:
            self.stats["inject_errors"] += 1
            return
        try:
            raw = pkt.to_ip()
        except PacketError as exc:
            self.stats["inject_errors"] += 1
            log.debug("cannot inject %s: %s", pkt, exc)
            return
        if self._injector is None:
            self.stats["inject_errors"] += 1
            return
        try:
            self._injector.sendto(raw, (pkt.dst, 0))
        except OSError as exc:
            self.stats["inject_errors"] += 1
            log.debug("inject to %s failed: %s", pkt.dst, exc)
            return
        self.stats["injected"] += 1

    def _restore_destination(self, pkt: Packet) -> Packet | None:
        """A packet read from a REDIRECT socket shows 0.0.0.0 (and port 0) where its rule names no
        single destination: a pass / modify verdict (or a reply, addresses swapped) gets the
        original destination back from the kernel's flow map."""
        if self.dp is None:
            return pkt
        if pkt.dst == "0.0.0.0" or pkt.dport == 0:
            found = self.dp.original_destination(pkt.src, pkt.sport) if pkt.proto == PROTO_UDP else None
            if found is None:
                return None
            return dataclasses.replace(pkt, dst=found[0], dport=found[1])
        if pkt.src == "0.0.0.0" or pkt.sport == 0:
            found = self.dp.original_destination(pkt.dst, pkt.dport) if pkt.proto == PROTO_UDP else None
            if found is None:
                return None
            return dataclasses.replace(pkt, src=found[0], sport=found[1])
        return pkt

    async def set_multicast_group(self, group: int, members: list[tuple[str, int]]) -> None:
        members = checked_group_members(group, members, MAX_GROUP_MEMBERS)
        try:
            self.dp.set_group(group, members)
        except (maps.DatapathRefused, bpf.BpfError) as exc:
            raise EngineRefused(str(exc)) from None
        if members:
            fresh = {h for h, _ in members} - {h for h, _ in self.groups.get(group, ())}
            self.groups[group] = members
            await asyncio.to_thread(self._resolve_neighbours, fresh)
        else:
            self.groups.pop(group, None)

    @staticmethod
    def _resolve_neighbours(hosts: set[str]) -> None:
        """The kernel fans out with bpf_fib_lookup, which needs each next hop's neighbour entry:
        one empty datagram to the discard port of each new member makes the kernel resolve it."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            nf.mark_injected(probe)
            for host in hosts:
                with contextlib.suppress(OSError):
                    probe.sendto(b"", (host, 9))

    def _source_for(self, dst: str) -> str:
        return self._sources.toward(dst)

    def send_multicast(self, group: int, payload: bytes, src_port: int, session: BoosterSession) -> None:
        """One frame into boxd's veth; the tc program on its far end makes one copy per member."""
        members = self.groups.get(group)
        if not members or self._mcast is None:
            self.stats["multicast_no_group"] += 1
            return
        host, port = members[0]
        try:
            ip = Packet(PROTO_UDP, self._source_for(host), src_port, host, port, payload).to_ip()
        except (PacketError, OSError) as exc:
            self.stats["multicast_errors"] += 1
            log.debug("multicast to group %d failed: %s", group, exc)
            return
        frame = b"\x02\xbb" + group.to_bytes(4, "big") + self._mcast_src_mac + b"\x08\x00" + ip
        try:
            self._mcast.send(frame)
        except OSError:
            self.stats["multicast_errors"] += 1
            return
        self.stats["multicast_sent"] += 1

    # -- management ----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        kernel: dict[str, int] = {}
        counters: dict[str, list[int]] = {}
        if self.dp is not None:
            with contextlib.suppress(bpf.BpfError):
                kernel = self.dp.stats()
                counters = {str(c): list(v) for c, v in self.dp.counters().items()}
        return {
            "interfaces": {n: "native" if f & bpf.XDP_FLAGS_DRV_MODE else "generic"
                           for n, (_, f) in self.attached.items()},
            "rules": len(self.installed),
            "pins": self.pin_dir,
            "kernel": kernel,
            "kernel_counters": counters,
            "multicast_groups": {str(g): len(m) for g, m in self.groups.items()},
            "stall_bound_s": self.stall,
            "lease_s": self.lease,
            **self.stats,
        }
