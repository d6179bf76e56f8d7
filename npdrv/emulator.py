"""``np4gs3-emu``: the NP4GS3 card as a network namespace and a process.

The process lives in the card's namespace and reads every interface there
with AF_PACKET: the two external ports, the two host-side interfaces (whose
peers the host sees as the card's virtual interfaces) and the control
interface.  Frames go through the sans-IO :class:`npdrv.card.Card`; guided
frames through :class:`npdrv.controlpoint.ControlPoint`.  This module is only
the I/O adapter.

Per frame it keeps the wall-clock latency from the kernel's receive timestamp
to the return of the transmit call, and, separately, a sample of the modelled
latency of the real card (15 µs ± 3 µs by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
import time

from cliruntime import ConfigError, RunContext, make_parser, non_negative_float, positive_int, run_async
from cliruntime.wirefields import Layout
from npdrv import netns, wire
from npdrv.card import Card, CardConfig, complete_l4_checksum, host, is_host
from npdrv.controlpoint import ControlPoint
from npdrv.histogram import LatencyHistogram

log = logging.getLogger("npdrv.emulator")


class EmulatorError(RuntimeError):
    """The emulator cannot open one of its interfaces (the text names it and says why)."""

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23
SO_TIMESTAMPNS = 35
TP_STATUS_CSUMNOTREADY = 1 << 3
# kernel structures read from packet sockets (native byte order; no padding in either)
AUXDATA = Layout("=", (("status", "I"), ("len", "I"), ("snaplen", "I"), ("mac", "H"), ("net", "H"),
                       ("vlan_tci", "H"), ("vlan_tpid", "H")))        # struct tpacket_auxdata
TIMESPEC = Layout("=", (("sec", "q"), ("nsec", "q")))               # struct timespec (64-bit)
PACKET_STATS = Layout("=", (("packets", "I"), ("drops", "I")))      # struct tpacket_stats
ANC_SIZE = socket.CMSG_SPACE(AUXDATA.size) + socket.CMSG_SPACE(TIMESPEC.size)
BATCH = 64           # frames per wake-up per interface, so one busy port cannot starve the rest


class Emulator:
    """Sockets on the card's interfaces, wired to a Card and its ControlPoint."""

    def __init__(self, card: Card, control: ControlPoint, ports: list[str], host_ifaces: list[str],
                 control_iface: str, rcvbuf: int) -> None:
        self.card = card
        self.control = control
        self.names: dict[int, str] = {}
        for i, name in enumerate(ports):
            self.names[i] = name
        for i, name in enumerate(host_ifaces):
            self.names[host(i)] = name
        self.control_iface = control_iface
        self.rcvbuf = rcvbuf
        self.socks: dict[int, socket.socket] = {}
        self.control_sock: socket.socket | None = None
        self.wall = LatencyHistogram()          # port -> port, measured
        self.wall_to_host = LatencyHistogram()  # port -> host interface, measured
        self.modelled = LatencyHistogram()      # the real card's model, per forwarded frame
        self.errors: dict[str, int] = {}

    def _count(self, key: str) -> None:
        self.errors[key] = self.errors.get(key, 0) + 1

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        for iface, name in self.names.items():
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            try:
                sock.bind((name, ETH_P_ALL))
            except OSError as exc:
                sock.close()
                raise EmulatorError(f"cannot open card interface {name!r}: {exc.strerror}") from None
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.setblocking(False)
            self.socks[iface] = sock
            loop.add_reader(sock.fileno(), self._readable, iface, sock)
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(wire.ETHERTYPE))
        try:
            sock.bind((self.control_iface, wire.ETHERTYPE))
        except OSError as exc:
            sock.close()
            raise EmulatorError(f"cannot open control interface {self.control_iface!r}: {exc.strerror}") from None
        sock.setblocking(False)
        self.control_sock = sock
        loop.add_reader(sock.fileno(), self._control_readable)

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        for sock in list(self.socks.values()) + [self.control_sock]:
            if sock is not None:
                loop.remove_reader(sock.fileno())
                sock.close()

    def kernel_drops(self) -> dict[str, int]:
        """Frames the kernel dropped because a receive queue was full (per interface)."""
        out = {}
        for iface, sock in self.socks.items():
            stats = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, PACKET_STATS.size)
            out[self.names[iface]] = PACKET_STATS.unpack(stats)[1]
        return out

    def _readable(self, iface: int, sock: socket.socket) -> None:
        card = self.card
        for _ in range(BATCH):
            try:
                data, ancdata, _flags, _addr = sock.recvmsg(65535, ANC_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._count(f"recv_{exc.errno}")
                return
            rx_ns = 0
            for level, kind, value in ancdata:
                if level == SOL_PACKET and kind == PACKET_AUXDATA:
                    if AUXDATA.unpack_from(value)[0] & TP_STATUS_CSUMNOTREADY:
                        data = complete_l4_checksum(data)   # left for offload by the sender's veth
                elif level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = TIMESPEC.unpack_from(value)
                    rx_ns = sec * 1_000_000_000 + nsec
            try:
                outputs = card.process(iface, data)
            except Exception:   # a frame the card model cannot handle must not stop the card
                self._count("internal_errors")
                log.exception("frame of %d bytes on %s dropped", len(data), self.names[iface])
                continue
            for out_iface, frame in outputs:
                try:
                    self.socks[out_iface].send(frame)
                except (BlockingIOError, InterruptedError):
                    self._count("tx_queue_full")
                    continue
                except OSError as exc:      # e.g. EMSGSIZE for an offloaded super-frame
                    self._count(f"tx_error_{exc.errno}")
                    continue
                if rx_ns and not is_host(iface):
                    elapsed = time.time_ns() - rx_ns
                    if is_host(out_iface):
                        self.wall_to_host.record(elapsed)
                    else:
                        self.wall.record(elapsed)
                        self.modelled.record(card.model_latency_ns())

    def _control_readable(self) -> None:
        for _ in range(BATCH):
            try:
                data = self.control_sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            replies = self.control.handle_frame(data)
            if not replies and self.control.last_error:
                log.debug("control frame dropped: %s", self.control.last_error)
                self.control.last_error = ""
            for reply in replies:
                try:
                    self.control_sock.send(reply)
                except OSError as exc:
                    self._count(f"control_tx_error_{exc.errno}")

    def snapshot(self) -> dict:
        card = self.card
        return {
            "code": card.code,
            "ports": {self.names[i]: {
                "rx_packets": p.rx_packets, "rx_bytes": p.rx_bytes, "tx_packets": p.tx_packets,
                "tx_bytes": p.tx_bytes, "drops": p.drops, "to_host_packets": p.to_host_packets,
                "mac": wire.mac_text(p.config.mac)} for i, p in enumerate(card.ports)},
            "tables": {"rules": len(card.rules), "forwarding": len(card.fwd), "groups": len(card.groups),
                       "rules_refused_full": card.rules.stats["refused_full"],
                       "forwarding_refused_full": card.fwd.stats["refused_full"]},
            "rules": {str(r.rule_id): {"packets": r.packets, "bytes": r.bytes, "action": r.action.name}
                      for r in card.rules},
            "card": dict(card.stats),
            "control": dict(self.control.stats),
            "adapter": dict(self.errors),
            "latency_us": {"wall_port_to_port": self.wall.summary(),
                           "wall_port_to_host": self.wall_to_host.summary(),
                           "modelled": self.modelled.summary()},
        }


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if len(names) != 2:
        raise argparse.ArgumentTypeError(f"expected two interface names, got {text!r}")
    return names


def _peer(text: str) -> tuple[str, str]:
    ns, sep, ifname = text.partition(":")
    if not sep or not ns or not ifname:
        raise argparse.ArgumentTypeError(f"expected NETNS:IFNAME, got {text!r}")
    return ns, ifname


def _macs(text: str) -> list[bytes]:
    try:
        return [wire.mac_bytes(part) for part in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "np4gs3-emu",
        "Emulate the IBM NP4GS3 card: two ports, a host-side virtual interface per port and a "
        "control interface speaking the guided-frame protocol, in its own network namespace.",
        examples=[
            "np4gs3-emu --name bbnpcard --create --box-netns bbbox --port0 bbclient:eth0 --port1 bbserver:eth0",
            "np4gs3-emu --name bblab_card            # attach: the namespace and p0,p1,h0,h1,cp exist",
            "np4gs3-emu --name bbnpcard --model-latency-us 15 --model-jitter-us 3 --stats-json card.json",
        ])
    parser.add_argument("--name", required=True, help="the card's network namespace")
    parser.add_argument("--create", action="store_true",
                        help="create the namespace and veth pairs (removed on exit); see docs/npdrv.md")
    parser.add_argument("--box-netns", help="with --create: the namespace that gets np0, np1 and npc")
    parser.add_argument("--port0", type=_peer, metavar="NETNS:IFNAME",
                        help="with --create: where the peer of external port 0 goes")
    parser.add_argument("--port1", type=_peer, metavar="NETNS:IFNAME",
                        help="with --create: where the peer of external port 1 goes")
    parser.add_argument("--ports", type=_names, default=list(netns.CARD_PORTS), metavar="IF0,IF1",
                        help="external port interfaces inside the card namespace")
    parser.add_argument("--host-ifaces", type=_names, default=list(netns.CARD_HOST_IFACES),
                        metavar="IF0,IF1", help="card ends of the host-side virtual interfaces")
    parser.add_argument("--control-iface", default=netns.CARD_CONTROL, help="card end of the control interface")
    parser.add_argument("--port-macs", type=_macs, metavar="MAC0,MAC1",
                        help="the ports' MACs (default: the host interfaces' MACs with --create, else "
                             "the card interfaces' own; the np engine sets them with PORT_CONFIG)")
    parser.add_argument("--code", default="forward", help="action set loaded at boot (forward|filter|booster)")
    parser.add_argument("--rule-limit", type=positive_int, default=4096, help="multi-field table size")
    parser.add_argument("--fwd-limit", type=positive_int, default=65536, help="LPM table size")
    parser.add_argument("--group-limit", type=positive_int, default=1024, help="multicast groups")
    parser.add_argument("--reply-cache", type=positive_int, default=256,
                        help="control replies kept to answer resent requests")
    parser.add_argument("--model-latency-us", type=non_negative_float, default=15.0,
                        help="modelled forwarding latency of the real card (mean)")
    parser.add_argument("--model-jitter-us", type=non_negative_float, default=3.0,
                        help="modelled latency spread (± bound)")
    parser.add_argument("--rcvbuf", type=positive_int, default=4 << 20, help="receive buffer per interface")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latency model")
    return parser


async def amain(args: argparse.Namespace, ctx: RunContext) -> int:
    from npdrv.card import ACTION_SETS

    if args.code not in ACTION_SETS:
        raise ConfigError(f"--code must be one of {', '.join(sorted(ACTION_SETS))}, got {args.code!r}")
    created = False
    port_macs = args.port_macs
    if args.create:
        if not args.box_netns or not args.port0 or not args.port1:
            raise ConfigError("--create needs --box-netns, --port0 and --port1")
        # In a worker thread: pyroute2's ethtool runs an event loop of its own.
        topo = await asyncio.to_thread(netns.create_card, args.name, args.box_netns, [args.port0, args.port1])
        created = True
        port_macs = port_macs or [wire.mac_bytes(mac) for mac in topo.host_macs]
    try:
        netns.enter(args.name)
        if port_macs is None:
            port_macs = [wire.mac_bytes(netns.link_mac(name)) for name in args.ports]
        if len(port_macs) != 2:
            raise ConfigError("--port-macs needs two MAC addresses")
        card = Card(CardConfig(ports=2, port_macs=tuple(port_macs), rule_limit=args.rule_limit,
                               fwd_limit=args.fwd_limit, group_limit=args.group_limit,
                               model_latency_us=args.model_latency_us, model_jitter_us=args.model_jitter_us,
                               seed=args.seed))
        card.code = args.code
        control = ControlPoint(card, wire.mac_bytes(netns.link_mac(args.control_iface)),
                               reply_cache=args.reply_cache)
        emu = Emulator(card, control, args.ports, args.host_ifaces, args.control_iface, args.rcvbuf)
        loop = asyncio.get_running_loop()
        emu.open(loop)
        ctx.stats.providers["emulator"] = emu.snapshot
        ctx.stats.providers["kernel_drops"] = emu.kernel_drops
        ready = {"ready": True, "netns": args.name, "ports": args.ports, "host_ifaces": args.host_ifaces,
                 "control": args.control_iface, "port_macs": [wire.mac_text(m) for m in port_macs]}
        if created:
            ready["box"] = {"netns": args.box_netns, "host_ifaces": list(netns.BOX_HOST_IFACES),
                            "control": netns.BOX_CONTROL}
        print(json.dumps(ready), flush=True)
        log.info("card %s up: ports %s, host interfaces %s, control %s", args.name, ",".join(args.ports),
                 ",".join(args.host_ifaces), args.control_iface)
        await ctx.stop.wait()
        drops = emu.kernel_drops()
        ctx.stats.providers["kernel_drops"] = lambda: drops
        emu.close(loop)
        summary = emu.snapshot()["latency_us"]
        log.info("forwarded %d frames: wall p50 %s us, modelled p50 %s us", summary["wall_port_to_port"]["count"],
                 summary["wall_port_to_port"]["p50_us"], summary["modelled"]["p50_us"])
    finally:
        if created:
            netns.destroy_card(args.name)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_async(build_parser(), amain, argv, config_errors=(EmulatorError, netns.NetnsError))


if __name__ == "__main__":
    sys.exit(main())
