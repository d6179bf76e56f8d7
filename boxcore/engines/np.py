"""The ``np`` engine: booster rules on the NP4GS3 card (paper section II-C, Fig. 3 and Fig. 5).

boxd runs on the host of the card.  The card forwards between its two ports by itself; the
host sees one virtual interface per port (``np0``, ``np1``) and the control interface
(``npc``), over which :mod:`npdrv` speaks the guided-frame protocol.  Redirecting a packet
follows Fig. 5: the booster asks (1), boxd checks (2), the rule is mapped to the card's
multi-field table (3) and to the kernel of the host (4); a matching packet arrives (5), the
card hands it up the host interface (6), the kernel hands it to the booster (7) through the
same NFQUEUE machinery as the ``linux`` engine, and the callback runs (8).

==========  ================================  ======================================  =========
rule        card                              host kernel (via the linux engine)       delivery
==========  ================================  ======================================  =========
REDIRECT    REDIRECT (up the host interface)  NFQUEUE --queue-bypass (FORWARD, INPUT)  nfqueue
TCP         REDIRECT                          TPROXY                                   tproxy
COPY        COPY (a tagged copy goes up)      NFLOG in mangle PREROUTING on copies     nflog
DROP        DROP                              DROP                                     -
FORWARD     FORWARD (skips lower priorities)  RETURN                                   -
MULTICAST   MULTICAST group (card fan-out)    -                                        -
==========  ================================  ======================================  =========

Copies reach the host addressed to the card's group MAC, so the kernel never forwards them
(``ip_forward`` drops non-PACKET_HOST frames); the chain :data:`COPY_CHAIN`, jumped to from
mangle PREROUTING for group-addressed frames of the host interfaces, logs them to the
booster's NFLOG group and drops them.  ``booster.send_multicast`` sends one frame to the card
addressed to the group's transmit MAC; the card sends one copy per member.

The forwarding table the card uses is the host's: its own addresses (to the host), its
neighbours on the host interfaces and its routes through them (next hop MAC from the
neighbour table), pushed as LPM entries and kept in sync every ``--np-sync`` seconds.
Destinations the card does not know go up to the host, whose kernel forwards them (and
resolves the neighbour the next sync pushes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
from typing import Any

from boxcore import iptables as nf
from boxcore.engines.base import BoosterSession, Delivery, EngineRefused, EngineSetupError, Route
from boxcore.engines.linux import LinuxEngine
from boxcore.packet import Packet, PacketError
from boxcore.rules import Action, Rule
from cliruntime.supervisor import within
from npdrv import wire
from npdrv.card import mcast_tx_mac
from npdrv.driver import NpDriver, NpError
from npdrv.netns import no_segmentation_offload
from npdrv.wire import NpAction, NpRule, Table

log = logging.getLogger("boxcore.engines.np")

COPY_CHAIN = "NP-COPY"
ACTIONS = {Action.FORWARD: NpAction.FORWARD, Action.REDIRECT: NpAction.REDIRECT, Action.COPY: NpAction.COPY,
           Action.DROP: NpAction.DROP, Action.MULTICAST: NpAction.MULTICAST}


def card_rule(rule: Rule, rule_id: int, group: int = 0, action: NpAction | None = None) -> NpRule:
    """A booster rule in the card's multi-field format (EngineRefused if it does not fit)."""
    m = rule.match

    def prefix(text: str | None) -> tuple[int, int]:
        if text is None:
            return 0, 0
        net = ipaddress.IPv4Network(text, strict=False)
        return int(net.network_address), int(net.netmask)

    def ports(port: int | tuple[int, int] | None) -> tuple[int, int]:
        if port is None:
            return 0, 0xFFFF
        return (port, port) if isinstance(port, int) else (port[0], port[1])

    patterns = []
    for p in m.payload:
        mask = p.mask if p.mask is not None else b"\xff" * len(p.value)
        value = bytes(v & k for v, k in zip(p.value, mask))
        try:
            patterns.append(wire.Pattern(p.offset, value, mask))
        except ValueError as exc:
            raise EngineRefused(f"the card cannot match payload pattern at {p.offset}: {exc}") from None
    src, src_mask = prefix(m.src)
    dst, dst_mask = prefix(m.dst)
    try:
        return NpRule(rule_id, rule.priority, action if action is not None else ACTIONS[rule.action], group,
                      m.proto or 0, 0xFF if m.proto is not None else 0, src, src_mask, dst, dst_mask,
                      ports(m.src_port), ports(m.dst_port), tuple(patterns))
    except ValueError as exc:
        raise EngineRefused(f"the card cannot hold rule {m.describe()}: {exc}") from None


class NPEngine(LinuxEngine):
    name = "np"

    def __init__(self, *, control: str = "npc", host_ifaces: tuple[str, ...] = ("np0", "np1"),
                 timeout: float = 0.5, retries: int = 3, sync_interval: float = 1.0, **linux: Any) -> None:
        super().__init__(**linux)
        self.control = control
        self.host_ifaces = tuple(host_ifaces)
        self.timeout = timeout
        self.retries = retries
        self.sync_interval = sync_interval
        self.driver: NpDriver | None = None
        self.card_rules: dict[int, int] = {}          # cookie -> card rule id
        self.card_counters: dict[int, tuple[int, int]] = {}
        self.card_groups: dict[int, int] = {}          # boxd group -> card group (1..65535)
        self.copy_entries: dict[int, tuple[Rule, int]] = {}   # cookie -> (rule, nflog group)
        self.pushed_fwd: dict[str, tuple[int, bytes]] = {}
        self._next_rule_id = 1
        self._sync_now = asyncio.Event()
        self._tx: socket.socket | None = None
        self.np_stats: dict[str, int] = {"card_rules_installed": 0, "card_rules_removed": 0,
                                         "fwd_pushes": 0, "fwd_entries": 0, "sync_errors": 0,
                                         "multicast_sent": 0, "multicast_errors": 0}

    # -- construction ----------------------------------------------------------------
    @classmethod
    def add_options(cls, group: argparse._ArgumentGroup) -> None:
        # The host side takes the linux engine's --linux-* options (boxd adds those already).
        group.add_argument("--np-control", default="npc", help="the card's control interface on the host")
        group.add_argument("--np-host-ifaces", default="np0,np1",
                           help="the host's virtual interfaces of card ports 0 and 1")
        group.add_argument("--np-timeout", type=float, default=0.5, help="seconds per control request attempt")
        group.add_argument("--np-retries", type=int, default=3, help="resends of idempotent control requests")
        group.add_argument("--np-sync", type=float, default=1.0,
                           help="seconds between pushes of the host's forwarding table to the card")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "NPEngine":
        engine = super().from_args(args)
        ifaces = tuple(i.strip() for i in str(getattr(args, "np_host_ifaces", "np0,np1")).split(",") if i.strip())
        if len(ifaces) != 2:
            raise EngineSetupError(f"--np-host-ifaces needs two interfaces (ports 0 and 1), got {len(ifaces)}")
        engine.host_ifaces = ifaces
        engine.control = str(getattr(args, "np_control", "npc"))
        engine.timeout = float(getattr(args, "np_timeout", 0.5))
        engine.retries = int(getattr(args, "np_retries", 3))
        engine.sync_interval = float(getattr(args, "np_sync", 1.0))
        if not 0.01 <= engine.timeout <= 10 or not 0 <= engine.retries <= 10:
            raise EngineSetupError("--np-timeout must be within 0.01-10 s and --np-retries within 0-10")
        if not 0.05 <= engine.sync_interval <= 60:
            raise EngineSetupError(f"--np-sync must be within 0.05-60 s, got {engine.sync_interval}")
        return engine

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        await super().start()
        try:
            self.driver = await NpDriver(self.control, timeout=self.timeout, retries=self.retries).open()
            await self.driver.echo(b"boxd")
            # Loading the booster action set resets the card's rules and groups: nothing a
            # previous boxd left behind survives.
            await self.driver.code_load("booster")
            macs = [await asyncio.to_thread(_link_mac, iface) for iface in self.host_ifaces]
            for iface in self.host_ifaces:      # the card takes wire-sized frames, as a real NIC
                try:
                    await asyncio.to_thread(no_segmentation_offload, iface)
                except Exception as exc:  # pyroute2 raises many kinds; the card still works for UDP
                    log.warning("cannot turn segmentation offload off on %s: %s", iface, exc)
            for port, mac in enumerate(macs):
                await self.driver.port_config(port, mac=mac)
            for entry in await self.driver.dump(Table.FORWARDING):
                await self.driver.fwd_delete(entry.network, missing_ok=True)
        except (OSError, NpError) as exc:
            await super().stop()
            if self.driver is not None:
                await self.driver.close()
                self.driver = None
            raise EngineSetupError(f"np engine: no card on control interface {self.control!r}: {exc}") from None
        await self._setup_copy_chain()
        self._tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self._tx.bind((self.host_ifaces[0], 0))
        self._tx.setblocking(False)
        await self._sync_forwarding()
        self._tasks.spawn_restarting(self._sync_loop, name="card sync")
        log.info("np engine ready: card on %s, host interfaces %s", self.control, ",".join(self.host_ifaces))

    async def stop(self) -> None:
        await self._tasks.aclose()          # the card sync first: it uses the driver closed below
        if self.driver is not None:
            with contextlib.suppress(NpError, OSError):
                commands = [wire.request(wire.RuleRef(rid), wire.Cmd.RULE_DELETE) for rid in self.card_rules.values()]
                commands += [wire.request(wire.McastSet(g)) for g in self.card_groups.values()]
                commands += [wire.request(wire.FwdDelete(net)) for net in self.pushed_fwd]
                if commands:
                    await self.driver.execute(commands, check=False)
            await self.driver.close()
            self.driver = None
        self.card_rules.clear()
        self.card_groups.clear()
        self.pushed_fwd.clear()
        self.copy_entries.clear()
        with contextlib.suppress(nf.NetfilterError, OSError):
            await self._remove_copy_chain()
        if self._tx is not None:
            self._tx.close()
            self._tx = None
        await super().stop()

    # -- rules: the card first needs the kernel ready to take what it hands up -----------
    async def install(self, rule: Rule, session: BoosterSession) -> Delivery:
        if rule.action is Action.MULTICAST:
            return await self._install_multicast(rule)
        if rule.action is Action.COPY:
            return await self._install_copy(rule)
        delivery = await super().install(rule, session)
        await self._install_card(rule, session)
        return delivery

    async def install_tcp(self, rule: Rule, session: BoosterSession) -> Delivery:
        delivery = await super().install_tcp(rule, session)
        await self._install_card(rule, session, NpAction.REDIRECT)
        return delivery

    async def _install_card(self, rule: Rule, session: BoosterSession | None, action: NpAction | None = None,
                            group: int = 0) -> None:
        await self._remove_card(rule.cookie)
        rule_id = self._allocate_rule_id()
        try:
            await self.driver.rule_insert(card_rule(rule, rule_id, group, action))
        except (NpError, EngineRefused) as exc:
            if session is not None:
                await super().remove(rule)
            raise EngineRefused(f"the card refused rule {rule.match.describe()}: {exc}") from None
        self.card_rules[rule.cookie] = rule_id
        self.np_stats["card_rules_installed"] += 1

    async def _install_multicast(self, rule: Rule) -> Delivery:
        group = self._card_group(rule.group)
        await self._install_card(rule, None, NpAction.MULTICAST, group)
        return Delivery("channel", {"data_path": "np"})

    async def _install_copy(self, rule: Rule) -> Delivery:
        old = self.copy_entries.pop(rule.cookie, None)
        if old is not None:
            self.nflog_groups.give(old[1])
        group = self.nflog_groups.take()
        self.copy_entries[rule.cookie] = (rule, group)
        try:
            await self._render_copy_chain()
            await self._install_card(rule, None)
        except (nf.NetfilterError, OSError, EngineRefused) as exc:
            self.copy_entries.pop(rule.cookie, None)
            self.nflog_groups.give(group)
            with contextlib.suppress(nf.NetfilterError, OSError):
                await self._render_copy_chain()
            raise EngineRefused(str(exc)) from None
        return Delivery("nflog", {"group": group})

    async def remove(self, rule: Rule) -> None:
        await self._remove_card(rule.cookie)
        copy = self.copy_entries.pop(rule.cookie, None)
        if copy is not None:
            self.nflog_groups.give(copy[1])
            await self._render_copy_chain()
        await super().remove(rule)

    async def _remove_card(self, cookie: int) -> None:
        rule_id = self.card_rules.pop(cookie, None)
        self.card_counters.pop(cookie, None)
        if rule_id is None or self.driver is None:
            return
        try:
            await self.driver.rule_delete(rule_id, missing_ok=True)
            self.np_stats["card_rules_removed"] += 1
        except NpError as exc:
            log.error("removing card rule %d failed: %s", rule_id, exc)

    def _allocate_rule_id(self) -> int:
        used = set(self.card_rules.values())
        while self._next_rule_id in used:
            self._next_rule_id = self._next_rule_id % 0xFFFFFFFF + 1
        rule_id = self._next_rule_id
        self._next_rule_id = self._next_rule_id % 0xFFFFFFFF + 1
        return rule_id

    def _card_group(self, group: int) -> int:
        card_group = self.card_groups.get(group)
        if card_group is None:
            used = set(self.card_groups.values())
            free = next((g for g in range(1, 0x10000) if g not in used), None)
            if free is None:
                raise EngineRefused("the card has no free multicast group")
            card_group = self.card_groups[group] = free
        return card_group

    def counters(self) -> dict[int, tuple[int, int]]:
        kernel = super().counters()
        return {cookie: self.card_counters.get(cookie, kernel.get(cookie, (0, 0)))
                for cookie in set(kernel) | set(self.card_rules)}

    # -- copies: group-addressed frames from the card ---------------------------------
    async def _setup_copy_chain(self) -> None:
        await self._remove_copy_chain()
        lines = ["*mangle", f":{COPY_CHAIN} - [0:0]"]
        lines += [f"-I PREROUTING 1 -i {iface} -m pkttype --pkt-type multicast -j {COPY_CHAIN}"
                  for iface in self.host_ifaces]
        lines.append("COMMIT")
        await nf.restore("\n".join(lines) + "\n")
        await self._render_copy_chain()

    async def _render_copy_chain(self) -> None:
        lines = ["*mangle", f":{COPY_CHAIN} - [0:0]"]
        for rule, group in self.copy_entries.values():
            target = " ".join(nf.Target("nflog", group).args())
            for args in nf.match_args(rule.match):
                lines.append(f"-A {COPY_CHAIN} {' '.join(args)} {target}".replace("  ", " "))
        # A card copy is a unicast IP packet in a group-addressed frame: never the host's to keep.
        lines.append(f"-A {COPY_CHAIN} ! -d 224.0.0.0/4 -j DROP")
        lines.append("COMMIT")
        await nf.restore("\n".join(lines) + "\n")

    async def _remove_copy_chain(self) -> None:
        saved = await nf.save()
        lines = ["*mangle"]
        present = False
        for line in saved.splitlines():
            if line.startswith("-A PREROUTING") and f"-j {COPY_CHAIN}" in line:
                lines.append("-D" + line[2:])
            if line.startswith(f":{COPY_CHAIN} "):
                present = True
        if present:
            lines += [f":{COPY_CHAIN} - [0:0]", f"-X {COPY_CHAIN}"]
        if len(lines) > 1:
            lines.append("COMMIT")
            await nf.restore("\n".join(lines) + "\n")

    # -- multicast -----------------------------------------------------------------
    async def set_multicast_group(self, group: int, members: list[tuple[str, int]]) -> None:
        await super().set_multicast_group(group, members)
        if len(members) > wire.MAX_GROUP_MEMBERS:
            raise EngineRefused(f"the card holds at most {wire.MAX_GROUP_MEMBERS} members per group")
        if not members and group not in self.card_groups:
            return
        card_group = self._card_group(group)
        try:
            await self.driver.mcast_set(card_group, [(h, int(p)) for h, p in members])
        except NpError as exc:
            raise EngineRefused(f"the card refused multicast group {group}: {exc}") from None

    def send_multicast(self, group: int, payload: bytes, src_port: int, session: BoosterSession) -> None:
        """One frame to the card, addressed to the group's transmit MAC: the card fans it out."""
        members = self.groups.get(group)
        card_group = self.card_groups.get(group)
        if not members or card_group is None or self._tx is None:
            self.np_stats["multicast_errors"] += 1
            return
        try:
            src = self._source_for(members[0][0])
            raw = Packet(nf.PROTO_UDP, src, src_port, "0.0.0.0", 0, payload).to_ip()
            self._tx.send(mcast_tx_mac(card_group) + self._tx.getsockname()[4] + b"\x08\x00" + raw)
        except (PacketError, OSError) as exc:
            self.np_stats["multicast_errors"] += 1
            log.debug("multicast to group %d failed: %s", group, exc)
            return
        self.np_stats["multicast_sent"] += 1

    # -- the forwarding table --------------------------------------------------------
    async def set_forwarding(self, routes: list[Route]) -> None:
        await super().set_forwarding(routes)       # kernel routes: the host's table is the source
        self._sync_now.set()

    async def _sync_loop(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await within(self._sync_now.wait(), self.sync_interval)
            self._sync_now.clear()
            try:
                await self._sync_forwarding()
                if self.card_rules:
                    by_id = {rid: cookie for cookie, rid in self.card_rules.items()}
                    for record in await self.driver.dump(Table.RULES):
                        cookie = by_id.get(record.rule.rule_id)
                        if cookie is not None:
                            self.card_counters[cookie] = (record.packets, record.bytes)
            except (NpError, OSError, nf.NetfilterError) as exc:
                self.np_stats["sync_errors"] += 1
                log.warning("card sync failed: %s", exc)

    async def _sync_forwarding(self) -> None:
        wanted = await host_forwarding_table(self.host_ifaces)
        commands = [wire.request(wire.FwdDelete(net)) for net in self.pushed_fwd if net not in wanted]
        commands += [wire.request(wire.FwdAdd(net, port, mac)) for net, (port, mac) in wanted.items()
                     if self.pushed_fwd.get(net) != (port, mac)]
        if not commands:
            return
        results = await self.driver.execute(commands, check=False)
        for result in results:
            if not result.ok and result.request.type is wire.Cmd.FWD_ADD:
                log.warning("card refused %s: %s", result.request.body.network, result.reply.body.text)
        self.pushed_fwd = {net: entry for net, entry in wanted.items()}
        self.np_stats["fwd_pushes"] += 1
        self.np_stats["fwd_entries"] = len(wanted)

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["np"] = {**self.np_stats, "control": self.control, "host_ifaces": list(self.host_ifaces),
                     "card_rules": len(self.card_rules), "card_groups": len(self.card_groups),
                     "driver": self.driver.stats if self.driver is not None else {}}
        return out


def _link_mac(iface: str) -> str:
    with open(f"/sys/class/net/{iface}/address") as fh:
        return fh.read().strip()


async def _ip_json(*argv: str) -> list[dict]:
    proc = await asyncio.create_subprocess_exec("ip", "-j", "-4", *argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise OSError(f"ip {' '.join(argv)}: {err.decode().strip()}")
    return json.loads(out or b"[]")


async def host_forwarding_table(host_ifaces: tuple[str, ...]) -> dict[str, tuple[int, bytes]]:
    """The card's LPM table from the host's: network -> (port, next-hop MAC).

    The host's own addresses go to the host; neighbours on a host interface are /32 entries
    out of that interface's port; routes through a host interface use the gateway's MAC.
    """
    addrs, neighbours, routes = await asyncio.gather(_ip_json("addr", "show"), _ip_json("neigh", "show"),
                                                     _ip_json("route", "show", "table", "main"))
    port_of = {iface: port for port, iface in enumerate(host_ifaces)}
    table: dict[str, tuple[int, bytes]] = {}
    macs: dict[tuple[str, int], bytes] = {}
    for n in neighbours:
        port = port_of.get(n.get("dev"))
        state = n.get("state") or []
        if port is None or "lladdr" not in n or any(s in ("FAILED", "INCOMPLETE") for s in state):
            continue
        mac = wire.mac_bytes(n["lladdr"])
        macs[(n["dst"], port)] = mac
        table[f"{n['dst']}/32"] = (port, mac)
    for r in routes:
        port = port_of.get(r.get("dev"))
        gateway = r.get("gateway")
        if port is None or gateway is None or (gateway, port) not in macs:
            continue
        dst = "0.0.0.0/0" if r["dst"] == "default" else str(ipaddress.IPv4Network(r["dst"], strict=False))
        table.setdefault(dst, (port, macs[(gateway, port)]))
    for link in addrs:
        for info in link.get("addr_info", []):
            if info.get("family") == "inet":
                table[f"{info['local']}/32"] = (wire.PORT_HOST, b"\x00" * 6)
    return table
