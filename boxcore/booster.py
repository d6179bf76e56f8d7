"""The booster library (skeleton of the public API; the implementation lands next).

See docs/ARCHITECTURE.md "boxcore: the booster library" for the contract.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import os
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

DEFAULT_CONTROL = "/run/boxd/control.sock"


class VerdictKind(enum.IntEnum):
    CONSUME = 0
    PASS = 1
    MODIFY = 2


@dataclass(frozen=True, slots=True)
class Verdict:
    """What happens to a redirected packet: CONSUME, PASS, or ``Verdict.modify(payload)``."""

    kind: VerdictKind
    payload: bytes | None = None

    CONSUME: Any = None  # set below
    PASS: Any = None

    @staticmethod
    def modify(payload: bytes) -> "Verdict":
        return Verdict(VerdictKind.MODIFY, bytes(payload))

    @staticmethod
    def coerce(result: Any, rule: Any = None) -> "Verdict":
        """A handler's return value as a verdict (None means CONSUME)."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class InterceptedConnection:
    client: tuple[str, int]
    original_dst: tuple[str, int]
    cookie: int


class Subscription:
    """An installed rule whose packets keep arriving until :meth:`cancel`."""

    rule: Any
    cookie: int
    delivery: Any

    async def cancel(self) -> None:
        raise NotImplementedError


class Timer:
    def cancel(self) -> None:
        raise NotImplementedError


class Booster:
    """An asyncio booster connected to boxd.  Use as ``async with Booster(name, control=...)``."""

    def __init__(self, name: str, control: str | None = None, *, heartbeat: float = 1.0) -> None:
        self.name = name
        self.control = control or os.environ.get("BOXD_CONTROL", DEFAULT_CONTROL)
        self.stats: dict[str, int] = {}

    async def __aenter__(self) -> "Booster":
        raise NotImplementedError

    async def __aexit__(self, *exc: Any) -> None:
        raise NotImplementedError

    async def redirect(self, match: Any, handler: Callable, *, priority: int = 100) -> Subscription:
        raise NotImplementedError

    async def copy(self, match: Any, handler: Callable, *, priority: int = 100) -> Subscription:
        raise NotImplementedError

    async def intercept_tcp(self, match: Any, handler: Callable, *, priority: int = 100) -> Subscription:
        raise NotImplementedError

    def send(self, pkt: Any) -> None:
        raise NotImplementedError

    async def set_multicast_group(self, group: int, members: list[tuple[str, int]]) -> None:
        raise NotImplementedError

    def send_multicast(self, group: int, payload: bytes, *, src_port: int = 0) -> None:
        raise NotImplementedError

    def call_later(self, delay: float, fn: Callable, *args: Any) -> Timer:
        raise NotImplementedError

    def call_every(self, interval: float, fn: Callable, *args: Any) -> Timer:
        raise NotImplementedError

    async def run_handler(self, handler: Callable, *args: Any) -> Any:
        """Call a user handler (plain or coroutine); exceptions are logged and counted."""
        raise NotImplementedError

    def count_packet(self, cookie: int, nbytes: int) -> None:
        raise NotImplementedError

    async def run_until_stopped(self, stop: asyncio.Event | None = None) -> None:
        raise NotImplementedError

    async def open_udp(self, local: tuple[str, int] | None = None,
                       remote: tuple[str, int] | None = None) -> Any:
        raise NotImplementedError

    async def open_tcp(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        raise NotImplementedError


def add_booster_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control", metavar="PATH",
                        default=os.environ.get("BOXD_CONTROL", DEFAULT_CONTROL),
                        help="boxd's control socket")
