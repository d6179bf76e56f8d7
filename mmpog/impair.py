"""A seeded user-space impairing UDP relay: loss, delay, jitter (reordering) and duplication.

This kernel has no netem, so experiments put this relay between the game
clients and the reflector.  Each client gets its own upstream socket, so the
reflector still sees one address per client (and binds it with the client's
token as usual); answers come back to the client from the relay's listening
address.  Decisions come from one seeded RNG per direction, so a run is
repeatable given the same packet order.

``python -m mmpog.impair --listen 127.0.0.1:7600 --upstream 127.0.0.1:7400 --loss 0.05 --seed 1``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import socket
from dataclasses import dataclass

from cliruntime import RunContext, host_port, make_parser, non_negative_float, positive_int, probability, run_async

log = logging.getLogger("mmpog.impair")

Address = tuple[str, int]
MAX_READS = 512


class RelayError(ValueError):
    """The relay cannot run as asked: an impairment out of range, or a listening address it cannot bind."""


@dataclass
class Impairment:
    loss: float = 0.0
    delay: float = 0.0       # fixed one-way delay (s)
    jitter: float = 0.0      # extra uniform delay in [0, jitter): reorders
    duplicate: float = 0.0

    def validate(self) -> None:
        if not (0 <= self.loss <= 1 and 0 <= self.duplicate <= 1):
            raise RelayError("loss and duplicate must be probabilities in [0, 1]")
        if self.delay < 0 or self.jitter < 0:
            raise RelayError("delay and jitter must be non-negative")


class _Direction:
    """The impairment decisions for one direction (sans-IO: returns the delays to send copies at)."""

    def __init__(self, impairment: Impairment, rng: random.Random) -> None:
        self.imp = impairment
        self.rng = rng
        self.passed = 0
        self.dropped = 0
        self.duplicated = 0

    def decide(self) -> tuple[float, ...]:
        imp, rng = self.imp, self.rng
        if imp.loss and rng.random() < imp.loss:
            self.dropped += 1
            return ()
        self.passed += 1
        copies = 1
        if imp.duplicate and rng.random() < imp.duplicate:
            copies = 2
            self.duplicated += 1
        if not imp.delay and not imp.jitter:
            return (0.0,) * copies
        return tuple(imp.delay + (rng.random() * imp.jitter if imp.jitter else 0.0) for _ in range(copies))


class ImpairingRelay:
    def __init__(self, listen: Address, upstream: Address, up: Impairment, down: Impairment, seed: int = 0,
                 max_clients: int = 4096, max_in_flight: int = 65536) -> None:
        up.validate()
        down.validate()
        self.listen_addr = listen
        self.upstream = upstream
        self.up = _Direction(up, random.Random(seed))
        self.down = _Direction(down, random.Random(seed + 1))
        self.max_clients = max_clients
        self.clients: dict[Address, socket.socket] = {}
        self.refused_clients = 0
        self.send_errors = 0
        self.max_in_flight = max_in_flight
        self.in_flight = 0          # delayed datagrams waiting for their time
        self.in_flight_refused = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listen: socket.socket | None = None

    async def start(self) -> Address:
        self._loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        _big_buffers(sock)
        try:
            sock.bind(self.listen_addr)
        except OSError as exc:
            sock.close()
            raise RelayError(f"cannot bind {self.listen_addr[0]}:{self.listen_addr[1]}: {exc.strerror}") from None
        sock.setblocking(False)
        self._listen = sock
        self._loop.add_reader(sock.fileno(), self._on_client_readable)
        self.listen_addr = sock.getsockname()[:2]
        return self.listen_addr

    def close(self) -> None:
        assert self._loop is not None
        for sock in [self._listen, *self.clients.values()]:
            if sock is not None:
                with contextlib.suppress(ValueError, OSError):
                    self._loop.remove_reader(sock.fileno())
                sock.close()
        self.clients.clear()

    def _send(self, sock: socket.socket, data: bytes, addr: Address, delays: tuple[float, ...]) -> None:
        for delay in delays:
            if not delay:
                self._sendto(sock, data, addr)
            elif self.in_flight >= self.max_in_flight:
                self.in_flight_refused += 1
            else:
                self.in_flight += 1
                self._loop.call_later(delay, self._send_delayed, sock, data, addr)

    def _send_delayed(self, sock: socket.socket, data: bytes, addr: Address) -> None:
        self.in_flight -= 1
        self._sendto(sock, data, addr)

    def _sendto(self, sock: socket.socket, data: bytes, addr: Address) -> None:
        try:
            sock.sendto(data, addr)
        except OSError:
            self.send_errors += 1

    def _on_client_readable(self) -> None:
        for _ in range(MAX_READS):
            try:
                data, addr = self._listen.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            upstream = self.clients.get(addr)
            if upstream is None:
                if len(self.clients) >= self.max_clients:
                    self.refused_clients += 1
                    continue
                upstream = self._open_upstream(addr)
            delays = self.up.decide()
            if delays:
                self._send(upstream, data, self.upstream, delays)

    def _open_upstream(self, client: Address) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        _big_buffers(sock)
        sock.bind((self.listen_addr[0], 0))
        sock.setblocking(False)
        self.clients[client] = sock

        def on_readable() -> None:
            for _ in range(MAX_READS):
                try:
                    data = sock.recv(65535)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    return
                delays = self.down.decide()
                if delays:
                    self._send(self._listen, data, client, delays)

        self._loop.add_reader(sock.fileno(), on_readable)
        return sock

    def snapshot(self) -> dict:
        return {"clients": len(self.clients), "refused_clients": self.refused_clients, "send_errors": self.send_errors,
                "in_flight": self.in_flight, "in_flight_refused": self.in_flight_refused,
                "up": {"passed": self.up.passed, "dropped": self.up.dropped, "duplicated": self.up.duplicated},
                "down": {"passed": self.down.passed, "dropped": self.down.dropped, "duplicated": self.down.duplicated}}


def _big_buffers(sock: socket.socket) -> None:
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, 4 * 1024 * 1024)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("python -m mmpog.impair", "Seeded impairing UDP relay (loss, delay, jitter, duplication).",
                         examples=["python -m mmpog.impair --listen 127.0.0.1:7600 --upstream 127.0.0.1:7400 --loss 0.05 --seed 1"])
    parser.add_argument("--listen", type=host_port, required=True)
    parser.add_argument("--upstream", type=host_port, required=True)
    parser.add_argument("--loss", type=probability, default=0.0, help="loss in each direction")
    parser.add_argument("--delay", type=non_negative_float, default=0.0, help="one-way delay (s)")
    parser.add_argument("--jitter", type=non_negative_float, default=0.0, help="extra random delay (s), reorders")
    parser.add_argument("--duplicate", type=probability, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-clients", type=positive_int, default=4096)
    return parser


async def amain(args: argparse.Namespace, ctx: RunContext) -> int:
    imp = Impairment(args.loss, args.delay, args.jitter, args.duplicate)
    relay = ImpairingRelay(args.listen, args.upstream, imp, Impairment(**vars(imp)), args.seed, args.max_clients)
    ctx.stats.providers["relay"] = relay.snapshot
    addr = await relay.start()
    log.info("impairing relay %s:%d -> %s:%d", *addr, *args.upstream)
    try:
        await ctx.stop.wait()
    finally:
        relay.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_async(build_parser(), amain, argv, config_errors=(RelayError,))


if __name__ == "__main__":
    raise SystemExit(main())
