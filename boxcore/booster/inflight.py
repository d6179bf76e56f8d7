"""A count of work still running, with an event for "none left" (tests wait on it)."""

from __future__ import annotations

import asyncio


class InFlight:
    """``enter()`` / ``leave()`` around each piece of work; ``await wait_idle()`` until none runs."""

    __slots__ = ("count", "_idle")

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count <= 0:
            self.count = 0
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()
