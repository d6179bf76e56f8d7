"""``mmpog-reflector``: the multicast reflector for game locations (paper Fig. 10).

Two ways to run it, same protocol core (:class:`mmpog.reliability.ReflectorCore`):

* ``--mode booster`` (the main one): a boxcore booster in opaque mode.  It asks
  boxd to redirect a whole UDP port to it; where boxd hands the port's own socket
  over (``Subscription.delegated_socket``), the booster fans out with ``sendto``
  per member on it itself - no boxd hop on the hot path.  Otherwise, or with
  ``--fanout engine``, the fan-out is one ``send_multicast`` to a multicast group
  of the box's data path that holds the location's members.
* ``--mode standalone``: binds its own UDP socket (no boxd).

Membership is pushed by the game server over HTTP (``--http``)::

    PUT    /locations/{loc}/members/{player}   {"token": "<hex>"}   add / replace token
    DELETE /locations/{loc}/members/{player}
    GET    /stats                                                   global + per-location counters
    GET    /health                                                  (no key needed)

With ``--api-key`` (or ``$MMPOG_API_KEY``) every request must carry
``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import socket
import time
from typing import Any, Callable

from aiohttp import web

from cliruntime import ConfigError, RunContext, host_port, make_parser, non_negative_float, positive_int, run_async
from cliruntime.supervisor import Supervisor, TaskFailed, first_of

from . import fastsend, wire
from .gcwatch import GcWatch
from .reliability import Address, BufferFull, MembersChanged, ReflectorConfig, ReflectorCore, copy_rounds

log = logging.getLogger("mmpog.reflector")

MAX_READS_PER_WAKEUP = 512
SOCKET_BUFFER = 4 * 1024 * 1024


class ReflectorService:
    """Glue between the sans-IO core and some datagram I/O: a hot path, a tick, and the control API."""

    def __init__(self, core: ReflectorCore, api_key: str | None = None, use_sendmmsg: bool = True) -> None:
        self.core = core
        self.use_sendmmsg = use_sendmmsg
        # packing (ReflectorConfig.pack/pack_budget/mtu): what one pass of the event loop fans out to a
        # location goes out as few datagrams (BUNDLE, at most `mtu` bytes); a `pack_budget` > 0 holds
        # datagrams up to that long for more company
        self.pack = core.config.pack
        self.pack_budget = core.config.pack_budget
        self.mtu = core.config.mtu
        self._flush_handle: asyncio.Handle | None = None
        self.api_key = api_key
        self.send_to: Callable[[bytes, Address], None] = lambda data, addr: None
        self.fanout: Callable[[int, bytes], None] = self.fanout_direct
        self.on_members: Callable[[MembersChanged], None] | None = None
        self.counters = {"datagrams_in": 0, "datagrams_out": 0, "send_dropped": 0, "send_errors": 0,
                         "control_requests": 0, "control_refused": 0, "updates_out": 0, "bundles_out": 0,
                         "redundant_copies_out": 0}
        self._copies_counted = 0     # core.copies_queued already taken out of updates_out
        self.started = time.monotonic()
        self.gc_watch: GcWatch | None = None     # the process's collections (mmpog-reflector sets it)
        self.instance = secrets.token_hex(8)     # /health says it: the game server notices a restart
        self.transport: dict[str, str] = {"mode": "memory"}
        self.fanout_kind = "direct"

    # ------------------------------------------------------------------ data path

    def receive(self, data: bytes, addr: Address) -> None:
        """One datagram into the core; what it makes is sent by :meth:`flush` (or :meth:`reads_done`)."""
        self.counters["datagrams_in"] += 1
        self.core.receive_datagram(data, addr, time.monotonic())

    def on_datagram(self, data: bytes, addr: Address) -> None:
        """A datagram handed over on its own (booster mode: one packet per callback)."""
        self.receive(data, addr)
        if not self.pack:
            self.flush()
        elif self._flush_handle is None:
            # answer once this pass of the loop has read what is there: one pack per location
            loop = asyncio.get_running_loop()
            if self.pack_budget > 0:
                self._flush_handle = loop.call_later(self.pack_budget, self.flush)
            else:
                self._flush_handle = loop.call_soon(self.flush)

    def reads_done(self) -> None:
        """The socket reader has read everything that waited (up to its limit): send at once what that
        made, packed - what queued while the reflector was busy shares datagrams, a lone update on an
        idle path leaves with no delay (not even one more pass of the event loop)."""
        if self.pack_budget > 0 and self.pack:
            if self._flush_handle is None:
                self._flush_handle = asyncio.get_running_loop().call_later(self.pack_budget, self.flush)
        else:
            self.flush()

    def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        core = self.core
        out = core.datagrams_to_send(0.0)
        if out:
            send_to, fanout, counters = self.send_to, self.fanout, self.counters
            copies = core.copies_queued - self._copies_counted
            if copies:
                # redundant copies (unicast DATA) are what the wire carries, not updates relayed
                self._copies_counted = core.copies_queued
                counters["redundant_copies_out"] += copies
                counters["updates_out"] -= copies
            if not self.pack:
                for data, dest in out:
                    is_update = data[1] == wire.Kind.DATA
                    if dest.__class__ is int:
                        counters["updates_out"] += is_update and len(core.members(dest))
                        fanout(dest, data)
                    else:
                        counters["updates_out"] += is_update
                        send_to(data, dest)
            else:
                groups: dict = {}          # location id, or (address, location): datagrams in order
                for data, dest in out:
                    key = dest if dest.__class__ is int else (dest, data[wire.LOCATION_OFFSET:wire.LOCATION_OFFSET + 4])
                    items = groups.get(key)
                    if items is None:
                        groups[key] = [data]
                    else:
                        items.append(data)
                mtu = self.mtu
                data_kind = wire.Kind.DATA
                for key, items in groups.items():
                    if key.__class__ is int:
                        packed = wire.pack(items, mtu)
                        counters["bundles_out"] += len(items) > 1 and len(packed)
                        # updates relayed: game data only (heartbeats are the protocol's own), echo included
                        updates = sum(1 for d in items if d[1] == data_kind)
                        counters["updates_out"] += updates * len(core.members(key))
                        for data in packed:
                            fanout(key, data)
                    else:
                        counters["updates_out"] += sum(1 for d in items if d[1] == data_kind)
                        # copies of one update to a member never share a datagram (lost together, they
                        # would be no copies): each round is packed on its own
                        for group in copy_rounds(items):
                            packed = wire.pack(group, mtu)
                            counters["bundles_out"] += len(group) > 1 and len(packed)
                            for data in packed:
                                send_to(data, key[0])
        if self.on_members is not None:
            while (event := core.next_event()) is not None:
                self.on_members(event)
        else:
            while core.next_event() is not None:
                pass

    def fanout_direct(self, location: int, data: bytes) -> None:
        send_to = self.send_to
        for addr in self.core.members(location):
            send_to(data, addr)

    def tick(self) -> None:
        self.core.handle_timer(time.monotonic())
        self.flush()

    def use_socket(self, sock: socket.socket) -> None:
        """Send unicasts and fan-outs on ``sock``: a fan-out is one sendmmsg (or a tight sendto loop)."""
        self.send_to = self.socket_sender(sock)
        sendto = sock.sendto
        members = self.core.members
        counters = self.counters

        def fanout(location: int, data: bytes) -> None:
            sent = 0
            for addr in members(location):
                try:
                    sendto(data, addr)
                    sent += 1
                except BlockingIOError:
                    counters["send_dropped"] += 1
                except OSError:
                    counters["send_errors"] += 1
            counters["datagrams_out"] += sent

        self.fanout = fanout
        self.fanout_kind = "direct sendto"
        if self.use_sendmmsg and fastsend.available() and sock.family == socket.AF_INET:
            fan = fastsend.FanoutSender(sock, max_cached=self.core.config.max_locations)

            def fanout_mmsg(location: int, data: bytes) -> None:
                # one syscall for the whole location (members() is a cached tuple, the batch key)
                sent, dropped = fan.send(data, members(location), location)
                counters["datagrams_out"] += sent
                if dropped:
                    counters["send_dropped"] += dropped

            self.fanout = fanout_mmsg
            self.fanout_kind = "direct sendmmsg"

    def socket_sender(self, sock: socket.socket) -> Callable[[bytes, Address], None]:
        sendto = sock.sendto
        counters = self.counters

        def send_to(data: bytes, addr: Address) -> None:
            try:
                sendto(data, addr)
            except BlockingIOError:
                counters["send_dropped"] += 1      # the socket buffer is full: UDP semantics, drop
                return
            except OSError:
                counters["send_errors"] += 1
                return
            counters["datagrams_out"] += 1

        return send_to

    def snapshot(self) -> dict[str, Any]:
        out = self.core.snapshot()
        out["io"] = dict(self.counters)
        out["transport"] = dict(self.transport)
        out["uptime"] = round(time.monotonic() - self.started, 3)
        if self.gc_watch is not None:
            out["gc"] = self.gc_watch.snapshot()
        return out

    # ------------------------------------------------------------------ control plane (HTTP)

    def control_app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=64 * 1024)
        app.router.add_put("/locations/{location}/members/{player}", self._put_member)
        app.router.add_delete("/locations/{location}/members/{player}", self._delete_member)
        app.router.add_get("/stats", self._get_stats)
        app.router.add_get("/health", self._get_health)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        self.counters["control_requests"] += 1
        if self.api_key and request.path != "/health" and not self._key_matches(request):
            self.counters["control_refused"] += 1
            return web.json_response({"error": "missing or wrong API key"}, status=401)
        return await handler(request)

    def _key_matches(self, request: web.Request) -> bool:
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        return hmac.compare_digest(given, f"Bearer {self.api_key}".encode())   # constant time

    @staticmethod
    def _ids(request: web.Request) -> tuple[int, int]:
        try:
            location = int(request.match_info["location"])
            player = int(request.match_info["player"])
        except ValueError:
            raise web.HTTPBadRequest(text="location and player must be integers") from None
        if not 0 <= location <= 0xFFFFFFFF or not 0 < player <= 0xFFFFFFFF:
            raise web.HTTPBadRequest(text="location or player out of range")
        return location, player

    async def _put_member(self, request: web.Request) -> web.Response:
        location, player = self._ids(request)
        try:
            body = await request.json()
            token = bytes.fromhex(body["token"])
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": 'body must be {"token": "<hex>"}'}, status=400)
        try:
            self.core.add_member(location, player, token, time.monotonic())
        except BufferFull as exc:
            return web.json_response({"error": str(exc)}, status=503)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.flush()
        return web.json_response({"location": location, "player": player})

    async def _delete_member(self, request: web.Request) -> web.Response:
        location, player = self._ids(request)
        removed = self.core.remove_member(location, player)
        self.flush()
        return web.json_response({"removed": removed}, status=200 if removed else 404)

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    async def _get_health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "instance": self.instance, "locations": len(self.core.locations())})


# ====================================================================== I/O modes

def open_udp_socket(listen: Address) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    try:
        sock.bind(listen)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind UDP {listen[0]}:{listen[1]}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def attach_reader(loop: asyncio.AbstractEventLoop, sock: socket.socket, service: ReflectorService) -> None:
    recvfrom = sock.recvfrom
    receive = service.receive

    def on_readable() -> None:
        for _ in range(MAX_READS_PER_WAKEUP):
            try:
                data, addr = recvfrom(65535)
            except OSError:                      # BlockingIOError: all read
                break
            receive(data, addr[:2])
        service.reads_done()

    loop.add_reader(sock.fileno(), on_readable)


async def run_standalone(service: ReflectorService, listen: Address, stop: asyncio.Event, tick: float,
                         ready: Callable[[Address], None] | None = None) -> None:
    loop = asyncio.get_running_loop()
    sock = open_udp_socket(listen)
    service.use_socket(sock)
    service.transport = {"mode": "standalone", "delivery": "own socket", "fanout": service.fanout_kind}
    attach_reader(loop, sock, service)
    log.info("reflector listening on udp %s:%d (standalone)", *sock.getsockname()[:2])
    if ready is not None:
        ready(sock.getsockname()[:2])
    try:
        async with Supervisor("mmpog-reflector", logger=log) as tasks:
            tasks.spawn(run_timers(service, tick), name="timers")
            failed = await first_of(stop.wait(), tasks.wait_failed())
            if isinstance(failed, TaskFailed):
                raise failed
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()


async def run_timers(service: ReflectorService, tick: float) -> None:
    """Run the core's timers when they are due (tail-loss probes come ~1 RTO after the last packet,
    a few ms on a LAN), and at least every ``tick`` (a location bound since the last wake-up)."""
    core = service.core
    while True:
        due = core.get_timer()
        await asyncio.sleep(tick if due is None else min(tick, max(0.0, due - time.monotonic())))
        service.tick()


async def run_booster(service: ReflectorService, args: argparse.Namespace, stop: asyncio.Event) -> int:
    """The reflector as a booster until ``stop`` (or boxd goes away); returns the exit status."""
    import contextlib

    from boxcore import booster as boosterlib
    from boxcore.booster import BoosterError
    from boxcore.packet import Packet
    from boxcore.rules import Match

    port = args.port
    box_addr = {"addr": args.box_address}

    def on_packet(pkt: Packet) -> None:
        box_addr["addr"] = pkt.dst
        service.on_datagram(pkt.payload, (pkt.src, pkt.sport))
        return None   # CONSUME: the reflector is the packet's end point

    @contextlib.asynccontextmanager
    async def serve(booster):
        sub = await booster.redirect(Match(proto="udp", dst=args.dst, dst_port=port), on_packet)
        direct_socket = sub.delegated_socket
        if direct_socket is not None:
            service.use_socket(direct_socket)
        else:
            def send_via_box(data: bytes, addr: Address) -> None:
                if booster.send(Packet(17, box_addr["addr"], port, addr[0], addr[1], data)):
                    service.counters["datagrams_out"] += 1
                else:
                    service.counters["send_dropped"] += 1
            service.send_to = send_via_box

        use_engine = args.fanout == "engine" or (args.fanout == "auto" and direct_socket is None)
        if use_engine:
            groups: asyncio.Queue[MembersChanged] = asyncio.Queue()

            def fanout_engine(location: int, data: bytes) -> None:
                if booster.send_multicast(args.group_base + location, data, src_port=args.src_port or port):
                    service.counters["datagrams_out"] += len(service.core.members(location))
                else:
                    service.counters["send_dropped"] += 1

            async def group_updater() -> None:
                # FIFO, one at a time: the engine's group always ends as the latest membership
                while True:
                    event = await groups.get()
                    try:
                        await booster.set_multicast_group(args.group_base + event.location, list(event.addresses))
                    except BoosterError as exc:
                        log.warning("engine refused multicast group for location %d: %s", event.location, exc)

            service.fanout = fanout_engine
            service.on_members = groups.put_nowait
            booster.spawn(group_updater(), name="multicast groups")
        service.transport = {"mode": "booster", "engine": str(booster.engine), "delivery": sub.delivery.kind,
                             "fanout": "engine multicast" if use_engine else service.fanout_kind}
        booster.spawn(run_timers(service, args.tick), name="timers")
        from boxcore.panels import publish_panel_every
        from .panel import ReflectorPanel
        publish_panel_every(booster, ReflectorPanel(service).build)
        log.info("reflector booster on udp port %d (delivery %s, fan-out %s)", port, sub.delivery.kind,
                 service.transport["fanout"])
        yield

    return await boosterlib.run_booster("mmpog-reflector", serve, control=args.control, stop=stop)


# ====================================================================== CLI

def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "mmpog-reflector",
        "Multicast reflector for game locations: echo-as-ACK, sequence numbers, retransmission buffer, heartbeats.",
        examples=[
            "boxd --engine user --control /tmp/boxd.sock --state /tmp/st --listen udp:127.0.0.1:7400=127.0.0.1:7409 &",
            "mmpog-reflector --mode booster --control /tmp/boxd.sock --port 7409 --src-port 7400 --http 127.0.0.1:7401",
            "mmpog-reflector --mode standalone --listen 127.0.0.1:7400 --http 127.0.0.1:7401",
        ],
    )
    parser.add_argument("--mode", choices=["booster", "standalone"], default="booster")
    parser.add_argument("--control", metavar="PATH", default=os.environ.get("BOXD_CONTROL", "/run/boxd/control.sock"),
                        help="boxd's control socket (booster mode)")
    parser.add_argument("--port", type=positive_int, default=7400,
                        help="booster mode: redirect UDP packets headed for this port (with a box in opaque mode, "
                             "the relay destination port of boxd's --listen udp:BOX:PORT=DST:DPORT, i.e. DPORT)")
    parser.add_argument("--dst", default=None, help="booster mode: ... and for this destination address (DST)")
    parser.add_argument("--src-port", type=int, default=0,
                        help="booster mode: the box's listening port, the source of engine multicasts (default --port)")
    parser.add_argument("--box-address", default="0.0.0.0", help="source address for packets sent through boxd")
    parser.add_argument("--fanout", choices=["auto", "direct", "engine"], default="auto",
                        help="auto: direct sendto on a delegated socket, else the engine's multicast")
    parser.add_argument("--no-sendmmsg", action="store_true",
                        help="direct fan-out with one sendto per member instead of one sendmmsg per location")
    parser.add_argument("--group-base", type=int, default=70000, help="engine multicast group = base + location")
    parser.add_argument("--no-pack", action="store_true",
                        help="one datagram per update and member (default: what one loop pass sends to a location "
                             "goes out packed in as few datagrams as the MTU allows)")
    parser.add_argument("--pack-budget", type=non_negative_float, default=0.0,
                        help="hold outgoing updates up to this long (s) to pack more per datagram (0: one loop pass)")
    parser.add_argument("--no-redundancy", action="store_true",
                        help="never send a member redundant copies of reliable updates (default: while the loss its "
                             "NACKs and LOSS reports show is above 2.5%%, each reliable update goes to it 2-3 times)")
    parser.add_argument("--loss-prior", type=float, default=ReflectorConfig().loss_prior,
                        help="the loss a new member's downlink is taken to have until its NACKs and LOSS reports "
                             "show otherwise (default 0.10: copies from the first update; 0.01: a clean-path start)")
    parser.add_argument("--redundancy-spacing", type=non_negative_float, default=0.0,
                        help="send copy i of a reliable update i x this long (s) after the original (0: at once)")
    parser.add_argument("--mtu", type=positive_int, default=wire.MAX_DATAGRAM,
                        help="largest packed datagram (UDP payload bytes) the path carries")
    parser.add_argument("--listen", type=host_port, default=("127.0.0.1", 7400), help="UDP address (standalone mode)")
    parser.add_argument("--http", type=host_port, default=("127.0.0.1", 7401), help="control API address")
    parser.add_argument("--api-key", default=os.environ.get("MMPOG_API_KEY"),
                        help="the bearer key the control API requires (or $MMPOG_API_KEY); needed unless --no-api-key")
    parser.add_argument("--no-api-key", action="store_true",
                        help="leave the control API open (anyone who reaches --http can add members): tests only")
    parser.add_argument("--buffer-packets", type=positive_int, default=1024, help="retransmission buffer per location (packets)")
    parser.add_argument("--buffer-age", type=non_negative_float, default=2.0, help="retransmission buffer age limit (s)")
    parser.add_argument("--heartbeat-min", type=non_negative_float, default=0.002)
    parser.add_argument("--heartbeat-max", type=non_negative_float, default=1.0)
    parser.add_argument("--heartbeat-factor", type=non_negative_float, default=1.0,
                        help="heartbeat interval = factor x the members' smallest RTO (then doubling while idle)")
    parser.add_argument("--probe-skip-target", type=non_negative_float, default=0.0001,
                        help="skip a heartbeat when the chance that it tells any member of a seq it missed is "
                             "below this (from the members' measured loss); 0: send every one")
    parser.add_argument("--nack-rate", type=non_negative_float, default=200.0, help="retransmissions/s per member")
    parser.add_argument("--nack-burst", type=int, default=64)
    parser.add_argument("--nack-burst-bytes", type=int, default=16 * 1024,
                        help="bytes of retransmissions one member may get in a burst")
    parser.add_argument("--nack-bytes-rate", type=non_negative_float, default=256 * 1024,
                        help="retransmitted bytes/s per member")
    parser.add_argument("--max-locations", type=positive_int, default=4096)
    parser.add_argument("--max-members", type=positive_int, default=256, help="members per location")
    parser.add_argument("--tick", type=non_negative_float, default=0.005,
                        help="longest sleep between timer checks (s); due timers wake the loop on time")
    return parser


def config_from_args(args: argparse.Namespace) -> ReflectorConfig:
    config = ReflectorConfig(
        buffer_packets=args.buffer_packets, buffer_age=args.buffer_age, heartbeat_min=args.heartbeat_min,
        heartbeat_max=args.heartbeat_max, heartbeat_factor=args.heartbeat_factor,
        probe_skip_target=args.probe_skip_target, nack_rate=args.nack_rate, nack_burst=args.nack_burst,
        nack_burst_bytes=args.nack_burst_bytes, nack_bytes_rate=args.nack_bytes_rate,
        pack=not args.no_pack, pack_budget=args.pack_budget, mtu=args.mtu,
        redundancy=not args.no_redundancy, redundancy_spacing=args.redundancy_spacing, loss_prior=args.loss_prior,
        max_locations=args.max_locations, max_members=args.max_members,
    )
    try:
        config.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.tick <= 0:
        raise ConfigError("--tick must be positive")
    if not args.api_key and not args.no_api_key:
        raise ConfigError("the control API needs a key: --api-key KEY or $MMPOG_API_KEY (--no-api-key leaves it open)")
    if args.no_api_key:
        args.api_key = None
    return config


async def amain(args: argparse.Namespace, ctx: RunContext) -> int:
    service = ReflectorService(ReflectorCore(config_from_args(args)), api_key=args.api_key,
                               use_sendmmsg=not args.no_sendmmsg)
    ctx.stats.providers["reflector"] = service.snapshot
    service.gc_watch = GcWatch().start()
    runner = web.AppRunner(service.control_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.http[0], args.http[1])
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on http {args.http[0]}:{args.http[1]}: {exc.strerror}") from None
    log.info("control API on http://%s:%d", *args.http)
    try:
        if args.mode == "standalone":
            await run_standalone(service, args.listen, ctx.stop, args.tick)
        else:
            return await run_booster(service, args, ctx.stop)
    finally:
        await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_async(build_parser(), amain, argv)


if __name__ == "__main__":
    raise SystemExit(main())
