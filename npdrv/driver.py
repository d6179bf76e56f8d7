"""The NP driver: an asyncio client of the card's control point.

A thin adapter around the sans-IO :class:`npdrv.channel.ControlChannel`: it
owns an AF_PACKET socket on the control interface (or any transport with
``send(frame)`` that calls back ``on_frame(frame)``), drives the channel's
timer on the event loop, and turns outcomes into return values or
:class:`NpError` naming the command that failed.

    async with NpDriver("npc") as np:
        await np.echo(b"hello")
        await np.fwd_add("10.2.0.0/24", port=1, next_hop="02:00:00:00:00:02")
        await np.execute([wire.request(rule) for rule in rules])    # batched into frames
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable, Iterable, Protocol

from npdrv import wire
from npdrv.channel import Completed, ControlChannel, Failed, Result
from npdrv.wire import Cmd, Command, Scope, Status, Table

log = logging.getLogger("npdrv.driver")


class NpError(Exception):
    """A command the card refused (or never answered): ``status`` and ``command`` say which."""

    def __init__(self, command: Cmd | None, status: Status | None, reason: str) -> None:
        name = command.name if command is not None else "request"
        super().__init__(f"{name} failed: {status.name if status is not None else 'TIMEOUT'}: {reason}")
        self.command = command
        self.status = status
        self.reason = reason


class NpTimeout(NpError):
    def __init__(self, command: Cmd | None, reason: str) -> None:
        super().__init__(command, None, reason)


class Transport(Protocol):
    mac: bytes

    def send(self, frame: bytes) -> None: ...
    def close(self) -> None: ...


class PacketTransport:
    """An AF_PACKET socket on ``iface`` that hears only guided frames."""

    def __init__(self, iface: str, on_frame: Callable[[bytes], None],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.iface = iface
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(wire.ETHERTYPE))
        try:
            self._sock.bind((iface, wire.ETHERTYPE))
        except OSError as exc:
            self._sock.close()
            raise OSError(exc.errno, f"cannot bind AF_PACKET to control interface {iface!r}: "
                          f"{exc.strerror}") from None
        self._sock.setblocking(False)
        self.mac = self._sock.getsockname()[4]
        self._on_frame = on_frame
        self._loop = loop
        loop.add_reader(self._sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(256):
            try:
                data = self._sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("control interface %s: %s", self.iface, exc)
                return
            self._on_frame(data)

    def send(self, frame: bytes) -> None:
        try:
            self._sock.send(frame)
        except (BlockingIOError, InterruptedError):
            log.warning("control interface %s: send buffer full, frame dropped (will retry)", self.iface)

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


class NpDriver:
    """Requests to the card's control point: batching, correlators, timeouts, retries."""

    def __init__(self, iface: str | None = None, *, timeout: float = 0.5, retries: int = 3,
                 max_pending: int = 32, card_mac: str | bytes = wire.BROADCAST,
                 transport_factory: Callable[[Callable[[bytes], None], asyncio.AbstractEventLoop],
                                             Transport] | None = None) -> None:
        if iface is None and transport_factory is None:
            raise ValueError("give a control interface or a transport")
        self.iface = iface
        self._timeout = timeout
        self._retries = retries
        self._max_pending = max_pending
        self._card_mac = wire.mac_bytes(card_mac)
        self._factory = transport_factory
        self._transport: Transport | None = None
        self._channel: ControlChannel | None = None
        self._futures: dict[int, asyncio.Future] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._room: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------ lifecycle
    async def open(self) -> "NpDriver":
        self._loop = asyncio.get_running_loop()
        if self._factory is not None:
            self._transport = self._factory(self._on_frame, self._loop)
        else:
            self._transport = PacketTransport(self.iface, self._on_frame, self._loop)
        self._channel = ControlChannel(self._transport.mac, self._card_mac, timeout=self._timeout,
                                       retries=self._retries, max_pending=self._max_pending)
        self._room = asyncio.Event()
        return self

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(NpTimeout(None, "driver closed"))
        self._futures.clear()
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def __aenter__(self) -> "NpDriver":
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._channel.stats) if self._channel is not None else {}

    # ------------------------------------------------------------ plumbing
    def _now(self) -> float:
        return self._loop.time()

    def _flush(self) -> None:
        channel = self._channel
        for data in channel.frames_to_send():
            self._transport.send(data)
        while (event := channel.next_event()) is not None:
            fut = self._futures.pop(event.correlator, None)
            if fut is not None and not fut.done():
                fut.set_result(event)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = channel.get_timer()
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)
        if self._room is not None:
            if channel.can_submit():
                self._room.set()
            else:
                self._room.clear()

    def _on_timer(self) -> None:
        self._timer = None
        self._channel.handle_timer(self._now())
        self._flush()

    def _on_frame(self, data: bytes) -> None:
        self._channel.receive(data, self._now())
        self._flush()

    async def _send_one(self, commands: list[Command]) -> Completed | Failed:
        if self._channel is None:
            raise RuntimeError("driver is not open")
        while not self._channel.can_submit():      # bounded in-flight requests
            self._room.clear()
            await self._room.wait()
        correlator = self._channel.submit(commands, self._now())
        fut = self._loop.create_future()
        self._futures[correlator] = fut
        self._flush()
        try:
            return await fut
        except asyncio.CancelledError:
            self._channel.cancel(correlator)
            self._futures.pop(correlator, None)
            raise

    # ------------------------------------------------------------ requests
    async def execute(self, commands: Iterable[Command], *, check: bool = True) -> list[Result]:
        """Send commands (batched into as few frames as fit) and return one Result each.

        With ``check``, the first failed command raises :class:`NpError`.
        """
        commands = list(commands)
        groups = wire.split_commands(commands)
        outcomes = await asyncio.gather(*(self._send_one(group) for group in groups))
        results: list[Result] = []
        for group, outcome in zip(groups, outcomes):
            if isinstance(outcome, Failed):
                raise NpTimeout(outcome.command or group[0].type,
                                f"{outcome.reason} on {self.iface or 'control channel'}")
            results.extend(outcome.results)
        if check:
            for result in results:
                if not result.ok:
                    raise NpError(result.request.type, result.reply.status, result.reply.body.text)
        return results

    async def one(self, body: wire.Body, cmd: Cmd | None = None, *, check: bool = True) -> Result:
        (result,) = await self.execute([wire.request(body, cmd)], check=check)
        return result

    async def echo(self, data: bytes = b"") -> bytes:
        return (await self.one(wire.Echo(data))).reply.body.data

    async def port_config(self, port: int, *, mac: str | bytes, enabled: bool = True,
                          mtu: int = 1500) -> wire.PortConfig:
        return (await self.one(wire.PortConfig(port, enabled, mtu, mac))).reply.body

    async def fwd_add(self, network: str, *, port: int, next_hop: str | bytes = b"\x00" * 6) -> None:
        await self.one(wire.FwdAdd(network, port, next_hop))

    async def fwd_delete(self, network: str, *, missing_ok: bool = False) -> bool:
        result = await self.one(wire.FwdDelete(network), check=not missing_ok)
        return result.ok

    async def rule_insert(self, rule: wire.NpRule) -> None:
        await self.one(rule)

    async def rule_delete(self, rule_id: int, *, missing_ok: bool = False) -> bool:
        result = await self.one(wire.RuleRef(rule_id), Cmd.RULE_DELETE, check=not missing_ok)
        return result.ok

    async def rule_read(self, rule_id: int) -> wire.RuleRecord:
        return (await self.one(wire.RuleRef(rule_id), Cmd.RULE_READ)).reply.body

    async def mcast_set(self, group: int, members: Iterable[tuple[str, int]]) -> None:
        await self.one(wire.McastSet(group, tuple(members)))

    async def counters(self, scope: Scope, ident: int) -> wire.Counters:
        return (await self.one(wire.CounterRef(scope, ident), Cmd.COUNTERS_READ)).reply.body

    async def counters_clear(self, scope: Scope, ident: int = wire.ALL) -> None:
        await self.one(wire.CounterRef(scope, ident), Cmd.COUNTERS_CLEAR)

    async def code_load(self, name: str) -> None:
        await self.one(wire.CodeLoad(name))

    async def dump(self, table: Table) -> list[wire.Body]:
        return list((await self.one(wire.DumpRequest(table))).entries)
