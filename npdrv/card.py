"""The emulated NP4GS3 data path, sans-IO: a frame and where it came from in,
the frames to transmit and where out.

Interfaces are small integers: port ``i`` is ``i``, the host-side virtual
interface of port ``i`` is ``host(i)``.  For a frame from an external port the
card applies, in order:

1. non-IPv4 frames (ARP, ...) and broadcasts go up the port's host interface;
   unicast frames for another MAC are dropped (the port's MAC filter);
2. the multi-field rule table: every matching COPY sends a copy up the host
   interface (destination MAC rewritten to the group address :data:`COPY_MAC`,
   so the host can tell copies from packets it must forward, and never forwards them); the winning terminating rule
   REDIRECTs the frame to the host interface, DROPs it, MULTICASTs it (one
   stored frame rewritten for every group member, keeping its source) or
   FORWARDs it;
3. the LPM forwarding table: rewrite MACs, decrement TTL, update the IPv4
   checksum incrementally and send out of the entry's port.  A miss, an entry
   for the host, TTL expiry or options the card does not handle go up the
   host interface (the exception path: the host's kernel deals with them).

Frames the host sends on a host interface go out of the matching port, except
those that match a MULTICAST rule, which the card fans out, and those addressed
to a group's transmit MAC (:func:`mcast_tx_mac`), which it sends to every member
of that group.
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field

from cliruntime.wirefields import Layout

from npdrv import wire
from npdrv.tables import CompiledRule, LpmTable, RuleTable
from npdrv.wire import NpAction

HOST_BASE = 0x10
ETH_P_IP = 0x0800
# Copies go up with this group (multicast-bit) destination MAC: the host's IP layer sees
# them (netfilter PREROUTING can log or queue them) but never forwards them, because
# ip_forward() only forwards frames addressed to the host (PACKET_HOST).
COPY_MAC = bytes.fromhex("034e50435059")      # "NPCPY", locally administered group address
# A frame the host sends to 03:4e:50:4d:GG:GG ("NPM" + group) is fanned out by the card to
# every member of group GG:GG, keeping its source (booster.send_multicast on the np engine).
MCAST_TX_PREFIX = bytes.fromhex("034e504d")


def mcast_tx_mac(group: int) -> bytes:
    return MCAST_TX_PREFIX + group.to_bytes(2, "big")
PORTS = Layout("!", (("sport", "H"), ("dport", "H")))   # the first four bytes of UDP and TCP

# Named action sets the card accepts with CODE_LOAD (its picocode images).
ACTION_SETS: dict[str, frozenset[NpAction]] = {
    "forward": frozenset({NpAction.FORWARD}),
    "filter": frozenset({NpAction.FORWARD, NpAction.DROP}),
    "booster": frozenset(NpAction),
}
BOOT_CODE = "forward"


def host(port: int) -> int:
    return HOST_BASE + port


def is_host(iface: int) -> bool:
    return iface >= HOST_BASE


def csum_adjust(csum: int, old: int, new: int) -> int:
    """RFC 1624 incremental update of a one's complement checksum for one 16-bit word."""
    total = (~csum & 0xFFFF) + (~old & 0xFFFF) + new
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ones_sum(data: bytes) -> int:
    """One's complement sum of 16-bit words (2**16 == 1 mod 0xFFFF does the folding)."""
    if len(data) % 2:
        data += b"\x00"
    total = int.from_bytes(data, "big") % 0xFFFF
    return total if total or not any(data) else 0xFFFF


def complete_l4_checksum(frame: bytes) -> bytes:
    """Fill in the TCP/UDP checksum of a frame the kernel left for offload (CHECKSUM_PARTIAL)."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return frame
    ihl = (frame[14] & 0x0F) * 4
    proto = frame[23]
    total_len = int.from_bytes(frame[16:18], "big")
    l4 = 14 + ihl
    end = 14 + total_len
    if proto == 17:
        where = l4 + 6
    elif proto == 6:
        where = l4 + 16
    else:
        return frame
    if end > len(frame) or where + 2 > end:
        return frame
    segment = bytearray(frame[l4:end])
    segment[where - l4:where - l4 + 2] = b"\x00\x00"
    pseudo = frame[26:34] + bytes([0, proto]) + (end - l4).to_bytes(2, "big")
    csum = ~ones_sum(pseudo + bytes(segment)) & 0xFFFF
    if proto == 17 and csum == 0:
        csum = 0xFFFF
    out = bytearray(frame)
    out[where:where + 2] = csum.to_bytes(2, "big")
    return bytes(out)


@dataclass(slots=True)
class PortState:
    config: wire.PortConfig
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    drops: int = 0
    to_host_packets: int = 0
    to_host_bytes: int = 0

    def record(self) -> wire.PortRecord:
        return wire.PortRecord(self.config, self.rx_packets, self.rx_bytes, self.tx_packets,
                               self.tx_bytes, self.drops)

    def clear(self) -> None:
        self.rx_packets = self.rx_bytes = self.tx_packets = self.tx_bytes = self.drops = 0
        self.to_host_packets = self.to_host_bytes = 0


@dataclass(slots=True)
class FwdEntry:
    port: int
    next_hop: bytes
    record: wire.FwdAdd


@dataclass
class CardConfig:
    ports: int = 2
    port_macs: tuple[bytes, ...] = ()
    rule_limit: int = 4096
    fwd_limit: int = 65536
    group_limit: int = 1024
    model_latency_us: float = 15.0
    model_jitter_us: float = 3.0
    seed: int = 0


@dataclass
class Card:
    """The card's tables, counters and per-frame processing."""

    config: CardConfig = field(default_factory=CardConfig)

    def __post_init__(self) -> None:
        cfg = self.config
        macs = list(cfg.port_macs) + [bytes([2, 0x4E, 0x50, 0, 0, i]) for i in range(len(cfg.port_macs),
                                                                                       cfg.ports)]
        self.ports = [PortState(wire.PortConfig(i, True, 1500, macs[i])) for i in range(cfg.ports)]
        self.fwd = LpmTable(cfg.fwd_limit)
        self.rules = RuleTable(cfg.rule_limit)
        self.groups: dict[int, tuple[tuple[int, int], ...]] = {}
        self.code = BOOT_CODE
        self.stats: collections.Counter[str] = collections.Counter()
        self._rng = random.Random(cfg.seed)

    # ------------------------------------------------------------ modelled latency
    def model_latency_ns(self) -> int:
        """One sample of the real card's forwarding latency: mean ± jitter, clipped.

        The paper measured 15 µs ± 3 µs independent of load, size and rule count,
        so the model depends on none of them.
        """
        mean, jitter = self.config.model_latency_us, self.config.model_jitter_us
        sample = self._rng.gauss(mean, jitter / 2) if jitter else mean
        return int(min(max(sample, mean - jitter), mean + jitter, ) * 1000)

    # ------------------------------------------------------------ data path
    def process(self, iface: int, frame: bytes) -> list[tuple[int, bytes]]:
        """Frames to transmit, as (interface, frame), for one frame received on ``iface``."""
        if is_host(iface):
            return self._from_host(iface - HOST_BASE, frame)
        return self._from_port(iface, frame)

    def _from_port(self, port: int, frame: bytes) -> list[tuple[int, bytes]]:
        state = self.ports[port]
        state.rx_packets += 1
        state.rx_bytes += len(frame)
        if len(frame) < 14:
            return self._drop(state, "malformed")
        if not state.config.enabled:
            return self._drop(state, "port_disabled")
        dst_mac = frame[0:6]
        if dst_mac != state.config.mac:
            if dst_mac[0] & 1:                      # broadcast / multicast: the host's business
                return self._to_host(port, frame)
            return self._drop(state, "not_for_us")
        if frame[12:14] != b"\x08\x00":
            return self._to_host(port, frame)
        parsed = self._parse_ip(frame)
        if parsed is None:
            return self._drop(state, "malformed")
        proto, src, dst, sport, dport, payload_at = parsed
        out: list[tuple[int, bytes]] = []
        if self.rules.rules:
            best, copies = self.rules.lookup(proto, src, dst, sport, dport, frame[payload_at:])
            for rule in copies:
                self._count(rule, frame)
                out.append((host(port), COPY_MAC + frame[6:]))
                self._host_count(port, frame)
            if best is not None:
                self._count(best, frame)
                action = best.action
                if action is NpAction.REDIRECT:
                    self.stats["redirected"] += 1
                    out.extend(self._to_host(port, frame))
                    return out
                if action is NpAction.DROP:
                    self.stats["dropped_by_rule"] += 1
                    return out
                if action is NpAction.MULTICAST:
                    out.extend(self._fanout(best.group, frame, port))
                    return out
        out.extend(self._forward(port, frame, dst))
        return out

    def _from_host(self, port: int, frame: bytes) -> list[tuple[int, bytes]]:
        if len(frame) < 14:
            self.stats["malformed"] += 1
            return []
        self.stats["from_host"] += 1
        if frame[:4] == MCAST_TX_PREFIX:
            if self._parse_ip(frame) is None:
                self.stats["malformed"] += 1
                return []
            return self._fanout(int.from_bytes(frame[4:6], "big"), frame, port)
        if self.rules.rules and frame[12:14] == b"\x08\x00":
            parsed = self._parse_ip(frame)
            if parsed is not None:
                proto, src, dst, sport, dport, payload_at = parsed
                best, _ = self.rules.lookup(proto, src, dst, sport, dport, frame[payload_at:])
                if best is not None and best.action is NpAction.MULTICAST:
                    self._count(best, frame)
                    return self._fanout(best.group, frame, port)
        return self._transmit(port, frame)

    def _parse_ip(self, frame: bytes) -> tuple[int, int, int, int, int, int] | None:
        if len(frame) < 34:
            return None
        vihl = frame[14]
        ihl = (vihl & 0x0F) * 4
        if vihl >> 4 != 4 or ihl < 20 or len(frame) < 14 + ihl:
            return None
        total_len = int.from_bytes(frame[16:18], "big")
        if total_len < ihl or 14 + total_len > len(frame):
            return None
        proto = frame[23]
        src = int.from_bytes(frame[26:30], "big")
        dst = int.from_bytes(frame[30:34], "big")
        l4 = 14 + ihl
        frag = int.from_bytes(frame[20:22], "big") & 0x1FFF
        if proto in (6, 17) and not frag and total_len - ihl >= (20 if proto == 6 else 8):
            sport, dport = PORTS.unpack_from(frame, l4)
            if proto == 17:
                return proto, src, dst, sport, dport, l4 + 8
            return proto, src, dst, sport, dport, l4 + (frame[l4 + 12] >> 4) * 4
        return proto, src, dst, -1, -1, l4

    def _forward(self, port: int, frame: bytes, dst: int) -> list[tuple[int, bytes]]:
        entry: FwdEntry | None = self.fwd.lookup(dst)
        if entry is None or entry.port == wire.PORT_HOST:
            self.stats["fwd_miss" if entry is None else "fwd_host"] += 1
            return self._to_host(port, frame)
        ttl = frame[22]
        if ttl <= 1:
            self.stats["ttl_expired"] += 1
            return self._to_host(port, frame)
        out_port = self.ports[entry.port]
        if not out_port.config.enabled:
            return self._drop(out_port, "port_disabled")
        if len(frame) - 14 > out_port.config.mtu:
            self.stats["too_big"] += 1
            return self._to_host(port, frame)
        old = (ttl << 8) | frame[23]
        csum = csum_adjust(int.from_bytes(frame[24:26], "big"), old, old - 0x100)
        rewritten = b"".join((entry.next_hop, out_port.config.mac, frame[12:22], bytes((ttl - 1,)),
                              frame[23:24], csum.to_bytes(2, "big"), frame[26:]))
        self.stats["forwarded"] += 1
        return self._transmit(entry.port, rewritten)

    def _fanout(self, group: int, frame: bytes, port: int) -> list[tuple[int, bytes]]:
        """One stored frame, rewritten per member of ``group`` (destination address and port)
        and forwarded by the LPM table.  Copies keep the original source, as the kernel path
        of the linux engine does, so members answer the sender directly."""
        members = self.groups.get(group, ())
        if not members:
            self.stats["mcast_empty_group"] += 1
            return []
        if frame[23] != 17:
            self.stats["mcast_not_udp"] += 1
            return []
        self.stats["mcast_frames"] += 1
        ihl = (frame[14] & 0x0F) * 4
        l4 = 14 + ihl
        ip_csum = int.from_bytes(frame[24:26], "big")
        udp_csum = int.from_bytes(frame[l4 + 6:l4 + 8], "big")
        old_hi, old_lo = int.from_bytes(frame[30:32], "big"), int.from_bytes(frame[32:34], "big")
        old_port = int.from_bytes(frame[l4 + 2:l4 + 4], "big")
        head, middle, body = frame[:24], frame[26:30], frame[34:l4 + 2]
        tail_len, payload = frame[l4 + 4:l4 + 6], frame[l4 + 8:]
        out: list[tuple[int, bytes]] = []
        for addr, member_port in members:
            hi, lo = addr >> 16, addr & 0xFFFF
            ipc = csum_adjust(csum_adjust(ip_csum, old_hi, hi), old_lo, lo)
            udpc = udp_csum
            if udpc:     # 0: the sender sent no UDP checksum
                udpc = csum_adjust(csum_adjust(csum_adjust(udpc, old_hi, hi), old_lo, lo), old_port,
                                   member_port) or 0xFFFF
            copy = b"".join((head, ipc.to_bytes(2, "big"), middle, addr.to_bytes(4, "big"), body,
                             member_port.to_bytes(2, "big"), tail_len, udpc.to_bytes(2, "big"), payload))
            self.stats["mcast_copies"] += 1
            out.extend(self._forward(port, copy, addr))
        return out

    def _to_host(self, port: int, frame: bytes) -> list[tuple[int, bytes]]:
        self._host_count(port, frame)
        return [(host(port), frame)]

    def _host_count(self, port: int, frame: bytes) -> None:
        state = self.ports[port]
        state.to_host_packets += 1
        state.to_host_bytes += len(frame)

    def _transmit(self, port: int, frame: bytes) -> list[tuple[int, bytes]]:
        if not 0 <= port < len(self.ports):
            self.stats["bad_port"] += 1
            return []
        state = self.ports[port]
        if not state.config.enabled:
            return self._drop(state, "port_disabled")
        state.tx_packets += 1
        state.tx_bytes += len(frame)
        return [(port, frame)]

    def _drop(self, state: PortState, why: str) -> list[tuple[int, bytes]]:
        state.drops += 1
        self.stats[f"dropped_{why}"] += 1
        return []

    @staticmethod
    def _count(rule: CompiledRule, frame: bytes) -> None:
        rule.packets += 1
        rule.bytes += len(frame) - 14
