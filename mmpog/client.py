"""The asyncio adapter over the reliability protocol, and the ``mmpog-client`` console script.

::

    async with aiohttp.ClientSession() as http:
        client = GameClient("http://127.0.0.1:7500", "alice", "secret", http=http, on_event=print)
        await client.start()                  # UDP socket
        await client.register()               # once (409 if the name exists is fine)
        await client.login()
        await client.move(150.0, 20.0)        # joins the location at its reflector (waits for WELCOME)
        client.send(b"pos 150 20", reliable=False)
        client.send(b"picked up sword", reliable=True, deadline=0.5)
        ...
        await client.close()

Events reach ``on_event`` (a plain callable) as they happen: ``Received``,
``Delivered``, ``Expired``, ``Unrecoverable``, ``Joined``, ``JoinFailed``
(see :mod:`mmpog.reliability`).  Time is ``time.monotonic()``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import sys
import time
from typing import Any, Callable, Iterable

import aiohttp

from cliruntime import RunContext, make_parser, non_negative_float, positive_int, run_async
from cliruntime.supervisor import within

from . import wire
from .reliability import Address, ClientConfig, ClientEndpoint, Event, Joined, JoinFailed, Received, copy_rounds

log = logging.getLogger("mmpog.client")

_JOIN_OUTCOMES = frozenset((Joined, JoinFailed))   # the events a join() waits for (final classes: type() is exact)
_NEVER = float("inf")
LOCATION_SLICE = slice(wire.LOCATION_OFFSET, wire.LOCATION_OFFSET + 4)   # routing before a full decode


class GameClientError(Exception):
    pass


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, client: "GameClient") -> None:
        self.client = client

    def datagram_received(self, data: bytes, addr) -> None:
        self.client._on_datagram(data)

    def error_received(self, exc: Exception) -> None:
        self.client.io_errors += 1


class GameClient:
    def __init__(self, server: str, name: str, password: str, *, http: aiohttp.ClientSession | None = None,
                 config: ClientConfig | None = None, on_event: Callable[[Event], None] | None = None,
                 reflector_map: Callable[[Address], Address] | None = None, local: Address = ("127.0.0.1", 0),
                 rng: random.Random | None = None, join_timeout: float = 5.0) -> None:
        self.server = server.rstrip("/")
        self.name = name
        self.password = password
        self.config = config or ClientConfig()
        self.on_event = on_event or (lambda event: None)
        self.reflector_map = reflector_map or (lambda addr: addr)
        self.local = local
        self.rng = rng or random.Random()
        self.join_timeout = join_timeout
        self._http = http
        self._own_http = http is None
        self.player: int | None = None
        self.session: str | None = None
        self.location: int | None = None
        self.endpoint: ClientEndpoint | None = None
        self._endpoints: dict[int, tuple[ClientEndpoint, Address]] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._join_waiters: dict[int, asyncio.Future] = {}
        self.io_errors = 0
        self.foreign = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._transport = await self.open_transport(self._loop)

    async def open_transport(self, loop: asyncio.AbstractEventLoop) -> Any:
        """The datagram transport the client sends through (``sendto``, ``get_extra_info``,
        ``close``) and whose arrivals it is given by :meth:`receive_datagrams`.  A subclass may bring
        its own receive path (``mmpog.bots`` reads batches with the kernel's arrival times)."""
        transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), local_addr=self.local)
        return transport

    async def close(self) -> None:
        now = self._now()
        for endpoint, _ in list(self._endpoints.values()):
            endpoint.close(now)
        self._service()
        if self.session is not None:
            with contextlib.suppress(aiohttp.ClientError, GameClientError, asyncio.TimeoutError):
                await self._post("/leave", {})
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self._transport.close()
        if self._own_http and self._http is not None:
            await self._http.close()

    @property
    def local_address(self) -> Address:
        assert self._transport is not None
        return self._transport.get_extra_info("sockname")[:2]

    # ------------------------------------------------------------------ control plane

    async def _post(self, path: str, body: dict, ok: tuple[int, ...] = (200, 201)) -> tuple[int, dict]:
        assert self._http is not None, "call start() first"
        headers = {"Authorization": f"Bearer {self.session}"} if self.session else {}
        async with self._http.post(self.server + path, json=body, headers=headers) as resp:
            if resp.status not in ok:
                raise GameClientError(f"{path}: {resp.status} {(await resp.text())[:200]}")
            return resp.status, await resp.json() if resp.content_type == "application/json" else {}

    async def register(self) -> bool:
        """Register the name; False if it already exists."""
        status, body = await self._post("/register", {"name": self.name, "password": self.password}, ok=(201, 409))
        return status == 201

    async def login(self) -> int:
        _, body = await self._post("/login", {"name": self.name, "password": self.password})
        self.player, self.session = int(body["player"]), body["session"]
        return self.player

    async def move(self, x: float, y: float, rejoin: bool = False) -> int:
        """Tell the server where we are; on a location change, join the new location and leave the old.

        ``rejoin``: ask for a fresh token and join again even if the location did not change (after our
        address changed, or the reflector restarted: a token is bound to the address that first used it).
        """
        _, body = await self._post("/move", {"x": x, "y": y, "rejoin": rejoin} if rejoin else {"x": x, "y": y})
        location = int(body["location"])
        if location == self.location and self.endpoint is not None and not body.get("changed"):
            return location
        host, _, port = body["reflector"].rpartition(":")
        reflector = self.reflector_map((host, int(port)))
        token = bytes.fromhex(body["token"])
        await self.join(location, token, reflector)
        return location

    async def leave(self) -> None:
        """Leave the current location (the server removes the membership; we say BYE)."""
        await self._post("/leave", {})
        if self.endpoint is not None:
            self.endpoint.close(self._now())
            self._service()
            self._endpoints.pop(self.endpoint.location, None)
        self.endpoint = self.location = None

    async def join(self, location: int, token: bytes, reflector: Address) -> None:
        """Join ``location`` at ``reflector`` with ``token`` (the server's /move does this for you)."""
        assert self.player is not None and self._loop is not None
        now = self._now()
        old = self.endpoint
        same_path = old is not None and self._endpoints.get(old.location, (None, None))[1] == reflector
        endpoint = ClientEndpoint(self.player, location, token, self.config, rng=self.rng,
                                  rtt=old.rtt if same_path else None)
        self._endpoints[location] = (endpoint, reflector)
        waiter = self._loop.create_future()
        self._join_waiters[location] = waiter
        endpoint.connect(now)
        self._service()
        try:
            joined = await within(waiter, self.join_timeout)
        finally:
            self._join_waiters.pop(location, None)
        if not joined:
            self._endpoints.pop(location, None)
            raise GameClientError(f"reflector {reflector[0]}:{reflector[1]} did not welcome us into location {location}")
        self.endpoint, self.location = endpoint, location
        if old is not None and old is not endpoint and old.location != location:
            old.close(self._now())      # BYE; the server already removed us from the old location
            self._service()             # sends the BYE, hands out the Expired events of its pending packets
            self._endpoints.pop(old.location, None)
        # (re-joining the same location with a new token: the new endpoint replaced the old one, and a
        # BYE from this address would unbind the new membership)

    # ------------------------------------------------------------------ data plane

    def send(self, payload: bytes, reliable: bool = False, deadline: float | None = None) -> int:
        if self.endpoint is None:
            raise GameClientError("not in a location: move() first")
        packet_id = self.endpoint.send(payload, self._now(), reliable=reliable, deadline=deadline)
        self._service()
        return packet_id

    @staticmethod
    def _now() -> float:
        # not loop.time(): uvloop's clock has millisecond resolution, too coarse for loopback RTTs
        return time.monotonic()

    def receive_datagrams(self, datagrams: Iterable[tuple[bytes, float]]) -> None:
        """Hand each ``(datagram, arrival time)`` to its location's endpoint, in order, then send what
        is queued, hand out events and arm the timer once for the whole batch.  Consecutive datagrams
        of one location reach their endpoint as one batch (:meth:`ClientEndpoint.receive_datagrams`)."""
        endpoints = self._endpoints
        header_size = wire.HEADER_SIZE
        run: list[tuple[bytes, float]] = []
        run_location = -1
        run_endpoint = None
        for pair in datagrams:
            data = pair[0]
            if len(data) < header_size:
                self.foreign += 1
                continue
            location = int.from_bytes(data[LOCATION_SLICE], "big")
            if location != run_location:
                entry = endpoints.get(location)
                if entry is None:
                    self.foreign += 1
                    continue
                if run:
                    run_endpoint.receive_datagrams(run)
                    run = []
                run_location, run_endpoint = location, entry[0]
            run.append(pair)
        if run:
            run_endpoint.receive_datagrams(run)
        self._service()

    def _on_datagram(self, data: bytes) -> None:
        self.receive_datagrams(((data, self._now()),))

    def _flush(self) -> None:
        transport = self._transport
        if transport is None:
            return
        for endpoint, reflector in self._endpoints.values():
            if endpoint.has_datagrams:
                # what the game queued in one go (several updates, NACKs) leaves packed up to the MTU;
                # redundant copies of an update each in a datagram of their own
                for group in copy_rounds(endpoint.datagrams_to_send(0.0)):
                    for data in wire.pack(group):
                        transport.sendto(data, reflector)

    def _service(self) -> None:
        """Send what is queued, hand out events, and arm the timer for the earliest deadline."""
        self._flush()
        on_event = self.on_event
        earliest = _NEVER
        for endpoint, _ in self._endpoints.values():
            events = endpoint.events
            while events:
                event = events.popleft()      # popped one at a time: on_event may send, which services again
                if type(event) in _JOIN_OUTCOMES:
                    waiter = self._join_waiters.get(event.location)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(type(event) is Joined)
                on_event(event)
            timer = endpoint.get_timer()
            if timer is not None and timer < earliest:
                earliest = timer
        # re-armed only for an earlier deadline: a later one finds the armed timer early, and it re-arms
        if earliest < self._timer_at - 1e-4 or (self._timer is None and earliest != _NEVER):
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = earliest
            self._timer = self._loop.call_later(max(0.0, earliest - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        now = self._now()
        for endpoint, _ in list(self._endpoints.values()):
            timer = endpoint.get_timer()
            if timer is not None and timer <= now:
                endpoint.handle_timer(now)
        self._service()

    def snapshot(self) -> dict:
        out = self.endpoint.snapshot() if self.endpoint is not None else {}
        out.update(io_errors=self.io_errors, foreign=self.foreign, location=self.location)
        return out


# ====================================================================== CLI

def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "mmpog-client",
        "A game client: log in, move to a position, send updates, print what arrives as JSON lines.",
        examples=[
            "mmpog-client --server http://127.0.0.1:7500 --name alice --password 'correct horse' --register "
            "--position 150,20 --send hello --count 10 --interval 0.1 --reliable --duration 3",
        ],
    )
    parser.add_argument("--server", required=True, help="game server base URL")
    parser.add_argument("--name", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--register", action="store_true", help="register the name first (an existing name is fine)")
    parser.add_argument("--position", type=_position, default=(0.0, 0.0), help="X,Y in world units")
    parser.add_argument("--send", default=None, help="payload text to send")
    parser.add_argument("--count", type=positive_int, default=1)
    parser.add_argument("--interval", type=non_negative_float, default=0.1)
    parser.add_argument("--reliable", action="store_true")
    parser.add_argument("--deadline", type=non_negative_float, default=1.0, help="retry bound for reliable packets (s)")
    parser.add_argument("--duration", type=non_negative_float, default=2.0, help="stay this long, printing events")
    return parser


def _event_json(event: Event) -> str:
    fields = {name: getattr(event, name) for name in event.__slots__}
    if isinstance(event, Received):
        fields["payload"] = event.payload.decode("utf-8", "replace")
    return json.dumps({"event": type(event).__name__, **fields})


def _position(text: str) -> tuple[float, float]:
    """argparse type for ``X,Y``."""
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y, got {text!r}") from None
    return x, y


async def amain(args: argparse.Namespace, ctx: RunContext) -> int:
    x, y = args.position

    def on_event(event: Event) -> None:
        ctx.stats[f"event_{type(event).__name__}"] += 1
        print(_event_json(event), flush=True)

    client = GameClient(args.server, args.name, args.password, on_event=on_event)
    ctx.stats.providers["client"] = client.snapshot
    await client.start()
    try:
        if args.register:
            await client.register()
        await client.login()
        location = await client.move(x, y)
        log.info("player %d joined location %d", client.player, location)
        if args.send is not None:
            for index in range(args.count):
                client.send(args.send.encode(), reliable=args.reliable, deadline=args.deadline)
                if index + 1 < args.count:
                    await asyncio.sleep(args.interval)
        with contextlib.suppress(asyncio.TimeoutError):
            await within(ctx.stop.wait(), args.duration)
    except (GameClientError, aiohttp.ClientError) as exc:
        print(f"mmpog-client: error: {exc}", file=sys.stderr)
        return 1
    finally:
        await client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_async(build_parser(), amain, argv)


if __name__ == "__main__":
    raise SystemExit(main())
